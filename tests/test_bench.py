"""Smoke test of bench.py: a few synthetic images, tiny sizes, every figure present and positive."""

import json
import sys
from pathlib import Path

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


def test_gpu_check_runs_end_to_end_at_tiny_scale(tmp_path):
    """The prepared GPU check, on the CPU with a few images: every stage runs and is recorded."""
    source = MS_COCO.make_demo_dataset(tmp_path / "source", n_train=24, n_test=6)
    out = tmp_path / "check"
    bench.main(["--gpu-check", str(out), "--source-dir", str(source), "--bench-dir", str(tmp_path / "bench"),
                "--count", "30", "--size", "32", "--batch", "8", "--device", "cpu", "--warmup", "1", "--steps", "1",
                "--repeats", "1", "--workers", "1", "--threads", "1", "--pil-images", "5", "--sweep-rows", "200",
                "--sweep-repeats", "1", "--val-rows", "300", "--out", str(tmp_path / "bench.json")])
    r = json.loads((out / "gpu_check.json").read_text())
    assert set(r["stages"]) == {"train_data_on_gpu", "train_data_in_host_memory", "resume_one_epoch",
                                "export_and_score"}
    assert [row["epoch"] for row in r["stages"]["resume_one_epoch"]["epochs"]] == [1, 2, 3]
    assert 0 <= r["stages"]["export_and_score"]["f1"] <= 1
    assert r["bench"]["epoch_overhead_s"]["after"] > 0 and r["bench"]["calibration_s"] > 0
    assert "epoch   3/3" in (out / "gpu_check.log").read_text()
