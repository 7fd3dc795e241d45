"""Ablation of the training options on a fixed budget: which ones lift the validation challenge F1?

    python ablation.py                                  # demo dataset (built if absent), CPU, 3 seeds
    python ablation.py --data-dir ms-coco --image-size 224 --batch-size 256 --epochs 12 --device cuda
    python ablation.py --variants default,asl,strong --seeds 0,1,2,3,4
    python ablation.py --preset real                    # ImageNet EfficientNet-Lite0 on ../shared/coco-sample, CPU

Every variant trains with MS_COCO.train on the same data, size, batch and epoch budget, once
per seed (the seed also draws the validation split), and is scored on validation only: the
challenge F1 at the global tau* (the checkpoint-selection figure), macro F1 and mAP of the best
epoch, and the held-out F1 of each threshold option (fitted on 4/5 of validation, scored on the
rest, see MS_COCO.calibrate_thresholds). Writes a markdown table (mean +- sample std over seeds)
and the per-run figures as JSON. No test data is read.
"""

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import MS_COCO as M
import MS_COCO_test as T

DATA_DIR = "demo-data"                 # dataset in the challenge layout (the demo's is generated when absent)
OUT_DIR = "outputs/ablation"           # table.md, runs.json, and every run's folders
VARIANTS = "default,asl,sampling,ema,cosine,tta,sampling+asl+ema+tta,strong,default-longer,sampling+asl,sampling+asl-longer"   # comma-separated names of VARIANT_OPTIONS
SEEDS = "0,1,2"                        # one run per seed and variant
EPOCHS = 10                            # the fixed budget of every run
IMAGE_SIZE = 64                        # px
BATCH_SIZE = 64                        # images per step
LR = 2e-3                              # initial learning rate
LR_STEP = 7                            # step schedule: epochs between halvings (scaled to the short budget)
WEIGHTS = "none"                       # imagenet | none | path (the demo has no pretrained weights offline)
DEVICE = "auto"                        # auto | cpu | cuda
ARCH = "resnet18"                      # backbone
CACHE_DIR = ""                         # image and feature cache ("" = MS_COCO.py's choice)
PRESET = "synthetic"                   # synthetic (the demo's shapes, above) | real (REAL below: ImageNet Lite0 on real photos) | oneout (ONEOUT below: the finetune recipe, one component at a time)

# What each variant changes relative to the default recipe.
VARIANT_OPTIONS = {
    "default": {},
    "asl": dict(loss="asl"),
    "sampling": dict(class_balance="sampling"),
    "ema": dict(ema_decay=0.998),
    "cosine": dict(schedule="cosine", warmup_epochs=1.0),
    "tta": dict(tta=True),
    "strong": dict(recipe="strong"),
    # Candidate bundles tried before settling MS_COCO.RECIPES["strong"].
    "sampling+asl+ema+tta": dict(class_balance="sampling", loss="asl", ema_decay=0.998, tta=True),
    # The default recipe given the strong recipe's wall time (its sampling, EMA and TTA cost ~25%).
    "default-longer": dict(epochs=13, lr_step=9),
    "sampling+asl": dict(class_balance="sampling", loss="asl"),
    "sampling+asl-longer": dict(class_balance="sampling", loss="asl", epochs=13, lr_step=9),
}
BUDGET_KEYS = ("epochs", "lr_step", "image_size", "batch_size", "freeze")   # options that change a variant's budget

# --preset real: ../shared/coco-sample (2,264 train / 400 validation real COCO photos; its 600
# labelled test photos are scored for information only, never to choose), EfficientNet-Lite0
# with ImageNet weights, 224 px, on the CPU. Linear probes train on cached features (seconds);
# fine-tunes are few and short, their budget matched in wall time (about 3 minutes a run).
PROBE = dict(freeze="backbone", crop_scale_min=1.0, hflip=False, head_bias_prior=False, lr=1e-3, epochs=15)
REAL = dict(data_dir="../shared/coco-sample/ms-coco", cache_dir="cache/coco-sample", arch="efficientnet_lite0", weights="imagenet",
            image_size=224, batch_size=32, epochs=5, lr=1e-3, lr_step=30,
            variants="probe,probe+bias,probe+bias+asl,probe+bias+asl+sampling,finetune,finetune-crop0.5,default-128,"
                     "default-128-5ep")
VARIANT_OPTIONS.update({
    "probe": PROBE,                                            # linear head, BCE, Adam: the reference point
    "probe+bias": dict(PROBE, head_bias_prior=True),
    "probe+bias+asl": dict(PROBE, head_bias_prior=True, loss="asl"),
    "probe+bias+asl+sampling": dict(PROBE, head_bias_prior=True, loss="asl", class_balance="sampling"),
    # the finetune recipe: 3 head epochs on features, then 2 of the last two stages + head at 224 px
    "finetune": dict(recipe="finetune", freeze="partial", epochs=5),
    "finetune-crop0.5": dict(recipe="finetune", freeze="partial", epochs=5, crop_scale_min=0.5),
    # the product recipe (Adam 1e-3, whole network, crop 0.5) at 128 px: 2 epochs ...
    "default-128": dict(image_size=128, epochs=2),
    "default-128-5ep": dict(image_size=128, epochs=5),        # ... and at the finetune runs' wall time
})
# --preset oneout: the finetune recipe on REAL's photos and budget, and the recipe with each component
# replaced by its plain alternative (one out at a time), plus mirrored test-time augmentation on top.
FINETUNE = VARIANT_OPTIONS["finetune"]
VARIANT_OPTIONS.update({
    "ft-no-head-phase": dict(FINETUNE, head_epochs=0),
    "ft-adam": dict(FINETUNE, optimizer="adam"),
    "ft-backbone-lr-x1": dict(FINETUNE, backbone_lr_scale=1.0),
    "ft-no-weight-decay": dict(FINETUNE, weight_decay=0.0),
    "ft-step-schedule": dict(FINETUNE, schedule="step", warmup_epochs=0.0),
    "ft-no-ema": dict(FINETUNE, ema_decay=0.0),
    "ft-bce-no-sampling": dict(FINETUNE, loss="bce", class_balance="none"),
    "ft-crop0.5": dict(FINETUNE, crop_scale_min=0.5),
    "ft+tta": dict(FINETUNE, tta=True),
})
ONEOUT = dict(REAL, variants="finetune,ft-no-head-phase,ft-adam,ft-backbone-lr-x1,ft-no-weight-decay,ft-step-schedule,"
                             "ft-no-ema,ft-bce-no-sampling,ft-crop0.5,ft+tta")
PRESETS = {"real": REAL, "oneout": ONEOUT}


def parse_args(argv=None):
    return M.parse_options(sys.modules[__name__], "Ablation of MS_COCO.py's training options.", argv)[0]


def run_one(args, variant, seed, out_dir):
    if variant not in VARIANT_OPTIONS:
        raise M.UserError(f"unknown variant {variant!r}: {', '.join(VARIANT_OPTIONS)}")
    cfg = M.default_config()
    cfg.update(data_dir=args["data_dir"], arch=args["arch"], weights=args["weights"], image_size=args["image_size"],
               batch_size=args["batch_size"], epochs=args["epochs"], lr=args["lr"], lr_step=args["lr_step"],
               device=args["device"], seed=seed, keep_epochs=0, reports=False, run_id=f"{variant}-s{seed}",
               checkpoint_dir=str(out_dir / "checkpoints"), output_dir=str(out_dir / "outputs"),
               runs_dir=str(out_dir / "runs"), cache_dir=args["cache_dir"])
    for folder in M.run_dirs(cfg, cfg["run_id"]).values():  # an interrupted attempt of this run starts over
        shutil.rmtree(folder, ignore_errors=True)
    plumbing = set(cfg) - {"epochs", "lr", "lr_step"}        # a recipe's own values win over the base budget
    cfg.update(VARIANT_OPTIONS[variant])
    t0 = time.time()
    result = M.train(cfg, log=lambda *_: None, given=(plumbing - set(M.RECIPES[cfg["recipe"]]))
                     | set(VARIANT_OPTIONS[variant]))
    seconds = time.time() - t0
    state = M.load_checkpoint(result["best_path"])
    vm = state["val_metrics"]
    run = {"variant": variant, "seed": seed, "f1": vm["f1"], "macro_f1": vm["macro_f1"], "map": vm["map"],
           "tau": vm["tau"], "best_epoch": state["epoch"], "seconds": seconds,
           "heldout_f1": state["thresholds"]["heldout_f1"], "thresholds_chosen": state["thresholds"]["chosen"]}
    test = M.find_layout(cfg["data_dir"])
    if test["test_images"] and test["test_labels"]:
        run["test_f1"] = test_scores(state, test["test_images"], test["test_labels"], cfg["device"])
    return run


def test_scores(state, test_dir, labels_dir, device):
    """Challenge F1 on labelled test photos at each threshold option: for information only."""
    stems, probs = T.predict_folder(state, test_dir, dict(device=device, loader_threads=0, batch_size=64))
    y = M.read_labels(labels_dir, stems)
    cal = state["thresholds"]
    out = {}
    for name in T.THRESHOLD_OPTIONS:
        th = M.option_thresholds(name, cal["global_tau"], np.asarray(cal["per_class"]))
        out[name] = M.challenge_scores(y, M.binarize(probs, th))["f1"]
    out["chosen"] = out[cal["chosen"]]
    return out


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values, digits=4):
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def test_cell(rs, name):
    return fmt([r["test_f1"][name] for r in rs]) if all("test_f1" in r for r in rs) else "-"


def budget_note(variants):
    changed = {v: {k: o for k, o in VARIANT_OPTIONS.get(v, {}).items() if k in BUDGET_KEYS} for v in variants}
    parts = [f"{v}: " + ", ".join(f"{k} {o}" for k, o in c.items()) for v, c in changed.items() if c]
    return f" (except {'; '.join(parts)})" if parts else ""


def paired_lines(runs, variants):
    """Each variant minus the first (the reference) on the seeds both ran: differences are paired, so the split and
    the initialisation, which move every variant alike, cancel out."""
    ref = {r["seed"]: r for r in runs if r["variant"] == variants[0]}
    lines = ["", f"Paired difference to `{variants[0]}` on the seeds both ran (mean ± sample std; wins = seeds where "
             f"the variant is higher), and the best epoch of each seed:", "",
             "| variant | seeds | validation F1 difference | wins | held-out per-class difference | "
             "test per-class difference (info) | best epochs |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in variants:
        rs = [r for r in runs if r["variant"] == v and r["seed"] in ref]
        d = [r["f1"] - ref[r["seed"]]["f1"] for r in rs]
        h = [r["heldout_f1"]["per_class"] - ref[r["seed"]]["heldout_f1"]["per_class"] for r in rs]
        t = [r["test_f1"]["per_class"] - ref[r["seed"]]["test_f1"]["per_class"] for r in rs
             if "test_f1" in r and "test_f1" in ref[r["seed"]]]
        lines.append(f"| {v} | {', '.join(str(r['seed']) for r in rs)} | {fmt(d)} | {sum(x > 0 for x in d)} of "
                     f"{len(d)} | {fmt(h)} | {fmt(t) if t else 'n/a'} | {', '.join(str(r['best_epoch']) for r in rs)} |")
    return lines


def table(runs, args):
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    lines = [f"Validation figures of the best epoch, mean ± sample std over seeds {seeds}; "
             f"{args['arch']} ({args['weights']}), {args['image_size']} px, batch {args['batch_size']}, "
             f"{args['epochs']} epochs, data {args['data_dir']}{budget_note(variants)}.", "",
             "| variant | challenge F1 @ global tau* | macro F1 | mAP | held-out F1, global | held-out F1, per-class "
             "| per-class gain | test F1, global (info) | test F1, per-class (info) | time (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        g = [r["heldout_f1"]["global"] for r in rs]
        pc = [r["heldout_f1"]["per_class"] for r in rs]
        lines.append(f"| {v} | {fmt([r['f1'] for r in rs])} | {fmt([r['macro_f1'] for r in rs])} | "
                     f"{fmt([r['map'] for r in rs])} | {fmt(g)} | {fmt(pc)} | "
                     f"{fmt([b - a for a, b in zip(g, pc)])} | {test_cell(rs, 'global')} | "
                     f"{test_cell(rs, 'per_class')} | {fmt([r['seconds'] for r in rs], 0)} |")
    lines += paired_lines(runs, variants)
    gains = {name: [r["heldout_f1"][name] - r["heldout_f1"]["global"] for r in runs]
             for name in T.THRESHOLD_OPTIONS if name != "global"}
    lines += ["", f"Held-out gain of each threshold option over the global tau*, all {len(runs)} runs "
              "(fitted on 4/5 of validation, scored on the other 1/5, 5 folds):", ""]
    lines += [f"- {name}: {fmt(g)} (better in {sum(x > 0 for x in g)} of {len(g)} runs)" for name, g in gains.items()]
    tested = [r for r in runs if "test_f1" in r]
    if tested:
        lines += ["", f"For information only (never used to choose), the same on the labelled test photos, "
                  f"{len(tested)} runs:", ""]
        lines += [f"- {name}: {fmt([r['test_f1'][name] - r['test_f1']['global'] for r in tested])}"
                  for name in T.THRESHOLD_OPTIONS if name != "global"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args["preset"] in PRESETS:
        given = M.parse_options(sys.modules[__name__], "", argv)[1]
        args.update({k: v for k, v in PRESETS[args["preset"]].items() if k not in given})
    out_dir = Path(args["out_dir"])
    if args["data_dir"] == DATA_DIR and not (Path(DATA_DIR) / "labels" / "train").is_dir():
        M.make_demo_dataset(DATA_DIR)
    runs_path = out_dir / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else []
    done = {(r["variant"], r["seed"]) for r in runs}
    try:
        for variant in args["variants"].split(","):
            for seed in (int(s) for s in args["seeds"].split(",")):
                if (variant, seed) in done:      # a rerun continues where an interrupted one stopped
                    continue
                r = run_one(args, variant, seed, out_dir)
                runs.append(r)
                M.atomic_write_text(runs_path, json.dumps(runs, indent=1))
                print(f"{variant:10s} seed {seed}: F1 {r['f1']:.4f}  macro F1 {r['macro_f1']:.4f}  mAP {r['map']:.4f}  "
                      f"held-out global {r['heldout_f1']['global']:.4f} per-class {r['heldout_f1']['per_class']:.4f}  "
                      f"{r['seconds']:.0f}s", flush=True)
    except M.UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    wanted = set(args["variants"].split(","))
    text = table([r for r in runs if r["variant"] in wanted], args)
    M.atomic_write_text(out_dir / "table.md", text)
    print(text)
    if args["preset"] == "real":
        print("The same comparison on full COCO with a GPU (validation only; no test labels there):\n"
              "  python ablation.py --preset real --data-dir ms-coco --cache-dir '' --device cuda "
              "--batch-size 256 --out-dir outputs/ablation-coco")
    return runs


if __name__ == "__main__":
    main()
