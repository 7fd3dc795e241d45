"""Faults met at their real mechanism: a file-size limit (RLIMIT_FSIZE) and a really full file system while a
checkpoint is written, a real pair of SIGINTs timed into torch.save, and real torchrun launches whose workers are
SIGKILLed (restarted with --max-restarts), SIGSTOPped (a hung rank: --dist-timeout) or made to fail alone (an
address-space limit set on one live worker). Every launch has a timeout, so a hang fails instead of blocking CI."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import MS_COCO as M
from conftest import ROOT, run_main, tiny_argv

POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX limits and signals")
LINUX = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc (Linux)")
SCRIPT = str(ROOT / "MS_COCO.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def no_temporary_files(folder):
    return not [p for p in Path(folder).rglob("*") if p.name.endswith((".tmp", ".tmp.npy"))]


# ------------------------------------------------------------ a file-size limit
@POSIX
def test_a_file_size_limit_while_saving_a_checkpoint_is_one_line(tmp_path, tiny_source):
    M.main(tiny_argv(tmp_path, tiny_source, epochs=1))
    last = tmp_path / "checkpoints" / "t" / "last.pth"
    before = last.read_bytes()
    limit = 1 << 20                  # 1 MiB: the CSV and JSON files fit, a ResNet-18 checkpoint does not
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            f"sys.path.insert(0, {str(ROOT)!r}); import MS_COCO; MS_COCO.main(sys.argv[1:])")
    run = subprocess.run([sys.executable, "-c", code, "--resume", str(last), "--epochs", "2"], capture_output=True,
                         text=True, timeout=300, env=ENV)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert re.match(r"error: could not write \S+\.pth: the file-size limit of this process \(1048576 bytes", lines[0])
    assert "ulimit -f" in lines[0]
    assert last.read_bytes() == before and no_temporary_files(tmp_path)


# --------------------------------------------------------- a really full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 400 MiB tmpfs mounted for the test (root and a kernel that allows it, else skipped)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.name != "posix" or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(mount)],
                                            capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk):
    """Fill the file system to the last byte, as a neighbour's job would (unbuffered: close has nothing left to
    flush into the full disk)."""
    with open(disk / "filler", "wb", buffering=0) as f:
        for block in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError:
                pass


def test_a_full_file_system_while_saving_a_checkpoint_is_one_line(tmp_path, tiny_source, small_disk, capsys):
    argv = tiny_argv(tmp_path, tiny_source, epochs=1, checkpoint_dir=str(small_disk / "checkpoints"))
    M.main(argv)
    last = small_disk / "checkpoints" / "t" / "last.pth"
    before = last.read_bytes()
    fill(small_disk)
    err = run_main(capsys, ["--resume", str(last), "--epochs", "2"])
    assert re.search(r"could not write \S+\.pth: the disk is full \([^)]*\): it needs at least \d+\.\d+ MiB, \d+\.\d+ MiB "
                     r"are free", err), err
    assert last.read_bytes() == before and no_temporary_files(small_disk)
    (small_disk / "filler").unlink()
    M.main(["--resume", str(last), "--epochs", "2"])          # room again: the same command goes on
    assert M.load_checkpoint(last)["epoch"] == 2


# ------------------------------------------------- a second Ctrl-C inside torch.save
SLOW_SAVE = """
import sys, time, torch
sys.path.insert(0, {root!r})
import MS_COCO
real = torch.save
def save(obj, f, *args, **kwargs):          # the real torch.save; its first write says so and takes a second
    if ".last.pth." not in str(getattr(f, "name", "")):
        return real(obj, f, *args, **kwargs)
    class Announcing:
        said = False
        def __getattr__(self, name):
            return getattr(f, name)
        def write(self, b):
            if not Announcing.said:
                Announcing.said = True
                print("writing last.pth", flush=True)
                time.sleep(1.0)
            return f.write(b)
    return real(obj, Announcing(), *args, **kwargs)
torch.save = save
MS_COCO.main(sys.argv[1:])
"""


@POSIX
def test_a_second_ctrl_c_while_saving_lets_the_save_finish(tmp_path, tiny_source):
    code = SLOW_SAVE.format(root=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code, *tiny_argv(tmp_path, tiny_source, epochs=3)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        seen = iter(proc.stdout.readline, "")
        assert "writing last.pth" in (line.strip() for line in seen)      # inside torch.save, epoch 1
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    last = tmp_path / "checkpoints" / "t" / "last.pth"
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert f"--resume {last}" in out + err
    assert M.load_checkpoint(last)["epoch"] == 1 and no_temporary_files(tmp_path)


# ------------------------------------------------------------------- torchrun
def torchrun_popen(args, extra=()):
    from test_ddp import free_port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *extra, SCRIPT, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def workers(proc):
    """The worker processes of a torchrun launch, by pid: torchrun starts local rank 0 first."""
    return sorted(int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())


def run_until(proc, marker, act, timeout):
    """Read the launch's output until a line starts with marker, act(), then the rest (within timeout)."""
    out, deadline = [], time.time() + timeout
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith(marker):
                act()
                break
            assert time.time() < deadline, "".join(out)
        out.append(proc.communicate(timeout=max(deadline - time.time(), 1))[0])
    finally:
        for pid in (workers(proc) if proc.poll() is None else []):
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        proc.kill()
        proc.wait()
    return "".join(out)


def epochs_in_csv(tmp_path):
    rows = (tmp_path / "outputs" / "t" / "metrics.csv").read_text().splitlines()[1:]
    return [int(r.split(",")[0]) for r in rows]


@LINUX
def test_torchrun_restarts_a_killed_worker_and_the_run_goes_on(tmp_path, tiny_source):
    epochs = 12
    proc = torchrun_popen(tiny_argv(tmp_path, tiny_source, epochs=epochs, keep_epochs=1), ["--max-restarts", "1"])
    kept = []

    def kill_rank_1():
        kept.extend((tmp_path / "outputs" / "t" / "metrics.csv").read_text().splitlines())
        os.kill(workers(proc)[1], signal.SIGKILL)          # as an OOM killer or a lost node does
    text = run_until(proc, "epoch   3/", kill_rank_1, timeout=400)
    assert proc.returncode == 0, text
    assert re.search(r"torchrun restart 1: run t continues from \S+last\.pth", text), text
    assert epochs_in_csv(tmp_path) == list(range(1, epochs + 1)), text         # every epoch once
    rows = (tmp_path / "outputs" / "t" / "metrics.csv").read_text().splitlines()
    assert rows[:len(kept)] == kept                            # the epochs before the kill were kept, not redone
    best = M.load_checkpoint(tmp_path / "checkpoints" / "t" / "best_model.pth")
    f1 = [float(r.split(",")[4]) for r in rows[1:]]
    assert best["epoch"] == 1 + f1.index(max(f1)) and best["best_score"] == pytest.approx(max(f1), abs=1e-6)


@LINUX
def test_a_fresh_torchrun_launch_with_an_existing_run_id_still_refuses(tmp_path, tiny_source):
    from test_ddp import torchrun
    assert torchrun(tiny_argv(tmp_path, tiny_source, epochs=1)).returncode == 0
    again = torchrun(tiny_argv(tmp_path, tiny_source, epochs=1), timeout=120)
    assert again.returncode != 0 and "run t already exists" in again.stderr, again.stderr


@LINUX
def test_a_hung_rank_ends_the_job_within_the_dist_timeout(tmp_path, tiny_source):
    proc = torchrun_popen(tiny_argv(tmp_path, tiny_source, epochs=40, keep_epochs=1) + ["--dist-timeout", "0.25"])
    stopped = []

    def stop_rank_1():
        stopped.append(time.time())
        os.kill(workers(proc)[1], signal.SIGSTOP)        # as a hung GPU or a frozen node
    text = run_until(proc, "epoch   2/40", stop_rank_1, timeout=300)
    took = time.time() - stopped[0]
    assert proc.returncode != 0 and took < 120, (took, text)        # 15 s of timeout, then torchrun's teardown
    ours = [line for line in text.splitlines() if line.startswith("error: rank 0:")]
    assert len(ours) == 1 and "rank 1 stopped answering" in ours[0] and "--dist-timeout 0.25" in ours[0], text
    assert "--resume " in ours[0] and 'MS_COCO.py", line' not in text, text
    assert M.load_checkpoint(tmp_path / "checkpoints" / "t" / "last.pth")["epoch"] >= 2


@LINUX
def test_a_cache_build_longer_than_the_dist_timeout_does_not_trip_it(tmp_path):
    """Rank 0 decodes while rank 1 waits: 30 large PNGs (hard links of one) take longer than --dist-timeout 0.1
    (6 s) to decode on one thread, yet the job trains on."""
    import numpy as np
    from PIL import Image
    source = M.make_demo_dataset(tmp_path / "ms-coco", n_train=24, n_test=4)
    pixels = np.zeros((6000, 6000, 3), np.uint8)
    pixels[..., 0], pixels[..., 1] = np.arange(6000)[None, :] % 256, (np.arange(6000)[:, None] * 7) % 256
    big = tmp_path / "big.png"
    Image.fromarray(pixels).save(big, compress_level=1)
    for i in range(30):
        os.link(big, source / "images" / "train-resized" / f"big{i:02d}.png")
        (source / "labels" / "train" / f"big{i:02d}.cls").write_text("0\n")
    from test_ddp import torchrun
    run = torchrun(tiny_argv(tmp_path, source, epochs=1) + ["--dist-timeout", "0.1"], timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    took = float(re.search(r"decoded 54 images at 32px in ([\d.]+)s", run.stdout)[1])
    assert took > 6, run.stdout            # the build did outlast the timeout


@LINUX
def test_an_error_on_one_rank_ends_every_rank_and_names_it(tmp_path, tiny_source):
    import resource
    proc = torchrun_popen(tiny_argv(tmp_path, tiny_source, epochs=40, keep_epochs=1))
    failed = []

    def starve_rank_1():            # its next allocations fail: a real out-of-memory error on that rank alone
        pid = workers(proc)[1]
        size = int(Path(f"/proc/{pid}/status").read_text().split("VmSize:")[1].split()[0]) * 1024
        resource.prlimit(pid, resource.RLIMIT_AS, (size // 2, size // 2))   # below its use: no new mapping
        failed.append(time.time())
    text = run_until(proc, "epoch   2/40", starve_rank_1, timeout=300)
    assert proc.returncode != 0 and time.time() - failed[0] < 90, text
    ours = [line for line in text.splitlines() if line.startswith("error: rank ")]
    assert any(line.startswith("error: rank 1:") and "every rank stops" in line for line in ours), text
    assert any("--resume " in line for line in ours), text
    assert M.load_checkpoint(tmp_path / "checkpoints" / "t" / "last.pth")["epoch"] >= 2


# ------------------------------------------------------------- --dropout, the hub
def test_a_dropout_checkpoint_of_an_earlier_version_loads(one_epoch_checkpoint, tmp_path):
    """--dropout (removed) made the head Sequential(Dropout, Linear): its keys are fc.1.weight, fc.1.bias."""
    state = M.load_checkpoint(one_epoch_checkpoint)
    old = dict(state, config=dict(state["config"], dropout=0.2),
               model={k.replace("fc.", "fc.1.") if k.startswith("fc.") else k: v for k, v in state["model"].items()})
    path = tmp_path / "dropout.pth"
    M.save_checkpoint(path, old)
    model = M.model_from_checkpoint(M.load_checkpoint(path))
    assert torch.equal(model.fc.weight, state["model"]["fc.weight"])


def test_hub_weights_offline_fail_in_seconds(monkeypatch):
    import socket
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        pytest.skip("the hub is reachable from here")
    except OSError:
        pass
    t0 = time.time()
    with pytest.raises(M.UserError, match="could not fetch timm's ImageNet weights for convnext_atto"):
        M.build_model("convnext_atto", "imagenet")
    assert time.time() - t0 < 10
