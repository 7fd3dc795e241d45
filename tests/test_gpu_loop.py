"""The training step never waits for the device: host reads per epoch do not grow with the
number of steps (counted on the CPU under a TorchFunctionMode), with and without EMA."""

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import MS_COCO as M
from conftest import tiny_config

READS = {torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__int__,
         torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}


class CountHostReads(TorchFunctionMode):
    """Counts calls that copy a tensor's value to the host, outside optimizer.step()."""

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS and not self.paused:
            self.count += 1
        return func(*args, **(kwargs or {}))


def reads_for(steps, tmp_path, **overrides):
    cfg = tiny_config(tmp_path, tmp_path, batch_size=4, **overrides)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4 * steps, 3, 16, 16), dtype=np.uint8)
    labels = (rng.random((4 * steps, M.NUM_CLASSES)) < 0.1).astype(np.uint8)
    model = M.build_model("resnet18", "none")
    opt = M.build_optimizer(cfg, model)
    scheduler = M.build_scheduler(cfg, opt, steps)
    mode = CountHostReads()
    step = opt.step

    def step_uncounted(*args, **kwargs):      # the optimizer's own step counters are left out
        mode.paused = True
        try:
            return step(*args, **kwargs)
        finally:
            mode.paused = False
    opt.step = step_uncounted
    ema = M.build_ema(model, cfg)
    with mode:
        M.train_one_epoch(model, opt, images, labels, np.arange(4 * steps), torch.device("cpu"), cfg, 1,
                          ema=ema, scheduler=scheduler)
    return mode.count


@pytest.mark.parametrize("ema", [0.0, 0.99])
def test_host_reads_do_not_grow_with_the_steps(tmp_path, ema):
    few, many = reads_for(4, tmp_path, ema_decay=ema), reads_for(12, tmp_path, ema_decay=ema)
    assert few == many, (few, many)
    assert many <= 6, many
