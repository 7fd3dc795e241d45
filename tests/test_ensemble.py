"""Ensembles at export (MS_COCO_test.py --ckpt A B ...): averaged probabilities, each model at its
own image size, thresholds re-fitted on the shared validation split (refused when splits differ),
run-id shorthand, and the --tta / --amp overrides."""

import json

import numpy as np
import pytest

import MS_COCO as M
import MS_COCO_test as T
from conftest import tiny_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_source):
    """Three 1-epoch runs in one checkpoint folder: a (32 px) and b (48 px) share seed 0 and so
    their split; c (seed 1) has another split."""
    tmp = tmp_path_factory.mktemp("ensemble")
    for run_id, seed, size in (("a", 0, 32), ("b", 0, 48), ("c", 1, 32)):
        M.train(tiny_config(tmp, tiny_source, epochs=1, run_id=run_id, seed=seed, image_size=size),
                log=lambda *_: None)
    return tmp


@pytest.fixture(scope="module")
def test_dir(tiny_source):
    return tiny_source / "images" / "test-resized"


def ckpt(runs, run_id):
    return runs / "checkpoints" / run_id / "best_model.pth"


def cfg():
    return T.parse_config(["--device", "cpu", "--loader-threads", "1"])


@pytest.fixture(scope="module")
def single(runs, test_dir):
    """Each run's (stems, test probabilities) through the single-checkpoint path."""
    return {r: T.predict_folder(M.load_checkpoint(ckpt(runs, r)), test_dir, cfg()) for r in ("a", "b", "c")}


def mean_of(single, *run_ids):
    """The equal-weight ensemble's probabilities as the export computes them (float64, then float32)."""
    return (sum(single[r][1].astype(np.float64) for r in run_ids) / len(run_ids)).astype(np.float32)


def export(runs, test_dir, out, *ids, more=()):
    return T.main(["--ckpt", *ids, "--checkpoint-dir", str(runs / "checkpoints"), "--test-dir", str(test_dir),
                   "--out", str(out), "--device", "cpu", "--loader-threads", "1", *more])


def refused(capsys, call):
    with pytest.raises(SystemExit) as exc:
        call()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def averaged_val_scores(runs, run_ids, weights):
    """The members' saved validation probabilities, aligned on the first one's stems, averaged."""
    first = np.load(runs / "outputs" / run_ids[0] / "val_scores.npz")
    total = 0.0
    for run_id, w in zip(run_ids, weights):
        z = np.load(runs / "outputs" / run_id / "val_scores.npz")
        row = {str(s): i for i, s in enumerate(z["stems"])}
        total = total + w * z["probs"].astype(np.float64)[[row[str(s)] for s in first["stems"]]]
    return first["labels"], total


# ------------------------------------------------------------------ averaging
def test_the_same_checkpoint_twice_is_that_checkpoint(runs, test_dir, single):
    members = [T.load_member(ckpt(runs, "a"), keep_weights=False)] * 2       # weights reloaded when used
    stems, twice = T.predict_ensemble(members, [0.5, 0.5], test_dir, cfg())
    assert stems == single["a"][0] and np.array_equal(twice, single["a"][1])


def test_weighted_average_across_image_sizes(runs, test_dir, single, tmp_path, monkeypatch):
    """a is 32 px and b 48 px: each decoded once at its own size, weights 1,3 give 0.25 a + 0.75 b."""
    (stems, pa), (_, pb) = single["a"], single["b"]
    sizes, real = [], M.decode_all
    monkeypatch.setattr(M, "decode_all", lambda paths, size, **kw: sizes.append(size) or real(paths, size, **kw))
    members = [T.load_member(ckpt(runs, r), keep_weights=False) for r in ("a", "b")]
    _, mixed = T.predict_ensemble(members, T.ensemble_weights("1,3", 2), test_dir, cfg())
    assert sizes == [32, 48]
    np.testing.assert_allclose(mixed, 0.25 * pa + 0.75 * pb, rtol=1e-6, atol=1e-7)
    preds = export(runs, test_dir, tmp_path / "p.json", "a", "b", more=["--ensemble-weights", "1,3"])
    assert sorted(preds) == sorted(stems)


@pytest.mark.parametrize("weights", ["1", "1,2,3", "-1,2", "0,0", "1,x"])
def test_bad_weights_are_refused_before_loading(weights, runs, test_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(M, "load_checkpoint", lambda *a: pytest.fail("loaded before the weights were checked"))
    err = refused(capsys, lambda: export(runs, test_dir, tmp_path / "p.json", "a", "b",
                                         more=[f"--ensemble-weights={weights}"]))
    assert f"--ensemble-weights {weights!r}" in err and not (tmp_path / "p.json").exists()


# ----------------------------------------------------------------- thresholds
@pytest.mark.parametrize("option", ["", "global"])
def test_ensemble_thresholds_are_refit_on_the_shared_validation(option, runs, test_dir, single, tmp_path, capsys):
    labels, val = averaged_val_scores(runs, ["a", "b"], [0.5, 0.5])
    run = M.load_checkpoint(ckpt(runs, "a"))["config"]
    taus = M.threshold_grid(run["threshold_min"], run["threshold_max"], run["threshold_step"])
    expected = M.calibrate_thresholds(labels, val, taus, option or run["thresholds"], seed=run["seed"])
    more = ["--thresholds", option] if option else []
    preds = export(runs, test_dir, tmp_path / "p.json", "a", str(ckpt(runs, "b")), more=more)   # id and file
    pred = M.binarize(mean_of(single, "a", "b"), expected["threshold"])
    assert preds == T.predictions_dict(single["a"][0], pred)
    out = capsys.readouterr().out
    for run_id in ("a", "b"):          # each member re-estimated by the same calibration, on its own scores
        _, own = averaged_val_scores(runs, ["a", run_id], [0.0, 1.0])
        mine = M.calibrate_thresholds(labels, own, taus, option or run["thresholds"], seed=run["seed"])
        assert f"run {run_id}: {T.heldout_estimate(mine)}" in out
    assert f"ensemble of 2: {T.heldout_estimate(expected)}" in out


def test_ensemble_output_is_a_checked_json(runs, test_dir, tmp_path):
    out = tmp_path / "deep" / "p.json"
    preds = export(runs, test_dir, out, "a", "b")
    stems = sorted(p.stem for p in test_dir.glob("*.jpg"))
    assert json.loads(out.read_text()) == preds and sorted(preds) == stems
    T.check_predictions(preds, stems)
    assert all(ids == sorted(set(ids)) and all(type(c) is int for c in ids) for ids in preds.values())


def test_different_splits_are_refused_unless_a_threshold_is_given(runs, test_dir, single, tmp_path, capsys):
    out = tmp_path / "p.json"
    err = refused(capsys, lambda: export(runs, test_dir, out, "a", "c"))
    assert "different validation splits" in err and "split.json" in err and "--threshold-value" in err
    assert not out.exists()
    preds = export(runs, test_dir, out, "a", "c", more=["--threshold-value", "0.3"])
    assert preds == T.predictions_dict(single["a"][0], mean_of(single, "a", "c") >= 0.3)


def test_missing_validation_scores_are_refused(runs, test_dir, tmp_path, capsys):
    state = M.load_checkpoint(ckpt(runs, "a"))
    moved = tmp_path / "moved.pth"
    M.save_checkpoint(moved, dict(state, config=dict(state["config"], output_dir=str(tmp_path / "gone"))))
    err = refused(capsys, lambda: export(runs, test_dir, tmp_path / "p.json", str(moved), "b"))
    assert "split.json" in err and "--threshold-value" in err


def test_threshold_value_is_global_only(capsys):
    err = refused(capsys, lambda: T.main(["--threshold-value", "0.3", "--thresholds", "per_class"]))
    assert "--threshold-value" in err and "per_class" in err
    err = refused(capsys, lambda: T.main(["--threshold-value", "1.5"]))
    assert "--threshold-value 1.5 is out of range" in err


# ------------------------------------------------------------------ options
def test_run_id_shorthand(runs):
    cfg = T.parse_config(["--ckpt", "a", str(ckpt(runs, "b")), "nowhere",
                          "--checkpoint-dir", str(runs / "checkpoints")])
    assert T.checkpoint_paths(cfg) == [ckpt(runs, "a"), ckpt(runs, "b"), T.Path("nowhere")]
    assert T.parse_config(["--ckpt-path", "a", "b"])["ckpt_path"] == ["a", "b"]


def test_tta_and_amp_follow_each_checkpoint_unless_forced(runs, test_dir, tmp_path, monkeypatch):
    state = M.load_checkpoint(ckpt(runs, "a"))
    flipped = tmp_path / "flipped.pth"              # trained with TTA on and AMP off
    M.save_checkpoint(flipped, dict(state, tta=True, config=dict(state["config"], amp=False)))
    calls, real = [], M.predict

    def recording(*args, **kwargs):
        calls.append((kwargs["tta"], kwargs["amp"]))
        return real(*args, **kwargs)
    monkeypatch.setattr(M, "predict", recording)
    for more, expected in (([], [(True, False), (False, True)]),          # (tta, amp) of flipped, then of a
                           (["--no-tta", "--amp"], [(False, True), (False, True)]),
                           (["--tta", "--no-amp"], [(True, False), (True, False)])):
        calls.clear()
        export(runs, test_dir, tmp_path / "p.json", str(flipped), "a", more=["--threshold-value", "0.3", *more])
        assert calls == expected, more
