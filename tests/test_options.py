"""Every option does what it says; every fault of the training side gets its one-line message.

Given options win over recipe, demo and resume settings even when they equal a default; choices
and ranges are checked before anything is written; one --run-id is one run; stops leave a run
that resumes or one that re-runs; odd files and folders never end in a traceback."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import MS_COCO as M
from conftest import ROOT, run_main, tiny_argv, tiny_config, written

QUIET = dict(log=lambda *_: None)


def metrics_epochs(tmp_path, run="t"):
    return [r["epoch"] for r in csv.DictReader((tmp_path / "outputs" / run / "metrics.csv").open())]


# ---------------------------------------------------------- 1. given options win
def test_given_option_wins_over_the_recipe_even_at_its_default(tmp_path, tiny_source):
    M.main(tiny_argv(tmp_path, tiny_source, epochs=1) + ["--recipe", "strong", "--loss", "bce"])
    config = json.loads((tmp_path / "outputs" / "t" / "config.json").read_text())
    assert config["loss"] == "bce" and config["class_balance"] == "sampling"   # given bce, recipe's sampling


def test_given_option_wins_over_the_demo():
    cfg, given = M.parse_options(M, "", ["--demo", "--epochs", str(M.EPOCHS), "--lr", str(M.LR)])
    merged = M.merge_settings(cfg, given)
    assert merged["epochs"] == M.EPOCHS and merged["lr"] == M.LR                # not the demo's 20 / 2e-3
    assert merged["image_size"] == M.DEMO_OVERRIDES["image_size"]            # the rest is the demo's


def test_resume_honours_epochs_equal_to_the_default(tmp_path, tiny_source, monkeypatch):
    monkeypatch.setattr(M, "EPOCHS", 2)                     # the constant's default is 2 in this test
    M.main(tiny_argv(tmp_path, tiny_source, epochs=1))
    M.main(["--resume", str(tmp_path / "checkpoints" / "t" / "last.pth"), "--epochs", "2"])
    assert metrics_epochs(tmp_path) == ["1", "2"]


def test_resume_honours_what_our_messages_suggest_and_warns_about_the_rest(tmp_path, tiny_source, capsys):
    M.main(tiny_argv(tmp_path, tiny_source, epochs=1))
    capsys.readouterr()
    last = tmp_path / "checkpoints" / "t" / "last.pth"
    M.main(["--resume", str(last), "--epochs", "2", "--batch-size", "4", "--lr", "1e-4", "--no-amp",
            "--loss", "asl", "--image-size", "48"])
    out = capsys.readouterr().out
    assert "warning: --loss 'asl' ignored" in out and "warning: --image-size 48 ignored" in out
    state = M.load_checkpoint(last)
    assert state["config"]["batch_size"] == 4 and state["config"]["lr"] == 1e-4 and state["config"]["amp"] is False
    assert state["config"]["loss"] == "bce" and state["config"]["image_size"] == 32
    rows = list(csv.DictReader((tmp_path / "outputs" / "t" / "metrics.csv").open()))
    assert float(rows[1]["lr"]) == pytest.approx(1e-4)      # the new lr, at the step schedule's factor 1


def test_resume_of_a_finished_run_says_how_to_extend_it(tmp_path, tiny_source, capsys):
    M.main(tiny_argv(tmp_path, tiny_source, epochs=1))
    err = run_main(capsys, ["--resume", str(tmp_path / "checkpoints" / "t" / "last.pth")])
    assert "--epochs" in err


def test_resume_of_a_run_with_the_removed_pos_weight_is_one_line(tmp_path, tiny_source, capsys):
    M.main(tiny_argv(tmp_path, tiny_source, epochs=1))
    last = tmp_path / "checkpoints" / "t" / "last.pth"
    state = torch.load(last, weights_only=True)
    state["config"]["class_balance"] = "pos_weight"         # what an older run's config may hold
    torch.save(state, last)
    err = run_main(capsys, ["--resume", str(last), "--epochs", "2"])
    assert "--class-balance 'pos_weight' was removed" in err


# ------------------------------------------------------- 2. and 3. bad values
BAD_OPTIONS = [
    (["--class-balance", "pos-weight"], "--class-balance"), (["--loss", "ASL"], "--loss"),
    (["--thresholds", "per-class"], "--thresholds"), (["--optimizer", "lamb"], "--optimizer"),
    (["--freeze", "all"], "--freeze"), (["--schedule", "linear"], "--schedule"), (["--recipe", "magic"], "--recipe"),
    (["--max-images", "-35"], "--max-images"), (["--val-fraction", "1.5"], "--val-fraction"),
    (["--val-fraction", "-0.5"], "--val-fraction"), (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-16"], "--batch-size"), (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"), (["--momentum", "1.5"], "--momentum"), (["--threshold-step", "0"], "--threshold-step"),
    (["--threshold-min", "0.9", "--threshold-max", "0.1"], "--threshold-min"),
    (["--loader-threads", "-1"], "--loader-threads"), (["--image-size", "0"], "--image-size"),
    (["--run-id", "../escape"], "--run-id"), (["--run-id", "a/b"], "--run-id"), (["--run-id", "CON:"], "--run-id"),
    (["--device", "gpu"], "--device"), (["--epochs", "ten"], "--epochs"), (["--ema-decay", "1"], "--ema-decay"),
    (["--crop-scale-min", "0"], "--crop-scale-min"), (["--keep-epochs", "-2"], "--keep-epochs"),
    (["--arch", "resnet_9000"], "--arch"), (["--arch", "fasterrcnn_resnet50_fpn"], "--arch"),
    (["--weights", "no/such/file.pth"], "--weights"),
]


@pytest.mark.parametrize("bad,option", BAD_OPTIONS, ids=[" ".join(b) for b, _ in BAD_OPTIONS])
def test_bad_value_stops_before_anything_is_written(tmp_path, tiny_source, capsys, bad, option):
    err = run_main(capsys, tiny_argv(tmp_path, tiny_source) + bad)
    assert option in err
    assert written(tmp_path) == [] and not (tmp_path / "cache").exists()


def test_help_lists_the_choices_of_every_string_option(capsys):
    with pytest.raises(SystemExit):
        M.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key, allowed in M.CHOICES.items():
        assert "{" + ",".join(allowed) + "}" in text, key


def test_device_beyond_the_machine_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(M.UserError, match=r"--device cuda:1: this machine has 1 GPU"):
        M.pick_device("cuda:1")


# ------------------------------------------------------------ 4. one run per id
def test_a_claimed_run_id_is_refused(tmp_path, tiny_source, capsys):
    dirs = M.run_dirs(tiny_config(tmp_path, tiny_source), "t")
    M.claim_run(dirs, "t")
    with pytest.raises(M.UserError, match="just taken by another launch"):
        M.claim_run(dirs, "t")
    err = run_main(capsys, tiny_argv(tmp_path, tiny_source))
    assert "is taken by another launch" in err and "--run-id" in err


def test_two_launches_with_one_run_id_at_once(tmp_path, tiny_source):
    argv = [sys.executable, str(ROOT / "MS_COCO.py")] + tiny_argv(tmp_path, tiny_source, epochs=1)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "--run-id" in loser and "Traceback" not in loser
    split = json.loads((tmp_path / "outputs" / "t" / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"])


# ------------------------------------------------------------- 6. label content
def test_label_edited_in_place_with_same_size_and_time_rebuilds(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data)
    first = M.load_train_set(cfg, log=lambda *_: None)
    label = sorted((tiny_data / "labels" / "train").glob("*.cls"))[0]
    stat = label.stat()
    text = label.read_text()
    old = int(text.split()[0])
    label.write_text(text.replace(str(old), str((old + 1) % 10), 1) if old < 9 else text.replace(str(old), "1", 1))
    assert label.stat().st_size == stat.st_size
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = M.load_train_set(cfg, log=lambda *_: None)
    assert not np.array_equal(first.labels[0], second.labels[0])
    assert np.array_equal(second.labels[0], M.read_labels(label.parent, [label.stem])[0])


# ----------------------------------------------------- 7. Ctrl-C in the cache build
def test_ctrl_c_during_the_cache_build_leaves_no_temp(tmp_path, tiny_source, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / ".train_32.99999.tmp.npy"                  # left by a killed launch
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (0, 0))                                     # untouched for long: not a live build
    live = cache / ".train_32.88888.tmp.npy"                   # another launch building right now
    live.write_bytes(b"y")

    def interrupted(paths, size, out=None, **kwargs):
        out[:2] = 1
        raise KeyboardInterrupt
    monkeypatch.setattr(M, "decode_all", interrupted)
    run_main(capsys, tiny_argv(tmp_path, tiny_source), code=130)
    assert list(cache.iterdir()) == [live] and written(tmp_path) == []


# ------------------------------------------- 8. every stop leaves a usable run
def test_stop_before_the_first_checkpoint_leaves_a_rerunnable_run(tmp_path, tiny_source, monkeypatch, capsys):
    real_save = M.save_checkpoint

    def second_ctrl_c(path, state):
        if path.name == "last.pth":
            raise KeyboardInterrupt
        real_save(path, state)
    monkeypatch.setattr(M, "save_checkpoint", second_ctrl_c)
    argv = tiny_argv(tmp_path, tiny_source, epochs=1)
    with pytest.raises(SystemExit) as exc:
        M.main(argv)
    assert exc.value.code == 130
    assert "the same command starts it again" in capsys.readouterr().out
    assert written(tmp_path) == []
    monkeypatch.setattr(M, "save_checkpoint", real_save)
    M.main(argv)                                              # re-runnable: not "already exists"
    assert metrics_epochs(tmp_path) == ["1"]


def test_stop_between_last_pth_and_metrics_leaves_a_resumable_run(tmp_path, tiny_source, monkeypatch, capsys):
    def second_ctrl_c(path, rows):
        raise KeyboardInterrupt
    monkeypatch.setattr(M, "write_metrics_csv", second_ctrl_c)
    with pytest.raises(SystemExit) as exc:
        M.main(tiny_argv(tmp_path, tiny_source, epochs=2))
    last = tmp_path / "checkpoints" / "t" / "last.pth"
    assert exc.value.code == 130 and f"--resume {last}" in capsys.readouterr().out
    monkeypatch.undo()
    M.main(["--resume", str(last)])
    assert metrics_epochs(tmp_path) == ["1", "2"]             # epoch 1's row came back from last.pth


# ------------------------------------------------------- 9. unwritable folders
@pytest.mark.parametrize("option", ["--checkpoint-dir", "--output-dir", "--runs-dir", "--cache-dir"])
def test_unwritable_folder_fails_before_training(tmp_path, tiny_source, monkeypatch, capsys, option):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(M, "train_one_epoch", lambda *a, **k: pytest.fail("trained before the check"))
    err = run_main(capsys, tiny_argv(tmp_path, tiny_source) + [option, str(blocker / "sub")])
    assert option in err
    assert not (tmp_path / "checkpoints" / "t").exists()     # the claim is released with the rest


# ------------------------------------------------------ 10. odd files and folders
def test_odd_files_in_the_training_folders(tmp_path, tiny_data, capsys):
    images, labels = tiny_data / "images" / "train-resized", tiny_data / "labels" / "train"
    first = sorted(labels.glob("*.cls"))[0]
    first.rename(first.with_suffix(".CLS"))                   # upper case is accepted like .JPG
    (labels / "folder.cls").mkdir()                           # a folder is not a label file
    (images / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (labels / "gone.cls").write_text("3\n")
    M.main(tiny_argv(tmp_path, tiny_data, epochs=1, max_bad_fraction=0.1))
    out = capsys.readouterr().out
    assert "gone" in out and "unreadable" in out              # the broken image is listed and skipped
    split = json.loads((tmp_path / "outputs" / "t" / "split.json").read_text())
    assert first.stem in split["train"] + split["val"] and "gone" not in split["train"] + split["val"]


def test_broken_label_link_is_one_line(tmp_path, tiny_data, capsys):
    label = sorted((tiny_data / "labels" / "train").glob("*.cls"))[0]
    label.unlink()
    label.symlink_to(tmp_path / "nowhere.cls")
    err = run_main(capsys, tiny_argv(tmp_path, tiny_data))
    assert label.name in err and "broken link" in err
