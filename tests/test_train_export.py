"""End to end: a 2-epoch training run writes every file; the export writes a valid JSON;
resume continues a run exactly; ImageNet weights load offline from $TORCH_HOME."""

import csv
import json

import numpy as np
import pytest
import torch

import MS_COCO as M
import MS_COCO_test as T
from conftest import config_argv, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_source):
    """One 2-epoch CPU run through the command line, shared by the checks below."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny_config(tmp, tiny_source, reports=True)
    M.main(config_argv(cfg))
    return tmp, cfg


def test_training_writes_every_file(trained):
    tmp, cfg = trained
    ck, out, runs = tmp / "checkpoints" / "t", tmp / "outputs" / "t", tmp / "runs" / "t"
    assert {p.name for p in ck.iterdir()} == {"best_model.pth", "last.pth", "epoch_001.pth", "epoch_002.pth",
                                              M.CLAIM_FILE}
    assert {"metrics.csv", "per_class.csv", "config.json", "split.json", "thresholds.json", "per_class_f1.png",
            "threshold_sweep.png", "pr_rare_classes.png", "val_predictions.png"} <= {p.name for p in out.iterdir()}
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert list(runs.glob("events.out.tfevents.*"))
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(M.METRIC_COLUMNS) <= set(rows[0])
    for r in rows:
        assert 0 <= float(r["f1"]) <= 1 and M.THRESHOLD_MIN <= float(r["tau"]) <= 0.95 and float(r["images_per_s"]) > 0
    per_class = list(csv.DictReader((out / "per_class.csv").open()))
    assert len(per_class) == 80 and {"class", "support", "precision", "recall", "f1", "ap"} <= set(per_class[0])
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == 32 and config["epochs"] == 2 and config["arch"] == "resnet18"


def test_tensorboard_has_scalars_and_per_class_f1(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tmp, _ = trained
    acc = EventAccumulator(str(tmp / "runs" / "t"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert any(t.endswith("f1") for t in tags) and any("class" in t for t in tags)
    assert [e.step for e in acc.Scalars("metrics/f1")] == [1, 2]


def test_checkpoint_describes_itself(trained):
    tmp, _ = trained
    state = torch.load(tmp / "checkpoints" / "t" / "best_model.pth", weights_only=True)
    for key in ("model", "arch", "image_size", "mean", "std", "class_names", "threshold", "epoch",
                "val_metrics", "config", "format_version", "amp", "tta"):
        assert key in state, key
    assert "optimizer" not in state                         # the export needs no training state ...
    last = torch.load(tmp / "checkpoints" / "t" / "last.pth", weights_only=True)
    assert {"optimizer", "scaler", "torch_rng", "metrics"} <= set(last)   # ... resume does
    assert state["arch"] == "resnet18" and state["image_size"] == 32 and len(state["class_names"]) == 80
    assert isinstance(state["config"], dict) and state["config"]["batch_size"] == 8
    assert M.THRESHOLD_MIN <= float(np.mean(state["threshold"])) <= 0.95
    rows = list(csv.DictReader((tmp / "outputs" / "t" / "metrics.csv").open()))
    best = max(rows, key=lambda r: float(r["f1"]))
    assert state["epoch"] == int(best["epoch"])             # the best epoch by challenge F1 at its tau*
    assert state["val_metrics"]["f1"] == pytest.approx(float(best["f1"]), abs=1e-6)
    model = M.model_from_checkpoint(state)
    assert not any(k.startswith("_orig_mod") for k in state["model"])
    assert model.fc.out_features == 80


def test_export_writes_checked_json_and_scores(trained, tiny_source, tmp_path, capsys):
    tmp, _ = trained
    out = tmp_path / "deep" / "folder" / "predictions.json"
    T.main(["--ckpt", str(tmp / "checkpoints" / "t" / "best_model.pth"), "--test-dir",
            str(tiny_source / "images" / "test-resized"), "--out", str(out), "--device", "cpu"])
    preds = json.loads(out.read_text())
    stems = sorted(p.stem for p in (tiny_source / "images" / "test-resized").glob("*.jpg"))
    assert sorted(preds) == stems
    T.check_predictions(preds, stems)
    assert all(ids == sorted(set(ids)) and all(type(c) is int and 0 <= c < 80 for c in ids) for ids in preds.values())
    scores = T.main(["--predictions", str(out), "--labels", str(tiny_source / "labels" / "test")])
    assert 0 <= scores["f1"] <= 1 and scores["images"] == len(stems)
    assert "challenge F1" in capsys.readouterr().out


def test_export_uses_the_stored_threshold_on_probabilities(trained, tiny_source, tmp_path):
    tmp, _ = trained
    state = M.load_checkpoint(tmp / "checkpoints" / "t" / "best_model.pth")
    cfg = T.parse_config(["--device", "cpu"])
    stems, probs = T.predict_folder(state, tiny_source / "images" / "test-resized", cfg)
    assert ((probs >= 0) & (probs <= 1)).all()
    path = tmp_path / "ckpt.pth"
    for thr, count in ((0.0, 80), (1.01, 0)):
        M.save_checkpoint(path, dict(state, threshold=thr))
        preds = T.main(["--ckpt", str(path), "--test-dir", str(tiny_source / "images" / "test-resized"),
                        "--out", str(tmp_path / "p.json"), "--device", "cpu"])
        assert all(len(v) == count for v in preds.values())
    top = probs.argmax(1)
    per_class = np.full(80, 1.01)
    per_class[top[0]] = 0.0                                             # one class always passes
    M.save_checkpoint(path, dict(state, threshold=per_class.tolist()))
    preds = T.main(["--ckpt", str(path), "--test-dir", str(tiny_source / "images" / "test-resized"),
                    "--out", str(tmp_path / "p.json"), "--device", "cpu"])
    assert all(v == [int(top[0])] for v in preds.values())


def test_export_finds_the_newest_run(trained, tiny_source, tmp_path, monkeypatch):
    tmp, _ = trained
    monkeypatch.chdir(tmp)                                  # checkpoints/ lives here
    T.main(["--test-dir", str(tiny_source / "images" / "test-resized"), "--device", "cpu"])
    assert len(json.loads((tmp / "predictions.json").read_text())) == 8


def test_resume_continues_to_the_same_result(tmp_path, tiny_source):
    """Stop after epoch 1 (a run launched with --epochs 1), resume to 3: same rows as a straight run."""
    straight = tiny_config(tmp_path / "a", tiny_source, epochs=3)
    M.train(straight, log=lambda *_: None)
    cut = tiny_config(tmp_path / "b", tiny_source, epochs=1)
    M.train(cut, log=lambda *_: None)
    resumed = tiny_config(tmp_path / "b", tiny_source, epochs=3,
                          resume=str(tmp_path / "b" / "checkpoints" / "t" / "last.pth"))
    M.train(resumed, log=lambda *_: None)
    a = list(csv.DictReader((tmp_path / "a" / "outputs" / "t" / "metrics.csv").open()))
    b = list(csv.DictReader((tmp_path / "b" / "outputs" / "t" / "metrics.csv").open()))
    assert [r["epoch"] for r in b] == ["1", "2", "3"]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss", "f1", "tau", "map", "lr"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-5, abs=1e-6), (ra["epoch"], key)
    names = lambda root: sorted(p.name for p in (root / "checkpoints" / "t").iterdir())
    assert names(tmp_path / "a") == names(tmp_path / "b")


def test_resume_alone_keeps_the_runs_own_epochs(tmp_path, tiny_source, capsys):
    cfg = tiny_config(tmp_path, tiny_source, epochs=1)
    M.train(cfg, log=lambda *_: None)
    with pytest.raises(SystemExit) as exc:                     # nothing else given: the run's own 1 epoch
        M.main(["--resume", str(tmp_path / "checkpoints" / "t" / "last.pth")])
    assert exc.value.code == 2 and "already trained 1 of its 1 epochs" in capsys.readouterr().err
    rows = list(csv.DictReader((tmp_path / "outputs" / "t" / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1"]                 # already finished: nothing more trained


# ------------------------------------------------------------ ImageNet weights
def test_imagenet_weights_load_offline_from_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    import torchvision
    fname = torchvision.models.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    reference = M.build_model("resnet18", "none")
    state = {k: v for k, v in reference.state_dict().items()}
    full = torchvision.models.resnet18()                     # an ImageNet-shaped file (1000-way fc)
    full.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
    (tmp_path / "th" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(full.state_dict(), tmp_path / "th" / "hub" / "checkpoints" / fname)

    def no_network(*a, **k):
        raise AssertionError("tried to download")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    model = M.build_model("resnet18", "imagenet")
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 80


def test_missing_imagenet_weights_give_a_clear_message(tmp_path, monkeypatch, capsys, tiny_source):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cfg = tiny_config(tmp_path, tiny_source, weights="imagenet")
    with pytest.raises(SystemExit) as exc:
        M.main(config_argv(cfg))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    import torchvision
    fname = torchvision.models.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    assert fname in err and "hub/checkpoints" in err and "--weights none" in err
    assert "Traceback" not in err


def test_local_weights_file(tmp_path):
    import torchvision
    ref = M.build_model("resnet18", "none")
    ours, imagenet_shaped = tmp_path / "ours.pth", tmp_path / "imagenet.pth"
    torch.save(ref.state_dict(), ours)                                # 80-way head: kept
    torch.save(torchvision.models.resnet18().state_dict(), imagenet_shaped)   # 1000-way head: replaced
    model = M.build_model("resnet18", str(ours))
    assert torch.equal(model.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
    assert torch.equal(model.fc.weight, ref.fc.weight)
    model = M.build_model("resnet18", str(imagenet_shaped))
    assert model.fc.out_features == 80
    (tmp_path / "junk.pth").write_text("not a state dict")
    with pytest.raises(M.UserError, match="junk.pth"):
        M.build_model("resnet18", str(tmp_path / "junk.pth"))


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "efficientnet_b0", "resnet50", "convnext_tiny"])
def test_other_backbones_get_an_80_way_head(arch):
    model = M.build_model(arch, "none")
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 80)


@pytest.mark.parametrize("freeze", ["backbone", "partial"])
def test_freezing(freeze):
    model = M.build_model("resnet18", "none", freeze=freeze)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert "fc" in trainable and "conv1" not in trainable
    assert ("layer4" in trainable) == (freeze == "partial") and ("layer3" in trainable) == (freeze == "partial")
    assert "layer2" not in trainable


def test_same_seed_same_split_loss_and_predictions(tmp_path, tiny_source):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        cfg = tiny_config(tmp_path / name, tiny_source, epochs=1, seed=seed)
        M.train(cfg, log=lambda *_: None)
        state = M.load_checkpoint(tmp_path / name / "checkpoints" / "t" / "best_model.pth")
        _, probs = T.predict_folder(state, tiny_source / "images" / "test-resized", T.parse_config(["--device", "cpu"]))
        runs[name] = ((tmp_path / name / "outputs" / "t" / "split.json").read_text(),
                      list(csv.DictReader((tmp_path / name / "outputs" / "t" / "metrics.csv").open()))[0]["train_loss"],
                      probs)
    assert runs["a"][0] == runs["b"][0] and runs["a"][1] == runs["b"][1]
    assert np.array_equal(runs["a"][2], runs["b"][2])
    assert runs["a"][0] != runs["c"][0] and runs["a"][1] != runs["c"][1]
