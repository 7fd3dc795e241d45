"""Smoke test of bench.py: a few synthetic images, tiny sizes, every figure present and positive."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench  # noqa: E402
import MS_COCO  # noqa: E402


def test_bench_main_writes_positive_figures(tmp_path):
    source = MS_COCO.make_demo_dataset(tmp_path / "source", n_train=12, n_test=0)
    out = tmp_path / "bench.json"
    bench.main(["--source-dir", str(source), "--bench-dir", str(tmp_path / "bench"), "--count", "20",
                "--size", "32", "--batch", "4", "--device", "cpu", "--warmup", "1", "--steps", "2",
                "--workers", "1", "--threads", "2", "--pil-images", "10", "--sweep-rows", "300",
                "--sweep-repeats", "1", "--repeats", "1", "--val-rows", "300", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["dataset"]["count"] == 20
    assert len(list((tmp_path / "bench" / "ms-coco" / "images" / "train-resized").glob("*.jpg"))) == 20
    positive = {
        "decode": ["cache_build_img_s", "pil_1thread_img_s", "pil_threads_img_s", "cache_vs_pil_1thread",
                   "cache_vs_pil_threads", "warm_start_s", "warm_start_full_s", "cold_start_img_s",
                   "cold_start_vs_pil_1thread"],
        "train": ["ours_img_s", "baseline_img_s", "model_only_img_s", "ours_over_model", "ours_over_baseline"],
        "memory": ["peak_rss_mb"],
        "sweep": ["seconds"],
    }
    for section, keys in positive.items():
        for key in keys:
            assert r[section][key] > 0, (section, key)
    assert r["decode"]["warm_cache_hit"] is True
    assert r["decode"]["cache_build_s"] <= r["decode"]["cold_start_s"]
    assert r["memory"]["peak_gpu_mb"] is None
    assert r["sweep"]["rows"] == 300 and r["sweep"]["classes"] == 80


COCO_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "coco-sample" / "ms-coco"
GPU_CHECK_STAGES = ["default_data_on_gpu", "default_host_memory", "finetune_head_epochs", "strong", "ema_tta",
                    "fp16_forced", "sgd_head_epochs", "compile", "timm_convnext_atto", "stop_mid_epoch", "resume",
                    "export", "ensemble", "score", "bench"]


def files_mib(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20


def test_make_gpu_sample_fits_its_budget_and_replaces_only_its_own(tmp_path):
    source = MS_COCO.make_demo_dataset(tmp_path / "source", n_train=60, n_test=20)
    dest = tmp_path / "sample"
    s = bench.make_gpu_sample(source, dest, max_mb=0.05)
    layout = MS_COCO.find_layout(dest)
    stems, _ = MS_COCO.pair_images_and_labels(layout["train_images"], layout["train_labels"])
    tests, _ = MS_COCO.pair_images_and_labels(layout["test_images"], layout["test_labels"])
    assert len(stems) == s["train"]["images"] and 0 < len(stems) < 60
    assert len(tests) == s["test"]["images"] and 0 < len(tests) < 20
    assert files_mib(dest) <= 0.05 + 0.001          # the photos and labels within budget, plus the marker
    bench.make_gpu_sample(source, dest, max_mb=0.02)         # ours: replaced, not added to
    assert files_mib(dest) <= 0.02 + 0.001
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(MS_COCO.UserError, match="not a sample"):
        bench.make_gpu_sample(source, tmp_path / "mine", max_mb=0.02)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_gpu_check_runs_end_to_end_at_tiny_scale(tmp_path):
    """The prepared GPU check on the CPU, on a sample made as a GPU session makes it (real
    photos when ../shared has them): every stage runs, passes its own checks and is recorded."""
    source = COCO_SAMPLE if (COCO_SAMPLE / "labels" / "test").is_dir() else \
        MS_COCO.make_demo_dataset(tmp_path / "source", n_train=32, n_test=8)
    sample = bench.make_gpu_sample(source, tmp_path / "sample", max_mb=0.5)
    assert sample["train"]["images"] >= 24 and sample["test"]["images"] >= 4 and sample["test"]["labels"]
    out = tmp_path / "check"
    try:
        bench.main(["--gpu-check", str(out), "--source-dir", str(tmp_path / "sample"), "--bench-dir",
                    str(tmp_path / "bench"), "--count", "30", "--size", "32", "--batch", "8", "--device", "cpu",
                    "--warmup", "1", "--steps", "1", "--repeats", "1", "--workers", "1", "--threads", "1",
                    "--pil-images", "5", "--sweep-rows", "200", "--sweep-repeats", "1", "--val-rows", "300"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    r = json.loads((out / "gpu_check.json").read_text())
    assert list(r["stages"]) == GPU_CHECK_STAGES
    not_ok = {n: (e["status"], e.get("error") or e.get("reason")) for n, e in r["stages"].items() if e["status"] != "ok"}
    assert not not_ok and r["failed"] == [] and code == 0, not_ok
    s = r["stages"]
    assert [row["epoch"] for row in s["default_data_on_gpu"]["epochs"]] == [1, 2, 3]
    assert [row["epoch"] for row in s["sgd_head_epochs"]["epochs"]] == [1, 2, 3]
    assert s["stop_mid_epoch"]["saved_epoch"] == 2 and s["stop_mid_epoch"]["saved_step"] > 0
    assert [row["epoch"] for row in s["resume"]["epochs"]] == [1, 2, 3]
    assert s["export"]["images"] == s["ensemble"]["images"] == sample["test"]["images"]
    assert 0 <= s["score"]["f1"] <= 1 and 0 <= s["ensemble"]["f1"] <= 1
    assert s["score"]["images"] == sample["test"]["images"]
    assert all(e["hidden_syncs"] == e["memory_estimate"] == "n/a (cpu)" for e in s.values())
    assert s["bench"]["bench"]["epoch_overhead_s"]["after"] > 0 and s["bench"]["bench"]["calibration_s"] > 0
    assert "epoch   3/3" in (out / "gpu_check.log").read_text()
