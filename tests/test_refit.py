"""--refit-from: the source run's settings and thresholds, every labelled image in training,
the best epoch count scaled to the same number of steps, and nothing scored on seen images."""

import json

import numpy as np
import pytest

import MS_COCO as M
import MS_COCO_test as T
from conftest import config_argv, tiny_config


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_source):
    tmp = tmp_path_factory.mktemp("refit")
    cfg = tiny_config(tmp, tiny_source, epochs=3, run_id="src", lr_step=2)
    result = M.train(cfg, log=lambda *_: None)
    return tmp, cfg, M.load_checkpoint(result["best_path"])


def test_refit_trains_on_every_image_and_keeps_the_thresholds(source, capsys):
    tmp, cfg, src = source
    M.main(["--refit-from", str(tmp / "checkpoints" / "src" / "best_model.pth")])
    out = capsys.readouterr().out
    refit = M.load_checkpoint(tmp / "checkpoints" / "src-refit" / "best_model.pth")
    split = json.loads((tmp / "outputs" / "src-refit" / "split.json").read_text())
    source_split = json.loads((tmp / "outputs" / "src" / "split.json").read_text())
    assert sorted(split["train"]) == sorted(source_split["train"] + source_split["val"]) and split["val"] == []
    scale = len(source_split["train"]) / (len(source_split["train"]) + len(source_split["val"]))
    assert refit["epoch"] == refit["config"]["epochs"] == max(1, round(src["epoch"] * scale))
    assert refit["config"]["lr_step"] == max(1, round(2 * scale))
    assert refit["refit"] == {"source_run": "src", "source_epoch": src["epoch"], "epochs": refit["epoch"]}
    assert refit["threshold"] == src["threshold"] and refit["thresholds"] == src["thresholds"]
    assert refit["val_metrics"] == src["val_metrics"]                  # the source's, not re-measured
    assert "refit: no validation" in out and not (tmp / "outputs" / "src-refit" / "val_scores.npz").exists()
    assert not np.allclose(refit["model"]["fc.weight"].numpy(), src["model"]["fc.weight"].numpy())


def test_a_refit_exports_like_any_run(source, tiny_source, tmp_path):
    tmp, _, _ = source
    if not (tmp / "checkpoints" / "src-refit" / "best_model.pth").exists():
        M.main(["--refit-from", str(tmp / "checkpoints" / "src" / "best_model.pth")])
    preds = T.main(["--ckpt", str(tmp / "checkpoints" / "src-refit" / "best_model.pth"), "--device", "cpu",
                    "--test-dir", str(tiny_source / "images" / "test-resized"), "--out", str(tmp_path / "p.json")])
    assert set(preds) == {p.stem for p in (tiny_source / "images" / "test-resized").glob("*.jpg")}


def test_refit_from_a_missing_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        M.main(["--refit-from", str(tmp_path / "nope.pth")])
    assert exc.value.code == 2 and "nope.pth" in capsys.readouterr().err
