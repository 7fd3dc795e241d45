"""The training step never waits for the device and copies nothing to it but the batch: the
transfers of an epoch (device-to-host reads, and host-to-device copies of values made on the
host) do not grow with its number of steps, on every recipe and on both data paths. Counted on
the CPU under a TorchFunctionMode, which sees the very calls a GPU run makes: the data path is
the same lines on every device (images as one tensor gathered with index_select, or the host
path), and only the pinned ring of the host path is CUDA-only."""

import sys
import threading

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import MS_COCO as M
from conftest import tiny_config

READS = {torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__int__,
         torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__array__}
# Tensors built from host values: on a GPU each is a host-to-device copy.
BUILT_FROM_HOST = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor, torch.Tensor.pin_memory,
                   torch.Tensor.cuda}
DEVICE_ARGS = (torch.device, str, torch.Tensor)


def ours(frame):
    """A call made by MS_COCO.py. torch's own .to(device) calls (the gradient scaler's) move
    tensors that already live on the device: on a GPU they copy nothing."""
    return frame.f_code.co_filename == M.__file__


class CountTransfers(TorchFunctionMode):
    """Counts device-to-host reads and host-to-device copies (tensors built from Python or
    numpy values, .to(device)), outside optimizer.step() (its own counters stay on the host)."""

    def __init__(self):
        super().__init__()
        self.reads, self.copies, self.paused = [], [], False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            name = getattr(func, "__qualname__", str(func))
            if func in READS:
                self.reads.append(name)
            elif func in BUILT_FROM_HOST or (func is torch.Tensor.to and ours(sys._getframe(1))
                                             and args[0].dtype != torch.uint8      # the batch itself
                                             and ("device" in kwargs or any(isinstance(a, DEVICE_ARGS)
                                                                            for a in args[1:]))):
                self.copies.append(name)
        return func(*args, **kwargs)


RECIPES = {
    "default": {},
    "strong": dict(M.RECIPES["strong"]),
    "ema": dict(ema_decay=0.99),
    "finetune": dict(M.RECIPES["finetune"], freeze="partial"),
    "finetune-head": dict(M.RECIPES["finetune"]),      # the head phase, on cached features
    "sgd": dict(optimizer="sgd"),
}


def epoch_transfers(steps, tmp_path, monkeypatch, on_device, recipe):
    """(reads, copies) of one training epoch of `steps` batches of 4 images."""
    cfg = tiny_config(tmp_path, tmp_path, batch_size=4, image_size=16, **RECIPES[recipe])
    rng = np.random.default_rng(0)
    n = 4 * steps
    images = rng.integers(0, 255, (n, 3, 16, 16), dtype=np.uint8)
    labels = (rng.random((n, M.NUM_CLASSES)) < 0.1).astype(np.uint8)
    labels[:, 0] = 1
    device = torch.device("cpu")
    model = M.build_model("resnet18", "none", freeze=cfg["freeze"])
    rows = np.arange(n)
    features, head_only = None, False
    if recipe == "finetune-head":
        head_only = M.freeze_for_epoch(model, cfg, 1)
        features = torch.from_numpy(M.backbone_features(model, images, device, cfg, rows))
    repeat = M.repeat_factors(labels, cfg["sampling_threshold"]) if cfg["class_balance"] == "sampling" else None
    opt = M.build_optimizer(cfg, model)
    scheduler = M.build_scheduler(cfg, opt, M.count_steps(n, 4))
    criterion = M.build_criterion(cfg)
    ema = M.build_ema(model, cfg)
    images, labels = M.place_images(images, labels, device, dict(cfg, data_on_gpu=on_device), print)
    assert isinstance(images, torch.Tensor) == on_device
    mode = CountTransfers()
    M.channel_stats.cache_clear()                   # both runs build mean and std once
    step = opt.step

    def step_uncounted(*args, **kwargs):
        mode.paused = True
        try:
            return step(*args, **kwargs)
        finally:
            mode.paused = False
    monkeypatch.setattr(opt, "step", step_uncounted)
    from_numpy = torch.from_numpy                     # not a torch function: seen through a wrapper

    def counted_from_numpy(a):
        if threading.current_thread() is threading.main_thread():    # the prefetch thread's are the batch itself
            mode.copies.append("from_numpy")
        return from_numpy(a)
    monkeypatch.setattr(torch, "from_numpy", counted_from_numpy)
    with mode:
        run = M.RunState(cfg, model, opt, device, scheduler, ema=ema, criterion=criterion, repeat=repeat)
        M.train_one_epoch(run, images, labels, rows, head_only=head_only, features=features)
    monkeypatch.undo()
    return mode.reads, mode.copies


@pytest.mark.parametrize("on_device", [True, False], ids=["images-on-device", "host-path"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_no_transfer_per_step(tmp_path, monkeypatch, recipe, on_device):
    few, many = (epoch_transfers(s, tmp_path, monkeypatch, on_device, recipe) for s in (3, 9))
    assert len(few[0]) == len(many[0]), (few[0], many[0])
    assert len(few[1]) == len(many[1]), (few[1], many[1])
    assert len(many[0]) <= 10 and len(many[1]) <= 10, many     # a few per epoch
    if on_device:       # np.asarray of a device tensor (the labels in the head phase) is a TypeError on a GPU
        assert not [r for r in many[0] if "__array__" in r], many[0]


@pytest.mark.parametrize("tta", [False, True])
def test_validation_reads_once(tmp_path, monkeypatch, tta):
    """predict reads the probabilities back once, and copies the rows to the images' device once."""
    cfg = tiny_config(tmp_path, tmp_path, batch_size=2, image_size=16, tta=tta)
    model = M.build_model("resnet18", "none")
    rng = np.random.default_rng(0)
    counts = []
    for n in (8, 24):
        images = torch.from_numpy(rng.integers(0, 255, (n, 3, 16, 16), dtype=np.uint8))
        labels = np.zeros((n, M.NUM_CLASSES), np.uint8)
        mode = CountTransfers()
        with mode:
            M.evaluate(model, images, labels, np.arange(n), torch.device("cpu"), cfg)
        counts.append((len(mode.reads), len(mode.copies)))
    assert counts[0] == counts[1], counts


def test_fused_sgd_survives_a_skipped_first_step_and_a_late_first_gradient():
    """A first step skipped by the scaler (non-finite) must leave SGD as if it never happened,
    and a parameter unfrozen after the first step (--head-epochs) must train."""
    cfg = M.default_config() | dict(optimizer="sgd", lr=0.1, weights="none")

    def run(skip_first):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, M.NUM_CLASSES))
        model[0].requires_grad_(False)                 # frozen during the "head phase"
        opt = M.build_optimizer(dict(cfg), model)
        scaler = M.make_scaler(torch.device("cpu"), cfg)
        x = torch.randn(8, 64)
        if skip_first:
            scaler.scale(model(x).sum() * float("inf")).backward()
            garbage = [torch.full((64 * 64,), 7.0) for _ in range(20)]   # recycled memory is not zero
            del garbage
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        for _ in range(2):
            scaler.scale(model(x).square().mean()).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            model[0].requires_grad_(True)              # its first gradient comes after the first step
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_count_steps_matches_the_batches():
    for n in range(1, 40):
        for world in (1, 2, 4):                     # torchrun: every rank's share of the last batch has 2 images
            for b in (world * k for k in (1, 2, 3, 4, 7, 16, 64)):
                for drop in (False, True):
                    batches = M.epoch_batches(np.arange(n), b, 0, 1, drop_last=drop, world=world)
                    assert M.count_steps(n, b, drop, world) == len(batches), (n, b, drop, world)
                    assert len(batches) == 1 or len(batches[-1]) >= min(2 * world, b), (n, b, drop, world)


def test_optimizer_state_to_come_counts_only_what_is_missing():
    cfg = M.default_config() | dict(weights="none")
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 3))
    weights = sum(p.numel() * 4 for p in model.parameters())
    adam = M.build_optimizer(dict(cfg, optimizer="adam"), model)
    assert M.optimizer_state_to_come(adam) == 2 * weights
    model(torch.randn(2, 10)).sum().backward()
    adam.step()
    assert M.optimizer_state_to_come(adam) == 0                  # a resume: its state is already there
    assert M.optimizer_state_to_come(M.build_optimizer(dict(cfg, optimizer="sgd"), model)) == 0


def test_validation_out_of_memory_retries_outside_the_traceback_and_remembers(tmp_path, monkeypatch):
    """The retry frees memory after the failed batch's traceback is gone, and later epochs
    start at the batch that fitted instead of running out again."""
    import sys
    cfg = tiny_config(tmp_path, tmp_path, batch_size=8)
    monkeypatch.setattr(M, "VALIDATION_BATCH_FITS", {})
    tried, freed_inside_except = [], []

    def predict(model, images, device, rows=None, tta=False, **how):
        tried.append(how["batch_size"])
        if how["batch_size"] > 4:
            raise torch.cuda.OutOfMemoryError("out of memory")
        return np.full((len(rows), M.NUM_CLASSES), 0.5, np.float32)
    monkeypatch.setattr(M, "predict", predict)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed_inside_except.append(sys.exc_info()[0] is not None))
    labels = np.zeros((10, M.NUM_CLASSES), np.uint8)
    for _ in range(2):
        M.evaluate(None, None, labels, np.arange(10), torch.device("cpu"), cfg)
    assert tried == [16, 8, 4, 4], tried
    assert freed_inside_except == [False, False]
    tried.clear()                                   # another model (a stage of the GPU check) starts afresh
    M.evaluate(None, None, labels, np.arange(10), torch.device("cpu"), dict(cfg, image_size=64))
    assert tried == [16, 8, 4], tried


def test_compile_drops_the_last_partial_batch_and_the_schedule_counts_it(tiny_data, tmp_path):
    """--compile trains on full batches only (one shape); the schedule must count the steps
    actually taken, or the cosine never reaches its end and a resume drifts by a step an epoch.
    The batch cutting is the same on every device, so the CPU shows it."""
    cfg = tiny_config(tmp_path, tiny_data, compile=True, schedule="cosine", epochs=2, batch_size=5)
    summary = M.train(cfg, log=lambda *a: None)
    state = torch.load(summary["last_path"], weights_only=True)
    import json
    n_train = len(json.loads((tmp_path / "outputs" / "t" / "split.json").read_text())["train"])
    assert n_train % 5 > 1                          # a partial last batch, dropped under --compile
    assert max(g["lr"] for g in state["optimizer"]["param_groups"]) == pytest.approx(0.0, abs=1e-9)
