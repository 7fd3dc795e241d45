"""The documentation matches the code: every option the four scripts accept is documented, the
defaults and recipes in docs/options.md (and the readme's option table) are the code's, the
readme stays a product page of at most 2,000 words whose links resolve, and two statements
that contradicted the code stay gone. No training runs: the parsers are built and inspected."""

import argparse
import math
import re

import pytest

import ablation
import bench
import MS_COCO as M
import MS_COCO_test as T
from conftest import ROOT

README = ROOT / "readme.md"
DOCS = ROOT / "docs"
SCRIPTS = {"MS_COCO.py": M, "MS_COCO_test.py": T, "ablation.py": ablation, "bench.py": bench}

# Words about the machines this project was developed on: none belongs in the documentation.
FORBIDDEN = [r"\blent\b", r"\bdrawn\b", r"\bcarry\b", r"\$OUT\b", r"\bdevice status\b", r"\bdevice time\b",
             r"\bthe device tool\b"]
# Statements that contradicted the code (the default is per_class; the finetune recipe has one head epoch).
STALE = [r"--thresholds global`?\s+is\s+(now\s+)?the\s+default", r"\bits\s+(3|three)\s+head\s+epochs",
         r"head\s+phase\s+is\s+(3|three)\s+epochs"]


def pages():
    return [README] + sorted(DOCS.glob("*.md"))


def all_text():
    return "\n".join(p.read_text(encoding="utf-8") for p in pages())


class Captured(BaseException):
    """Raised in place of parsing: a BaseException, so that no script's error handling catches it."""


def accepted_options(monkeypatch, script):
    """Every --option string of the parser a script's main builds (its own options and any added ones)."""
    module, parsers = SCRIPTS[script], []

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise Captured
    monkeypatch.delenv("WORLD_SIZE", raising=False)          # not under torchrun: main builds the parser only
    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(Captured):
            module.main([])
    assert parsers, f"{script}: main built no parser"
    return {s for action in parsers[0]._actions for s in action.option_strings if s.startswith("--")}


def constants(module):
    return M.module_constants(module)


def documented(option, text):
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_of_every_script_is_documented(script, monkeypatch):
    options = accepted_options(monkeypatch, script)
    flags = {"--" + key.replace("_", "-") for key in constants(SCRIPTS[script])}
    assert flags <= options                                    # the capture saw the real parser
    text = all_text()
    missing = sorted(o for o in options if not documented(o, text))
    assert not missing, f"{script}: options in no page of readme.md or docs/: {missing}"


def test_the_readme_is_at_most_2000_words():
    words = len(README.read_text(encoding="utf-8").split())
    assert words <= 2000, f"readme.md has {words} words"


@pytest.mark.parametrize("pattern", FORBIDDEN)
def test_no_word_about_the_development_machines(pattern):
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in pages()
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(pattern, line, re.I)]
    assert not hits, hits


@pytest.mark.parametrize("pattern", STALE)
def test_the_statements_that_contradicted_the_code_are_gone(pattern):
    hits = [str(p.relative_to(ROOT)) for p in pages() if re.search(pattern, p.read_text(encoding="utf-8"), re.I)]
    assert not hits, hits
    assert M.THRESHOLDS == "per_class" or "thresholds" not in pattern


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", page.read_text(encoding="utf-8"), re.M)}


def test_every_relative_link_resolves():
    for page in pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):                  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.is_file(), f"{page.relative_to(ROOT)}: link to missing {target}"
            if anchor and file.suffix == ".md":
                assert anchor in anchors(file), f"{page.relative_to(ROOT)}: no heading #{anchor} in {path}"


def test_the_readme_links_every_docs_page():
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", README.read_text(encoding="utf-8")))
    assert linked, "readme.md links to no page of docs/"
    for name in linked:
        assert (ROOT / name).is_file(), name
    assert {f"docs/{p.name}" for p in DOCS.glob("*.md")} <= linked


# ------------------------------------------------------------------ defaults
def cell_value(cell):
    """A default as written in a table: on/off, `text`, `""`, or a number (leading token); None otherwise."""
    cell = cell.strip()
    if cell in ("on", "off"):
        return cell == "on"
    if cell == '`""`':
        return ""
    if re.fullmatch(r"`[^`]*`", cell):
        return cell[1:-1]
    token = cell.split(" ", 1)[0]
    try:
        return float(token)
    except ValueError:
        return None


def table_defaults(lines):
    """[(option, default cell)] of the table rows whose first cell names options."""
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`--") or "`--" in cells[1]:   # not a bundle's settings
            continue
        opts = re.findall(r"`(--[a-z0-9-]+)`", cells[0])
        opts = [o for o in opts if not (o.startswith("--no-") and "--" + o[5:] in opts)]
        parts = [p.strip() for p in cells[1].split(",")]
        rows += list(zip(opts, parts)) if len(opts) > 1 and len(parts) == len(opts) else [(opts[0], cells[1])]
    return rows


def check_default(module, option, cell, strict):
    key = option[2:].replace("-", "_")
    if key not in constants(module):
        return None
    value, shown = getattr(module, key.upper()), cell_value(cell)
    if shown is None:
        assert not strict, f"{option}: default {cell!r} is not readable (on/off, `text`, `\"\"` or a number)"
        return key
    if isinstance(value, tuple):                                # shown as its items, comma-separated
        value = ", ".join(map(str, value))
    if isinstance(value, (bool, str)):
        assert shown == value, f"{module.__name__} {option}: documented default {cell!r}, the code's is {value!r}"
    else:
        assert isinstance(shown, float) and math.isclose(shown, value), \
            f"{module.__name__} {option}: documented default {cell!r}, the code's is {value!r}"
    return key


def options_sections():
    """{script: lines of its section} of docs/options.md (sections are '## <script>...')."""
    sections, current = {}, None
    for line in (DOCS / "options.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            current = next((s for s in SCRIPTS if line[3:].startswith(s)), None)
            sections.setdefault(current, [])
        elif current:
            sections[current].append(line)
    return sections


@pytest.mark.parametrize("script", SCRIPTS)
def test_options_page_lists_each_constant_with_the_codes_default(script):
    module, lines = SCRIPTS[script], options_sections().get(script)
    assert lines, f"docs/options.md has no section '## {script}'"
    strict = script in ("MS_COCO.py", "MS_COCO_test.py")
    checked = {check_default(module, o, cell, strict) for o, cell in table_defaults(lines)}
    missing = sorted(set(constants(module)) - checked)
    assert not missing, f"docs/options.md, {script}: no table row for {missing}"


def test_readme_option_table_shows_the_codes_defaults():
    for option, cell in table_defaults(README.read_text(encoding="utf-8").splitlines()):
        check_default(M, option, cell, strict=False)


def test_recipes_and_demo_are_documented_as_the_code_sets_them():
    text = (DOCS / "options.md").read_text(encoding="utf-8")
    bundles = dict(M.RECIPES, **{"--demo": M.DEMO_OVERRIDES})
    found = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = cells[0].strip("`") if len(cells) >= 2 else None
        if name not in bundles:
            continue
        pairs = re.findall(r"`--([a-z0-9-]+) ([^`]+)`", cells[1])
        kinds = {k: type(v) for k, (v, _) in constants(M).items()}
        found[name] = {k.replace("-", "_"): kinds[k.replace("-", "_")](v) for k, v in pairs}
    assert set(found) == set(bundles), f"docs/options.md documents {sorted(found)}, the code has {sorted(bundles)}"
    for name, settings in bundles.items():
        assert found[name] == settings, f"{name}: documented {found[name]}, the code sets {settings}"


def test_the_options_a_resume_may_change_are_the_codes():
    text = (DOCS / "options.md").read_text(encoding="utf-8")
    section = text.split("### Resume", 1)[1].split("Any other option", 1)[0]
    listed = {o[2:].replace("-", "_") for o in re.findall(r"`(--[a-z0-9-]+)`", section)} - {"resume"}
    assert listed == set(M.RESUMABLE), f"docs/options.md lists {sorted(listed)}, the code {sorted(M.RESUMABLE)}"
