"""Thresholds fitted on the challenge F1, long-tail losses and sampling, schedules, EMA,
TTA and recipes."""

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
    cal = M.calibrate_thresholds(y, probs, TAUS, "per_class", folds=5, seed=0)
    assert set(cal["heldout_f1"]) == set(T.THRESHOLD_OPTIONS) and cal["chosen"] == "per_class"
    assert all(0 <= v <= 1 for v in cal["heldout_f1"].values())
    assert cal["heldout_f1"]["per_class"] > cal["heldout_f1"]["global"]   # planted offsets: per-class wins out of fold
    assert len(cal["threshold"]) == 80 and cal["threshold"][5] == cal["global_tau"]
    assert min(cal["threshold"]) >= 0.05
    forced = M.calibrate_thresholds(y, probs, TAUS, "global+top1")     # an older run's option: the nearest left
    assert forced["chosen"] == "global" and forced["threshold"] == forced["global_tau"]


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
    cfg = M.default_config()
    for loss, kind in (("bce", nn.BCEWithLogitsLoss), ("asl", M.AsymmetricLoss)):
        assert isinstance(M.build_criterion(dict(cfg, loss=loss)), kind)
    with pytest.raises(M.UserError, match="--loss"):
        M.build_criterion(dict(cfg, loss="hinge"))
    with pytest.raises(M.UserError, match="--class-balance 'pos_weight' was removed"):   # an older run's config
        M.build_criterion(dict(cfg, class_balance="pos_weight"))


def test_repeat_factors_favour_rare_classes():
    y = np.zeros((100, 80), np.uint8)
    y[:, 0] = 1                                               # everyone
    y[:2, 1] = 1                                              # rare
    y[:30, 2] = 1
    r = M.repeat_factors(y, 0.1)
    assert r[0] == pytest.approx(np.sqrt(0.1 / 0.02)) and r[50] == 1.0
    batches = M.epoch_batches(np.arange(100), 10, 0, 1, repeat=r)
    drawn = np.concatenate(batches)
    assert set(drawn) == set(range(100)) and (drawn == 0).sum() in (2, 3) and (drawn == 50).sum() == 1


# ----------------------------------------------------------------- schedules
def two_layers():
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))      # a backbone layer and a head


def lr_steps(cfg, spe, steps):
    """Each group's learning rate over `steps` steps of a fresh schedule, as multiples of --lr."""
    optimizer = M.build_optimizer(cfg, two_layers())
    scheduler = M.build_scheduler(cfg, optimizer, spe)
    out = []
    for _ in range(steps):
        out.append([g["lr"] / cfg["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out, optimizer, scheduler


def test_learning_rate_schedules():
    cfg = dict(M.default_config(), epochs=100, warmup_epochs=0.0, backbone_lr_scale=0.1)
    spe = 10
    step = lr_steps(cfg, spe, 100 * spe)[0]
    assert [step[e * spe][-1] for e in (0, 29, 30, 59, 60, 89, 90, 99)] == pytest.approx(
        [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125])                      # the product recipe: halved every 30 epochs
    assert step[300][0] == pytest.approx(0.05)                           # the backbone keeps its lr scale
    cos = [lrs[-1] for lrs in lr_steps(dict(cfg, schedule="cosine", warmup_epochs=2.0), spe, 100 * spe)[0]]
    assert cos[0] == pytest.approx(0.05) and cos[19] == pytest.approx(1.0) and cos[20] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(cos[20:], cos[21:])) and cos[-1] < 1e-4
    head = [lrs[-1] for lrs in lr_steps(dict(cfg, schedule="cosine", head_epochs=3, warmup_epochs=1.0), spe, 50)[0]]
    assert head[0] == pytest.approx(0.1) and head[9] == pytest.approx(1)   # the head epochs take no scheduled step
    with pytest.raises(M.UserError, match="--schedule"):
        M.build_scheduler(dict(cfg, schedule="linear"), M.build_optimizer(cfg, two_layers()), spe)


def test_a_resumed_schedule_lands_where_a_fresh_run_is():
    """A resume may change --lr and --batch-size (so the steps per epoch): its rate at each step
    is then a fresh run's with the new settings, whatever the old run's state said."""
    old = dict(M.default_config(), schedule="cosine", head_epochs=1, warmup_epochs=1.0, epochs=10,
               backbone_lr_scale=0.1)
    new = dict(old, lr=3e-4)
    _, trained, _ = lr_steps(old, 7, 30)
    model = two_layers()
    resumed = M.build_optimizer(new, model)
    scheduler = M.build_scheduler(new, resumed, 5)
    resumed.load_state_dict(trained.state_dict())
    M.RunState(new, model, resumed, scheduler=scheduler).rebase_schedule(23)
    fresh, _, _ = lr_steps(new, 5, 33)
    for i in range(23, 33):
        assert [g["lr"] / new["lr"] for g in resumed.param_groups] == fresh[i]
        resumed.step()
        scheduler.step()


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


# ---------------------------------------------------------------------- TTA
def test_tta_is_the_mean_of_both_views():
    model = M.build_model("resnet18", "none").eval()
    x8 = np.random.default_rng(0).integers(0, 255, (4, 3, 32, 32), dtype=np.uint8)
    plain = M.predict(model, x8, torch.device("cpu"))
    mirrored = M.predict(model, np.ascontiguousarray(x8[..., ::-1]), torch.device("cpu"))
    both = M.predict(model, x8, torch.device("cpu"), tta=True)
    assert np.allclose(both, (plain + mirrored) / 2, atol=1e-5)


# ------------------------------------------------------------------ recipes
def test_recipe_fills_only_what_was_not_given():
    cfg = M.merge_settings(dict(M.default_config(), recipe="strong", loss="bce"), {"recipe", "loss"})
    assert cfg["loss"] == "bce" and cfg["class_balance"] == M.RECIPES["strong"]["class_balance"] == "sampling"
    assert M.merge_settings(M.default_config(), set()) == M.default_config()
    with pytest.raises(M.UserError, match="--recipe"):
        M.merge_settings(dict(M.default_config(), recipe="magic"), {"recipe"})


def test_strong_recipe_runs_end_to_end(tmp_path, tiny_source):
    cfg = tiny_config(tmp_path, tiny_source, recipe="strong", ema_decay=0.9, tta=True, epochs=2)
    result = M.train(cfg, log=lambda *_: None, given=M.given_keys(cfg) | {"loss"})    # --loss bce given
    state = M.load_checkpoint(result["best_path"])
    assert state["tta"] and state["weights_source"] in ("ema", "raw")
    assert M.load_checkpoint(result["last_path"])["ema"] is not None
    assert state["config"]["loss"] == "bce" and state["config"]["class_balance"] == "sampling"   # given wins
    assert set(state["thresholds"]["heldout_f1"]) == set(T.THRESHOLD_OPTIONS)
    saved = json.loads((tmp_path / "outputs" / "t" / "thresholds.json").read_text())
    assert saved["chosen"] == state["thresholds"]["chosen"]
    preds = T.main(["--ckpt", str(result["best_path"]), "--test-dir", str(tiny_source / "images" / "test-resized"),
                    "--out", str(tmp_path / "p.json"), "--device", "cpu"])
    T.check_predictions(preds, sorted(preds))
    forced = T.main(["--ckpt", str(result["best_path"]), "--test-dir", str(tiny_source / "images" / "test-resized"),
                     "--out", str(tmp_path / "q.json"), "--device", "cpu", "--thresholds", "global"])
    stems, probs = T.predict_folder(state, tiny_source / "images" / "test-resized", T.parse_config(["--device", "cpu"]))
    assert forced == T.predictions_dict(stems, M.binarize(probs, state["thresholds"]["global_tau"]))
    with pytest.raises(SystemExit) as exc:
        T.main(["--ckpt", str(result["best_path"]), "--test-dir", str(tiny_source / "images" / "test-resized"),
                "--out", str(tmp_path / "r.json"), "--device", "cpu", "--thresholds", "best"])
    assert exc.value.code == 2 and not (tmp_path / "r.json").exists()
    resumed = tiny_config(tmp_path, tiny_source, epochs=3, resume=str(result["last_path"]))
    M.train(resumed, log=lambda *_: None)                     # EMA and sampling state come back
    assert M.load_checkpoint(result["last_path"])["epoch"] == 3


def test_our_asymmetric_loss_is_not_timms():
    """Why AsymmetricLoss is ours: timm's AsymmetricLossMultiLabel sums over the 80 classes (80x our mean, so every
    learning rate would change) and clamps p at eps before its log, so a positive far below the threshold (logit
    -25) gets no gradient at all, where ours pulls it up with logsigmoid's full gradient."""
    from timm.loss import AsymmetricLossMultiLabel
    torch.manual_seed(0)
    x, y = torch.randn(64, 80) * 3, (torch.rand(64, 80) < 0.1).float()
    ours, theirs = M.AsymmetricLoss(4.0, 0.0, 0.05), AsymmetricLossMultiLabel(gamma_neg=4, gamma_pos=0, clip=0.05)
    assert float(theirs(x, y)) == pytest.approx(80 * float(ours(x, y)), rel=1e-4)
    grads = []
    for loss in (ours, theirs):
        z = torch.tensor([[-25.0]], requires_grad=True)
        loss(z, torch.ones(1, 1)).backward()
        grads.append(float(z.grad))
    assert grads[0] == pytest.approx(-1.0, abs=1e-6) and grads[1] == 0.0


def test_ema_averages_buffers_too_and_warms_up():
    """timm's ModelEmaV3 under build_ema: BatchNorm's running statistics are averaged like the weights, its batch
    counter copied, and the decay is min(decay, (1 + n) / (10 + n)) over the n updates so far."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = M.build_ema(model, dict(M.default_config(), ema_decay=0.99))
    before = ema.module[1].running_mean.clone()
    model.train()
    model(torch.randn(16, 4) + 5.0)                     # moves the running mean and the batch counter
    ema.update_parameters(model)                        # n = 0: decay 0.1
    expected = 0.1 * before + 0.9 * model[1].running_mean
    assert torch.allclose(ema.module[1].running_mean, expected, atol=1e-6)
    assert int(ema.module[1].num_batches_tracked) == int(model[1].num_batches_tracked) == 1
    assert ema.get_decay() == pytest.approx(2 / 11) and ema.updates == 1
