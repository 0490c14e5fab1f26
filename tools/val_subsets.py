"""
How far a small validation set can move a comparison: re-scores the runs of a tools/real_data.py results.json on
random subsets of their validation frames, from the pixel counts each run saved (per_image.json beside its
checkpoint), without re-running any model.

For each comparison (row A minus row B, per mode and budget, paired by seed) it prints the paired difference on
every frame, then over --draws random subsets of --frames frames (one subset scores every row and seed, as one
small validation split would): the spread of the mean difference, how often its sign differs from the full set's,
and how often its 95% t-interval excludes 0.

    python tools/val_subsets.py runs/udder_full/results.json --frames 15
    python tools/val_subsets.py runs/udder_full/results.json --frames 15,50,150 --pairs clip:rule-clip:peak
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_data import ci_text, paired_ci, t_quantile  # noqa: E402


def load_counts(results):
    """{(row, mode, budget): {seed: (intersection, union)}}, each an (images, classes) array in one frame order."""
    runs, names = {}, None
    for name, d in results["run_details"].items():
        path = os.path.join(os.path.dirname(d["checkpoint"]), "per_image.json")
        if not os.path.exists(path):
            raise SystemExit(f"error: {path} is missing (run {name}): its pixel counts are needed")
        images = json.load(open(path))["images"]
        if names is None:
            names = sorted(images)
        if sorted(images) != names:
            raise SystemExit(f"error: {path} scores other frames than the first run's ({len(images)} vs {len(names)})")
        inter = np.array([images[k]["intersection"] for k in names], dtype=np.float64)
        union = np.array([images[k]["union"] for k in names], dtype=np.float64)
        runs.setdefault((d["row"], d["mode"], int(d["budget"])), {})[d["seed"]] = (inter, union)
    return runs, names


def miou(inter, union, subsets):
    """mIoU (%) of each subset (a (draws, frames) index array, or None for every frame): pixels summed over the
    subset's frames, then IoU per class, then the mean over classes that occur (union > 0)."""
    if subsets is None:
        i, u = inter.sum(0, keepdims=True), union.sum(0, keepdims=True)  # (1, C)
    else:
        i, u = inter[subsets].sum(1), union[subsets].sum(1)  # (draws, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100 * np.nanmean(np.where(u > 0, i / u, np.nan), axis=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a tools/real_data.py results.json (its runs' folders must still exist)")
    p.add_argument("--frames", default="15", help="subset sizes, comma-separated (default 15)")
    p.add_argument("--draws", type=int, default=2000, help="random subsets per size (default 2000)")
    p.add_argument("--pairs", default="", help="comparisons 'A-B,...' (default: every row minus scratch, and the "
                                               "results' between-layer comparisons)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset draws")
    args = p.parse_args(argv)
    results = json.load(open(args.results))
    runs, names = load_counts(results)
    sizes = [int(v) for v in args.frames.split(",")]
    if min(sizes) < 1 or max(sizes) > len(names):
        raise SystemExit(f"error: --frames {args.frames}: subsets of 1 to {len(names)} frames")
    if args.pairs:
        pairs = [tuple(s.split("-")) for s in args.pairs.split(",")]
        if any(len(q) != 2 for q in pairs):
            raise SystemExit(f"error: --pairs {args.pairs!r}: comma-separated 'A-B' row pairs, e.g. clip:rule-scratch")
    else:  # between-layer keys are 'a/b/mode/bBUDGET'
        rows = [r for r in results["rows"] if r != "scratch" and not r.endswith("teacher")]
        pairs = [(r, "scratch") for r in rows] + list(dict.fromkeys(
            tuple(k.split("/")[:2]) for k in results.get("between_layers", {})))
    rng = np.random.default_rng(args.seed)
    draws = {n: np.stack([rng.choice(len(names), n, replace=False) for _ in range(args.draws)]) for n in sizes}
    print(f"{len(names)} validation frames; {args.draws} random subsets per size; differences in mIoU points, "
          f"paired by seed (A - B)")
    print("| A - B | mode | budget | every frame: mean [95% CI] | frames | subset mean: sd | 2.5-97.5% | "
          "sign flips | CI excludes 0 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for a, b in pairs:
        for (row, mode, budget) in sorted(k for k in runs if k[0] == a):
            if (b, mode, budget) not in runs:
                continue
            ra, rb = runs[(a, mode, budget)], runs[(b, mode, budget)]
            seeds = sorted(set(ra) & set(rb))
            if not seeds:
                continue
            full = paired_ci([miou(*ra[s], None)[0] for s in seeds], [miou(*rb[s], None)[0] for s in seeds])
            for n in sizes:
                d = np.stack([miou(*ra[s], draws[n]) - miou(*rb[s], draws[n]) for s in seeds], 1)  # (draws, seeds)
                mean = d.mean(1)
                flips = np.mean(np.sign(mean) != np.sign(full["mean"]))
                if len(seeds) > 1:  # the t-interval of each subset's seed differences, as paired_ci computes it
                    half = t_quantile(0.975, len(seeds) - 1) * d.std(1, ddof=1) / np.sqrt(len(seeds))
                    excl = f"{100 * np.mean(np.abs(mean) > half):.0f}%"
                else:
                    excl = "(1 seed)"
                lo, hi = np.percentile(mean, [2.5, 97.5])
                print(f"| {a} - {b} | {mode} | {budget} | {ci_text(full)} | {n} | {mean.std(ddof=1):.1f} | "
                      f"{lo:+.1f} to {hi:+.1f} | {100 * flips:.0f}% | {excl} |")


if __name__ == "__main__":
    main()
