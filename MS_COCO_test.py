"""Write predictions.json for the challenge's test images from a trained checkpoint.

    python MS_COCO_test.py                                   # newest checkpoints/*/best_model.pth -> predictions.json
    python MS_COCO_test.py --ckpt checkpoints/<run_id>/best_model.pth --out outputs/<run_id>/predictions.json
    python MS_COCO_test.py --labels path/to/labels           # also score the predictions like the leaderboard
    python MS_COCO_test.py --predictions predictions.json --labels path/to/labels   # score a file only

The checkpoint carries everything needed: architecture, image size, normalisation and the
threshold(s) tuned on validation. Preprocessing is imported from MS_COCO.py, never copied.
The JSON maps every test image's stem to its class ids, ascending: {"000000000139": [56, 60], ...}.
"""

import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

import MS_COCO as M

# ---------------------------------------------------------------- constants
CKPT_PATH = ""                              # checkpoint to use ("" = newest CHECKPOINT_DIR/*/best_model.pth)
CHECKPOINT_DIR = "checkpoints"              # where the newest run is looked for
TEST_DIR = "ms-coco/images/test-resized"    # test images (images/test and nested folders are found too)
OUT = "predictions.json"                    # output JSON (parent folders are created)
LABELS = ""                                 # a labels folder (.cls files) to score the predictions against
PREDICTIONS = ""                            # score this existing JSON against --labels instead of predicting
BATCH_SIZE = 256                            # images per forward pass
DEVICE = "auto"                             # auto (cuda when present) | cpu | cuda | cuda:N | mps
LOADER_THREADS = 0                          # decode threads (0 = one per core)
THRESHOLDS = ""                             # "" = the checkpoint's choice | global | per_class | global+top1 | per_class+top1

CHOICES = {"thresholds": ("",) + M.THRESHOLD_OPTIONS}
RANGES = {"batch_size": ">= 1", "loader_threads": ">= 0"}


def newest_checkpoint(checkpoint_dir):
    found = sorted(Path(checkpoint_dir).glob("*/best_model.pth"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise M.UserError(f"no {checkpoint_dir}/*/best_model.pth found: train first (python MS_COCO.py) "
                          f"or pass --ckpt PATH")
    return found[-1]


def find_test_dir(test_dir):
    """The given folder, or the variants of the challenge layout around it."""
    path = Path(test_dir)
    nested = path / path.name
    if nested.is_dir():
        return nested
    if path.is_dir():
        return path
    root = path.parent.parent if path.parent.name == "images" else path.parent
    layout_root = root if (root / "images").is_dir() else None
    if layout_root is not None:
        found = M.find_layout(layout_root)["test_images"] if (layout_root / "labels").is_dir() else None
        if found:
            return found
    raise M.UserError(f"test image folder {test_dir} does not exist: pass --test-dir")


def list_test_images(test_dir):
    """The test images (folders skipped, broken links kept: they get [] with a warning), one per
    stem: two files with one stem (x.jpg beside x.png) are refused, as both would claim the key "x"."""
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
    """--out checked before minutes of prediction: not a folder, under folders (or a place where
    they can be made), writable. The probe creates and removes a real file, as os.access does not
    see read-only mounts, ACLs or root's exemptions the way a write does."""
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
    """The submission's format, shared by the export (before writing) and the scoring (before
    scoring): exactly one key per stem, ids int 0-79 unique and ascending. The error names the
    first offending key and its value, or a few of the missing and extra keys."""
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
    try:
        preds = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise M.UserError(f"cannot read predictions {path}: {exc}") from None
    if not isinstance(preds, dict):
        raise M.UserError(f"{path} is not a JSON object of stem -> class ids")
    return preds


def score_predictions(preds, labels_dir, source="predictions"):
    """The challenge F1 (with P, R, macro and micro F1) of preds against a folder of .cls files.
    preds pass the export's own check first, so a malformed id is an error, not a silent 0."""
    label_files = M.list_labels(labels_dir)
    if not label_files:
        raise M.UserError(f"no .cls label files in {labels_dir}: pass the labels folder with --labels")
    stems = [p.stem for p in label_files]
    check_predictions(preds, stems, source, per=f"label file in {labels_dir}")
    y_true = M.read_labels(labels_dir, stems)
    y_pred = np.zeros_like(y_true, dtype=bool)
    for i, stem in enumerate(stems):
        y_pred[i, preds[stem]] = True
    scores = M.challenge_scores(y_true, y_pred)
    scores["images"] = len(stems)
    return scores


def print_scores(scores, labels_dir):
    absent = M.NUM_CLASSES - scores["classes_present"]
    print(f"score against {labels_dir} ({scores['images']} images"
          + (f", {absent} classes absent from the labels and left out" if absent else "") + "):")
    print(f"  challenge F1 {scores['f1']:.4f}  P {scores['precision']:.4f}  R {scores['recall']:.4f}  "
          f"macro F1 {scores['macro_f1']:.4f}  micro F1 {scores['micro_f1']:.4f}")


def predict_folder(state, test_dir, cfg):
    """Probabilities for every image of test_dir; unreadable images get a row of NaN."""
    paths = list_test_images(test_dir)
    device = M.pick_device(cfg["device"])
    model = M.model_from_checkpoint(state).to(device)
    images, bad = M.decode_all(paths, state["image_size"], threads=cfg["loader_threads"], desc="test images")
    probs = M.predict(model, images, device, cfg["batch_size"], amp=True, mean=state["mean"], std=state["std"],
                      tta=state.get("tta", False))
    for i, why in bad:
        print(f"warning: {paths[i]} cannot be read ({why}); it gets an empty prediction", file=sys.stderr)
        probs[i] = np.nan
    return [p.stem for p in paths], probs


def export(cfg):
    check_out_path(cfg["out"])
    ckpt = Path(cfg["ckpt_path"]) if cfg["ckpt_path"] else newest_checkpoint(cfg["checkpoint_dir"])
    state = choose_thresholds(M.load_checkpoint(ckpt), cfg["thresholds"])
    test_dir = find_test_dir(cfg["test_dir"])
    print(f"checkpoint {ckpt} (run {state['run_id']}, epoch {state['epoch']}, {state['arch']}, "
          f"validation F1 {state['val_metrics'].get('f1', float('nan')):.4f}); test images {test_dir}")
    stems, probs = predict_folder(state, test_dir, cfg)
    finite = np.isfinite(probs).all(1)
    if (~finite).sum() > sum(np.isnan(probs).all(1)):
        print(f"warning: {int((~finite).sum())} image(s) got non-finite scores; they get an empty prediction",
              file=sys.stderr)
    pred = M.apply_thresholds(np.where(finite[:, None], probs, 0.0), state["threshold"],
                              state.get("min_one_label", False)) & finite[:, None]
    preds = predictions_dict(stems, pred)
    write_predictions(cfg["out"], preds, stems)
    per_image = pred.sum(1)
    print(f"wrote {cfg['out']}: {len(stems)} images, {per_image.mean():.2f} labels per image, "
          f"{int((per_image == 0).sum())} with none (thresholds: {describe_threshold(state)})")
    return preds


def choose_thresholds(state, option):
    """The checkpoint's thresholds, or another of the options it stores (global tau* and the
    fitted per-class thresholds), so switching needs no retraining."""
    if not option:
        return state
    if option not in M.THRESHOLD_OPTIONS:
        raise M.UserError(f"unknown --thresholds {option!r}: {', '.join(M.THRESHOLD_OPTIONS)} (or leave it empty)")
    cal = state.get("thresholds") or {}
    if "global_tau" not in cal or "per_class" not in cal:
        raise M.UserError("this checkpoint stores only its chosen threshold; leave --thresholds empty")
    th, min_one = M.option_thresholds(option, float(cal["global_tau"]), [float(t) for t in cal["per_class"]])
    return {**state, "threshold": th, "min_one_label": min_one}


def describe_threshold(state):
    th = state["threshold"]
    text = f"per class, {min(th):.2f}-{max(th):.2f}" if np.ndim(th) else f"global {th:.2f}"
    return text + (", at least one label per image" if state.get("min_one_label") else "")


def parse_config(argv=None):
    module = sys.modules[__name__]
    parser = M.build_parser(module, "Write predictions.json from a trained checkpoint.")
    parser.add_argument("--ckpt", dest="ckpt_path", help="alias of --ckpt-path")
    given = vars(parser.parse_args(argv))
    cfg = {k: v for k, (v, _) in M.module_constants(module).items()}
    cfg.update(given)
    return M.validate_options(cfg, RANGES, CHOICES)


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
        print("interrupted: no file was left half-written; run the same command again",
              file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
