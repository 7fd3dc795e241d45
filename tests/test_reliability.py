"""Every run a user starts finishes or says why (issue 18): run ids of launches in one second,
claims of killed launches, a full disk, a refit whose outputs are gone, huge integers, a
predictions file with a key twice, empty label files, --max-images too small, and no false
warning on a refit. Each case is checked through the mechanism it revealed."""

import errno
import io
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import MS_COCO as M
import MS_COCO_test as T
from conftest import ROOT, run_main, tiny_argv, tiny_config, written


# ------------------------------------------------ 1. launches in the same second
def test_default_run_ids_are_unique_per_launch_and_sort_by_time(monkeypatch):
    real = time.localtime
    monkeypatch.setattr(time, "localtime", lambda *a: real(1_700_000_000))
    same_second = [M.new_run_id() for _ in range(50)]     # 8 hex digits: a repeat in 50 has p < 3e-7
    monkeypatch.setattr(time, "localtime", lambda *a: real(1_700_000_001))
    later = M.new_run_id()
    assert len(set(same_second)) == len(same_second)
    assert max(same_second) < later
    for run_id in same_second + [later]:
        M.validate_options({"run_id": run_id}, {})                # a valid --run-id (a folder name)


# ------------------------------------------------------ 2. claims of killed launches
def claimer(tmp_path, data, hold):
    """Another process that claims run "t" and then holds it (hold) or exits at once, as a launch
    killed before its first epoch ended leaves its claim behind."""
    code = (f"import sys, MS_COCO as M; "
            f"M.claim_run(M.run_dirs({tiny_config(tmp_path, data)!r}, 't'), 't'); "
            f"print('claimed', flush=True); sys.stdin.readline() if {hold} else None")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "claimed"
    return proc


def test_the_claim_of_a_killed_launch_is_taken_over_and_a_live_one_refused(tmp_path, tiny_source, capsys):
    argv = tiny_argv(tmp_path, tiny_source, epochs=1)
    proc = claimer(tmp_path, tiny_source, hold=True)
    try:
        err = run_main(capsys, argv)                              # alive: refused as before
        assert "is taken by another launch" in err and "--run-id" in err
    finally:
        proc.kill()                                               # kill -9 before its first epoch
        proc.wait()
    M.main(argv)                                                  # the same command now runs: the OS dropped
    out, err = capsys.readouterr()                                # the killed launch's lock
    assert "taken by another launch" not in out + err
    assert (tmp_path / "outputs" / "t" / "metrics.csv").is_file()


def test_the_claim_file_of_an_ended_launch_does_not_block(tmp_path, tiny_source, capsys, monkeypatch):
    """The claim is an OS lock, not a pid file: the file an ended launch leaves names nobody (no pid, no host)."""
    claimer(tmp_path, tiny_source, hold=False).wait()             # its process is gone, its lock with it
    assert (tmp_path / "checkpoints" / "t" / M.CLAIM_FILE).exists()
    monkeypatch.setattr(platform, "node", lambda: "another-host")
    M.main(tiny_argv(tmp_path, tiny_source, epochs=1))
    assert (tmp_path / "outputs" / "t" / "metrics.csv").is_file()


# -------------------------------------------------------------- 3. a full disk
def full_disk_on(monkeypatch, name):
    """Files whose name contains `name` are opened on a full disk: half a write lands, then ENOSPC."""
    class FullDisk(io.FileIO):
        def write(self, data):
            super().write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
    real_open = open

    def full_open(file, mode="r", *args, **kwargs):
        if name in os.path.basename(file) and "w" in mode:
            return FullDisk(file, "wb")
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(M, "open", full_open, raising=False)


SPACE = re.compile(r"needs at least \d+\.\d+ MiB, \d+\.\d+ MiB are free")


def test_disk_full_while_saving_a_checkpoint_is_one_line_and_keeps_the_old_one(tmp_path, tiny_source, monkeypatch,
                                                                               capsys):
    M.main(tiny_argv(tmp_path, tiny_source, epochs=1))
    ckpt = tmp_path / "checkpoints" / "t"
    before = (ckpt / "last.pth").read_bytes()
    files = sorted(os.listdir(ckpt))
    full_disk_on(monkeypatch, "last.pth")
    err = run_main(capsys, ["--resume", str(ckpt / "last.pth"), "--epochs", "2"])
    assert str(ckpt / "last.pth") in err and SPACE.search(err), err
    assert (ckpt / "last.pth").read_bytes() == before
    assert sorted(os.listdir(ckpt)) == files                      # no temporary file left


def test_disk_full_at_the_first_write_of_a_new_run_is_one_line(tmp_path, tiny_source, monkeypatch, capsys):
    full_disk_on(monkeypatch, "split.json")
    err = run_main(capsys, tiny_argv(tmp_path, tiny_source, epochs=1))
    assert "split.json" in err and SPACE.search(err), err
    assert written(tmp_path) == []                                # nothing half-made is left


# -------------------------------------------------------------- 4. and 9. refits
def test_a_normal_refit_warns_about_nothing(one_epoch_checkpoint, capsys):
    best, tmp = one_epoch_checkpoint, one_epoch_checkpoint.parents[2]
    M.main(["--refit-from", str(best), "--run-id", "refit-ok"])
    out = capsys.readouterr().out
    assert "warning" not in out and "ignored" not in out, out
    assert (tmp / "checkpoints" / "refit-ok" / "best_model.pth").is_file()


def test_refit_from_a_run_whose_outputs_were_deleted_is_one_line(one_epoch_checkpoint, capsys):
    best, tmp = one_epoch_checkpoint, one_epoch_checkpoint.parents[2]
    outputs, aside = tmp / "outputs" / "t", tmp / "outputs-aside"
    outputs.rename(aside)
    try:
        err = run_main(capsys, ["--refit-from", str(best), "--run-id", "refit-gone"])
    finally:
        aside.rename(outputs)
    assert str(outputs / "split.json") in err


# ---------------------------------------------------------- 5. integer bounds
def integer_options(module):
    return [k for k, (v, _) in M.module_constants(module).items() if type(v) is int]


@pytest.mark.parametrize("module", [M, T], ids=["MS_COCO", "MS_COCO_test"])
def test_every_integer_option_has_an_upper_bound_checked_on_the_command_line(module):
    assert integer_options(module)
    for key in integer_options(module):
        spec = module.RANGES.get(key, "")
        assert re.fullmatch(r"[\[(]\S+, \S+[\])]", spec), f"{key}: {spec!r} has no upper bound"
        flag = "--" + key.replace("_", "-")
        with pytest.raises(M.UserError, match=flag):
            M.parse_options(module, "", [flag, "99999999999999999999999"])


def test_the_largest_seed_fits_torch_and_numpy(capsys):
    top = int(float(re.fullmatch(r".*, (\S+)\]", M.RANGES["seed"]).group(1)))
    M.parse_options(M, "", ["--seed", str(top)])
    torch.manual_seed(top)
    np.random.seed(top)
    np.random.default_rng(top)
    assert "--seed" in run_main(capsys, ["--seed", "99999999999999999999999"])


# ---------------------------------------------------- 6. a predictions key twice
def test_scoring_refuses_a_key_given_twice(tmp_path, capsys):
    labels = tmp_path / "labels"
    labels.mkdir()
    for stem, ids in (("a", "1\n"), ("b", "2\n")):
        (labels / f"{stem}.cls").write_text(ids)
    preds = tmp_path / "p.json"
    preds.write_text('{"a": [1], "b": [2], "a": [3]}')
    err = run_main(capsys, ["--predictions", str(preds), "--labels", str(labels)], module=T)
    assert "'a'" in err and "more than once" in err and str(preds) in err


# ---------------------------------------------------------- 7. empty .cls files
def test_an_empty_label_file_trains_as_an_image_with_no_positive_label(tmp_path, tiny_data, capsys):
    empties = sorted((tiny_data / "labels" / "train").glob("*.cls"))[:3]
    empties[0].write_bytes(b"")
    empties[1].write_text("\n\n")
    empties[2].write_bytes(b"\xef\xbb\xbf\r\n")                    # a BOM and a Windows line end
    M.main(tiny_argv(tmp_path, tiny_data, epochs=1))
    out = capsys.readouterr().out
    assert re.search(r"data: 3 image\(s\) with no positive label", out), out
    split = json.loads((tmp_path / "outputs" / "t" / "split.json").read_text())
    assert {p.stem for p in empties} <= set(split["train"] + split["val"])
    labels = M.read_labels(tiny_data / "labels" / "train", [p.stem for p in empties])
    assert labels.shape == (3, M.NUM_CLASSES) and not labels.any()


# --------------------------------------------------------- 8. --max-images 3
def test_too_few_images_blames_max_images_when_it_was_given(tmp_path, tiny_data, capsys):
    for i, label in enumerate(sorted((tiny_data / "labels" / "train").glob("*.cls"))[:3]):
        label.write_text(f"{i}\n")                               # three classes of one image each: no split
    err = run_main(capsys, tiny_argv(tmp_path, tiny_data, max_images=3))
    assert "--max-images 3" in err and "add images" not in err
    err = run_main(capsys, tiny_argv(tmp_path, tiny_data, max_images=1))
    assert "--max-images 1" in err
