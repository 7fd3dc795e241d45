"""Several processes through torchrun (DistributedDataParallel on gloo, the CPU's backend): one set of files,
the figures and weights of a one-process run, Ctrl-C and resume with another process count, bad input ending every
rank, two "machines" on this one. Each test launches real processes: a hang fails by timeout, never blocks CI."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import MS_COCO
from conftest import ROOT, tiny_argv, written

SCRIPT = str(ROOT / "MS_COCO.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2, extra=(), timeout=240, cwd=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *extra]
    if not extra:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    return subprocess.run(cmd + [SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)


def one_process(args, timeout=240, cwd=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=cwd)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_two_processes_write_one_set_of_files_and_validate_like_one(tmp_path, tiny_source):
    # the finetune recipe's parts under DDP: a head epoch on sharded, gathered features, then EMA and ASL + sampling
    run = torchrun(tiny_argv(tmp_path, tiny_source, epochs=3, head_epochs=1, ema_decay=0.9, loss="asl",
                             class_balance="sampling"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("epoch   3/3") == 1 and run.stdout.count("head: ") == 1, run.stdout   # rank 0 logs
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "t").iterdir() if not p.name.startswith(".")) == [
        "best_model.pth", "epoch_001.pth", "epoch_002.pth", "epoch_003.pth", "last.pth"]
    rows = (tmp_path / "outputs" / "t" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "1", "2", "3"]
    assert len(list((tmp_path / "runs" / "t").glob("events.out.tfevents.*"))) == 1
    # the gathered validation equals one process scoring the saved weights on the same images
    state = MS_COCO.load_checkpoint(tmp_path / "checkpoints" / "t" / "best_model.pth")
    cfg = dict(state["config"], device="cpu")
    data = MS_COCO.load_train_set(cfg, log=lambda *_: None)
    split = json.loads((tmp_path / "outputs" / "t" / "split.json").read_text())
    val_idx = np.array([data.stems.index(s) for s in split["val"]])
    model = MS_COCO.model_from_checkpoint(state)
    _, probs = MS_COCO.evaluate(model, data.images, data.labels, val_idx, torch.device("cpu"), cfg)
    report = MS_COCO.validation_report(data.labels[val_idx], probs, MS_COCO.threshold_grid())
    assert report["best"]["f1"] == pytest.approx(state["best_score"], abs=1e-6)
    with np.load(tmp_path / "outputs" / "t" / "val_scores.npz") as z:
        assert np.allclose(z["probs"], probs, atol=1e-6)


def test_two_processes_train_the_weights_of_one_with_the_same_global_batch(tmp_path, tiny_source):
    # convnext_atto has no BatchNorm: per-rank batches change nothing; SGD keeps tiny float differences tiny.
    # 39 training images: 4 batches of 8 and one of 7, shared 3 + 4 (the shares' losses weighted by their sizes)
    common = dict(arch="convnext_atto", optimizer="sgd", lr=0.05, epochs=2, batch_size=8, crop_scale_min=0.6)
    one = one_process(tiny_argv(tmp_path / "one", tiny_source, **common))
    assert one.returncode == 0, one.stderr
    two = torchrun(tiny_argv(tmp_path / "two", tiny_source, **common))
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = (weights(tmp_path / d / "checkpoints" / "t" / "last.pth") for d in ("one", "two"))
    before = weights(tmp_path / "one" / "checkpoints" / "t" / "epoch_001.pth")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], before[k]) for k in a)    # epoch 2 trained
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), k
    first, second = (json.loads((tmp_path / d / "outputs" / "t" / "split.json").read_text()) for d in ("one", "two"))
    assert first == second


def test_a_batch_that_does_not_divide_and_a_bad_option_end_every_rank(tmp_path, tiny_source):
    for bad, message in ((["--batch-size", "7"], "--batch-size 7"), (["--lr", "-1"], "--lr -1"),
                         (["--sync-bn"], "--sync-bn"), (["--epochs", "x"], "--epochs")):
        run = torchrun(tiny_argv(tmp_path, tiny_source) + bad, timeout=120)
        assert run.returncode != 0
        ours = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
        assert len(ours) == 2 and all(message in line for line in ours), run.stderr
        assert 'MS_COCO.py", line' not in run.stderr, run.stderr     # no traceback of ours (torchrun prints its own)
        assert run.stderr.count("exitcode  : 2") + run.stderr.count("exitcode: 2") >= 1, run.stderr
        assert not written(tmp_path), written(tmp_path)                  # refused before any folder was made


def test_ctrl_c_saves_once_and_one_process_resumes(tmp_path, tiny_source):
    args = tiny_argv(tmp_path, tiny_source, epochs=40, keep_epochs=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", SCRIPT, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    out = []
    try:
        for line in proc.stdout:                    # after the first epoch line: mid-run
            out.append(line)
            if line.startswith("epoch   2/40"):
                proc.send_signal(signal.SIGINT)
                break
        out.append(proc.communicate(timeout=120)[0])
    finally:
        proc.kill()
    text = "".join(out)
    last = tmp_path / "checkpoints" / "t" / "last.pth"
    assert last.is_file(), text
    assert text.count("state saved in") == 1, text            # one writer
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert 2 <= state["epoch"] < 40
    resumed = one_process(["--resume", str(last), "--epochs", str(state["epoch"] + 2)])
    assert resumed.returncode == 0, resumed.stderr
    rows = (tmp_path / "outputs" / "t" / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, state["epoch"] + 3))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc (Linux)")
def test_sigterm_to_every_rank_saves_once_and_each_rank_exits_143(tmp_path, tiny_source):
    # as a cluster scheduler stops a job: SIGTERM to each worker, at about the same time
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend",
                             "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", SCRIPT,
                             *tiny_argv(tmp_path, tiny_source, epochs=40, keep_epochs=1)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith("epoch   2/40"):
                workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                for pid in workers:
                    os.kill(int(pid), signal.SIGTERM)
                break
        out.append(proc.communicate(timeout=120)[0])
    finally:
        proc.kill()
    text = "".join(out)
    assert len(workers) == 2 and text.count("state saved in") == 1, text
    ranks = re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s+exitcode\s*: 143", text)   # torchrun's report
    assert sorted(ranks) == ["0", "1"], text
    state = torch.load(tmp_path / "checkpoints" / "t" / "last.pth", map_location="cpu", weights_only=True)
    assert 2 <= state["epoch"] < 40


def test_one_process_under_torchrun_takes_the_ddp_path(tmp_path, tiny_source):
    # what the GPU check runs on a one-GPU machine: the process group, DDP and the gathers with one rank
    run = torchrun(tiny_argv(tmp_path, tiny_source, epochs=1), nproc=1)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("epoch   1/1") == 1 and (tmp_path / "checkpoints" / "t" / "best_model.pth").is_file()


def test_two_machines_on_this_one(tmp_path, tiny_source):
    port, args = free_port(), tiny_argv(tmp_path, tiny_source, epochs=1)
    launches = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
         "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), SCRIPT, *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV) for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in launches]
    finally:
        for p in launches:
            p.kill()
    assert [p.returncode for p in launches] == [0, 0], outs
    assert sum(o.count("epoch   1/1") for o in outs) == 1, outs
    assert (tmp_path / "checkpoints" / "t" / "best_model.pth").is_file()
