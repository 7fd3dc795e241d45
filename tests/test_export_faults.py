"""Faults on the export side (MS_COCO_test.py): a bad predictions file to score, a bad --out,
odd test folders, Ctrl-C, bad devices and options. Each stops with one line naming the file or
option, exit code 2 (130 for Ctrl-C), no traceback, and an existing predictions.json left
byte-identical."""

import json
import os
import shutil

import pytest
import torch

import MS_COCO as M
import MS_COCO_test as T
from conftest import listing, run_main, snapshot

OLD = b'{\n "old": [1]\n}\n'


@pytest.fixture
def old_out(tmp_path):
    """An earlier predictions.json that a failed export must leave byte-identical."""
    out = tmp_path / "out" / "predictions.json"
    out.parent.mkdir()
    out.write_bytes(OLD)
    return out


@pytest.fixture
def test_images(tmp_path, tiny_source):
    """A private copy of three tiny test images."""
    folder = tmp_path / "test"
    folder.mkdir()
    for path in sorted((tiny_source / "images" / "test-resized").glob("*.jpg"))[:3]:
        shutil.copy(path, folder)
    return folder


def export_argv(checkpoint, test_dir, out, *more):
    return ["--ckpt", str(checkpoint), "--test-dir", str(test_dir), "--out", str(out), "--device", "cpu",
            "--loader-threads", "1", *more]


def no_loading(monkeypatch):
    """Make loading a checkpoint fail the test: the check under test must come first."""
    def load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the check")
    monkeypatch.setattr(M, "load_checkpoint", load)


# ------------------------------------------------------------------ scoring
@pytest.fixture
def labels(tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    for stem, text in (("a", "1\n5\n"), ("b", "0\n"), ("c", "79\n")):
        (folder / f"{stem}.cls").write_text(text)
    return folder


def score(capsys, tmp_path, labels, text):
    """Score a predictions file holding `text`; returns stderr, checking the file and labels stay."""
    path = tmp_path / "predictions.json"
    path.write_text(text)
    before = snapshot(tmp_path)
    err = run_main(capsys, ["--predictions", str(path), "--labels", str(labels)], module=T)
    assert snapshot(tmp_path) == before
    assert str(path) in err
    return err


def test_scoring_a_valid_file(tmp_path, labels, capsys):
    path = tmp_path / "predictions.json"
    path.write_text('{"a": [1, 5], "b": [0], "c": [79]}')
    scores = T.main(["--predictions", str(path), "--labels", str(labels)])
    assert scores["f1"] == pytest.approx(1.0) and scores["images"] == 3
    assert "challenge F1 1.0000" in capsys.readouterr().out


@pytest.mark.parametrize("value, shown, why", [
    ('["3"]', '"3"', "not an integer 0-79"),           # used to score as an empty prediction
    ("[3.0]", "3.0", "not an integer 0-79"),
    ("[80]", "80", "not an integer 0-79"),              # used to be dropped silently
    ("[-1]", "-1", "not an integer 0-79"),
    ("[true]", "true", "not an integer 0-79"),          # a bool is an int subclass in Python
    ("[null]", "null", "not an integer 0-79"),
    ('"0"', '"0"', "not a list of class ids"),
    ("[0, 0]", "[0, 0]", "not unique and ascending"),
])
def test_scoring_rejects_a_bad_class_id(tmp_path, labels, capsys, value, shown, why):
    err = score(capsys, tmp_path, labels, f'{{"a": [1, 5], "b": {value}, "c": [79]}}')
    assert "key 'b'" in err and shown in err and why in err


def test_scoring_names_the_first_offending_key(tmp_path, labels, capsys):
    err = score(capsys, tmp_path, labels, '{"a": [1, 5], "c": [80], "b": ["3"]}')
    assert "key 'c'" in err and "80" in err and "'b'" not in err


def test_scoring_needs_one_key_per_label_file(tmp_path, labels, capsys):
    err = score(capsys, tmp_path, labels, '{"a": [1, 5], "b": [0], "d": [2]}')
    assert "one key per label file" in err and str(labels) in err
    assert "1 missing ('c')" in err and "1 extra ('d')" in err
    err = score(capsys, tmp_path, labels, json.dumps({f"x{i}": [] for i in range(6)}))
    assert "3 missing ('a', 'b', 'c')" in err and "6 extra ('x0', 'x1', 'x2', ...)" in err


def test_export_and_scoring_share_one_check(labels):
    preds = {"a": [1, 5], "b": [True], "c": [79]}
    with pytest.raises(M.UserError, match="key 'b': class id true") as export_side:
        T.check_predictions(preds, ["a", "b", "c"])
    with pytest.raises(M.UserError, match="key 'b': class id true") as scoring_side:
        T.score_predictions(preds, labels)
    assert str(export_side.value).split(": ", 1)[1] == str(scoring_side.value).split(": ", 1)[1]


# -------------------------------------------------------------------- --out
def out_is_a_folder(tmp_path):
    return tmp_path / "out"


def parent_is_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    return tmp_path / "notes.txt" / "predictions.json"


def grandparent_is_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    return tmp_path / "notes.txt" / "sub" / "predictions.json"


@pytest.mark.parametrize("bad_out", [out_is_a_folder, parent_is_a_file, grandparent_is_a_file],
                         ids=lambda f: f.__name__)
def test_bad_out_is_refused_before_predicting(bad_out, tmp_path, old_out, capsys, monkeypatch):
    out = bad_out(tmp_path)
    before = snapshot(tmp_path)
    no_loading(monkeypatch)
    err = run_main(capsys, ["--ckpt", "any.pth", "--out", str(out)], module=T)
    assert f"--out {out}" in err and ("folder" in err or "file" in err)
    assert snapshot(tmp_path) == before


def test_out_in_an_unwritable_folder_is_refused_before_predicting(tmp_path, old_out, capsys, monkeypatch):
    """Simulated (this also runs as root): every file created in the folder is refused."""
    real_open = os.open

    def refusing_open(path, *args, **kwargs):
        if os.path.dirname(os.fspath(path)) == str(old_out.parent):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", refusing_open)
    no_loading(monkeypatch)
    err = run_main(capsys, ["--ckpt", "any.pth", "--out", str(old_out)], module=T)
    assert f"--out {old_out}" in err and "cannot write" in err and "Permission denied" in err
    assert old_out.read_bytes() == OLD and listing(old_out.parent) == ["predictions.json"]


def test_out_in_a_read_only_folder_is_refused_before_predicting(tmp_path, old_out, capsys, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the simulated variant above covers this")
    old_out.parent.chmod(0o555)
    try:
        no_loading(monkeypatch)
        err = run_main(capsys, ["--ckpt", "any.pth", "--out", str(old_out)], module=T)
    finally:
        old_out.parent.chmod(0o755)
    assert f"--out {old_out}" in err and "cannot write" in err
    assert old_out.read_bytes() == OLD and listing(old_out.parent) == ["predictions.json"]


# -------------------------------------------------------------- test folder
def test_same_stem_twice_is_refused(one_epoch_checkpoint, test_images, old_out, capsys):
    twin = sorted(test_images.glob("*.jpg"))[0]
    shutil.copy(twin, twin.with_suffix(".png"))
    err = run_main(capsys, export_argv(one_epoch_checkpoint, test_images, old_out), module=T)
    assert repr(twin.stem) in err and twin.name in err and twin.with_suffix(".png").name in err
    assert old_out.read_bytes() == OLD and listing(old_out.parent) == ["predictions.json"]


def test_odd_entries_of_the_test_folder(one_epoch_checkpoint, test_images, tmp_path, capsys):
    """Upper-case .JPG is an image; a broken link gets its key (empty) with a warning, like an
    unreadable image; a folder named y.jpg is skipped (M.list_images leaves folders out)."""
    first = sorted(test_images.glob("*.jpg"))[0]
    first.rename(test_images / "UPPER.JPG")
    (test_images / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (test_images / "y.jpg").mkdir()
    out = tmp_path / "p.json"
    preds = T.main(export_argv(one_epoch_checkpoint, test_images, out))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert json.loads(out.read_text()) == preds
    assert "UPPER" in preds and preds["dangling"] == [] and "y" not in preds and len(preds) == 4
    assert "dangling.jpg cannot be read" in err and "y.jpg" not in err


# ------------------------------------------------------------------ Ctrl-C
def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["decode_all", "predict", "replace"])
def test_ctrl_c_keeps_the_old_predictions(where, one_epoch_checkpoint, test_images, old_out, capsys, monkeypatch):
    monkeypatch.setattr(M.os if where == "replace" else M, where, interrupt)   # replace: while writing
    err = run_main(capsys, export_argv(one_epoch_checkpoint, test_images, old_out), code=130, module=T)
    assert "interrupted" in err and "run the same command again" in err
    monkeypatch.undo()
    assert old_out.read_bytes() == OLD and listing(old_out.parent) == ["predictions.json"]


# ------------------------------------------------------------------ devices
def test_unknown_device_lists_the_accepted_forms(old_out, capsys, monkeypatch):
    no_loading(monkeypatch)
    err = run_main(capsys, ["--device", "gpu", "--out", str(old_out)], module=T)
    assert "--device 'gpu'" in err and all(form in err for form in ("auto", "cpu", "cuda:N", "mps"))
    assert old_out.read_bytes() == OLD


def fake_gpus(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_pick_device_refuses_a_gpu_index_beyond_the_machine(monkeypatch):
    fake_gpus(monkeypatch, 1)
    with pytest.raises(M.UserError, match="--device cuda:1") as exc:
        M.pick_device("cuda:1")
    assert "\n" not in str(exc.value)
    assert M.pick_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.parametrize("gpus, device, expected", [(1, "cuda:1", "--device cuda:1"),
                                                    (0, "cuda", "CUDA is not available")])
def test_export_with_a_missing_gpu_stops_cleanly(gpus, device, expected, one_epoch_checkpoint, test_images, old_out,
                                                 capsys, monkeypatch):
    fake_gpus(monkeypatch, gpus)
    argv = export_argv(one_epoch_checkpoint, test_images, old_out)
    argv[argv.index("--device") + 1] = device
    err = run_main(capsys, argv, module=T)
    assert expected in err
    assert old_out.read_bytes() == OLD and listing(old_out.parent) == ["predictions.json"]


# ------------------------------------------------------------------ options
def test_help_shows_the_choices_of_string_options(capsys):
    with pytest.raises(SystemExit) as exc:
        T.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())          # argparse wraps lines anywhere
    assert exc.value.code == 0
    assert all(choice in out for choice in T.THRESHOLD_OPTIONS)
    assert "{,global,per_class}" in out.replace(" ", "")
    assert "cuda:N" in out and "mps" in out                   # --device: a pattern, shown in its help


def test_unknown_thresholds_stops_before_anything_is_written(tmp_path, old_out, capsys, monkeypatch):
    before = snapshot(tmp_path)
    no_loading(monkeypatch)
    err = run_main(capsys, ["--thresholds", "per-class", "--out", str(old_out)], module=T)
    assert "--thresholds" in err and "'per-class'" in err and "per_class" in err
    assert snapshot(tmp_path) == before
