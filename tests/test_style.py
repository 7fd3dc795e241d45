"""The shape of the code, checked by walking its syntax trees: one-way imports (MS_COCO_test.py imports
MS_COCO.py, never the reverse), short functions with few parameters, a line budget for the two
scripts, and a module docstring whose section map is the file's."""

import ast
import re

import pytest

from conftest import ROOT

SCRIPTS = ("MS_COCO.py", "MS_COCO_test.py", "bench.py", "ablation.py")
MAX_LINES, MAX_PARAMS = 60, 8
# MS_COCO.py + MS_COCO_test.py: a feature pays for its lines. Issue 24 set 2,835 (the size before the redesign);
# the redesign and the fault handling of issue 25 end at 2,942 after trimming, and the open gap is stated in
# issue 24: this bound keeps the scripts from growing further until a feature is removed to close it.
LINE_BUDGET = 2942


def tree(name):
    return ast.parse((ROOT / name).read_text(encoding="utf-8"), name)


def imported_modules(module):
    """Every module the file imports or loads by name (import, from-import, import_module / __import__ calls)."""
    names = set()
    for node in ast.walk(module):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value))
    return names


def test_imports_go_one_way():
    train, export = tree("MS_COCO.py"), tree("MS_COCO_test.py")
    assert "MS_COCO" in imported_modules(export)
    assert not {m for m in imported_modules(train) if m.startswith("MS_COCO_test")}
    names = {n.id for n in ast.walk(train) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(train) if isinstance(n, ast.Attribute)}
    assert "MS_COCO_test" not in names
    touches = [n.lineno for n in ast.walk(train)
               if isinstance(n, ast.Attribute) and n.attr == "modules" and getattr(n.value, "id", "") == "sys"]
    assert not touches, f"MS_COCO.py touches sys.modules at line(s) {touches}"


def functions(name):
    for node in ast.walk(tree(name)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1, params


@pytest.mark.parametrize("name", SCRIPTS)
def test_functions_are_short_and_take_few_parameters(name):
    long = [f"{f} (line {at}): {n} lines" for f, at, n, _ in functions(name) if n > MAX_LINES]
    wide = [f"{f} (line {at}): {p} parameters" for f, at, _, p in functions(name) if p > MAX_PARAMS]
    assert not long and not wide, long + wide


def test_the_two_scripts_keep_their_line_budget():
    lines = sum(len((ROOT / f).read_text(encoding="utf-8").splitlines()) for f in ("MS_COCO.py", "MS_COCO_test.py"))
    assert lines <= LINE_BUDGET, f"MS_COCO.py + MS_COCO_test.py: {lines} lines, over {LINE_BUDGET}"


def test_the_section_map_is_the_file():
    text = (ROOT / "MS_COCO.py").read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(text))
    mapped = re.findall(r"^    ([a-z][a-z ()]*?)\s{2,}\S", doc.split("\n\n")[1], re.M)
    headers = re.findall(r"^# -+ ([a-z][a-z ()]*)$", text, re.M)
    assert mapped == headers


def test_nothing_runs_at_import_time():
    top = tree("MS_COCO.py").body
    allowed = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)
    stray = [n.lineno for n in top if not isinstance(n, allowed) and not (
        isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) and not isinstance(n, ast.If)]
    assert not stray, stray
