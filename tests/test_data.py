"""Metric, dataset layout, decoding, cache, split and batched augmentation."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

import MS_COCO as M
from conftest import DATA, tiny_config


# ------------------------------------------------------------------- metric
def multi_hot(mapping, stems):
    y = np.zeros((len(stems), M.NUM_CLASSES), bool)
    for i, s in enumerate(stems):
        y[i, mapping[s]] = True
    return y


@pytest.mark.parametrize("case", json.loads((DATA / "metric_cases.json").read_text())["cases"],
                         ids=lambda c: c["name"][:40])
def test_metric_reproduces_reference_cases(case):
    stems = sorted(case["labels"])
    scores = M.challenge_scores(multi_hot(case["labels"], stems), multi_hot(case["predictions"], stems))
    for key, ref in (("f1", "challenge_f1"), ("precision", "precision"), ("recall", "recall"),
                     ("macro_f1", "macro_f1"), ("micro_f1", "micro_f1")):
        assert scores[key] == pytest.approx(case[ref], abs=1e-6), key
    assert scores["classes_present"] == case["classes_present"]


def test_sweep_matches_direct_scoring_at_every_threshold():
    rng = np.random.default_rng(1)
    y = rng.random((300, 80)) < 0.05
    y[0] = True                                   # every class present
    probs = np.clip(y * 0.3 + rng.random((300, 80)) * 0.7, 0, 1).astype(np.float32)
    probs[:5] = 0.5                               # exact ties on a grid value
    taus = M.threshold_grid(0.05, 0.95, 0.01)
    sweep = M.sweep_thresholds(y, probs, taus)
    for i in range(0, len(taus), 7):
        direct = M.challenge_scores(y, M.binarize(probs, taus[i]))
        assert sweep["f1"][i] == pytest.approx(direct["f1"], abs=1e-12)
        assert sweep["precision"][i] == pytest.approx(direct["precision"], abs=1e-12)
    assert len(taus) == 91 and taus[0] == 0.05 and taus[-1] == 0.95


def test_threshold_applies_to_probabilities_not_logits():
    probs = np.array([[0.6, 0.4]])
    assert M.binarize(probs, 0.5).tolist() == [[True, False]]
    assert M.binarize(probs, np.array([0.7, 0.3])).tolist() == [[False, True]]


# ------------------------------------------------------------------- layout
def test_layout_variants_are_found(tmp_path, tiny_source):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_source, plain)
    (plain / "images" / "train-resized").rename(plain / "images" / "train")
    (plain / "images" / "test-resized").rename(plain / "images" / "test")
    layout = M.find_layout(plain)
    assert layout["train_images"] == plain / "images" / "train"
    assert layout["test_images"] == plain / "images" / "test"

    nested = tmp_path / "nested"
    shutil.copytree(tiny_source, nested)
    for parent, name in (("images", "train-resized"), ("labels", "train")):
        d = nested / parent / name
        d.rename(nested / parent / "tmp")
        d.mkdir()
        (nested / parent / "tmp").rename(d / name)
    layout = M.find_layout(nested)
    assert layout["train_images"] == nested / "images" / "train-resized" / "train-resized"
    assert layout["train_labels"] == nested / "labels" / "train" / "train"
    lines = []
    data = M.load_train_set(tiny_config(tmp_path, nested), log=lines.append)
    assert len(data.stems) == 48
    assert "train-resized/train-resized" in lines[0]          # it says which layout it found


# ------------------------------------------------------------------ dataset
def test_tiny_dataset_decodes_to_uint8_rgb_with_multi_hot_labels(tmp_path, tiny_source):
    data = M.load_train_set(tiny_config(tmp_path, tiny_source, image_size=40), log=lambda *_: None)
    assert data.images.shape == (48, 3, 40, 40) and data.images.dtype == np.uint8
    assert data.labels.shape == (48, 80) and set(np.unique(data.labels)) <= {0, 1}
    assert (data.labels.sum(1) >= 1).all() and data.labels[:, 24:].sum() == 0
    first = sorted((tiny_source / "labels" / "train").glob("*.cls"))[0]
    ids = [int(line) for line in first.read_text().split()]
    assert np.flatnonzero(data.labels[0]).tolist() == sorted(set(ids))
    gray = np.asarray(data.images[0])                            # conftest made the first image grayscale
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()
    assert not data.bad


def test_real_coco_photos(tmp_path):
    """A handful of real COCO photos (copied from ../shared/coco-sample), grayscale one included."""
    coco = DATA / "coco"
    data = M.load_train_set(tiny_config(tmp_path, coco, image_size=64), log=lambda *_: None)
    assert data.images.shape == (8, 3, 64, 64)
    assert data.labels.sum() >= 8 and not data.bad
    modes = {p.stem: Image.open(p).mode for p in (coco / "images" / "train-resized").glob("*.jpg")}
    assert "L" in modes.values()
    for i, stem in enumerate(data.stems):
        img = np.asarray(data.images[i]).astype(int)
        if modes[stem] == "L":
            assert (img[0] == img[2]).all()
        assert img.std() > 5                                     # a real photo, not a blank
        ids = [int(x) for x in (coco / "labels" / "train" / f"{stem}.cls").read_text().split()]
        assert np.flatnonzero(data.labels[i]).tolist() == sorted(set(ids))


def test_decode_uses_draft_and_matches_plain_resize(tmp_path):
    src = sorted((DATA / "coco" / "images" / "train-resized").glob("*.jpg"))[0]
    ours = M.decode_image(src, 64).astype(int)
    plain = np.asarray(Image.open(src).convert("RGB").resize((64, 64), Image.BILINEAR)).transpose(2, 0, 1)
    assert ours.shape == (3, 64, 64)
    assert np.abs(ours - plain).mean() < 6                      # same picture, up to the DCT-scaling error


# -------------------------------------------------------------------- cache
def test_cache_is_reused_then_rebuilt_when_a_file_changes(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data)
    lines = []
    first = M.load_train_set(cfg, log=lines.append)
    assert any(line.startswith("decoded") for line in lines)
    lines.clear()
    second = M.load_train_set(cfg, log=lines.append)
    assert any("memory-mapped" in line for line in lines)
    assert isinstance(second.images, np.memmap)
    assert np.array_equal(np.asarray(first.images), np.asarray(second.images))
    # change one label file: a rebuild, with the new label
    lbl = sorted((tiny_data / "labels" / "train").glob("*.cls"))[3]
    lbl.write_text("23\n")
    future = time.time() + 5
    os.utime(lbl, (future, future))
    lines.clear()
    third = M.load_train_set(cfg, log=lines.append)
    assert any(line.startswith("decoded") for line in lines)
    assert np.flatnonzero(third.labels[3]).tolist() == [23]
    # another size is another cache file
    lines.clear()
    M.load_train_set(dict(cfg, image_size=24), log=lines.append)
    assert any(line.startswith("decoded") for line in lines)
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.npy")) == ["train_24.npy", "train_32.npy"]


# -------------------------------------------------------------------- split
def test_split_is_seeded_and_keeps_rare_classes_on_both_sides():
    rng = np.random.default_rng(0)
    labels = np.zeros((500, 80), np.uint8)
    for i in range(500):
        labels[i, rng.choice(60, size=rng.integers(1, 4), p=np.r_[[0.5], np.full(59, 0.5 / 59)])] = 1
    labels[:2, 70] = 1                             # a class with exactly two images
    labels[10:13, 71] = 1
    labels[20, 72] = 1                             # a single image: train or val, cannot be both
    a_train, a_val = M.make_split(labels, 0.15, seed=3)
    b_train, b_val = M.make_split(labels, 0.15, seed=3)
    c_train, _ = M.make_split(labels, 0.15, seed=4)
    assert np.array_equal(a_train, b_train) and np.array_equal(a_val, b_val)
    assert not np.array_equal(a_train, c_train)
    assert len(np.intersect1d(a_train, a_val)) == 0 and len(a_train) + len(a_val) == 500
    assert 0.10 < len(a_val) / 500 < 0.20
    for c in np.flatnonzero(labels.sum(0) >= 2):
        assert labels[a_train, c].any() and labels[a_val, c].any(), c


def test_a_dataset_larger_than_free_ram_uses_the_memory_mapped_cache(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(M, "available_ram_bytes", lambda: 1000)      # pretend the machine is nearly full
    lines = []
    data = M.load_train_set(tiny_config(tmp_path, tiny_data, cache=False), log=lines.append)
    assert any("despite --no-cache" in line for line in lines)
    assert isinstance(data.images, np.memmap) and len(data.images) == len(data.stems)
    monkeypatch.setattr(M, "available_ram_bytes", lambda: float("inf"))
    assert not isinstance(M.load_train_set(tiny_config(tmp_path, tiny_data, cache=False), log=print).images, np.memmap)


def test_split_json_written_and_reused(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data, epochs=1)
    M.train(cfg, log=lambda *_: None)
    split = json.loads((tmp_path / "outputs" / "t" / "split.json").read_text())
    assert split["seed"] == 0 and len(split["train"]) + len(split["val"]) == 48
    assert not set(split["train"]) & set(split["val"])


# ------------------------------------------------------------- augmentation
def index_images(n, size=16):
    """Image i is filled with the value 2 * i: its content says which image it is."""
    return np.stack([np.full((3, size, size), 2 * i, np.uint8) for i in range(n)])


def test_prefetch_and_augmentation_keep_labels_aligned():
    n = 100
    images = index_images(n)
    labels = np.zeros((n, 80), np.uint8)
    labels[np.arange(n), np.arange(n) % 80] = 1
    batches = M.epoch_batches(np.arange(n), 16, seed=0, epoch=1)
    seen = []
    g = torch.Generator().manual_seed(0)
    for x8, y in M.BatchPrefetcher(images, labels, batches, torch.device("cpu")):
        x = M.augment_batch(x8, g, crop_scale_min=0.3, hflip=True)
        value = (x[:, 0] * M.IMAGENET_STD[0] + M.IMAGENET_MEAN[0]) * 255 / 2
        idx = value.mean((1, 2)).round().long()
        assert torch.allclose(value, idx[:, None, None].float(), atol=1e-3)   # crops never mix images
        assert (y.argmax(1) == idx % 80).all()
        seen += idx.tolist()
    assert sorted(seen) == list(range(n))                     # every image once per epoch


def test_crops_and_flips_stay_inside_the_image():
    w = 32
    ramp = np.tile(np.arange(w, dtype=np.uint8) * 8, (3, w, 1))            # value = 8 * column
    x8 = torch.from_numpy(np.stack([ramp] * 64))
    g = torch.Generator().manual_seed(1)
    x = M.augment_batch(x8, g, crop_scale_min=0.25, hflip=True)
    cols = ((x[:, 0] * M.IMAGENET_STD[0] + M.IMAGENET_MEAN[0]) * 255 / 8)[:, w // 2]   # one row per image
    assert cols.min() >= -1e-3 and cols.max() <= w - 1 + 1e-3
    d = cols[:, 1:] - cols[:, :-1]
    increasing, decreasing = (d >= -1e-3).all(1), (d <= 1e-3).all(1)
    assert (increasing | decreasing).all()                    # a crop of the ramp, maybe mirrored
    assert increasing.sum() > 10 and decreasing.sum() > 10    # both flips occur
    span = cols.max(1).values - cols.min(1).values
    assert span.min() < 0.8 * (w - 1)                         # some crops zoom in
    same = M.augment_batch(x8, torch.Generator().manual_seed(1), crop_scale_min=0.25, hflip=True)
    assert torch.equal(x, same)                               # seeded: resume replays the same pixels
    plain = M.augment_batch(x8, g, crop_scale_min=1.0, hflip=False)
    assert torch.allclose(plain, M.normalize(x8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_augmentation_matches_cpu():
    """CUDA only: the same batches in the same order on the GPU as on the CPU (both data paths),
    and the same crop and flip, drawn on the GPU, give the same pixels there as on the CPU."""
    images = index_images(32)
    labels = np.eye(80, dtype=np.uint8)[np.arange(32)]
    dev = torch.device("cuda")
    batches = M.epoch_batches(np.arange(32), 8, 0, 1)
    on_gpu = M.BatchPrefetcher(torch.from_numpy(images).to(dev), torch.from_numpy(labels).to(dev), batches, dev)
    pinned = M.BatchPrefetcher(images, labels, batches, dev)
    for (xc, yc), (xg, yg), (xh, yh) in zip(M.BatchPrefetcher(images, labels, batches, torch.device("cpu")),
                                            on_gpu, pinned):
        assert torch.equal(xc, xg.cpu()) and torch.equal(xc, xh.cpu()) and torch.equal(yc, yh.cpu())
        g = torch.Generator(device=dev).manual_seed(0)
        theta = M.crop_flip_theta(len(xg), g, 0.5, True, dev)
        warped_gpu = M.warp(xg.float() / 255, theta)
        warped_cpu = M.warp(xc.float() / 255, theta.cpu())
        torch.testing.assert_close(warped_gpu.cpu(), warped_cpu, atol=1e-4, rtol=0)
        x = M.augment_batch(xg, torch.Generator(device=dev).manual_seed(1))
        assert x.device.type == "cuda" and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_a_lone_last_image_joins_the_previous_batch():
    batches = M.epoch_batches(np.arange(33), 16, seed=0, epoch=1)
    assert [len(b) for b in batches] == [16, 17]              # BatchNorm cannot train on a batch of one
    assert sorted(np.concatenate(batches).tolist()) == list(range(33))
    assert [len(b) for b in M.epoch_batches(np.arange(1), 16, seed=0, epoch=1)] == [1]
