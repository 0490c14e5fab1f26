"""
The UNIP experiment in miniature, end to end on the CPU, with the project's own scripts.

Synthetic mode (the default, no download, about 10 minutes on 2 cores):
  1. teacher   train_seg.py      a ViT-T trained from scratch on 2000 synthetic infrared scenes
  2. analyse   analyze.py        NMI of every teacher head; the layer to distil
  3. distil    train_pretrain.py NMI-HAD: that layer's attention -> the last layer of a ViT-micro,
                                 on the same scenes without their labels
  4. evaluate  train_seg.py      the distilled student and a randomly initialised one, each
                                 fine-tuned (LL-FPN + UperNet) and linearly probed with the same
                                 small label budget, then scored on 100 validation scenes

Real mode (--teacher PATH): a pre-trained teacher and real folders instead, no synthetic stage:
  1. split     a fixed train / validation split of the labelled folder, written to OUT/split
  2. analyse   analyze.py on the unlabelled frames: the layers of the rows (--rows): the rule's
               (after the NMI peak), the NMI peak (local control), the layer closest to 0.09 over
               all layers, the last layer (global)
  3. distil    train_pretrain.py, once per layer and distillation seed, on the unlabelled frames
               minus the labelled validation frames
  4. evaluate  train_seg.py for every seed: the student from scratch, the distilled students and
               the teacher itself, each fine-tuned and linearly probed; tables of mean +- std and of
               the paired difference to scratch (seed by seed) with a 95% t-interval
  5. curve     (--curve-steps) the rule's layer distilled once for the longest length, snapshots
               fine-tuned and probed: mIoU against distillation length
Results: OUT/results.md (the tables, commit, command, stage times) and OUT/results.json.

    python demo.py                                     # synthetic
    python demo.py --teacher dinov2_vits14.pth --teacher-arch dinov2_vits14 \\
        --unlabelled DIR1,DIR2 --labelled buffalo_udder_thermal_seg \\
        --classes background,udder --label-map 255:1 --rows scratch,rule,peak,closest,teacher \\
        --seeds 5 --distill-seeds 1 --teacher-seeds 2 --curve-steps 150,300,600,1200   # real (see docs/results.md)

Every stage is the real script with its real command line (printed before it runs), so this file
doubles as a worked example. Outputs land in --out; a stage that already finished is not run again
(delete the folder, or pass --fresh, to start over).
"""
import dataclasses
import functools
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

import common
import data  # its list of image endings and the pair check
import unip  # the layer rules, as analyze.py and train_pretrain.py apply them

HERE = os.path.dirname(os.path.abspath(__file__))
# Table rows: a random init, UNIP students distilled from four kinds of teacher layer, the teacher itself.
ROWS = ("scratch", "rule", "peak", "closest", "last", "teacher")
MODES = {"finetune": "fine-tune (LL-FPN + UperNet)", "linear": "linear probe"}


@dataclass
class Config:
    out: str = "runs/demo"  # output folder, one sub-folder per stage
    teacher: str = ""  # pre-trained teacher checkpoint (real mode); empty: train one from scratch on synthetic scenes
    teacher_arch: str = "vit_tiny"  # teacher preset (real mode e.g. dinov2_vits14)
    unlabelled: str = ""  # real mode: comma-separated folders of unlabelled infrared images for NMI-HAD
    labelled: str = ""  # real mode: folder with images/ and labels/ (same stems) for fine-tuning
    classes: str = "background,udder"  # real mode: class names of the labelled folder
    label_map: str = "255:1"  # real mode: raw label value -> class (binary 0/255 masks: 255:1)
    val_every: int = 4  # real mode: every k-th labelled image (sorted names) is held out for validation
    seeds: int = 1  # fine-tuning / probing seeds per student row; the table reports mean +- std and paired differences
    distill_seeds: int = 0  # distillation runs per layer (0: one per seed); fine-tuning seed s uses run s mod this
    teacher_seeds: int = 0  # real mode: fine-tuning seeds of the teacher row (0: --seeds)
    rows: str = ""  # rows, comma-separated: scratch,rule,peak,closest,last,teacher (empty: real scratch,rule,peak,teacher; synthetic scratch,rule)
    control_layer: int = 0  # layer of the 'peak' row, the local control (0: the NMI peak, the most local layer)
    curve_steps: str = ""  # distillation-length curve, e.g. '150,300,600,1200': the rule's layer distilled once, snapshots fine-tuned (seed 0)
    size: int = 0  # image / crop side for every stage (0: 128 synthetic, 224 real)
    teacher_iters: int = 300  # synthetic teacher training iterations (batch 8)
    teacher_lr: float = 1e-3  # synthetic teacher lr: from scratch it needs more than the fine-tuning recipe's 1e-4
    student: str = ""  # student preset (0: vit_micro synthetic, vit_tiny real)
    distill_steps: int = 0  # NMI-HAD optimiser steps (batch 32) (0: 200 synthetic, 600 real)
    label_budget: int = 200  # synthetic: labelled scenes the students are fine-tuned on
    finetune_iters: int = 0  # fine-tuning / linear-probing iterations (batch 8) per run (0: 300 synthetic, 250 real)
    analyse_images: int = 64  # images for the NMI analysis
    analyse_size: int = 0  # real mode: the student's crop for the NMI analysis (0: --size, the grid distillation uses)
    amp: str = "auto"  # precision of every stage: auto (bf16 where the CPU has it) | bf16 | none
    device: str = "cpu"  # device for every stage
    fresh: bool = False  # delete --out first


def check_config(cfg):
    """The defaults that depend on the mode (real: --teacher given) filled in, and the settings argparse cannot
    check; an error message, or None."""
    real = bool(cfg.teacher)
    if real and not (cfg.unlabelled and cfg.labelled):
        return "--teacher (real mode) needs --unlabelled and --labelled"
    cfg.size = cfg.size or (224 if real else 128)
    cfg.student = cfg.student or ("vit_tiny" if real else "vit_micro")
    cfg.distill_steps = cfg.distill_steps or (600 if real else 200)
    cfg.finetune_iters = cfg.finetune_iters or (250 if real else 300)
    cfg.distill_seeds = cfg.distill_seeds or cfg.seeds
    cfg.teacher_seeds = cfg.teacher_seeds or cfg.seeds
    cfg.rows = cfg.rows or ("scratch,rule,peak,teacher" if real else "scratch,rule")
    rows = [r.strip().replace("control", "peak") for r in cfg.rows.split(",") if r.strip()]
    if any(r not in ROWS for r in rows) or len(set(rows)) != len(rows):
        return f"--rows: distinct names from {','.join(ROWS)}; got {cfg.rows!r}"
    if "teacher" in rows and not real:
        return "--rows teacher: the teacher row fine-tunes a pre-trained --teacher (real mode)"
    cfg.rows = ",".join(rows)
    if min(cfg.seeds, cfg.distill_seeds, cfg.teacher_seeds, cfg.distill_steps, cfg.finetune_iters) < 1:
        return "--seeds, --distill-seeds, --teacher-seeds, --distill-steps and --finetune-iters must be positive"
    try:
        curve = sorted({int(v) for v in cfg.curve_steps.split(",") if v.strip()})
    except ValueError:
        curve = [0]
    if curve and curve[0] < 1:
        return f"--curve-steps: comma-separated positive step counts, e.g. '150,300,600'; got {cfg.curve_steps!r}"
    cfg.curve_steps = ",".join(map(str, curve))
    return None


def parse_config(argv=None):
    return common.parse_config(Config, argv, __doc__, check=check_config)


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
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=20)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    if head.returncode != 0:
        return "unknown", None
    return head.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None


# -----------------------------------------------------------------------------
# the stages: each one the real script, run as a user would


def run_stage(times, ran, name, script, *args, done=None):
    """Run one script with its command line printed first; skip it when its marker file `done` exists. The
    stage's seconds go to `times` (and into the marker, so a resumed experiment still reports every stage);
    `ran` collects the stages this call ran. A failed script has printed its own error: one line here."""
    cmd = [sys.executable, os.path.join(HERE, script), *map(str, args)]
    print(f"\n=== {name}\n$ {' '.join(cmd[1:])}", flush=True)
    if done and os.path.exists(done):
        print(f"(already done: {done})")
        try:
            times[name] = json.load(open(done))["seconds"]
        except (ValueError, KeyError, TypeError):
            pass
        return
    t = time.time()
    try:
        subprocess.run(cmd, check=True, cwd=HERE)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"error: {script} failed (exit status {e.returncode}), see above") from None
    times[name] = time.time() - t
    ran.add(name)
    if done:
        with open(done, "w") as f:
            json.dump({"seconds": times[name]}, f)


def final_miou(folder):
    """The last evaluation row of a train_seg.py run."""
    rows = [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]
    return [r for r in rows if "miou" in r][-1]["miou"]


def script_args(cfg):
    """The settings every stage shares."""
    return ["--device", cfg.device, "--amp", cfg.amp, "--workers", 1]


def distil_epochs(steps, n_images):
    """(epochs, steps per epoch) of a distillation of `steps` optimiser steps on n_images: whole epochs of
    n // 32 steps (the sampler drops the last partial batch), enough of them to reach `steps`, so the run stops
    at exactly `steps` and the cosine ends there when `steps` fills whole epochs."""
    per_epoch = n_images // 32
    if per_epoch < 1:
        raise ValueError(f"{n_images} unlabelled images are fewer than one batch of 32 (--unlabelled)")
    return math.ceil(steps / per_epoch), per_epoch


def distil(stage, cfg, teacher_ckpt, images, n_images, layer, seed, folder, steps=None, keep="", what=""):
    """NMI-HAD with train_pretrain.py: the teacher layer's logits -> the student's last layer, for `steps`
    optimiser steps (default --distill-steps) on `images` (empty: the synthetic scenes), snapshots at the steps
    in `keep`. Returns the student checkpoint."""
    steps = steps or cfg.distill_steps
    data_args = ["--infrared", images] if images else []
    epochs, per_epoch = distil_epochs(steps, n_images)
    if epochs * per_epoch != steps:
        print(f"note: {steps} steps stop inside a schedule of {epochs * per_epoch} ({epochs} epochs of "
              f"{per_epoch} steps): the lr is not fully annealed at the stop")
    stage(f"distil teacher layer {layer} into a {cfg.student} (seed {seed}{what})", "train_pretrain.py",
          "--teacher", teacher_ckpt, "--teacher-arch", cfg.teacher_arch, "--teacher-layer", layer,
          "--model", cfg.student, "--img-size", cfg.size, "--batch-size", 32, "--effective-batch", 32,
          "--epochs", epochs, "--warmup-epochs", 1, "--lr", 5e-4,
          "--steps", steps, "--log-every", 10, "--seed", seed, *data_args, *script_args(cfg),
          *(["--keep-steps", keep] if keep else []),
          "--out", folder, "--resume", "auto", done=os.path.join(folder, "done"))
    return os.path.join(folder, "ckpt.pt")


def evaluate(stage, seg_args, iters, folder, row, init, seed, mode):
    """One backbone fine-tuned (LL-FPN + UperNet) or linearly probed with train_seg.py; its final mIoU."""
    lr = ["--lr", 1e-3] if mode == "linear" else []  # a lone 1x1 conv wants a larger lr
    stage(f"{mode} {row} (seed {seed})", "train_seg.py", *seg_args, *init, *lr,
          "--iters", iters, "--seed", seed, "--mode", mode, "--out", folder,
          "--resume", "auto", done=os.path.join(folder, "done"))
    return final_miou(folder)


# -----------------------------------------------------------------------------
# real mode: the labelled split and the unlabelled frames


def prepare_real(labelled, classes, val_every, unlabelled_dirs, split_dir, link_dir):
    """Before the first stage: every labelled pair checked (files present, sizes from the headers, not when
    fine-tuning reaches it after the distillation has run), a fixed train / validation split (every
    val_every-th image of the sorted names) written to split_dir/{train,val}.txt, and the frames NMI-HAD sees
    linked into link_dir: every unlabelled frame except the labelled validation images (links, no copies).
    Returns (train stems, validation stems, unlabelled frame count)."""
    img_dir = os.path.join(labelled, "images")
    pairs = data.SegFolder(img_dir, os.path.join(labelled, "labels"), classes=classes.split(","))
    mismatched = [m for _, m in pairs.size_mismatches()]
    if mismatched:
        raise SystemExit(f"error: --labelled {labelled}: {len(mismatched)} image/label pairs differ in size: "
                         f"{'; '.join(mismatched)}. Fix or remove them before the run")
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(img_dir) if f.lower().endswith(data.IMG_EXTS))
    val = stems[val_every - 1::val_every]
    train = [s for s in stems if s not in set(val)]
    os.makedirs(split_dir, exist_ok=True)
    for name, part in (("train", train), ("val", val)):
        with open(os.path.join(split_dir, f"{name}.txt"), "w") as f:
            f.write("\n".join(part) + "\n")
    held_out = {os.path.realpath(os.path.join(img_dir, f)) for f in os.listdir(img_dir)
                if os.path.splitext(f)[0] in set(val)}
    files = [p for d in unlabelled_dirs.split(",") if d for p in data._images_in(d, recursive=True)]
    files = [p for p in files if os.path.realpath(p) not in held_out]
    shutil.rmtree(link_dir, ignore_errors=True)
    os.makedirs(link_dir)
    for i, p in enumerate(files):
        os.symlink(os.path.realpath(p), os.path.join(link_dir, f"{i:05d}_{os.path.basename(p)}"))
    print(f"labelled: {len(train)} train / {len(val)} validation images ({split_dir}); "
          f"unlabelled for NMI-HAD: {len(files)} frames from {unlabelled_dirs} "
          f"({len(held_out)} validation frames left out)")
    return train, val, len(files)


# -----------------------------------------------------------------------------
# the rows, the runs and the statistics


def choose_rows(names, nmi, control_layer):
    """The teacher layer of each distilled row from analyze.py's nmi.json. 'closest' is the rule as the paper
    states it (all layers searched), against which the after-peak rule's choice is tested. A row whose layer an
    earlier row already has is dropped (one layer distilled twice would be the same experiment). Returns (rows,
    {row: layer}, {dropped row: the row it repeats}, {row: candidate layer})."""
    means, n_layers = nmi["layers"], len(nmi["layers"])
    peak = max(range(n_layers), key=lambda i: means[i]) + 1
    candidates = {"rule": nmi["recommended_layer"], "peak": control_layer or peak,
                  "closest": unip.layer_choice(means, nmi.get("target", 0.09), rule="closest")[0], "last": n_layers}
    rows, layers, same_as = [], {}, {}
    for row in names:
        if row in candidates:
            twin = next((r for r, l in layers.items() if l == candidates[row]), None)
            if twin:
                same_as[row] = twin
                print(f"row '{row}': layer {candidates[row]} is the layer of row '{twin}' (not run twice)")
                continue
            layers[row] = candidates[row]
        rows.append(row)
    return rows, layers, same_as, candidates


def fine_tune_rows(run, rows, n_seeds, inits, distill_seeds, student, teacher_arch, teacher_ckpt):
    """Every row fine-tuned and probed for each of its seeds, seed by seed. run(row, init, seed, mode, name) ->
    mIoU. Returns {(row, mode): [mIoU per seed]}."""
    runs = {}
    for seed in range(max(n_seeds.values())):
        for row in rows:
            if seed >= n_seeds[row]:
                continue
            for mode in MODES:
                if row == "teacher":
                    init = ["--model", teacher_arch, "--init", teacher_ckpt]
                else:
                    init = ["--model", student] + (["--init", inits[row][seed % distill_seeds]] if row in inits else [])
                runs.setdefault((row, mode), []).append(run(row, init, seed, mode, f"{mode}_{row}_s{seed}"))
    return runs


def curve_points(run, curve, curve_dir, shared, runs, student):
    """The distillation-length curve: each snapshot of curve_dir fine-tuned and probed with seed 0. When the
    curve's run is the rule's distillation run 0 (`shared`), its last point is the rule's seed-0 row.
    Returns {steps: {mode: mIoU}}."""
    missing = [s for s in curve if not os.path.exists(os.path.join(curve_dir, f"step{s}.pt"))]
    if missing:  # e.g. the folder was distilled earlier without --curve-steps
        raise FileNotFoundError(f"{curve_dir} has no snapshots for steps {missing} (--curve-steps); "
                                f"delete that folder to distil it again with them")
    points = {}
    for steps in curve:
        for mode in MODES:
            if shared and steps == curve[-1]:  # the same weights and seed as the rule's seed-0 run
                points.setdefault(steps, {})[mode] = runs[("rule", mode)][0]
                continue
            init = ["--model", student, "--init", os.path.join(curve_dir, f"step{steps}.pt")]
            points.setdefault(steps, {})[mode] = run(f"curve {steps} steps", init, 0, mode, f"{mode}_curve{steps}_s0")
    return points


def paired_statistics(runs, rows, layers):
    """Paired by seed: each distilled row minus scratch, and the layer comparisons whose rows both ran.
    Returns ({(row, mode): interval}, [(a, b, why)], {(a, b, mode): interval})."""
    stats = {(r, m): paired_ci(runs[(r, m)], runs[("scratch", m)]) for r in layers for m in MODES
             if "scratch" in rows}
    pairs = [(a, b, why) for a, b, why in (("rule", "peak", "hybrid - local"), ("rule", "last", "hybrid - global"),
                                           ("rule", "closest", "after-peak rule - closest rule"))
             if a in layers and b in layers]
    comparisons = {(a, b, m): paired_ci(runs[(a, m)], runs[(b, m)]) for a, b, _ in pairs for m in MODES}
    return stats, pairs, comparisons


# -----------------------------------------------------------------------------
# results.md and results.json


def setup_lines(cfg, nmi, layer, split, n_unlabelled, teacher_miou, same_as, candidates, distil_note):
    """The lines above the tables: teacher, task, rows merged into others, seeds."""
    means, lines = nmi["layers"], []
    if split is not None:
        lines.append(f"teacher {cfg.teacher_arch} ({cfg.teacher}); rule: {nmi['reason']}")
        if nmi.get("warning"):
            lines.append(f"  note: {nmi['warning']}")
        lines.append(f"labelled task {cfg.labelled}: {len(split[0])} train / {len(split[1])} val images, crop "
                     f"{cfg.size}, {cfg.finetune_iters} iterations per run; NMI-HAD: {n_unlabelled} unlabelled "
                     f"frames, {cfg.distill_steps} steps x 32")
    else:
        lines.append(f"teacher {cfg.teacher_arch}: {cfg.teacher_iters} iterations on 2000 labelled scenes -> mIoU "
                     f"{teacher_miou:.1f}; distilled layer {layer} (mean NMI {means[layer - 1]:.3f})")
        lines.append(f"students ({cfg.student}), {cfg.label_budget} labelled scenes, {cfg.finetune_iters} "
                     f"iterations each; NMI-HAD {cfg.distill_steps} steps x 32")
    for row, twin in same_as.items():
        lines.append(f"row '{row}' (layer {candidates[row]}) is the same layer as row '{twin}': not run twice")
    lines.append(f"seeds: {cfg.seeds} per student row, {cfg.teacher_seeds} for the teacher; "
                 f"{cfg.distill_seeds} distillation run(s) per layer: {distil_note}")
    return lines + [""]


def table_lines(rows, label, runs, stats, pairs, comparisons, layers):
    """Per mode, one row per backbone: mean +- std, per seed, minus scratch [95% CI]; then the layer pairs."""
    lines = []
    for m, title in MODES.items():
        lines += [f"mIoU (%) on the validation images, {title}: mean +- std over seeds; student rows minus "
                  f"scratch seed by seed, mean [95% t-interval]", "",
                  "| backbone | mean +- std | per seed | minus scratch [95% CI] | excludes 0 |", "|---|---|---|---|---|"]
        for row in rows:
            v = runs[(row, m)]
            c = stats.get((row, m))
            diff = ci_text(c) if c else ""
            excl = "" if not c or c["excludes_zero"] is None else "yes" if c["excludes_zero"] else "no"
            lines.append(f"| {label[row]} | {mean_std(v)[0]:.1f} +- {mean_std(v)[1]:.1f} | "
                         f"{', '.join(f'{x:.1f}' for x in v)} | {diff} | {excl} |")
        lines.append("")
    if comparisons:
        lines.append("Between layers, paired by seed, mean [95% t-interval]:")
        for a, b, why in pairs:
            for m in MODES:
                c = comparisons[(a, b, m)]
                excl = "" if c["excludes_zero"] is None else (
                    ": excludes 0" if c["excludes_zero"] else ": includes 0")
                lines.append(f"  {a} - {b} (layer {layers[a]} - layer {layers[b]}, {why}), {MODES[m]}: "
                             f"{ci_text(c)}{excl}")
        lines.append("")
    return lines


def curve_lines(layer, curve, points, schedule, shared, runs, rows):
    """The distillation-length table (seed 0), scratch as its zero point when that row ran."""
    lines = [f"Distillation length, layer {layer}, seed 0 (mIoU %): snapshots of ONE run of {curve[-1]} steps, "
             f"one cosine schedule over {schedule} steps, so the shorter snapshots are taken "
             f"mid-schedule (not annealed)" + (f"; that run is the rule's distillation run 0, and its {curve[-1]}-step "
                                  f"point the rule's seed-0 row" if shared else ""),
             "", "| distillation steps | fine-tune | linear probe |", "|---|---|---|"]
    if "scratch" in rows:
        lines.append(f"| 0 (scratch, seed 0) | {runs[('scratch', 'finetune')][0]:.1f} | "
                     f"{runs[('scratch', 'linear')][0]:.1f} |")
    for steps in curve:
        lines.append(f"| {steps} | {points[steps]['finetune']:.1f} | {points[steps]['linear']:.1f} |")
    return lines + [""]


def footer_lines(commit, dirty, argv, wall, times, ran):
    """Commit, command and stage times: what reproduces the tables."""
    lines = [f"commit {commit}" + (" (with uncommitted changes to tracked files)" if dirty else ""),
             f"command: python demo.py {' '.join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))}",
             f"wall time of this call {wall / 60:.1f} min ({len(ran)} stages run now); "
             f"stage times add up to {sum(times.values()) / 60:.1f} min"]
    if times:
        lines.append("stage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    return lines


def write_results(folder, report, results):
    """results.md (the report as printed) and results.json."""
    print("\n" + "=" * 96 + "\n" + report)
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(argv)
    real = bool(cfg.teacher)
    if cfg.fresh and os.path.isdir(cfg.out):
        shutil.rmtree(cfg.out)
    os.makedirs(cfg.out, exist_ok=True)
    out = lambda *p: os.path.abspath(os.path.join(cfg.out, *p))
    times, ran, t_start = {}, set(), time.time()
    stage = functools.partial(run_stage, times, ran)

    if not real:
        # ------------------------------------------------------------ synthetic: a teacher trained from scratch
        seg_args = ["--dataset", "synthetic", "--crop", cfg.size, "--eval-every", 0, "--log-every", 10,
                    *script_args(cfg)]
        teacher_ckpt, unlabelled, n_unlabelled, split = out("teacher", "ckpt.pt"), "", 2000, None
        # --layer-scale 0: a plain ViT like the pre-trained teachers, so the vit_* preset loads it in the next stages
        stage("teacher: train a ViT from scratch", "train_seg.py", *seg_args, "--model", cfg.teacher_arch,
              "--iters", cfg.teacher_iters, "--lr", cfg.teacher_lr, "--layer-scale", 0, "--out", out("teacher"),
              "--resume", "auto", done=out("teacher", "done"))
        analyse_args = ["--img-size", cfg.size]
        seg_args += ["--train-images", cfg.label_budget]
    else:
        # ------------------------------------------------------------ real: split, unlabelled frames
        teacher_ckpt, unlabelled = os.path.abspath(cfg.teacher), out("unlabelled")
        *split, n_unlabelled = prepare_real(cfg.labelled, cfg.classes, cfg.val_every, cfg.unlabelled,
                                            out("split"), unlabelled)
        seg_args = ["--dataset", "folder", "--data-root", os.path.abspath(cfg.labelled), "--img-dir", "images",
                    "--label-dir", "labels", "--train-split", out("split", "train.txt"),
                    "--val-split", out("split", "val.txt"), "--classes", cfg.classes, "--label-map", cfg.label_map,
                    "--crop", cfg.size, "--eval-every", 0, "--log-every", 20, "--num-samples", 2, *script_args(cfg)]
        analyse_args = ["--img-size", cfg.analyse_size or cfg.size, "--images", unlabelled]

    # ---------------------------------------------------------------- the teacher's attention patterns
    stage("analyse the teacher's attention", "analyze.py", "--checkpoint", teacher_ckpt, "--arch", cfg.teacher_arch,
          "--num-images", cfg.analyse_images, *analyse_args, "--device", cfg.device, "--workers", 1, "--out", out("analyze"),
          done=out("analyze", "done"))
    nmi = json.load(open(out("analyze", "nmi.json")))
    rows, layers, same_as, candidates = choose_rows(cfg.rows.split(","), nmi, cfg.control_layer)
    layer = layers.get("rule", nmi["recommended_layer"])
    curve = [int(v) for v in cfg.curve_steps.split(",") if v]
    n_seeds = {r: cfg.teacher_seeds if r == "teacher" else cfg.seeds for r in rows}
    distil_note = ("each seed re-runs distillation too" if cfg.distill_seeds >= cfg.seeds else
                   "each seed re-runs fine-tuning only (one distillation per layer)" if cfg.distill_seeds == 1 else
                   f"fine-tuning seed s uses distillation run s mod {cfg.distill_seeds}")

    # A curve as long as the rows' distillation is the rule's first distillation run with snapshots: no extra run,
    # and its last point is the rule's seed-0 fine-tuning.
    curve_shared = bool(curve) and curve[-1] == cfg.distill_steps and "rule" in layers
    curve_dir = out(f"student_l{layer}_s0") if curve_shared else out(f"curve_l{layer}")

    # ---------------------------------------------------------------- NMI-HAD, then fine-tuning and probing
    nmi_had = functools.partial(distil, stage, cfg, teacher_ckpt, unlabelled, n_unlabelled)
    inits = {row: [nmi_had(layers[row], d, out(f"student_l{layers[row]}_s{d}"),
                           keep=cfg.curve_steps if curve_shared and row == "rule" and d == 0 else "")
                   for d in range(cfg.distill_seeds)] for row in layers}
    run = lambda row, init, seed, mode, name: evaluate(stage, seg_args, cfg.finetune_iters, out(name), row, init,
                                                       seed, mode)
    runs = fine_tune_rows(run, rows, n_seeds, inits, cfg.distill_seeds, cfg.student, cfg.teacher_arch, teacher_ckpt)

    # ---------------------------------------------------------------- distillation-length curve
    # One run of the longest length with snapshots: the shorter ones sit inside its cosine schedule.
    points = {}  # steps -> {mode: mIoU}
    if curve:
        if not curve_shared:
            nmi_had(layer, 0, curve_dir, steps=curve[-1], keep=cfg.curve_steps,
                    what=f", length curve: snapshots at steps {', '.join(map(str, curve))}")
        points = curve_points(run, curve, curve_dir, curve_shared, runs, cfg.student)

    # ---------------------------------------------------------------- statistics: paired by seed
    stats, pairs, comparisons = paired_statistics(runs, rows, layers)

    # ---------------------------------------------------------------- the tables
    means = nmi["layers"]
    kind = {"rule": f"the rule's: {nmi.get('layer_rule', 'after-peak')}",
            "peak": "control" if cfg.control_layer else "NMI peak: local",
            "closest": f"closest to {nmi.get('target', 0.09)} over all layers", "last": "last layer: global"}
    label = {"scratch": f"{cfg.student} from scratch (random init)",
             "teacher": f"the teacher {cfg.teacher_arch} itself"}
    for r, l in layers.items():
        label[r] = f"UNIP {cfg.student} <- layer {l} ({kind[r]}, NMI {means[l - 1]:.3f})"
    commit, dirty = git_commit()
    wall = time.time() - t_start
    teacher_miou = None if real else final_miou(out("teacher"))
    lines = setup_lines(cfg, nmi, layer, split, n_unlabelled, teacher_miou, same_as, candidates, distil_note)
    lines += table_lines(rows, label, runs, stats, pairs, comparisons, layers)
    if curve:
        epochs, per_epoch = distil_epochs(curve[-1], n_unlabelled)
        lines += curve_lines(layer, curve, points, epochs * per_epoch, curve_shared, runs, rows)
    lines += footer_lines(commit, dirty, argv, wall, times, ran)
    ci_json = lambda d: {"/".join(k): v for k, v in d.items()}
    write_results(out(), "\n".join(lines), {
        "layers": layers, "same_as": same_as, "layer_nmi": means, "reason": nmi.get("reason"),
        "warning": nmi.get("warning"), "rows": rows, "labels": label, "seeds_note": distil_note,
        "runs": {f"{r}/{m}": v for (r, m), v in runs.items()}, "minus_scratch": ci_json(stats),
        "between_layers": ci_json(comparisons),
        "curve": {"layer": layer, "schedule_steps": curve[-1] if curve else None, "seed": 0,
                  "folder": curve_dir if curve else None, "miou": {str(k): v for k, v in points.items()}},
        "config": dataclasses.asdict(cfg), "commit": commit, "uncommitted_changes": dirty,
        "seconds": times, "wall_seconds": wall})


if __name__ == "__main__":
    common.run(main)
