"""Thresholds fitted on the challenge F1, long-tail losses and sampling, schedules, EMA,
device augmentations, TTA and recipes."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import MS_COCO as M
import MS_COCO_test as T
from conftest import tiny_config

TAUS = M.threshold_grid(0.05, 0.95, 0.01)


def scores_with_class_offsets(n=400, seed=0):
    """Labels and probabilities where each class is best cut at a different threshold."""
    rng = np.random.default_rng(seed)
    y = rng.random((n, 80)) < np.linspace(0.02, 0.3, 80)
    shift = np.linspace(-0.25, 0.25, 80)                     # class c's scores sit higher or lower
    probs = np.clip(0.35 + 0.3 * y + shift + rng.normal(0, 0.12, (n, 80)), 0, 1)
    return y, probs


def f1(y, pred):
    return M.challenge_scores(y, pred)["f1"]


def test_class_thresholds_beat_the_global_one_where_fitted_and_are_a_coordinate_optimum():
    y, probs = scores_with_class_offsets()
    tau = M.best_threshold(M.sweep_thresholds(y, probs, TAUS))[0]
    th = M.fit_class_thresholds(y, probs, TAUS, tau)
    fitted = f1(y, M.binarize(probs, th))
    assert fitted > f1(y, M.binarize(probs, tau)) + 0.05
    for c in (0, 17, 79):                                    # no single class can move to do better
        for t in TAUS[::5]:
            moved = th.copy()
            moved[c] = t
            assert f1(y, M.binarize(probs, moved)) <= fitted + 1e-12
    assert np.corrcoef(th, np.linspace(-0.25, 0.25, 80))[0, 1] > 0.8     # follows the planted offsets


def test_shrinkage_and_absent_classes():
    raw = np.array([0.2, 0.8, 0.5])
    assert np.allclose(M.shrink_thresholds(raw, 0.4, [10, 10, 0], 0.0), [0.2, 0.8, 0.4])   # absent: global
    assert np.allclose(M.shrink_thresholds(raw, 0.4, [10, 10, 10], float("inf")), 0.4)
    mid = M.shrink_thresholds(raw, 0.4, [1, 100, 5], 5.0)
    assert mid[0] == pytest.approx((0.2 + 5 * 0.4) / 6) and abs(mid[1] - 0.8) < abs(mid[0] - 0.2) + 0.1


def test_calibration_reports_held_out_gains_and_never_zeroes_an_absent_class():
    y, probs = scores_with_class_offsets(1000)
    y[:, 5] = False                                          # a class with no validation positive
    cal = M.calibrate_thresholds(y, probs, TAUS, "auto", folds=5, seed=0)
    assert set(cal["heldout_f1"]) == set(M.THRESHOLD_OPTIONS)
    assert all(0 <= v <= 1 for v in cal["heldout_f1"].values())
    assert cal["chosen"] == max(cal["heldout_f1"], key=cal["heldout_f1"].get)
    assert cal["chosen"].startswith("per_class")             # planted offsets: per-class wins out of fold
    assert len(cal["threshold"]) == 80 and cal["threshold"][5] == cal["global_tau"]
    assert min(cal["threshold"]) >= 0.05
    forced = M.calibrate_thresholds(y, probs, TAUS, "global")
    assert forced["threshold"] == forced["global_tau"] and not forced["min_one"]


def test_at_least_one_label_per_image():
    probs = np.array([[0.9, 0.2, 0.1], [0.1, 0.3, 0.2], [np.nan, np.nan, np.nan]])
    pred = M.apply_thresholds(probs, 0.5, min_one=True)
    assert pred[:2].tolist() == [[True, False, False], [False, True, False]]
    assert pred[2].sum() <= 1                                 # an unreadable row: the export empties it anyway
    assert M.apply_thresholds(probs[:2], 0.5, min_one=False).tolist() == [[True, False, False], [False] * 3]


# ------------------------------------------------------------------- losses
def test_asymmetric_loss_reduces_to_bce_and_focuses():
    torch.manual_seed(0)
    logits, y = torch.randn(16, 80), (torch.rand(16, 80) < 0.1).float()
    bce = nn.BCEWithLogitsLoss()(logits, y)
    assert torch.allclose(M.AsymmetricLoss(0, 0, 0)(logits, y), bce, atol=1e-6)
    easy_neg = torch.full((1, 80), -4.0)
    assert M.AsymmetricLoss(4, 0, 0.05)(easy_neg, torch.zeros(1, 80)) == 0      # below the margin: free
    focal = M.AsymmetricLoss(2, 2, 0)
    assert focal(logits, y) < bce
    w = torch.full((80,), 3.0)
    assert M.AsymmetricLoss(0, 0, 0, w)(logits, y) > bce
    cfg = M.default_config()
    for loss, kind in (("bce", nn.BCEWithLogitsLoss), ("asl", M.AsymmetricLoss), ("focal", M.AsymmetricLoss)):
        assert isinstance(M.build_criterion(dict(cfg, loss=loss), y.numpy()), kind)
    with pytest.raises(M.UserError, match="--loss"):
        M.build_criterion(dict(cfg, loss="hinge"), y.numpy())


def test_positive_weights_and_repeat_factors_favour_rare_classes():
    y = np.zeros((100, 80), np.uint8)
    y[:, 0] = 1                                               # everyone
    y[:2, 1] = 1                                              # rare
    y[:30, 2] = 1
    w = M.class_positive_weights(y).numpy()
    assert w[1] > w[2] >= w[0] == 1.0 and w[3] == 1.0 and w.max() <= 10
    r = M.repeat_factors(y, 0.1)
    assert r[0] == pytest.approx(np.sqrt(0.1 / 0.02)) and r[50] == 1.0
    batches = M.epoch_batches(np.arange(100), 10, 0, 1, repeat=r)
    drawn = np.concatenate(batches)
    assert set(drawn) == set(range(100)) and (drawn == 0).sum() in (2, 3) and (drawn == 50).sum() == 1


# ----------------------------------------------------------------- schedules
def test_learning_rate_schedules():
    cfg = dict(M.default_config(), epochs=100, warmup_epochs=0.0)
    spe = 10
    step = [M.lr_factor(cfg, e * spe, spe) for e in (0, 29, 30, 59, 60, 89, 90, 99)]
    assert step == [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]               # the product recipe: halved every 30 epochs
    cos = dict(cfg, schedule="cosine", warmup_epochs=2.0)
    assert M.lr_factor(cos, 0, spe) == pytest.approx(0.05) and M.lr_factor(cos, 19, spe) == 1.0
    assert M.lr_factor(cos, 20, spe) == pytest.approx(1.0) and M.lr_factor(cos, 999, spe) < 1e-4
    with pytest.raises(M.UserError, match="--schedule"):
        M.lr_factor(dict(cfg, schedule="linear"), 0, spe)


def test_ema_tracks_the_weights():
    model = nn.Linear(4, 2)
    ema = M.build_ema(model, dict(M.default_config(), ema_decay=0.9))
    assert M.build_ema(model, M.default_config()) is None
    start = model.weight.detach().clone()
    for _ in range(50):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update_parameters(model)
    assert (ema.module.weight > start).all() and (ema.module.weight < model.weight).all()


# ------------------------------------------------------------- augmentation
def test_photometric_ops_and_cutout_stay_in_range_on_their_own_image():
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (64, 3, 24, 24), dtype=torch.uint8)
    x = M.augment_batch(x8, g, crop_scale_min=1.0, hflip=False, trivial=True, cutout=0.5)
    mean, std = torch.tensor(M.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(M.IMAGENET_STD).view(1, 3, 1, 1)
    raw = x * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    grey = (raw - 0.5).abs().amax(1) < 1e-5                  # cutout pixels
    share = grey.float().mean((1, 2))
    assert 0 < share.mean() < 0.3 and share.max() <= 0.25 + 1e-6
    x_only = M.photometric_ops(x8.float() / 255, torch.Generator().manual_seed(1))
    changed = ((x_only - x8.float() / 255).abs().amax((1, 2, 3)) > 1e-6)
    assert 0.6 < changed.float().mean() < 1.0                 # about 1 image in 7 gets the identity
    # index-encoded images stay distinguishable: a photometric op never mixes two images
    idx = torch.arange(64, dtype=torch.uint8).mul(3).view(64, 1, 1, 1).expand(64, 3, 8, 8).contiguous()
    out = M.photometric_ops(idx.float() / 255, torch.Generator().manual_seed(2))
    assert all(out[i].std() < 1e-6 for i in range(64))        # still one flat value per image


def test_tta_is_the_mean_of_both_views():
    model = M.build_model("resnet18", "none").eval()
    x8 = np.random.default_rng(0).integers(0, 255, (4, 3, 32, 32), dtype=np.uint8)
    plain = M.predict(model, x8, torch.device("cpu"))
    mirrored = M.predict(model, np.ascontiguousarray(x8[..., ::-1]), torch.device("cpu"))
    both = M.predict(model, x8, torch.device("cpu"), tta=True)
    assert np.allclose(both, (plain + mirrored) / 2, atol=1e-5)


# ------------------------------------------------------------------ recipes
def test_recipe_fills_only_what_was_not_given():
    cfg = M.merge_settings(dict(M.default_config(), recipe="strong", loss="focal"), {"recipe", "loss"})
    assert cfg["loss"] == "focal" and cfg["class_balance"] == M.RECIPES["strong"]["class_balance"] == "sampling"
    assert M.merge_settings(M.default_config(), set()) == M.default_config()
    with pytest.raises(M.UserError, match="--recipe"):
        M.merge_settings(dict(M.default_config(), recipe="magic"), {"recipe"})


def test_strong_recipe_runs_end_to_end(tmp_path, tiny_source):
    cfg = tiny_config(tmp_path, tiny_source, recipe="strong", loss="focal", ema_decay=0.9, tta=True,
                      epochs=2)
    result = M.train(cfg, log=lambda *_: None)
    state = M.load_checkpoint(result["best_path"])
    assert state["tta"] and state["weights_source"] in ("ema", "raw")
    assert M.load_checkpoint(result["last_path"])["ema"] is not None
    assert state["config"]["loss"] == "focal" and state["config"]["class_balance"] == "sampling"   # given wins
    assert set(state["thresholds"]["heldout_f1"]) == set(M.THRESHOLD_OPTIONS)
    saved = json.loads((tmp_path / "outputs" / "t" / "thresholds.json").read_text())
    assert saved["chosen"] == state["thresholds"]["chosen"]
    preds = T.main(["--ckpt", str(result["best_path"]), "--test-dir", str(tiny_source / "images" / "test-resized"),
                    "--out", str(tmp_path / "p.json"), "--device", "cpu"])
    T.check_predictions(preds, sorted(preds))
    forced = T.main(["--ckpt", str(result["best_path"]), "--test-dir", str(tiny_source / "images" / "test-resized"),
                     "--out", str(tmp_path / "q.json"), "--device", "cpu", "--thresholds", "per_class+top1"])
    assert sorted(forced) == sorted(preds) and all(len(v) >= 1 for v in forced.values())
    with pytest.raises(SystemExit) as exc:
        T.main(["--ckpt", str(result["best_path"]), "--test-dir", str(tiny_source / "images" / "test-resized"),
                "--out", str(tmp_path / "r.json"), "--device", "cpu", "--thresholds", "best"])
    assert exc.value.code == 2 and not (tmp_path / "r.json").exists()
    resumed = tiny_config(tmp_path, tiny_source, epochs=3, resume=str(result["last_path"]))
    M.train(resumed, log=lambda *_: None)                     # EMA and sampling state come back
    assert M.load_checkpoint(result["last_path"])["epoch"] == 3
