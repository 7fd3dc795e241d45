"""Write predictions.json for the challenge's test images from a trained checkpoint, or an ensemble of them.

    python MS_COCO_test.py                                   # newest checkpoints/*/best_model.pth -> predictions.json
    python MS_COCO_test.py --ckpt checkpoints/<run_id>/best_model.pth --out outputs/<run_id>/predictions.json
    python MS_COCO_test.py --ckpt run_a run_b run_c          # ensemble: run ids mean checkpoints/<id>/best_model.pth
    python MS_COCO_test.py --ckpt run_a run_b --ensemble-weights 1,3   # weighted average of the probabilities
    python MS_COCO_test.py --ckpt run_a run_b --threshold-value 0.3    # runs with different splits: fixed threshold
    python MS_COCO_test.py --tta                             # force test-time flips on (--no-tta: off)
    python MS_COCO_test.py --labels path/to/labels           # also score the predictions like the leaderboard
    python MS_COCO_test.py --predictions predictions.json --labels path/to/labels   # score a file only

A checkpoint carries its architecture, image size, normalisation and thresholds; preprocessing is MS_COCO.py's.
An ensemble averages its models' probabilities (each at its own settings, one in memory at a time) and fits its
thresholds anew with MS_COCO.calibrate_thresholds on the runs' averaged validation scores, only when the runs share
one validation split (else --threshold-value). The JSON maps each test image's stem to its ascending class ids.
"""

import argparse
import json
import os
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import MS_COCO as M

# ---------------------------------------------------------------- constants
CHECKPOINT_DIR = "checkpoints"              # where the newest run and run ids given to --ckpt are looked for
TEST_DIR = "ms-coco/images/test-resized"    # test images (images/test and nested folders are found too)
OUT = "predictions.json"                    # output JSON (parent folders are created)
LABELS = ""                                 # a labels folder (.cls files) to score the predictions against
PREDICTIONS = ""                            # score this existing JSON against --labels instead of predicting
BATCH_SIZE = 256                            # images per forward pass
DEVICE = "auto"                             # auto (cuda when present) | cpu | cuda | cuda:N | mps
LOADER_THREADS = 0                          # decode threads (0 = one per core)
THRESHOLDS = ""                             # "" = the checkpoint's choice | global | per_class (ensembles refit it)
ENSEMBLE_WEIGHTS = ""                       # one weight per --ckpt, e.g. "0.5,0.3,0.2" ("" = equal; 0 leaves a run out)
THRESHOLD_VALUE = 0.0                       # fixed global threshold in (0, 1) instead of fitted ones (0 = unused); needed when ensembled runs have different validation splits
# --ckpt (a list), --tta and --amp ("as each checkpoint, unless forced") are add_export_arguments', not constants.

# training's --thresholds choices, one list for both scripts (no trailing comment: not an option of this one)
THRESHOLD_OPTIONS = M.CHOICES["thresholds"]
CHOICES = {"thresholds": ("",) + THRESHOLD_OPTIONS}
RANGES = {"batch_size": "[1, 65536]", "loader_threads": "[0, 4096]", "threshold_value": "[0, 1)"}
# A checkpoint's weights: an ensemble keeps each run's description and reloads these in its turn (one in memory).
WEIGHT_KEYS = ("model", "raw_model", "ema", "optimizer", "scheduler", "torch_rng", "metrics")
FIXED_THRESHOLD_HINT = "or pass --threshold-value T (a fixed global threshold, e.g. 0.3) to export them anyway"


# ------------------------------------------------------------------- export
def find_test_dir(test_dir):
    """The given folder, or the variants of the challenge layout around it."""
    path = Path(test_dir)
    if (path / path.name).is_dir():
        return path / path.name
    if path.is_dir():
        return path
    root = path.parent.parent if path.parent.name == "images" else path.parent
    if (root / "images").is_dir() and (root / "labels").is_dir() and (found := M.find_layout(root)["test_images"]):
        return found
    raise M.UserError(f"test image folder {test_dir} does not exist: pass --test-dir")


def list_test_images(test_dir):
    """The test images (broken links kept: they get []), one per stem: x.jpg beside x.png would both claim key "x"."""
    paths = M.list_images(test_dir)
    if not paths:
        raise M.UserError(f"no test images (.jpg) in {test_dir}")
    twins = sorted(s for s, n in Counter(p.stem for p in paths).items() if n > 1)
    if twins:
        names = ", ".join(p.name for p in paths if p.stem == twins[0])
        raise M.UserError(f"{test_dir} holds {len(twins)} image name(s) twice, e.g. {twins[0]!r} ({names}): "
                          f"keep one file per image, each name is one key of the predictions")
    return paths


def check_out_path(out):
    """--out checked before minutes of prediction: not a folder, under folders (or a place where they can be made),
    writable. The probe creates and removes a real file: os.access misses read-only mounts, ACLs, root's exemptions."""
    path = Path(out)
    if path.is_dir():
        raise M.UserError(f"--out {out} is a folder: give a file path, e.g. --out {path / 'predictions.json'}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent          # the folders still to create are made in the first one that exists
    if not folder.is_dir():
        raise M.UserError(f"--out {out}: {folder} is a file, not a folder; choose another --out")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)   # O_EXCL
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise M.UserError(f"--out {out}: cannot write in {folder} ({exc.strerror or exc}); "
                          f"choose a writable --out") from None


def predictions_dict(stems, pred):
    """{stem: [class ids ascending]} from a boolean (N, 80) matrix."""
    return {stem: [int(c) for c in np.flatnonzero(row)] for stem, row in zip(stems, pred)}


def as_json(value):
    """A value as it reads in the JSON file (repr for what JSON cannot hold)."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def check_predictions(preds, stems, source="predictions", per="test image"):
    """The submission's format, checked before writing and before scoring: exactly one key per stem, ids int 0-79
    unique and ascending. The error names the first offending key and its value, or a few missing and extra keys."""
    if len(stems) != len(set(stems)):
        raise M.UserError(f"two {per}s share a name: each name can be only one key of {source}")
    missing, extra = sorted(set(stems) - set(preds), key=str), sorted(set(preds) - set(stems), key=str)
    problems = [f"{len(keys)} {what} ({', '.join(map(repr, keys[:3]))}{', ...' if len(keys) > 3 else ''})"
                for what, keys in (("missing", missing), ("extra", extra)) if keys]
    if problems:
        raise M.UserError(f"{source} needs exactly one key per {per}: {', '.join(problems)}")
    for stem, ids in preds.items():
        if not isinstance(ids, list):
            raise M.UserError(f"{source}, key {stem!r}: {as_json(ids)} is not a list of class ids")
        try:
            stem.encode("utf-8")
        except UnicodeEncodeError:
            raise M.UserError(f"test image name {stem!r} is not valid UTF-8: rename the file") from None
        # type() rather than isinstance: JSON true is a Python bool, which isinstance counts as an int
        bad = [c for c in ids if type(c) is not int or not 0 <= c < M.NUM_CLASSES]
        if bad:
            raise M.UserError(f"{source}, key {stem!r}: class id {as_json(bad[0])} is not an integer "
                              f"0-{M.NUM_CLASSES - 1}")
        if ids != sorted(set(ids)):
            raise M.UserError(f"{source}, key {stem!r}: class ids {as_json(ids)} are not unique and ascending")


def write_predictions(path, preds, stems):
    check_predictions(preds, stems)
    M.atomic_write_text(path, json.dumps(preds, indent=1, ensure_ascii=False) + "\n")


def read_predictions(path):
    def one_value_per_key(pairs):       # json keeps the last of a repeated key without a word
        twice = [k for k, n in Counter(k for k, _ in pairs).items() if n > 1]
        if twice:
            raise M.UserError(f"{path}: key {twice[0]!r} appears more than once: each image must be one key")
        return dict(pairs)
    try:
        preds = json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=one_value_per_key)
    except (OSError, ValueError) as exc:
        raise M.UserError(f"cannot read predictions {path}: {exc}") from None
    if not isinstance(preds, dict):
        raise M.UserError(f"{path} is not a JSON object of stem -> class ids")
    return preds


def score_predictions(preds, labels_dir, source="predictions"):
    """preds' challenge scores against a folder of .cls files, checked as exported (a bad id: an error, not 0)."""
    label_files = M.list_images(labels_dir, (".cls",))
    if not label_files:
        raise M.UserError(f"no .cls label files in {labels_dir}: pass the labels folder with --labels")
    stems = [p.stem for p in label_files]
    check_predictions(preds, stems, source, per=f"label file in {labels_dir}")
    y_true = M.read_labels(labels_dir, stems)
    y_pred = np.zeros_like(y_true, dtype=bool)
    for i, stem in enumerate(stems):
        y_pred[i, preds[stem]] = True
    return M.challenge_scores(y_true, y_pred) | {"images": len(stems)}


def print_scores(scores, labels_dir):
    absent = M.NUM_CLASSES - scores["classes_present"]
    print(f"score against {labels_dir} ({scores['images']} images"
          + (f", {absent} classes absent from the labels and left out" if absent else "") + "):")
    print(f"  challenge F1 {scores['f1']:.4f}  P {scores['precision']:.4f}  R {scores['recall']:.4f}  "
          f"macro F1 {scores['macro_f1']:.4f}  micro F1 {scores['micro_f1']:.4f}")


def checkpoint_paths(cfg):
    """--ckpt as files: a run id X (not a file) means CHECKPOINT_DIR/X/best_model.pth; none: the newest run's."""
    if not cfg["ckpt_path"]:
        found = sorted(Path(cfg["checkpoint_dir"]).glob("*/best_model.pth"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise M.UserError(f"no {cfg['checkpoint_dir']}/*/best_model.pth found: train first (python MS_COCO.py) "
                              f"or pass --ckpt PATH")
        return found[-1:]
    runs = [(Path(value), Path(cfg["checkpoint_dir"]) / value / "best_model.pth") for value in cfg["ckpt_path"]]
    return [run if not path.is_file() and run.is_file() else path for path, run in runs]   # a missing one: load says so


def ensemble_weights(text, count):
    """--ensemble-weights as floats summing to 1, one per checkpoint ("" = equal)."""
    if not text:
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise M.UserError(f"--ensemble-weights {text!r}: give numbers separated by commas, e.g. 0.5,0.3,0.2") from None
    if len(weights) != count:
        raise M.UserError(f"--ensemble-weights {text!r} gives {len(weights)} weight(s) for {count} checkpoint(s): "
                          f"give one per --ckpt")
    if not all(np.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise M.UserError(f"--ensemble-weights {text!r}: weights must be >= 0 with a sum above 0")
    return [w / sum(weights) for w in weights]


def load_member(path, keep_weights):
    """A checkpoint with its path; an ensemble's without its weights (reloaded when used)."""
    state = M.load_checkpoint(path)
    return {k: v for k, v in state.items() if keep_weights or k not in WEIGHT_KEYS} | {"path": path}


def reload_weights(member):
    """The member's full checkpoint, checked to be the one described (a run still training may have replaced it)."""
    if "model" in member:
        return member
    state = M.load_checkpoint(member["path"])
    if (state["run_id"], state["epoch"], state.get("time")) != (member["run_id"], member["epoch"], member.get("time")):
        raise M.UserError(f"{member['path']} changed during the export (is its run still training?): "
                          f"run the same command again")
    return state


def model_probs(state, images, device, cfg):
    """One checkpoint's probabilities with its normalisation, and its TTA and AMP unless --[no-]tta, --[no-]amp say."""
    model = M.model_from_checkpoint(state).to(device)
    amp = state["config"].get("amp", True) if cfg.get("amp") is None else cfg["amp"]
    tta = state.get("tta", False) if cfg.get("tta") is None else cfg["tta"]
    return M.predict(model, images, device, tta=tta, batch_size=cfg["batch_size"], amp=amp, mean=state["mean"],
                     std=state["std"])


def predict_ensemble(members, weights, test_dir, cfg):
    """(stems, weighted mean of the members' probabilities) of test_dir's images (NaN rows: unreadable), decoded once
    per image size, the models run one after another: one model and one decoded copy in memory at a time."""
    paths = list_test_images(test_dir)
    device = M.pick_device(cfg["device"])
    total, unreadable = np.zeros((len(paths), M.NUM_CLASSES), np.float64), {}
    for size in dict.fromkeys(m["image_size"] for m in members):
        images, bad = M.decode_all(paths, size, threads=cfg["loader_threads"], desc=f"test images {size}px")
        unreadable.update(bad)
        for member, weight in zip(members, weights):
            if member["image_size"] == size:
                # the checkpoint unnamed: freed before the next model is loaded
                total += weight * np.asarray(model_probs(reload_weights(member), images, device, cfg), np.float64)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del images
    for i, why in sorted(unreadable.items()):
        print(f"warning: {paths[i]} cannot be read ({why}); it gets an empty prediction", file=sys.stderr)
        total[i] = np.nan
    return [p.stem for p in paths], total.astype(np.float32)


def predict_folder(state, test_dir, cfg):
    """Probabilities of one checkpoint for every image of test_dir; unreadable images get a row of NaN."""
    return predict_ensemble([state], [1.0], test_dir, cfg)


def read_validation(member):
    """(split path, sorted (train, val) stems, val stems, probs, labels) its run saved (outputs/<run_id>/)."""
    folder = Path(member["config"]["output_dir"]) / member["run_id"]
    split_path, scores_path = folder / "split.json", folder / "val_scores.npz"
    for path in (split_path, scores_path):
        if not path.is_file():
            raise M.UserError(f"run {member['run_id']} has no {path}: an ensemble's thresholds are fitted on the "
                              f"validation scores of runs sharing one split; {FIXED_THRESHOLD_HINT}")
    try:
        split = json.loads(split_path.read_text())
        with np.load(scores_path) as z:
            stems, probs, labels, epoch = [str(s) for s in z["stems"]], z["probs"], z["labels"], int(z["epoch"])
        split = (sorted(split["train"]), sorted(split["val"]))
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise M.UserError(f"cannot read run {member['run_id']}'s {split_path} or {scores_path} "
                          f"({type(exc).__name__}); {FIXED_THRESHOLD_HINT}") from None
    if epoch != member["epoch"]:
        raise M.UserError(f"{scores_path} holds epoch {epoch}'s validation scores but {member['path']} is epoch "
                          f"{member['epoch']}: ensemble the runs' best_model.pth, {FIXED_THRESHOLD_HINT}")
    if sorted(stems) != split[1]:
        raise M.UserError(f"{scores_path} does not score the validation images of {split_path}; {FIXED_THRESHOLD_HINT}")
    return split_path, split, stems, probs, labels


def shared_validation(members):
    """(labels, [each member's probs]) on the members' common validation split, in the first member's order. Other
    splits are refused: thresholds fitted there would be scored on images another run trained on (optimistic)."""
    first_path, first_split, order, _, labels = read_validation(members[0])
    member_probs = []
    for member in members:
        split_path, split, stems, probs, _ = read_validation(member)     # the first again: one loop for all
        if split != first_split:
            raise M.UserError(f"runs {members[0]['run_id']} and {member['run_id']} have different validation splits "
                              f"({first_path} vs {split_path}): thresholds fitted on one run's validation images "
                              f"would be scored on images the other trained on; train them with the same --seed "
                              f"and --val-fraction on the same data, {FIXED_THRESHOLD_HINT}")
        row = {s: i for i, s in enumerate(stems)}
        member_probs.append(np.asarray(probs, np.float64)[[row[s] for s in order]])
    return labels, member_probs


def heldout_estimate(cal):
    return f"out-of-fold validation F1 {cal['heldout_f1'][cal['chosen']]:.4f} ({cal['chosen']} thresholds)"


def calibrate_ensemble(members, weights, cfg):
    """The ensemble's thresholds, fitted on its averaged validation probabilities by training's calibration (mode:
    --thresholds, else the first run's; its grid and seed); each member re-estimated alike, so the figures compare."""
    labels, member_probs = shared_validation(members)
    run = members[0]["config"]
    mode = cfg["thresholds"] or run.get("thresholds", "global")
    taus = M.threshold_grid(run["threshold_min"], run["threshold_max"], run["threshold_step"])
    calibrate = lambda probs: M.calibrate_thresholds(labels, probs, taus, mode, seed=run["seed"])
    for member, probs in zip(members, member_probs):
        print(f"  run {member['run_id']}: {heldout_estimate(calibrate(probs))}")
    cal = calibrate(sum(w * p for w, p in zip(weights, member_probs)))
    print(f"  ensemble of {len(members)}: {heldout_estimate(cal)} on {len(labels)} shared validation images")
    return cal


def export_thresholds(members, weights, cfg):
    """{"threshold": ...}: --threshold-value, a checkpoint's own (or stored option), an ensemble's fitted anew."""
    if cfg["threshold_value"]:
        return {"threshold": cfg["threshold_value"]}
    if len(members) == 1:
        return choose_thresholds(members[0], cfg["thresholds"])
    return calibrate_ensemble(members, weights, cfg)


def describe_member(m, weight=None):
    extra = f", {m['image_size']}px, weight {weight:.3g}" if weight is not None else ""
    return (f"checkpoint {m['path']} (run {m['run_id']}, epoch {m['epoch']}, {m['arch']}{extra}, "
            f"validation F1 {m['val_metrics'].get('f1', float('nan')):.4f})")


def export(cfg):
    check_out_path(cfg["out"])
    paths = checkpoint_paths(cfg)
    weights = ensemble_weights(cfg["ensemble_weights"], len(paths))
    runs = [(p, w) for p, w in zip(paths, weights) if w > 0]
    members = [load_member(p, keep_weights=len(runs) == 1) for p, _ in runs]
    weights = [w for _, w in runs]
    test_dir = find_test_dir(cfg["test_dir"])
    if len(members) == 1:
        print(f"{describe_member(members[0])}; test images {test_dir}")
    else:
        print(f"ensemble of {len(members)} checkpoints; test images {test_dir}")
        for m, w in zip(members, weights):
            print("  " + describe_member(m, w))
    chosen = export_thresholds(members, weights, cfg)
    stems, probs = predict_ensemble(members, weights, test_dir, cfg)
    finite = np.isfinite(probs).all(1)
    if (~finite).sum() > sum(np.isnan(probs).all(1)):
        print(f"warning: {int((~finite).sum())} image(s) got non-finite scores; they get an empty prediction",
              file=sys.stderr)
    pred = M.binarize(probs, chosen["threshold"]) & finite[:, None]
    preds = predictions_dict(stems, pred)
    write_predictions(cfg["out"], preds, stems)
    per_image, th = pred.sum(1), chosen["threshold"]
    shown = f"per class, {min(th):.2f}-{max(th):.2f}" if np.ndim(th) else f"global {th:.2f}"
    print(f"wrote {cfg['out']}: {len(stems)} images, {per_image.mean():.2f} labels per image, "
          f"{int((per_image == 0).sum())} with none (thresholds: {shown})")
    return preds


def choose_thresholds(state, option):
    """The checkpoint's thresholds, or another option it stores (global tau*, per-class): no retraining."""
    if not option:
        return state
    if option not in THRESHOLD_OPTIONS:
        raise M.UserError(f"unknown --thresholds {option!r}: {', '.join(THRESHOLD_OPTIONS)} (or leave it empty)")
    cal = state.get("thresholds") or {}
    if "global_tau" not in cal or "per_class" not in cal:
        raise M.UserError("this checkpoint stores only its chosen threshold; leave --thresholds empty")
    return {**state, "threshold": M.option_thresholds(option, float(cal["global_tau"]),
                                                      [float(t) for t in cal["per_class"]])}


def add_export_arguments(parser):
    parser.add_argument("--ckpt-path", "--ckpt", dest="ckpt_path", nargs="+", default=[], metavar="CKPT",
                        help="checkpoint file(s), or run id(s) meaning CHECKPOINT_DIR/<id>/best_model.pth; several "
                             "are an ensemble: their probabilities are averaged and thresholds fitted on the "
                             "validation split they share (default: the newest CHECKPOINT_DIR/*/best_model.pth)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="also score the mirrored images (default: as each checkpoint was trained)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast on CUDA, ignored on CPU (default: as each checkpoint was trained)")


def parse_config(argv=None):
    cfg = M.parse_options(sys.modules[__name__], "Write predictions.json from a trained checkpoint, or an "
                          "ensemble of several.", argv, add_export_arguments)[0]
    if cfg["threshold_value"] and cfg["thresholds"] == "per_class":
        raise M.UserError("--threshold-value is one global threshold: it cannot be --thresholds per_class")
    return cfg


def main(argv=None):
    try:
        cfg = parse_config(argv)
        if cfg["predictions"]:
            if not cfg["labels"]:
                raise M.UserError("--predictions needs --labels DIR to score against")
            preds = read_predictions(cfg["predictions"])
        else:
            preds = export(cfg)
        if cfg["labels"]:
            scores = score_predictions(preds, cfg["labels"], cfg["predictions"] or cfg["out"])
            print_scores(scores, cfg["labels"])
            return scores
        return preds
    except M.UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:   # files are written by atomic replace: none is ever left half-written
        print("interrupted: no file was left half-written; run the same command again", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
