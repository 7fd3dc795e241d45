"""Smoke tests of bench.py (a few synthetic images, tiny sizes, every figure present and positive)
and of its GPU check (every stage at tiny scale on the CPU, its sample, its records)."""

import json
import sys
from pathlib import Path

import pytest

import bench
import MS_COCO


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
                    "fp16_forced", "sgd_head_epochs", "compile", "timm_convnext_atto", "torchrun", "stop_mid_epoch",
                    "resume", "export", "ensemble", "score", "bench"]


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
    with pytest.raises(MS_COCO.UserError, match="source folder itself"):
        bench.make_gpu_sample(dest, dest)


def test_gpu_check_runs_end_to_end_at_tiny_scale(tmp_path):
    """The prepared GPU check on the CPU, on a sample made as a GPU session makes it (real
    photos when ../shared has them): every stage runs, passes its own checks and is recorded."""
    source = COCO_SAMPLE if (COCO_SAMPLE / "labels" / "test").is_dir() else \
        MS_COCO.make_demo_dataset(tmp_path / "source", n_train=32, n_test=8)
    sample = bench.make_gpu_sample(source, tmp_path / "sample", max_mb=0.5)
    assert sample["train"]["images"] >= 24 and sample["test"]["images"] >= 4 and sample["test"]["labels"]
    out = tmp_path / "check"
    # One intra-op thread: ops at 32 px are too small to split, and on a shared CI machine
    # OpenMP's spinning threads made each step several times slower (72 s against 246 s here).
    threads = bench.torch.get_num_threads()
    bench.torch.set_num_threads(1)
    try:
        bench.main(["--gpu-check", str(out), "--source-dir", str(tmp_path / "sample"), "--bench-dir",
                    str(tmp_path / "bench"), "--count", "30", "--size", "32", "--batch", "8", "--device", "cpu",
                    "--warmup", "1", "--steps", "1", "--repeats", "1", "--workers", "1", "--threads", "1",
                    "--pil-images", "5", "--sweep-rows", "200", "--sweep-repeats", "1", "--val-rows", "300"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        bench.torch.set_num_threads(threads)
    r = json.loads((out / "gpu_check.json").read_text())
    assert list(r["stages"]) == GPU_CHECK_STAGES
    not_ok = {n: (e["status"], e.get("error") or e.get("reason"))
              for n, e in r["stages"].items() if e["status"] != "ok"}
    assert not not_ok and r["failed"] == [] and code == 0, not_ok
    s = r["stages"]
    trained = [e for e in s.values() if "epochs" in e]            # the 10 training stages and the resume
    assert s["torchrun"]["processes"] == 2 and len(trained) == 11
    assert all([row["epoch"] for row in e["epochs"]] == [1, 2] for e in trained)
    assert s["stop_mid_epoch"]["saved_epoch"] == 2 and s["stop_mid_epoch"]["saved_step"] > 0
    assert s["export"]["images"] == s["ensemble"]["images"] == sample["test"]["images"]
    assert 0 <= s["score"]["f1"] <= 1 and 0 <= s["ensemble"]["f1"] <= 1
    assert s["score"]["images"] == sample["test"]["images"]
    assert all(e["hidden_syncs"] == e["memory_estimate"] == "n/a (cpu)" for e in s.values())
    assert s["bench"]["bench"]["epoch_overhead_s"]["after"] > 0 and s["bench"]["bench"]["calibration_s"] > 0
    assert "resuming run stop at epoch 2, step " in (out / "gpu_check.log").read_text()


def test_gpu_check_counts_syncs_by_line_and_compares_memory(monkeypatch):
    """The CUDA-only probes' own logic, with torch.cuda's calls replaced: the sync debug mode is
    on only inside the epoch, each sync warning is counted at its line, other warnings apart;
    the estimate is compared with the peak less the model and the images."""
    import warnings
    modes = []
    monkeypatch.setattr(bench.torch.cuda, "set_sync_debug_mode", modes.append)

    def epoch(model, epoch, start_step=0):
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("not a sync")
        return 0.5, 16, 1.0
    found = {"warnings": [], "images": 0, "epochs": 0}
    wrapped = bench.counting_syncs(found)(epoch)
    assert wrapped(None, 1) == (0.5, 16, 1.0) and wrapped(None, 2)[1] == 16
    assert modes == ["warn", "default"] * 2
    s = bench.sync_summary(found, batch=8)
    assert (s["count"], s["epochs"], s["steps"], s["per_step"]) == (6, 2, 4, 1.5)
    assert [(w["count"], w["code"]) for w in s["where"]] == \
        [(6, 'warnings.warn("called a synchronizing CUDA operation")')]
    assert s["other_warnings"] == ["not a sync"]

    mib = 2**20
    monkeypatch.setattr(bench.torch.cuda, "memory_allocated", lambda device=None: 100 * mib)
    monkeypatch.setattr(bench.torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(bench.torch.cuda, "max_memory_allocated", lambda device=None: 1600 * mib)
    probe = {}
    estimate, place = bench.measuring_memory(probe, "cuda")
    assert estimate(lambda *args: 1200 * mib)("model", "optimizer") == 1200 * mib
    images = bench.torch.zeros(4, 3, 8, 8, dtype=bench.torch.uint8)
    assert place(lambda *args: (images, "labels"))()[1] == "labels"
    assert probe == {"base": 100 * mib, "estimate": 1200 * mib, "images": 0}      # a CPU tensor is not on the GPU
    probe["images"] = 300 * mib
    m = bench.memory_summary(probe, "cuda")
    assert m["measured_training_mib"] == 1200 and m["estimate_over_measured"] == 1.0
    assert bench.memory_summary({}, "cuda").startswith("n/a")


def test_gpu_check_records_each_stage_and_exits_1_when_one_failed(tmp_path, monkeypatch):
    """A stage's JSON entry exists while it runs (a kill leaves it "running"); an exit of
    MS_COCO.main keeps its error line, a failed expectation its message; a skipped stage is
    not a failure; the stages after a failure still run; main exits 1 on a failure."""
    report, cpu = {"batch": 8, "stages": {}}, bench.torch.device("cpu")
    seen = {}

    def running(captured, probe):
        stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
        seen[list(stages)[-1]] = stages[list(stages)[-1]]["status"]
        return {"figure": 1}

    def exits(captured, probe):
        print("error: no such folder", file=sys.stderr)
        raise SystemExit(2)

    def skipped(captured, probe):
        raise bench.Skipped("timm is not installed")

    def wrong(captured, probe):
        bench.expect(False, "metrics.csv has epochs [1], not 1-2")
    for name, body in (("a", running), ("b", exits), ("c", skipped), ("d", wrong), ("e", running)):
        bench.run_stage(report, tmp_path, name, body, cpu)
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert seen == {"a": "running", "e": "running"}
    assert [(n, e["status"]) for n, e in r["stages"].items()] == \
        [("a", "ok"), ("b", "failed"), ("c", "skipped"), ("d", "failed"), ("e", "ok")]
    assert r["stages"]["a"]["figure"] == 1 and r["stages"]["b"]["error"] == "exit 2: error: no such folder"
    assert r["stages"]["c"]["reason"] == "timm is not installed"
    assert r["stages"]["d"]["error"] == "CheckFailed: metrics.csv has epochs [1], not 1-2"
    monkeypatch.setattr(bench, "gpu_check", lambda args: {"failed": ["b", "d"]})
    with pytest.raises(SystemExit) as exc:
        bench.main(["--gpu-check", str(tmp_path)])
    assert exc.value.code == 1
