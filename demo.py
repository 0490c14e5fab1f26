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
        --seeds 5 --distill-seeds 1 --teacher-seeds 2 --curve-steps 150,300,600,1200   # real (see README)

Every stage is the real script with its real command line (printed before it runs), so this file
doubles as a worked example. Outputs land in --out; a stage that already finished is not run again
(delete the folder, or pass --fresh, to start over).
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
# Table rows: a random init, UNIP students distilled from four kinds of teacher layer, the teacher itself.
ROWS = ("scratch", "rule", "peak", "closest", "last", "teacher")


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


def parse_config(argv=None):
    helps = dict(re.findall(r"^\s+(\w+):.*?#\s*(.+)$", inspect.getsource(Config), re.M))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag, h = "--" + f.name.replace("_", "-"), f"{helps[f.name]} (default: {f.default!r})"
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=h)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=h)
    cfg = Config(**vars(p.parse_args(argv)))
    real = bool(cfg.teacher)
    if real and not (cfg.unlabelled and cfg.labelled):
        p.error("--teacher (real mode) needs --unlabelled and --labelled")
    cfg.size = cfg.size or (224 if real else 128)
    cfg.student = cfg.student or ("vit_tiny" if real else "vit_micro")
    cfg.distill_steps = cfg.distill_steps or (600 if real else 200)
    cfg.finetune_iters = cfg.finetune_iters or (250 if real else 300)
    cfg.distill_seeds = cfg.distill_seeds or cfg.seeds
    cfg.teacher_seeds = cfg.teacher_seeds or cfg.seeds
    cfg.rows = cfg.rows or ("scratch,rule,peak,teacher" if real else "scratch,rule")
    rows = [r.strip().replace("control", "peak") for r in cfg.rows.split(",") if r.strip()]
    if any(r not in ROWS for r in rows) or len(set(rows)) != len(rows):
        p.error(f"--rows: distinct names from {','.join(ROWS)}; got {cfg.rows!r}")
    if "teacher" in rows and not real:
        p.error("--rows teacher: the teacher row fine-tunes a pre-trained --teacher (real mode)")
    cfg.rows = ",".join(rows)
    if min(cfg.seeds, cfg.distill_seeds, cfg.teacher_seeds, cfg.distill_steps, cfg.finetune_iters) < 1:
        p.error("--seeds, --distill-seeds, --teacher-seeds, --distill-steps and --finetune-iters must be positive")
    try:
        curve = sorted({int(v) for v in cfg.curve_steps.split(",") if v.strip()})
    except ValueError:
        curve = [0]
    if curve and curve[0] < 1:
        p.error(f"--curve-steps: comma-separated positive step counts, e.g. '150,300,600'; got {cfg.curve_steps!r}")
    cfg.curve_steps = ",".join(map(str, curve))
    return cfg


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


def main(argv=None):
    cfg = parse_config(argv)
    real = bool(cfg.teacher)
    if cfg.fresh and os.path.isdir(cfg.out):
        shutil.rmtree(cfg.out)
    os.makedirs(cfg.out, exist_ok=True)
    out = lambda *p: os.path.abspath(os.path.join(cfg.out, *p))
    times, run_now, t_start = {}, set(), time.time()
    sys.path.insert(0, HERE)
    import unip  # the layer rules, as analyze.py and train_pretrain.py apply them

    def stage(name, script, *args, done=None):
        """Run one script as a user would; skip it when its result file already exists."""
        cmd = [sys.executable, os.path.join(HERE, script), *map(str, args)]
        print(f"\n=== {name}\n$ {' '.join(cmd[1:])}", flush=True)
        if done and os.path.exists(done):
            print(f"(already done: {done})")
            try:  # the marker holds the stage's time, so a resumed experiment still reports every stage
                times[name] = json.load(open(done))["seconds"]
            except (ValueError, KeyError, TypeError):
                pass
            return
        t = time.time()
        subprocess.run(cmd, check=True, cwd=HERE)
        times[name] = time.time() - t
        run_now.add(name)
        if done:
            with open(done, "w") as f:
                json.dump({"seconds": times[name]}, f)

    def final_miou(folder):  # the last evaluation row of a train_seg.py run
        rows = [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]
        return [r for r in rows if "miou" in r][-1]["miou"]

    common = ["--device", cfg.device, "--amp", cfg.amp, "--workers", 1]

    schedule = {}  # distillation steps -> length of the lr schedule they stop in

    def distil(layer, seed, images, steps=None, keep="", folder=None, what=""):
        """NMI-HAD: the teacher layer's logits -> the student's last layer, for `steps` optimiser steps."""
        steps = steps or cfg.distill_steps
        folder = folder or out(f"student_l{layer}_s{seed}")
        data_args = ["--infrared", images] if images else []
        # Whole epochs of n // 32 steps (the sampler drops the last partial batch): enough of them to reach
        # `steps`, so the run stops at exactly `steps` and the cosine ends there when `steps` fills whole epochs.
        per_epoch = n_unlabelled // 32
        if per_epoch < 1:
            raise ValueError(f"{n_unlabelled} unlabelled images are fewer than one batch of 32 (--unlabelled)")
        epochs = math.ceil(steps / per_epoch)
        schedule[steps] = epochs * per_epoch
        if epochs * per_epoch != steps:
            print(f"note: {steps} steps stop inside a schedule of {epochs * per_epoch} ({epochs} epochs of "
                  f"{per_epoch} steps): the lr is not fully annealed at the stop")
        stage(f"distil teacher layer {layer} into a {cfg.student} (seed {seed}{what})", "train_pretrain.py",
              "--teacher", teacher_ckpt, "--teacher-arch", cfg.teacher_arch, "--teacher-layer", layer,
              "--model", cfg.student, "--img-size", cfg.size, "--batch-size", 32, "--effective-batch", 32,
              "--epochs", epochs, "--warmup-epochs", 1, "--lr", 5e-4,
              "--steps", steps, "--log-every", 10, "--seed", seed, *data_args, *common,
              *(["--keep-steps", keep] if keep else []),
              "--out", folder, "--resume", "auto", done=os.path.join(folder, "done"))
        return os.path.join(folder, "ckpt.pt")

    if not real:
        # ------------------------------------------------------------ synthetic: a teacher trained from scratch
        seg_common = ["--dataset", "synthetic", "--crop", cfg.size, "--eval-every", 0, "--log-every", 10, *common]
        teacher_ckpt, n_unlabelled = out("teacher", "ckpt.pt"), 2000
        # --layer-scale 0: a plain ViT like the pre-trained teachers, so the vit_* preset loads it in the next stages
        stage("teacher: train a ViT from scratch", "train_seg.py", *seg_common, "--model", cfg.teacher_arch,
              "--iters", cfg.teacher_iters, "--lr", cfg.teacher_lr, "--layer-scale", 0, "--out", out("teacher"),
              "--resume", "auto", done=out("teacher", "done"))
        analyse_args = ["--img-size", cfg.size]
        seg_common += ["--train-images", cfg.label_budget]
        unlabelled = ""
    else:
        # ------------------------------------------------------------ real: split, unlabelled frames
        teacher_ckpt = os.path.abspath(cfg.teacher)
        sys.path.insert(0, HERE)
        import data  # its list of image endings and the pair check
        img_dir = os.path.join(cfg.labelled, "images")
        # every labelled pair checked before the first stage (files present, sizes from the headers), not when
        # fine-tuning reaches it after the distillation has run
        pairs = data.SegFolder(img_dir, os.path.join(cfg.labelled, "labels"), classes=cfg.classes.split(","))
        mismatched = [m for _, m in pairs.size_mismatches()]
        if mismatched:
            raise SystemExit(f"error: --labelled {cfg.labelled}: {len(mismatched)} image/label pairs differ in size: "
                             f"{'; '.join(mismatched)}. Fix or remove them before the run")
        stems = sorted(os.path.splitext(f)[0] for f in os.listdir(img_dir) if f.lower().endswith(data.IMG_EXTS))
        val = stems[cfg.val_every - 1::cfg.val_every]
        train = [s for s in stems if s not in set(val)]
        os.makedirs(out("split"), exist_ok=True)
        for name, part in (("train", train), ("val", val)):
            with open(out("split", f"{name}.txt"), "w") as f:
                f.write("\n".join(part) + "\n")
        # NMI-HAD sees every unlabelled frame except the labelled validation images (links, no copies).
        held_out = {os.path.realpath(os.path.join(img_dir, f)) for f in os.listdir(img_dir)
                    if os.path.splitext(f)[0] in set(val)}
        files = [p for d in cfg.unlabelled.split(",") if d for p in data._images_in(d, recursive=True)]
        files = [p for p in files if os.path.realpath(p) not in held_out]
        unlabelled = out("unlabelled")
        shutil.rmtree(unlabelled, ignore_errors=True)
        os.makedirs(unlabelled)
        for i, p in enumerate(files):
            os.symlink(os.path.realpath(p), os.path.join(unlabelled, f"{i:05d}_{os.path.basename(p)}"))
        n_unlabelled = len(files)
        print(f"labelled: {len(train)} train / {len(val)} validation images ({out('split')}); "
              f"unlabelled for NMI-HAD: {n_unlabelled} frames from {cfg.unlabelled} "
              f"({len(held_out)} validation frames left out)")
        seg_common = ["--dataset", "folder", "--data-root", os.path.abspath(cfg.labelled), "--img-dir", "images",
                      "--label-dir", "labels", "--train-split", out("split", "train.txt"),
                      "--val-split", out("split", "val.txt"), "--classes", cfg.classes, "--label-map", cfg.label_map,
                      "--crop", cfg.size, "--eval-every", 0, "--log-every", 20, "--num-samples", 2, *common]
        analyse_args = ["--img-size", cfg.analyse_size or cfg.size, "--images", unlabelled]

    # ---------------------------------------------------------------- the teacher's attention patterns
    stage("analyse the teacher's attention", "analyze.py", "--checkpoint", teacher_ckpt, "--arch", cfg.teacher_arch,
          "--num-images", cfg.analyse_images, *analyse_args, "--device", cfg.device, "--workers", 1, "--out", out("analyze"),
          done=out("analyze", "done"))
    nmi = json.load(open(out("analyze", "nmi.json")))
    means, n_layers = nmi["layers"], len(nmi["layers"])
    peak = max(range(n_layers), key=lambda i: means[i]) + 1
    # The teacher layer of each distilled row. 'closest' is the rule as the paper states it (all layers searched),
    # against which the after-peak rule's choice is tested.
    candidates = {"rule": nmi["recommended_layer"], "peak": cfg.control_layer or peak,
                  "closest": unip.layer_choice(means, nmi.get("target", 0.09), rule="closest")[0], "last": n_layers}
    rows, layers, same_as = [], {}, {}
    for row in cfg.rows.split(","):
        if row in candidates:
            twin = next((r for r, l in layers.items() if l == candidates[row]), None)
            if twin:  # one layer distilled twice would be the same experiment: one row, and say so
                same_as[row] = twin
                print(f"row '{row}': layer {candidates[row]} is the layer of row '{twin}' (not run twice)")
                continue
            layers[row] = candidates[row]
        rows.append(row)
    layer = layers.get("rule", nmi["recommended_layer"])
    distilled = [r for r in rows if r in layers]
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
    inits = {row: [distil(layers[row], d, unlabelled, keep=cfg.curve_steps if curve_shared and row == "rule" and d == 0
                          else "") for d in range(cfg.distill_seeds)] for row in distilled}
    runs = {}  # (row, mode) -> [mIoU per seed]

    def evaluate(row, init, seed, mode, name):
        lr = ["--lr", 1e-3] if mode == "linear" else []  # a lone 1x1 conv wants a larger lr
        stage(f"{mode} {row} (seed {seed})", "train_seg.py", *seg_common, *init, *lr,
              "--iters", cfg.finetune_iters, "--seed", seed, "--mode", mode, "--out", out(name),
              "--resume", "auto", done=out(name, "done"))
        return final_miou(out(name))

    for seed in range(max(n_seeds.values())):
        for row in rows:
            if seed >= n_seeds[row]:
                continue
            for mode in ("finetune", "linear"):
                if row == "teacher":
                    init = ["--model", cfg.teacher_arch, "--init", teacher_ckpt]
                else:
                    init = ["--model", cfg.student] + (["--init", inits[row][seed % cfg.distill_seeds]]
                                                       if row in inits else [])
                runs.setdefault((row, mode), []).append(evaluate(row, init, seed, mode, f"{mode}_{row}_s{seed}"))

    # ---------------------------------------------------------------- distillation-length curve
    # One run of the longest length with snapshots: the shorter ones sit inside its cosine schedule.
    curve_runs = {}  # steps -> {mode: mIoU}
    if curve:
        if not curve_shared:
            distil(layer, 0, unlabelled, steps=curve[-1], keep=cfg.curve_steps, folder=curve_dir,
                   what=f", length curve: snapshots at steps {', '.join(map(str, curve))}")
        missing = [s for s in curve if not os.path.exists(os.path.join(curve_dir, f"step{s}.pt"))]
        if missing:  # e.g. the folder was distilled earlier without --curve-steps
            raise FileNotFoundError(f"{curve_dir} has no snapshots for steps {missing} (--curve-steps); "
                                    f"delete that folder to distil it again with them")
        for steps in curve:
            for mode in ("finetune", "linear"):
                if curve_shared and steps == curve[-1]:  # the same weights and seed as the rule's seed-0 run
                    curve_runs.setdefault(steps, {})[mode] = runs[("rule", mode)][0]
                    continue
                init = ["--model", cfg.student, "--init", os.path.join(curve_dir, f"step{steps}.pt")]
                curve_runs.setdefault(steps, {})[mode] = evaluate(f"curve {steps} steps", init, 0, mode,
                                                                  f"{mode}_curve{steps}_s0")

    # ---------------------------------------------------------------- statistics: paired by seed
    modes = {"finetune": "fine-tune (LL-FPN + UperNet)", "linear": "linear probe"}
    stats = {(r, m): paired_ci(runs[(r, m)], runs[("scratch", m)]) for r in distilled for m in modes
             if "scratch" in rows}
    pairs = [(a, b, why) for a, b, why in (("rule", "peak", "hybrid - local"), ("rule", "last", "hybrid - global"),
                                           ("rule", "closest", "after-peak rule - closest rule"))
             if a in layers and b in layers]
    comparisons = {(a, b, m): paired_ci(runs[(a, m)], runs[(b, m)]) for a, b, _ in pairs for m in modes}

    # ---------------------------------------------------------------- the tables
    kind = {"rule": f"the rule's: {nmi.get('layer_rule', 'after-peak')}",
            "peak": "control" if cfg.control_layer else "NMI peak: local",
            "closest": f"closest to {nmi.get('target', 0.09)} over all layers", "last": "last layer: global"}
    label = {"scratch": f"{cfg.student} from scratch (random init)",
             "teacher": f"the teacher {cfg.teacher_arch} itself"}
    for r, l in layers.items():
        label[r] = f"UNIP {cfg.student} <- layer {l} ({kind[r]}, NMI {means[l - 1]:.3f})"
    commit, dirty = git_commit()
    wall = time.time() - t_start
    lines = []
    if real:
        lines.append(f"teacher {cfg.teacher_arch} ({cfg.teacher}); rule: {nmi['reason']}")
        if nmi.get("warning"):
            lines.append(f"  note: {nmi['warning']}")
        lines.append(f"labelled task {cfg.labelled}: {len(train)} train / {len(val)} val images, crop {cfg.size}, "
                     f"{cfg.finetune_iters} iterations per run; NMI-HAD: {n_unlabelled} unlabelled frames, "
                     f"{cfg.distill_steps} steps x 32")
    else:
        lines.append(f"teacher {cfg.teacher_arch}: {cfg.teacher_iters} iterations on 2000 labelled scenes -> mIoU "
                     f"{final_miou(out('teacher')):.1f}; distilled layer {layer} (mean NMI {means[layer - 1]:.3f})")
        lines.append(f"students ({cfg.student}), {cfg.label_budget} labelled scenes, {cfg.finetune_iters} "
                     f"iterations each; NMI-HAD {cfg.distill_steps} steps x 32")
    for row, twin in same_as.items():
        lines.append(f"row '{row}' (layer {candidates[row]}) is the same layer as row '{twin}': not run twice")
    lines.append(f"seeds: {cfg.seeds} per student row, {cfg.teacher_seeds} for the teacher; "
                 f"{cfg.distill_seeds} distillation run(s) per layer: {distil_note}")
    lines.append("")
    for m, title in modes.items():
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
            for m in modes:
                c = comparisons[(a, b, m)]
                excl = "" if c["excludes_zero"] is None else (
                    ": excludes 0" if c["excludes_zero"] else ": includes 0")
                lines.append(f"  {a} - {b} (layer {layers[a]} - layer {layers[b]}, {why}), {modes[m]}: "
                             f"{ci_text(c)}{excl}")
        lines.append("")
    if curve:
        lines += [f"Distillation length, layer {layer}, seed 0 (mIoU %): snapshots of ONE run of {curve[-1]} steps, "
                  f"one cosine schedule over {schedule[curve[-1]]} steps, so the shorter snapshots are taken "
                  f"mid-schedule (not annealed)" + (f"; that run is the rule's distillation run 0, and its {curve[-1]}-step "
                                       f"point the rule's seed-0 row" if curve_shared else ""),
                  "", "| distillation steps | fine-tune | linear probe |", "|---|---|---|"]
        if "scratch" in rows:
            lines.append(f"| 0 (scratch, seed 0) | {runs[('scratch', 'finetune')][0]:.1f} | "
                         f"{runs[('scratch', 'linear')][0]:.1f} |")
        for steps in curve:
            lines.append(f"| {steps} | {curve_runs[steps]['finetune']:.1f} | {curve_runs[steps]['linear']:.1f} |")
        lines.append("")
    lines.append(f"commit {commit}" + (" (with uncommitted changes to tracked files)" if dirty else ""))
    lines.append(f"command: python demo.py {' '.join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))}")
    lines.append(f"wall time of this call {wall / 60:.1f} min ({len(run_now)} stages run now); "
                 f"stage times add up to {sum(times.values()) / 60:.1f} min")
    if times:
        lines.append("stage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    report = "\n".join(lines)
    print("\n" + "=" * 96 + "\n" + report)
    with open(out("results.md"), "w") as f:
        f.write(report + "\n")
    ci_json = lambda d: {"/".join(k): v for k, v in d.items()}
    with open(out("results.json"), "w") as f:
        json.dump({"layers": layers, "same_as": same_as, "layer_nmi": means, "reason": nmi.get("reason"),
                   "warning": nmi.get("warning"), "rows": rows, "labels": label, "seeds_note": distil_note,
                   "runs": {f"{r}/{m}": v for (r, m), v in runs.items()}, "minus_scratch": ci_json(stats),
                   "between_layers": ci_json(comparisons),
                   "curve": {"layer": layer, "schedule_steps": curve[-1] if curve else None, "seed": 0,
                             "folder": curve_dir if curve else None,
                             "miou": {str(k): v for k, v in curve_runs.items()}},
                   "config": dataclasses.asdict(cfg), "commit": commit, "uncommitted_changes": dirty,
                   "seconds": times, "wall_seconds": wall}, f, indent=1)


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:  # the stage printed its own error above
        raise SystemExit(f"error: {os.path.basename(e.cmd[1])} failed (exit status {e.returncode}), see above") from None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
