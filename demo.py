"""
The UNIP experiment in miniature, end to end on the CPU, with the project's own scripts and no download:

  1. teacher   train_seg.py      a ViT-T trained from scratch on 2000 synthetic infrared street scenes
  2. analyse   analyze.py        NMI of every teacher head; the layer to distil (unip.choose_layer)
  3. distil    train_pretrain.py NMI-HAD: that layer's attention -> the last layer of a ViT-micro, on the
                                 same scenes without their labels
  4. evaluate  train_seg.py      the distilled student and a randomly initialised one, each fine-tuned
                                 (LL-FPN + UperNet) and linearly probed with the same small label budget,
                                 then scored on 100 validation scenes
Results: OUT/results.md and OUT/results.json.

    python demo.py               # seed 0
    python demo.py --seeds 2     # the README's table

Every stage is the real script with its real command line (printed before it runs), so this file doubles as
a worked example. A stage that already finished is not run again (--fresh starts over). The same experiment
with pre-trained teachers, real frames, label budgets and confidence intervals: tools/real_data.py.
"""
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import plumbing

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = {"finetune": "fine-tune (LL-FPN + UperNet)", "linear": "linear probe"}


@dataclass
class Config:
    out: str = "runs/demo"  # output folder, one sub-folder per stage
    seeds: int = 1  # seeds: each one distils and fine-tunes again; the table reports mean +- std
    size: int = 112  # image / crop side for every stage (7 x 7 patches)
    teacher_arch: str = "vit_tiny"  # the teacher trained from scratch
    teacher_iters: int = 200  # teacher training iterations (batch 8)
    teacher_lr: float = 1e-3  # from scratch the teacher needs more than the fine-tuning recipe's 1e-4
    student: str = "vit_micro"  # student preset
    distill_steps: int = 124  # NMI-HAD optimiser steps (batch 32): 2 epochs of the 2000 scenes
    label_budget: int = 200  # labelled scenes the students are fine-tuned on
    finetune_iters: int = 200  # fine-tuning / linear-probing iterations (batch 8) per run
    head_channels: int = 64  # UperNet width of the teacher and the fine-tuned students (0: the backbone's dim, as the reference); on a CPU the head costs more than these small backbones
    analyse_images: int = 64  # images for the NMI analysis
    val_images: int = 100  # validation scenes every fine-tuned or probed student is scored on
    amp: str = "auto"  # precision of every stage: auto (bf16 where the CPU has it) | bf16 | none
    device: str = "cpu"  # device for every stage
    fresh: bool = False  # delete --out first


def check_config(cfg):
    if min(cfg.seeds, cfg.distill_steps, cfg.finetune_iters, cfg.teacher_iters) < 1:
        return "--seeds, --distill-steps, --finetune-iters and --teacher-iters must be positive"
    if not 1 <= cfg.val_images <= 100:
        return f"--val-images must be 1..100 (the synthetic validation split has 100 scenes), got {cfg.val_images}"
    return None


# -----------------------------------------------------------------------------
# the stages: each one the real script, run as a user would


class Stages:
    """An experiment's output folder (emptied first with fresh=True) and its stages. Calling it runs one
    script with its command line printed first, skipped when its marker file `done` exists. Each stage's
    seconds go to `times` (and into the marker, so a resumed experiment still reports every stage); `ran`
    holds the stages this call ran. A failed script has printed its own error: one line here."""

    def __init__(self, folder, fresh=False):
        if fresh and os.path.isdir(folder):
            shutil.rmtree(folder)
        os.makedirs(folder, exist_ok=True)
        self.folder, self.times, self.ran, self.t_start = folder, {}, set(), time.time()

    def path(self, *parts):
        return os.path.abspath(os.path.join(self.folder, *parts))

    def __call__(self, name, script, *args, done=None):
        cmd = [sys.executable, os.path.join(HERE, script), *map(str, args)]
        print(f"\n=== {name}\n$ {' '.join(cmd[1:])}", flush=True)
        if done and os.path.exists(done):
            print(f"(already done: {done})")
            try:
                self.times[name] = json.load(open(done))["seconds"]
            except (ValueError, KeyError, TypeError):
                pass
            return
        t = time.time()
        try:
            subprocess.run(cmd, check=True, cwd=HERE)
        except subprocess.CalledProcessError as e:
            raise SystemExit(f"error: {script} failed (exit status {e.returncode}), see above") from None
        self.times[name] = time.time() - t
        self.ran.add(name)
        if done:
            with open(done, "w") as f:
                json.dump({"seconds": self.times[name]}, f)

    def write(self, report, results):
        """Print the report; results.md and results.json, each written whole or not at all."""
        print("\n" + "=" * 96 + "\n" + report)
        for name, text in (("results.md", report + "\n"), ("results.json", json.dumps(results, indent=1))):
            with open(self.path(name + ".tmp"), "w") as f:
                f.write(text)
            os.replace(self.path(name + ".tmp"), self.path(name))


def final_miou(folder):
    """The last evaluation row of a train_seg.py run."""
    rows = [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]
    return [r for r in rows if "miou" in r][-1]["miou"]


def script_args(cfg):
    """The settings every stage shares."""
    return ["--device", cfg.device, "--amp", cfg.amp, "--workers", 0]  # on 2 cores a loader process only competes


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


def evaluate(stage, seg_args, iters, folder, row, init, seed, mode, head_channels=0):
    """One backbone fine-tuned (LL-FPN + UperNet, head_channels wide; 0: the backbone's dim) or linearly probed
    with train_seg.py; its final mIoU."""
    lr = ["--lr", 1e-3] if mode == "linear" else ["--head-channels", head_channels]  # a lone 1x1 conv wants a larger lr
    stage(f"{mode} {row} (seed {seed})", "train_seg.py", *seg_args, *init, *lr,
          "--iters", iters, "--seed", seed, "--mode", mode, "--out", folder,
          "--resume", "auto", done=os.path.join(folder, "done"))
    return final_miou(folder)


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = plumbing.parse_config(Config, argv, __doc__, check=check_config)
    stage = Stages(cfg.out, cfg.fresh)
    out = stage.path
    seg_args = ["--dataset", "synthetic", "--crop", cfg.size, "--eval-every", 0, "--eval-images", cfg.val_images,
                "--log-every", 10, *script_args(cfg)]

    # ---------------------------------------------------------------- 1. a teacher, trained from scratch
    # --layer-scale 0: a plain ViT like the pre-trained teachers, so the vit_* preset loads it in the next stages
    teacher_ckpt = out("teacher", "ckpt.pt")
    head = ["--head-channels", cfg.head_channels]
    stage("teacher: train a ViT from scratch", "train_seg.py", *seg_args, *head, "--model", cfg.teacher_arch,
          "--iters", cfg.teacher_iters, "--lr", cfg.teacher_lr, "--layer-scale", 0, "--out", out("teacher"),
          "--resume", "auto", done=out("teacher", "done"))

    # ---------------------------------------------------------------- 2. its attention patterns: the layer
    stage("analyse the teacher's attention", "analyze.py", "--checkpoint", teacher_ckpt, "--arch", cfg.teacher_arch,
          "--num-images", cfg.analyse_images, "--img-size", cfg.size, "--device", cfg.device, "--workers", 1,
          "--out", out("analyze"), done=out("analyze", "done"))
    nmi = json.load(open(out("analyze", "nmi.json")))
    layer = nmi["recommended_layer"]

    # ---------------------------------------------------------------- 3. NMI-HAD, 4. fine-tuning and probing
    seg_args += ["--train-images", cfg.label_budget]
    runs = {(row, mode): [] for row in ("scratch", "rule") for mode in MODES}
    for seed in range(cfg.seeds):
        student = distil(stage, cfg, teacher_ckpt, "", 2000, layer, seed, out(f"student_l{layer}_s{seed}"))
        for row, init in (("scratch", []), ("rule", ["--init", student])):
            for mode in MODES:
                runs[(row, mode)].append(evaluate(stage, seg_args, cfg.finetune_iters, out(f"{mode}_{row}_s{seed}"),
                                                  row, ["--model", cfg.student, *init], seed, mode,
                                                  cfg.head_channels))

    # ---------------------------------------------------------------- the table
    label = {"scratch": f"{cfg.student} from scratch (random init)",
             "rule": f"UNIP {cfg.student} <- layer {layer} (NMI {nmi['layers'][layer - 1]:.3f})"}
    ms = lambda v: f"{statistics.mean(v):.1f} +- {statistics.stdev(v) if len(v) > 1 else 0.0:.1f}"
    lines = [f"teacher {cfg.teacher_arch}: {cfg.teacher_iters} iterations on 2000 labelled scenes -> mIoU "
             f"{final_miou(out('teacher')):.1f}; {nmi['reason']}",
             f"students ({cfg.student}): {cfg.label_budget} labelled scenes, {cfg.finetune_iters} iterations each; "
             f"NMI-HAD {cfg.distill_steps} steps x 32; {cfg.seeds} seed(s), each distilled and fine-tuned again", "",
             f"mIoU (%) on {cfg.val_images} validation scenes: mean +- std over seeds (per seed)", "",
             "| student init | " + " | ".join(MODES.values()) + " |", "|---|---|---|"]
    for row in ("scratch", "rule"):
        lines.append(f"| {label[row]} | " + " | ".join(
            f"{ms(runs[(row, m)])} ({', '.join(f'{v:.1f}' for v in runs[(row, m)])})" for m in MODES) + " |")
    gaps = {m: [a - b for a, b in zip(runs[("rule", m)], runs[("scratch", m)])] for m in MODES}
    lines += ["", "UNIP minus scratch, seed by seed: " + "; ".join(
        f"{MODES[m]} {', '.join(f'{g:+.1f}' for g in gaps[m])}" for m in MODES), "",
        "stage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in stage.times.items()),
        f"wall time of this call {(time.time() - stage.t_start) / 60:.1f} min ({len(stage.ran)} stages run now)"]
    stage.write("\n".join(lines), {
        "layer": layer, "layer_nmi": nmi["layers"], "reason": nmi["reason"], "labels": label,
        "runs": {f"{r}/{m}": v for (r, m), v in runs.items()}, "minus_scratch": gaps,
        "config": dataclasses.asdict(cfg), "seconds": stage.times})


if __name__ == "__main__":
    plumbing.run(main)
