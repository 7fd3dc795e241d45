"""Shared fixtures: tiny datasets generated on the fly and a fast CPU training config."""

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(ROOT))

import MS_COCO  # noqa: E402


def make_tiny_dataset(root, n_train=48, n_test=8, seed=0):
    """The demo generator at a few dozen images (96 px long side, long-tailed, a grayscale one)."""
    root = MS_COCO.make_demo_dataset(root, n_train=n_train, n_test=n_test, seed=seed)
    # make sure at least one grayscale image is present whatever the random draw gave
    from PIL import Image
    first = sorted((root / "images" / "train-resized").glob("*.jpg"))[0]
    Image.open(first).convert("L").save(first, quality=90)
    return root


# ----------------------------------------------------------------- temporary files
# pytest.ini removes a passed test's tmp_path at its teardown. The folders that module-scoped fixtures make with
# tmp_path_factory.mktemp (test_ensemble's three runs, test_refit's and test_train_export's runs, test_interrupt's
# data and reference: 0.3-0.7 GB each) would stay to the end of the session, over 2 GB by its last modules: each is
# removed once its fixture is torn down at the end of its module, unless a test of that module failed (then it is
# kept for a look, as a failed test's tmp_path is). Session-scoped fixtures' folders (tiny, one-epoch) stay.
FAILED_MODULES = set()
MODULE_TEMP = {}                # fixture definition -> (the folders its setup made, its module's path)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        FAILED_MODULES.add(item.path)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    if fixturedef.scope not in ("module", "class") or "tmp_path_factory" not in fixturedef.argnames:
        return (yield)
    base = request.getfixturevalue("tmp_path_factory").getbasetemp()
    before = set(base.iterdir())
    try:
        return (yield)
    finally:
        MODULE_TEMP[fixturedef] = (sorted(set(base.iterdir()) - before), request.path)


def pytest_fixture_post_finalizer(fixturedef, request):
    """Runs after the fixture's own teardown code (pytest registers it as its first finalizer)."""
    made, module = MODULE_TEMP.pop(fixturedef, ((), None))
    if module not in FAILED_MODULES:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "ms-coco")


@pytest.fixture
def tiny_data(tiny_source, tmp_path):
    """A private copy of the tiny dataset (tests may damage it)."""
    dst = tmp_path / "ms-coco"
    shutil.copytree(tiny_source, dst)
    return dst


def tiny_config(tmp_path, data_dir, **overrides):
    """Settings for a seconds-long CPU run: 32 px, no pretrained weights, every output under tmp_path."""
    cfg = MS_COCO.default_config()
    cfg.update(data_dir=str(data_dir), weights="none", image_size=32, batch_size=8, epochs=2, lr=2e-3,
               device="cpu", loader_threads=1, keep_epochs=-1, run_id="t",
               checkpoint_dir=str(tmp_path / "checkpoints"), output_dir=str(tmp_path / "outputs"),
               runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), reports=False)
    cfg.update(overrides)
    return cfg


def config_argv(cfg):
    """The command line that reproduces a config dict (only the keys that differ from the defaults)."""
    defaults = MS_COCO.default_config()
    argv = []
    for key, value in cfg.items():
        if value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


def tiny_argv(tmp_path, data, **overrides):
    return config_argv(tiny_config(tmp_path, data, **overrides))


@pytest.fixture(scope="session")
def one_epoch_checkpoint(tmp_path_factory, tiny_source):
    """best_model.pth of one 1-epoch tiny_config run (run id "t"), in <tmp>/checkpoints/t/, shared
    by every module: tests may add runs beside it but must leave its own files as they found them."""
    tmp = tmp_path_factory.mktemp("one-epoch")
    MS_COCO.train(tiny_config(tmp, tiny_source, epochs=1), log=lambda *_: None)
    return tmp / "checkpoints" / "t" / "best_model.pth"


def run_main(capsys, argv, code=2, module=MS_COCO, one_line=True):
    """module.main(argv) (MS_COCO or MS_COCO_test) expected to stop with exit code `code`, no
    traceback, and one line on stderr (one_line=False: warnings may come before it); returns stderr."""
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == code, err
    assert "Traceback" not in err and (not one_line or len(err.strip().splitlines()) == 1), err
    assert code != 2 or "error: " in err, err
    return err


def snapshot(root):
    """Every file below root with its bytes ({} when root does not exist)."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def listing(folder):
    """Every entry of a folder, hidden ones included (temporary files start with a dot)."""
    return sorted(os.listdir(folder))


def written(tmp_path):
    """Everything a run wrote under the checkpoint, output and TensorBoard folders of tiny_config."""
    return [p for name in ("checkpoints", "outputs", "runs") for p in (tmp_path / name).rglob("*")]
