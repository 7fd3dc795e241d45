"""Bad input: a message naming the file and what to do, exit code 2, no traceback, nothing lost."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

import MS_COCO as M
import MS_COCO_test as T
from conftest import config_argv, run_main, snapshot, tiny_config


def first(folder, pattern):
    return sorted(folder.glob(pattern))[0]


@pytest.fixture
def previous_run(tmp_path, tiny_source):
    """Files of an earlier run that a failed launch must leave byte-identical."""
    cfg = tiny_config(tmp_path, tiny_source, epochs=1, run_id="earlier")
    M.train(cfg, log=lambda *_: None)
    return run_files(tmp_path)


def run_files(root):
    return {**snapshot(root / "checkpoints"), **snapshot(root / "outputs"), **snapshot(root / "runs")}


def bad_data_cases():
    def missing_folder(d):
        shutil.rmtree(d)
        return str(d)

    def empty_images(d):
        for p in (d / "images" / "train-resized").glob("*.jpg"):
            p.unlink()
        return "no .jpg images"

    def empty_labels(d):
        for p in (d / "labels" / "train").glob("*.cls"):
            p.unlink()
        return "no .cls label files"

    def id_out_of_range(d):
        f = first(d / "labels" / "train", "*.cls")
        f.write_text("3\n80\n")
        return f"{f.name}, line 2: class id 80 is outside 0-79"

    def not_an_integer(d):
        f = first(d / "labels" / "train", "*.cls")
        f.write_text("person\n")
        return f"{f.name}, line 1: 'person' is not an integer"

    def image_without_label(d):
        f = first(d / "labels" / "train", "*.cls")
        f.unlink()
        return f"have no label file in {d / 'labels' / 'train'}, e.g. {f.stem}"

    def label_without_image(d):
        f = first(d / "images" / "train-resized", "*.jpg")
        f.unlink()
        return f"have no image in {d / 'images' / 'train-resized'}, e.g. {f.stem}.cls"

    def too_many_unreadable(d):
        for f in sorted((d / "images" / "train-resized").glob("*.jpg"))[:3]:
            f.write_bytes(f.read_bytes()[:100])
        return "3 of 48 training images (6.2%) cannot be read, more than --max-bad-fraction 2%"

    return [missing_folder, empty_images, empty_labels, id_out_of_range, not_an_integer,
            image_without_label, label_without_image, too_many_unreadable]


@pytest.mark.parametrize("damage", bad_data_cases(), ids=lambda f: f.__name__)
def test_bad_training_data_stops_cleanly(damage, tmp_path, tiny_data, previous_run, capsys):
    expected = damage(tiny_data)
    cfg = tiny_config(tmp_path, tiny_data, run_id="new")
    err = run_main(capsys, config_argv(cfg))
    assert expected in err
    assert run_files(tmp_path) == previous_run                                   # nothing touched
    assert not (tmp_path / "checkpoints" / "new").exists()


def test_a_few_unreadable_training_images_are_skipped_and_listed(tmp_path, tiny_data, capsys):
    bad = sorted((tiny_data / "images" / "train-resized").glob("*.jpg"))[5]
    bad.write_bytes(bad.read_bytes()[:200])                                    # truncated JPEG
    lines = []
    cfg = tiny_config(tmp_path, tiny_data, epochs=1, max_bad_fraction=0.05)
    M.train(cfg, log=lines.append)
    text = "\n".join(lines)
    assert "warning: 1 unreadable training image(s) skipped" in text and bad.stem in text
    split = json.loads((tmp_path / "outputs" / "t" / "split.json").read_text())
    assert bad.stem not in split["train"] + split["val"] and len(split["train"] + split["val"]) == 47


def test_existing_run_is_not_overwritten(tmp_path, tiny_source, capsys):
    cfg = tiny_config(tmp_path, tiny_source, epochs=1)
    M.train(dict(cfg), log=lambda *_: None)
    before = snapshot(tmp_path / "checkpoints")
    err = run_main(capsys, config_argv(cfg))
    assert "already exists" in err and "--resume" in err
    assert snapshot(tmp_path / "checkpoints") == before


def test_cuda_out_of_memory_suggests_a_smaller_batch(tmp_path, tiny_source, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(M, "train_one_epoch", oom)
    err = run_main(capsys, config_argv(tiny_config(tmp_path, tiny_source)))
    assert "out of memory at batch size 8" in err and "--batch-size 4" in err


# ---------------------------------------------------------------- checkpoints
def bad_checkpoints(tmp_path, good):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": nn.Linear(2, 2).state_dict()}, foreign)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    return [(tmp_path / "missing.pth", "does not exist"), (truncated, "cannot be read"),
            (foreign, "not a checkpoint of this project"), (text, "cannot be read")]


def test_bad_checkpoint_for_export_keeps_the_old_predictions(tmp_path, one_epoch_checkpoint, tiny_source, capsys):
    out = tmp_path / "predictions.json"
    out.write_text('{"old": []}\n')
    for path, expected in bad_checkpoints(tmp_path, one_epoch_checkpoint):
        err = run_main(capsys, ["--ckpt", str(path), "--test-dir", str(tiny_source / "images" / "test-resized"),
                                "--out", str(out)], module=T)
        assert str(path) in err and expected in err
        assert out.read_text() == '{"old": []}\n'


def test_bad_checkpoint_for_resume(tmp_path, one_epoch_checkpoint, capsys):
    for path, expected in bad_checkpoints(tmp_path, one_epoch_checkpoint):
        err = run_main(capsys, ["--resume", str(path)])
        assert str(path) in err and expected in err


def test_export_without_any_run_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = run_main(capsys, [], module=T)
    assert "train first" in err and "--ckpt" in err


def test_missing_test_folder(tmp_path, one_epoch_checkpoint, capsys):
    err = run_main(capsys, ["--ckpt", str(one_epoch_checkpoint), "--test-dir", str(tmp_path / "nowhere")], module=T)
    assert "nowhere" in err and "--test-dir" in err


def test_corrupt_test_image_still_gets_a_key(tmp_path, one_epoch_checkpoint, tiny_source, capsys):
    test_dir = tmp_path / "test"
    shutil.copytree(tiny_source / "images" / "test-resized", test_dir)
    broken = first(test_dir, "*.jpg")
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (test_dir / "empty.jpg").write_bytes(b"")
    out = tmp_path / "p.json"
    T.main(["--ckpt", str(one_epoch_checkpoint), "--test-dir", str(test_dir), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    preds = json.loads(out.read_text())
    assert sorted(preds) == sorted(p.stem for p in test_dir.glob("*.jpg"))
    assert preds[broken.stem] == [] and preds["empty"] == []
    assert broken.name in err and "empty.jpg" in err and "warning" in err


# ------------------------------------------------------------ numerical faults
class NaNOnCalls(nn.Module):
    """A model whose output is NaN on the listed calls (counted from 1)."""

    def __init__(self, bad_calls):
        super().__init__()
        self.lin = nn.Linear(3, 80)
        self.bad, self.calls = set(bad_calls), 0

    def forward(self, x):
        self.calls += 1
        out = self.lin(x.mean((2, 3)))
        return out * float("nan") if self.calls in self.bad else out


def run_epoch(model, tiny_cfg):
    images = np.random.default_rng(0).integers(0, 255, (32, 3, 8, 8), dtype=np.uint8)
    labels = np.eye(80, dtype=np.uint8)[np.arange(32) % 80]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return M.train_one_epoch(M.RunState(tiny_cfg, model, opt), images, labels, np.arange(32))


def test_a_non_finite_loss_skips_the_step(tmp_path, capsys):
    cfg = tiny_config(tmp_path, tmp_path, batch_size=8)
    model = NaNOnCalls({2})
    loss, seen, _ = run_epoch(model, cfg)
    assert np.isfinite(loss) and seen == 24                                   # 3 of 4 steps counted
    assert "non-finite loss at epoch 1 step 1: step skipped" in capsys.readouterr().err
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_repeated_non_finite_losses_stop_the_run(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path, batch_size=4, max_bad_steps=3)
    with pytest.raises(M.UserError, match="3 non-finite losses in a row"):
        run_epoch(NaNOnCalls({2, 3, 4}), cfg)


def test_non_finite_losses_in_a_real_run_keep_the_last_good_checkpoint(tmp_path, tiny_source, capsys,
                                                                       monkeypatch):
    cfg = tiny_config(tmp_path, tiny_source, epochs=3)
    real = M.train_one_epoch

    def poisoned(run, *args, **kwargs):
        if run.epoch == 2:                                                    # epoch 2: every loss is NaN
            with torch.no_grad():
                for p in run.model.parameters():
                    p.mul_(float("nan"))
        return real(run, *args, **kwargs)
    M.train(dict(cfg, epochs=1), log=lambda *_: None)
    good = (tmp_path / "checkpoints" / "t" / "last.pth").read_bytes()
    monkeypatch.setattr(M, "train_one_epoch", poisoned)
    err = run_main(capsys, config_argv(dict(cfg, resume=str(tmp_path / "checkpoints" / "t" / "last.pth"))),
                   one_line=False)
    assert "non-finite losses in a row" in err
    assert (tmp_path / "checkpoints" / "t" / "last.pth").read_bytes() == good
    state = M.load_checkpoint(tmp_path / "checkpoints" / "t" / "best_model.pth")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_ctrl_c_before_training_exits_130_without_traceback(monkeypatch, capsys):
    def interrupted(cfg, log=print, given=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(M, "train", interrupted)
    with pytest.raises(SystemExit) as exc:
        M.main(["--epochs", "1"])
    assert exc.value.code == 130 and "run the same command again" in capsys.readouterr().err
