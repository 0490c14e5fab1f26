"""
The real-data experiment: NMI-HAD from real pre-trained teachers into a small ViT, on real thermal frames,
against the same ViT from scratch; several seeds, label budgets, paired 95% t-intervals.

  1. split     the labelled set's train / validation images: its own split folders (--val-img-dir), or every
               --val-every-th image held out; label budgets (--budgets) drawn once from train, nested (the
               first 45 of one permutation are also the first 45 of the 400), the same for every row
  2. analyse   analyze.py per teacher on training frames: the layers of the rows (--rows)
  3. distil    train_pretrain.py per teacher layer and distillation seed on the unlabelled frames; no
               validation frame is among them
  4. evaluate  train_seg.py for every row, budget and seed, fine-tuned and linearly probed, scored on every
               validation image; tables of mean +- std and paired differences (seed by seed) with 95% t-intervals
  5. curve     (--curve-steps) the first teacher's rule layer distilled once with snapshots: mIoU against length
Results: OUT/results.md (tables, commit, command, stage times) and OUT/results.json (every run's checkpoint and
per-image IoU, so the numbers can be re-scored without training again).

    python tools/real_data.py --teacher clip_vitb16_fp32.pth,dinov2_vits14_imgfocus.pth \\
        --teacher-arch clip_vitb16,dinov2_vits14 --teacher-name clip,dinov2 \\
        --unlabelled buffalo_udder_full/train/images,roadscene_flir_ir,msrs_ir_test20 \\
        --labelled buffalo_udder_full --img-dir train/images --label-dir train/masks \\
        --val-img-dir val/images --val-label-dir val/masks --budgets 45,400 \\
        --rows scratch,clip:rule,clip:peak,clip:last,dinov2:rule,clip:teacher,dinov2:teacher \\
        --seeds 3 --teacher-seeds 1 --teacher-budgets 400          # docs/results.md

Rows: scratch | [teacher:]rule | peak | closest | last | teacher (one teacher: no prefix). Each stage is the
real script with its command line printed; a stage that finished is not run again (--fresh starts over).
"""
import dataclasses
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import plumbing  # noqa: E402
import data  # noqa: E402
import demo  # noqa: E402  (the stage runner and the NMI-HAD / train_seg.py stages the walk-through uses)
import unip  # noqa: E402

KINDS = ("scratch", "rule", "peak", "closest", "last", "teacher")
MODES = {"finetune": "fine-tune (LL-FPN + UperNet)", "linear": "linear probe"}


@dataclass
class Config:
    out: str = "runs/real"  # output folder, one sub-folder per stage
    teacher: str = ""  # pre-trained teacher checkpoints, comma-separated
    teacher_arch: str = "dinov2_vits14"  # their presets, comma-separated, one per teacher
    teacher_name: str = ""  # their names in --rows and folder names (default: the presets)
    unlabelled: str = ""  # comma-separated folders of unlabelled infrared frames for NMI-HAD
    labelled: str = ""  # labelled set's root folder
    img_dir: str = "images"  # training images inside --labelled
    label_dir: str = "labels"  # training labels inside --labelled (same stems)
    val_img_dir: str = ""  # validation images inside --labelled (empty: every --val-every-th training image)
    val_label_dir: str = ""  # validation labels inside --labelled
    classes: str = "background,udder"  # class names of the labelled set
    label_map: str = "255:1"  # raw label value -> class (binary 0/255 masks: 255:1)
    val_every: int = 4  # without --val-img-dir: every k-th labelled image (sorted names) is held out
    budgets: str = ""  # label budgets, comma-separated training-image counts (empty: every training image)
    budget_seed: int = 0  # seed of the one permutation the budgets are drawn from
    min_passes: float = 5.0  # each budget's runs see every frame at least this often (raises --finetune-iters)
    seeds: int = 1  # fine-tuning / probing seeds per student row
    distill_seeds: int = 0  # distillation runs per layer (0: one per seed); fine-tuning seed s uses run s mod this
    teacher_seeds: int = 0  # seeds of the teacher rows (0: --seeds)
    teacher_budgets: str = ""  # budgets the teacher rows run at (empty: every budget)
    rows: str = ""  # comma-separated [teacher:]kind, kinds scratch,rule,peak,closest,last,teacher (empty: scratch,rule,peak,teacher per teacher)
    control_layer: int = 0  # layer of the 'peak' rows, the local control (0: the NMI peak)
    curve_steps: str = ""  # distillation-length curve of the first teacher's rule layer, e.g. '150,300,600'
    size: int = 224  # image / crop side for every stage
    student: str = "vit_tiny"  # student preset
    distill_steps: int = 600  # NMI-HAD optimiser steps (batch 32)
    finetune_iters: int = 250  # fine-tuning / probing iterations (batch 8) per run, raised by --min-passes
    analyse_images: int = 64  # images for the NMI analysis
    analyse_size: int = 0  # the student's crop for the NMI analysis (0: --size)
    amp: str = "auto"  # precision of every stage: auto (bf16 where the CPU has it) | bf16 | none
    device: str = "cpu"  # device for every stage
    fresh: bool = False  # delete --out first


def split_list(text, cast=str):
    return [cast(v.strip()) for v in text.split(",") if v.strip()]


def check_config(cfg):
    """Fill the defaults that depend on other fields; an error message, or None."""
    ckpts, archs = split_list(cfg.teacher), split_list(cfg.teacher_arch)
    if not (ckpts and cfg.unlabelled and cfg.labelled):
        return "needs --teacher, --unlabelled and --labelled"
    if len(archs) != len(ckpts):
        return f"--teacher-arch: one preset per teacher ({len(ckpts)}), got {cfg.teacher_arch!r}"
    names = split_list(cfg.teacher_name) or archs
    if len(names) != len(ckpts) or len(set(names)) != len(names) or any(":" in n for n in names):
        return f"--teacher-name: {len(ckpts)} distinct names without ':', got {cfg.teacher_name!r}"
    cfg.teacher_name = ",".join(names)
    cfg.rows = cfg.rows or ",".join(["scratch"] + [f"{n}:{k}" if len(names) > 1 else k for n in names
                                                   for k in ("rule", "peak", "teacher")])
    rows = []
    for r in split_list(cfg.rows):
        name, _, kind = r.rpartition(":")
        kind = kind.replace("control", "peak")
        if kind not in KINDS or (name and name not in names) or (kind == "scratch" and name):
            return f"--rows: [teacher:]kind with kinds {','.join(KINDS)} and teachers {','.join(names)}; got {r!r}"
        rows.append(kind if kind == "scratch" else f"{name or names[0]}:{kind}")
    if len(set(rows)) != len(rows):
        return f"--rows: a row is named twice in {cfg.rows!r}"
    cfg.rows = ",".join(r.split(":", 1)[1] if len(names) == 1 and ":" in r else r for r in rows)
    cfg.distill_seeds = cfg.distill_seeds or cfg.seeds
    cfg.teacher_seeds = cfg.teacher_seeds or cfg.seeds
    if min(cfg.seeds, cfg.distill_seeds, cfg.teacher_seeds, cfg.distill_steps, cfg.finetune_iters) < 1:
        return "--seeds, --distill-seeds, --teacher-seeds, --distill-steps and --finetune-iters must be positive"
    try:
        curve = sorted({int(v) for v in split_list(cfg.curve_steps)})
        budgets = [int(v) for v in split_list(cfg.budgets)]
        teacher_budgets = [int(v) for v in split_list(cfg.teacher_budgets)]
    except ValueError:
        return "--curve-steps, --budgets and --teacher-budgets take comma-separated integers"
    if curve and curve[0] < 1:
        return f"--curve-steps: positive step counts, e.g. '150,300,600'; got {cfg.curve_steps!r}"
    if (budgets and min(budgets) < 1) or len(set(budgets)) != len(budgets):
        return f"--budgets: distinct positive image counts, e.g. '45,400'; got {cfg.budgets!r}"
    if any(b not in budgets for b in teacher_budgets):
        return f"--teacher-budgets {cfg.teacher_budgets!r}: each must be one of --budgets {cfg.budgets!r}"
    if bool(cfg.val_img_dir) != bool(cfg.val_label_dir):
        return "--val-img-dir and --val-label-dir go together"
    cfg.curve_steps = ",".join(map(str, curve))
    return None


# -----------------------------------------------------------------------------
# statistics: Student-t quantiles from the regularised incomplete beta function, paired intervals


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def betainc(a, b, x):
    """Regularised incomplete beta I_x(a, b), by its continued fraction (modified Lentz), evaluated on the
    side of x where it converges fast and mirrored with I_x(a, b) = 1 - I_{1-x}(b, a) on the other."""
    if x <= 0.0 or x >= 1.0:
        return min(max(x, 0.0), 1.0)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even then odd term of the fraction
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom: the tail beyond |t| is I_{df/(df+t^2)}(df/2, 1/2) / 2."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p, df):
    """The t with P(T <= t) = p (e.g. p 0.975, df 4: 2.776), by bisection on t_cdf."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def paired_ci(a, b, level=0.95):
    """Paired difference a - b, seed by seed: the differences, their mean and standard deviation, and the
    Student-t interval mean +- t(1 - (1 - level)/2; n - 1) * sd / sqrt(n). With one pair there is no interval
    (low, high and excludes_zero are None)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired differences need two equally long, non-empty lists; got {len(a)} and {len(b)} values")
    diffs = [x - y for x, y in zip(a, b)]
    n, mean = len(diffs), statistics.mean(diffs)
    res = {"n": n, "diffs": diffs, "mean": mean, "sd": None, "low": None, "high": None, "excludes_zero": None}
    if n > 1:
        sd = statistics.stdev(diffs)
        half = t_quantile(1 - (1 - level) / 2, n - 1) * sd / math.sqrt(n)
        res.update(sd=sd, low=mean - half, high=mean + half, excludes_zero=mean - half > 0 or mean + half < 0)
    return res


def ci_text(c):
    """'+2.2 [-1.1, +5.6]' (or '+2.2 (one seed: no interval)')."""
    if c["low"] is None:
        return f"{c['mean']:+.1f} (one seed: no interval)"
    return f"{c['mean']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]"


def git_commit():
    """HEAD of the checkout this file runs from, and whether tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=20)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    if head.returncode != 0:
        return "unknown", None
    return head.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None


# -----------------------------------------------------------------------------
# the labelled split, the budgets and the unlabelled frames


def prepare_data(cfg, split_dir, link_dir):
    """Before the first stage: every labelled pair checked (files present, sizes from the headers), the train /
    validation split and the budgets written to split_dir ({train,val}.txt, train_b<N>.txt), and the frames
    NMI-HAD sees linked into link_dir: every unlabelled frame except the validation images (links, no copies).
    Returns ({budget or None: train stems}, validation stems, unlabelled frame count)."""
    join = lambda d: os.path.join(cfg.labelled, d)
    classes = cfg.classes.split(",")
    train_set = data.SegFolder(join(cfg.img_dir), join(cfg.label_dir), classes=classes)
    val_set = data.SegFolder(join(cfg.val_img_dir), join(cfg.val_label_dir), classes=classes) \
        if cfg.val_img_dir else None
    mismatched = [m for s in (train_set, val_set) if s for _, m in s.size_mismatches()]
    if mismatched:
        raise SystemExit(f"error: --labelled {cfg.labelled}: {len(mismatched)} image/label pairs differ in size: "
                         f"{'; '.join(mismatched[:20])}. Fix or remove them before the run")
    if val_set:
        train, val, val_images = train_set.stems, val_set.stems, val_set.images
    else:
        val = train_set.stems[cfg.val_every - 1::cfg.val_every]
        train = [s for s in train_set.stems if s not in set(val)]
        val_images = [p for s, p in zip(train_set.stems, train_set.images) if s in set(val)]
    budgets = split_list(cfg.budgets, int)
    if budgets and max(budgets) > len(train):
        raise SystemExit(f"error: --budgets {cfg.budgets}: the training split has {len(train)} images")
    order = [train[j] for j in np.random.default_rng(cfg.budget_seed).permutation(len(train))]
    subsets = {b: sorted(order[:b]) for b in budgets} or {None: train}
    os.makedirs(split_dir, exist_ok=True)
    for name, part in [("train", train), ("val", val)] + [(f"train_b{b}", s) for b, s in subsets.items() if b]:
        with open(os.path.join(split_dir, f"{name}.txt"), "w") as f:
            f.write("\n".join(part) + "\n")
    held_out = {os.path.realpath(p) for p in val_images}
    found = [p for d in split_list(cfg.unlabelled) for p in data._images_in(d, recursive=True)]
    files = [p for p in found if os.path.realpath(p) not in held_out]
    shutil.rmtree(link_dir, ignore_errors=True)
    os.makedirs(link_dir)
    for i, p in enumerate(files):
        os.symlink(os.path.realpath(p), os.path.join(link_dir, f"{i:05d}_{os.path.basename(p)}"))
    print(f"labelled: {len(train)} train / {len(val)} validation images ({split_dir}); budgets: "
          f"{', '.join(str(b) for b in budgets) or 'every training image'}; unlabelled for NMI-HAD: {len(files)} "
          f"frames from {cfg.unlabelled} ({len(found) - len(files)} validation frames left out)")
    return subsets, val, len(files)


def iters_for(cfg, n_images):
    """Iterations (batch 8) of a run on n_images labelled frames: --finetune-iters, raised so that every frame
    is seen at least --min-passes times."""
    return max(cfg.finetune_iters, math.ceil(cfg.min_passes * n_images / 8))


# -----------------------------------------------------------------------------
# rows, runs and statistics


def choose_layers(kinds, nmi, control_layer):
    """{kind: teacher layer} of one teacher's distilled rows from its analyze.py nmi.json. 'closest' is the rule
    as the paper states it (all layers searched). A kind whose layer an earlier kind already has is dropped (the
    same distillation twice): returns ({kind: layer}, {dropped kind: the kind it repeats}, {kind: candidate})."""
    means = nmi["layers"]
    peak = max(range(len(means)), key=lambda i: means[i]) + 1
    candidates = {"rule": nmi["recommended_layer"], "peak": control_layer or peak,
                  "closest": unip.layer_choice(means, nmi.get("target", 0.09), rule="closest")[0], "last": len(means)}
    layers, same_as = {}, {}
    for kind in kinds:
        if kind in candidates:
            twin = next((k for k, l in layers.items() if l == candidates[kind]), None)
            if twin:
                same_as[kind] = twin
                print(f"'{kind}': layer {candidates[kind]} is the layer of '{twin}' (not run twice)")
            else:
                layers[kind] = candidates[kind]
    return layers, same_as, candidates


def key_text(key):
    """(row, mode, budget) -> 'row/mode' or 'row/mode/b<budget>' (the keys of results.json)."""
    row, mode, budget = key
    return f"{row}/{mode}" + (f"/b{budget}" if budget else "")


def paired_statistics(runs, rows, distilled, teachers, budgets):
    """Paired by seed, per budget: each distilled row minus scratch, and the layer comparisons whose rows both
    ran (within a teacher: rule - peak, rule - last, rule - closest; across teachers: the first teacher's rule
    minus each other's). Returns ({(row, mode, budget): interval}, [(a, b, why)], {(a, b, mode, budget): interval})."""
    stats = {(r, m, b): paired_ci(runs[(r, m, b)], runs[("scratch", m, b)]) for r in distilled for m in MODES
             for b in budgets if "scratch" in rows}
    prefix = (lambda t: f"{t}:") if len(teachers) > 1 else (lambda t: "")
    pairs = [(prefix(t) + a, prefix(t) + b, why) for t in teachers
             for a, b, why in (("rule", "peak", "hybrid - local"), ("rule", "last", "hybrid - global"),
                               ("rule", "closest", "after-peak rule - closest rule"))]
    pairs += [(f"{teachers[0]}:rule", f"{t}:rule", f"{teachers[0]} rule - {t} rule") for t in teachers[1:]]
    pairs = [(a, b, why) for a, b, why in pairs if a in distilled and b in distilled]
    comparisons = {(a, b, m, bud): paired_ci(runs[(a, m, bud)], runs[(b, m, bud)])
                   for a, b, _ in pairs for m in MODES for bud in budgets}
    return stats, pairs, comparisons


def per_image_scores(folder):
    """{image: [IoU per class]} of a train_seg.py run's last evaluation (None when it wrote none)."""
    path = os.path.join(folder, "per_image.json")
    if not os.path.exists(path):
        return None
    return {k: v["iou"] for k, v in json.load(open(path))["images"].items()}


# -----------------------------------------------------------------------------
# results.md


def table_lines(rows, label, runs, stats, budgets):
    """Per budget and mode, one row per backbone: mean +- std, per seed, minus scratch [95% CI]."""
    lines = []
    for b in budgets:
        for m, title in MODES.items():
            lines += [f"mIoU (%) on the validation images, {title}" + (f", {b} labelled frames" if b else "")
                      + ": mean +- std over seeds; student rows minus scratch seed by seed, mean [95% t-interval]", "",
                      "| backbone | mean +- std | per seed | minus scratch [95% CI] | excludes 0 |", "|---|---|---|---|---|"]
            for row in rows:
                if (row, m, b) not in runs:
                    continue
                v, c = runs[(row, m, b)], stats.get((row, m, b))
                excl = "" if not c or c["excludes_zero"] is None else "yes" if c["excludes_zero"] else "no"
                lines.append(f"| {label[row]} | {mean_std(v)[0]:.1f} +- {mean_std(v)[1]:.1f} | "
                             f"{', '.join(f'{x:.1f}' for x in v)} | {ci_text(c) if c else ''} | {excl} |")
            lines.append("")
    return lines


def comparison_lines(pairs, comparisons, layers, budgets):
    if not comparisons:
        return []
    lines = ["Between rows, paired by seed, mean [95% t-interval]:"]
    for a, b, why in pairs:
        for bud in budgets:
            for m in MODES:
                c = comparisons[(a, b, m, bud)]
                excl = "" if c["excludes_zero"] is None else (": excludes 0" if c["excludes_zero"] else ": includes 0")
                lines.append(f"  {a} - {b} (layer {layers[a]} - layer {layers[b]}, {why}), {MODES[m]}"
                             + (f", {bud} frames" if bud else "") + f": {ci_text(c)}{excl}")
    return lines + [""]


def curve_lines(layer, curve, points, schedule, shared, runs, rows, budget):
    """The distillation-length table (seed 0), scratch as its zero point when that row ran."""
    lines = [f"Distillation length, layer {layer}, seed 0 (mIoU %): snapshots of ONE run of {curve[-1]} steps, "
             f"one cosine schedule over {schedule} steps, so the shorter snapshots are taken mid-schedule (not "
             f"annealed)" + (f"; that run is the rule's distillation run 0, and its {curve[-1]}-step point the "
                             f"rule's seed-0 row" if shared else ""),
             "", "| distillation steps | fine-tune | linear probe |", "|---|---|---|"]
    if "scratch" in rows:
        lines.append(f"| 0 (scratch, seed 0) | {runs[('scratch', 'finetune', budget)][0]:.1f} | "
                     f"{runs[('scratch', 'linear', budget)][0]:.1f} |")
    for steps in curve:
        lines.append(f"| {steps} | {points[steps]['finetune']:.1f} | {points[steps]['linear']:.1f} |")
    return lines + [""]


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = plumbing.parse_config(Config, argv, __doc__, check=check_config)
    stage = demo.Stages(cfg.out, cfg.fresh)
    out, times = stage.path, stage.times
    names, archs = split_list(cfg.teacher_name), split_list(cfg.teacher_arch)
    ckpts = [os.path.abspath(c) for c in split_list(cfg.teacher)]
    multi = len(names) > 1
    row_of = lambda t, kind: f"{t}:{kind}" if multi else kind  # row names: 'clip:rule', or 'rule' with one teacher
    rows = split_list(cfg.rows)
    teacher_of = {r: (r.split(":")[0] if multi else names[0]) for r in rows if r != "scratch"}
    kind_of = lambda r: r.rsplit(":", 1)[-1]

    # ---------------------------------------------------------------- data: split, budgets, unlabelled frames
    subsets, val, n_unlabelled = prepare_data(cfg, out("split"), out("unlabelled"))
    budgets = list(subsets)
    seg_args = ["--dataset", "folder", "--data-root", os.path.abspath(cfg.labelled), "--img-dir", cfg.img_dir,
                "--label-dir", cfg.label_dir, "--val-split", out("split", "val.txt"), "--classes", cfg.classes,
                "--label-map", cfg.label_map, "--crop", cfg.size, "--eval-every", 0, "--log-every", 20,
                "--num-samples", 2, *demo.script_args(cfg)]
    if cfg.val_img_dir:
        seg_args += ["--val-img-dir", cfg.val_img_dir, "--val-label-dir", cfg.val_label_dir]
    iters = {b: iters_for(cfg, len(s)) for b, s in subsets.items()}
    for b, s in subsets.items():
        print(f"{len(s)} labelled frames: {iters[b]} iterations x 8 = {8 * iters[b]} crops, "
              f"{8 * iters[b] / len(s):.1f} passes over each frame")
    analyse_dir = os.path.join(cfg.labelled, cfg.img_dir) if cfg.val_img_dir else out("unlabelled")

    # ---------------------------------------------------------------- each teacher's patterns, its rows' layers
    layers, same_as, candidates, nmis = {}, {}, {}, {}
    for t, arch, ckpt in zip(names, archs, ckpts):
        folder = out(f"analyze_{t}") if multi else out("analyze")
        stage(f"analyse {t}'s attention", "analyze.py", "--checkpoint", ckpt, "--arch", arch,
              "--num-images", cfg.analyse_images, "--img-size", cfg.analyse_size or cfg.size, "--images", analyse_dir,
              "--device", cfg.device, "--workers", 1, "--out", folder, done=os.path.join(folder, "done"))
        nmis[t] = json.load(open(os.path.join(folder, "nmi.json")))
        print(f"{t} mean NMI per layer: " + ", ".join(f"{i + 1}: {v:.3f}" for i, v in enumerate(nmis[t]["layers"])))
        kinds = [kind_of(r) for r in rows if teacher_of.get(r) == t]
        chosen, same, cand = choose_layers(kinds, nmis[t], cfg.control_layer)
        layers.update({row_of(t, k): l for k, l in chosen.items()})
        same_as.update({row_of(t, k): row_of(t, s) for k, s in same.items()})
        candidates.update({row_of(t, k): l for k, l in cand.items()})
    rows = [r for r in rows if r not in same_as]
    distilled = [r for r in rows if r in layers]
    curve = split_list(cfg.curve_steps, int)
    first_rule = row_of(names[0], "rule")
    curve_shared = bool(curve) and curve[-1] == cfg.distill_steps and first_rule in layers
    curve_layer = layers.get(first_rule, nmis[names[0]]["recommended_layer"])

    # ---------------------------------------------------------------- NMI-HAD: each distilled row's layer
    student_dir = lambda r, d: out(f"student_{teacher_of[r]}_l{layers[r]}_s{d}" if multi else
                                   f"student_l{layers[r]}_s{d}")
    arch_of = dict(zip(names, archs))
    ckpt_of = dict(zip(names, ckpts))

    def nmi_had(row, d, folder, **kw):
        t = teacher_of[row]
        return demo.distil(stage, dataclasses.replace(cfg, teacher_arch=arch_of[t]), ckpt_of[t], out("unlabelled"),
                           n_unlabelled, layers[row], d, folder, what=f", teacher {t}" if multi else "", **kw)

    inits = {r: [nmi_had(r, d, student_dir(r, d), keep=cfg.curve_steps if curve_shared and r == first_rule and d == 0
                         else "") for d in range(cfg.distill_seeds)] for r in distilled}

    # ---------------------------------------------------------------- fine-tuning and probing
    details = {}

    def run(row, init, seed, mode, budget, name):
        folder = out(name)
        split = ["--train-split", out("split", f"train_b{budget}.txt") if budget else out("split", "train.txt")]
        what = f"{row}, {len(subsets[budget])} frames" if budget else row
        miou = demo.evaluate(stage, seg_args + split, iters[budget], folder, what, init, seed, mode)
        details[name] = {"row": row, "mode": mode, "budget": budget or len(subsets[budget]), "seed": seed,
                         "miou": miou, "checkpoint": os.path.join(folder, "ckpt.pt"),
                         "per_image_iou": per_image_scores(folder)}
        return miou

    tag = lambda b: f"_b{b}" if b else ""
    runs = {}  # (row, mode, budget) -> [mIoU per seed]
    teacher_budgets = split_list(cfg.teacher_budgets, int) or budgets
    student_rows = [r for r in rows if kind_of(r) != "teacher"]
    for seed in range(cfg.seeds):  # seed by seed, so that an interrupted run already has whole seeds
        for b in budgets:
            for row in student_rows:
                init = ["--model", cfg.student] + (["--init", inits[row][seed % cfg.distill_seeds]] if row in inits else [])
                for mode in MODES:
                    name = f"{mode}_{row.replace(':', '_')}{tag(b)}_s{seed}"
                    runs.setdefault((row, mode, b), []).append(run(row, init, seed, mode, b, name))
    for row in [r for r in rows if kind_of(r) == "teacher"]:  # the slowest runs last
        t = teacher_of[row]
        for seed in range(cfg.teacher_seeds):
            for b in teacher_budgets:
                for mode in MODES:
                    name = f"{mode}_{row.replace(':', '_')}{tag(b)}_s{seed}"
                    init = ["--model", arch_of[t], "--init", ckpt_of[t]]
                    runs.setdefault((row, mode, b), []).append(run(row, init, seed, mode, b, name))

    # ---------------------------------------------------------------- distillation-length curve
    points, curve_dir = {}, (student_dir(first_rule, 0) if curve_shared else out(f"curve_l{curve_layer}"))
    if curve:
        if not curve_shared:
            t = names[0]
            demo.distil(stage, dataclasses.replace(cfg, teacher_arch=arch_of[t]), ckpt_of[t], out("unlabelled"),
                        n_unlabelled, curve_layer, 0, curve_dir, steps=curve[-1], keep=cfg.curve_steps,
                        what=f", length curve: snapshots at steps {', '.join(map(str, curve))}")
        missing = [s for s in curve if not os.path.exists(os.path.join(curve_dir, f"step{s}.pt"))]
        if missing:  # e.g. the folder was distilled earlier without --curve-steps
            raise FileNotFoundError(f"{curve_dir} has no snapshots for steps {missing} (--curve-steps); "
                                    f"delete that folder to distil it again with them")
        for steps in curve:
            for mode in MODES:
                if curve_shared and steps == curve[-1]:  # the same weights and seed as the rule's seed-0 run
                    points.setdefault(steps, {})[mode] = runs[(first_rule, mode, budgets[0])][0]
                    continue
                init = ["--model", cfg.student, "--init", os.path.join(curve_dir, f"step{steps}.pt")]
                points.setdefault(steps, {})[mode] = run(f"curve {steps} steps", init, 0, mode, budgets[0],
                                                         f"{mode}_curve{steps}{tag(budgets[0])}_s0")

    # ---------------------------------------------------------------- statistics and tables
    stats, pairs, comparisons = paired_statistics(runs, rows, distilled, names, budgets)
    desc = {"rule": lambda t: f"the rule's: {nmis[t].get('layer_rule', 'after-peak')}",
            "peak": lambda t: "control" if cfg.control_layer else "NMI peak: local",
            "closest": lambda t: f"closest to {nmis[t].get('target', 0.09)} over all layers",
            "last": lambda t: "last layer: global"}
    label = {"scratch": f"{cfg.student} from scratch (random init)"}
    for r in rows:
        t = teacher_of.get(r)
        if kind_of(r) == "teacher":
            label[r] = f"the teacher {arch_of[t]} itself"
        elif r in layers:
            who = f"{t} " if multi else ""
            label[r] = (f"UNIP {cfg.student} <- {who}layer {layers[r]} ({desc[kind_of(r)](t)}, "
                        f"NMI {nmis[t]['layers'][layers[r] - 1]:.3f})")
    lines = []
    for t, arch, ckpt in zip(names, archs, ckpts):
        lines.append(f"teacher {t}: {arch} ({ckpt}); rule: {nmis[t]['reason']}")
        if nmis[t].get("warning"):
            lines.append(f"  note: {nmis[t]['warning']}")
    n_train = len(subsets[budgets[-1]]) if budgets[-1] else len(subsets[None])
    lines.append(f"labelled task {cfg.labelled}: {len(val)} validation images; training budgets " + ", ".join(
        f"{len(s)} frames ({iters[b]} iterations)" for b, s in subsets.items()) + f", crop {cfg.size}; NMI-HAD: "
        f"{n_unlabelled} unlabelled frames, {cfg.distill_steps} steps x 32")
    for row, twin in same_as.items():
        lines.append(f"row '{row}' (layer {candidates[row]}) is the same layer as row '{twin}': not run twice")
    distil_note = ("each seed re-runs distillation too" if cfg.distill_seeds >= cfg.seeds else
                   "each seed re-runs fine-tuning only (one distillation per layer)" if cfg.distill_seeds == 1 else
                   f"fine-tuning seed s uses distillation run s mod {cfg.distill_seeds}")
    lines += [f"seeds: {cfg.seeds} per student row, {cfg.teacher_seeds} for the teacher rows; "
              f"{cfg.distill_seeds} distillation run(s) per layer: {distil_note}", ""]
    lines += table_lines(rows, label, runs, stats, budgets)
    lines += comparison_lines(pairs, comparisons, layers, budgets)
    if curve:
        epochs, per_epoch = demo.distil_epochs(curve[-1], n_unlabelled)
        lines += curve_lines(curve_layer, curve, points, epochs * per_epoch, curve_shared, runs, rows, budgets[0])
    commit, dirty = git_commit()
    wall = time.time() - stage.t_start
    lines += [f"commit {commit}" + (" (with uncommitted changes to tracked files)" if dirty else ""),
              "command: python tools/real_data.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                        else argv)),
              f"wall time of this call {wall / 60:.1f} min ({len(stage.ran)} stages run now); "
              f"stage times add up to {sum(times.values()) / 60:.1f} min"]
    if times:
        lines.append("stage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    ci_json = lambda d: {"/".join(str(p) for p in k[:-1]) + (f"/b{k[-1]}" if k[-1] else ""): v for k, v in d.items()}
    stage.write("\n".join(lines), {
        "layers": layers, "same_as": same_as,
        "layer_nmi": {t: n["layers"] for t, n in nmis.items()} if multi else nmis[names[0]]["layers"],
        "reason": {t: n.get("reason") for t, n in nmis.items()},
        "rows": rows, "labels": label, "seeds_note": distil_note, "n_train": n_train,
        "budgets": {str(b): len(s) for b, s in subsets.items()}, "iters": {str(b): i for b, i in iters.items()},
        "runs": {key_text(k): v for k, v in runs.items()}, "minus_scratch": ci_json(stats),
        "between_layers": ci_json(comparisons), "run_details": details,
        "curve": {"layer": curve_layer, "schedule_steps": curve[-1] if curve else None, "seed": 0,
                  "folder": curve_dir if curve else None, "miou": {str(k): v for k, v in points.items()}},
        "config": dataclasses.asdict(cfg), "commit": commit, "uncommitted_changes": dirty,
        "seconds": times, "wall_seconds": wall})


if __name__ == "__main__":
    plumbing.run(main)
