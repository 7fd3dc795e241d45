"""Paths the other tests left unexecuted (measured with coverage): the demo in-process, the
prefetcher's error and early-close paths, device names, weight files that do not fit, the
copy fallback of the epoch files, and the periodic host read of the training loop."""

import os

import numpy as np
import pytest
import torch

import MS_COCO as M
from conftest import make_tiny_dataset, tiny_config


def test_demo_in_process_on_a_small_existing_demo_folder(tmp_path, capsys):
    demo = make_tiny_dataset(tmp_path / "demo", n_train=40, n_test=6)
    M.main(["--demo", "--demo-dir", str(demo), "--epochs", "1", "--image-size", "32",
            "--checkpoint-dir", str(tmp_path / "ck"), "--output-dir", str(tmp_path / "out"),
            "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--no-reports"])
    out = capsys.readouterr().out
    assert "demo: validation challenge F1" in out
    assert len(list((tmp_path / "out").glob("*/predictions.json"))) == 1


def test_the_prefetcher_surfaces_a_worker_error_and_closes_early():
    images, labels = torch.zeros(8, 3, 4, 4, dtype=torch.uint8), torch.zeros(8, M.NUM_CLASSES)
    bad = M.BatchPrefetcher(images, labels, [np.array([0, 1]), np.array([99])], torch.device("cpu"))
    with pytest.raises(IndexError):
        list(bad)                                   # the worker thread's error, raised in the consumer
    bad.close()
    many = M.BatchPrefetcher(images, labels, [np.array([i % 8]) for i in range(50)], torch.device("cpu"), depth=1)
    next(iter(many))
    many.close()                                    # the worker waits on a full queue: it must still stop
    assert not many.thread.is_alive()


def test_device_names():
    assert M.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(M.UserError, match="MPS is not available"):
            M.pick_device("mps")


def test_weight_files_that_do_not_fit_are_one_line(tmp_path):
    model = M.build_model("resnet18", "none")
    torch.save({"a": 1, "b": "text"}, tmp_path / "odd.pth")
    with pytest.raises(M.UserError, match="not a state_dict"):
        M.load_weights_file(model, tmp_path / "odd.pth", "resnet18")
    torch.save(M.build_model("resnet50", "none").state_dict(), tmp_path / "other.pth")
    with pytest.raises(M.UserError, match="does not fit resnet18"):
        M.load_weights_file(model, tmp_path / "other.pth", "resnet18")
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(tmp_path / "same.safetensors"))
    M.load_weights_file(M.build_model("resnet18", "none"), tmp_path / "same.safetensors", "resnet18")


def test_epoch_files_are_copied_where_links_fail(tmp_path, monkeypatch):
    last = tmp_path / "last.pth"
    last.write_bytes(b"state")

    def no_links(*args):
        raise OSError("no hard links here")
    monkeypatch.setattr(os, "link", no_links)
    for epoch in (1, 2, 3):
        M.keep_epoch_file(last, tmp_path / f"epoch_{epoch:03d}.pth", keep=2)
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == ["epoch_002.pth", "epoch_003.pth"]
    assert (tmp_path / "epoch_003.pth").read_bytes() == b"state"


def test_the_loss_is_read_every_check_every_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "CHECK_EVERY", 2)
    cfg = tiny_config(tmp_path, tmp_path, batch_size=4, image_size=16)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (24, 3, 16, 16), dtype=np.uint8)
    labels = (rng.random((24, M.NUM_CLASSES)) < 0.1).astype(np.uint8)
    model = M.build_model("resnet18", "none")
    loss, seen, _ = M.train_one_epoch(M.RunState(cfg, model, M.build_optimizer(cfg, model)), images, labels,
                                      np.arange(24))
    assert seen == 24 and np.isfinite(loss)


def test_small_public_helpers(tmp_path):
    assert M.available_ram_bytes() > 0
    assert M.parse_options(M, "", ["--epochs", "7"])[0]["epochs"] == 7
    with pytest.raises(SystemExit) as stop:
        M.main(["--head-epochs", "3", "--epochs", "3", "--data-dir", str(tmp_path)])
    assert stop.value.code == 2
