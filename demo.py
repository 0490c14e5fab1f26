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
  2. analyse   analyze.py on the unlabelled frames: the layer the rule picks, and a control layer
               (the most local one: the NMI peak)
  3. distil    train_pretrain.py, once per layer and seed, on the unlabelled frames minus the
               labelled validation frames
  4. evaluate  train_seg.py for every seed: the student from scratch, the two distilled students and
               the teacher itself, each fine-tuned and linearly probed; table of mean +- std

    python demo.py                                     # synthetic
    python demo.py --teacher dinov2_vits14.pth --teacher-arch dinov2_vits14 \\
        --unlabelled DIR1,DIR2 --labelled buffalo_udder_thermal_seg \\
        --classes background,udder --label-map 255:1 --seeds 3     # real (see README for the run)

Every stage is the real script with its real command line (printed before it runs), so this file
doubles as a worked example. Outputs land in --out; a stage that already finished is not run again
(delete the folder, or pass --fresh, to start over).
"""
import argparse
import dataclasses
import inspect
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))


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
    seeds: int = 1  # seeds per row (distillation and fine-tuning); the table reports mean +- std
    control_layer: int = 0  # real mode: second layer distilled as a control (0: the NMI peak, the most local layer)
    size: int = 0  # image / crop side for every stage (0: 128 synthetic, 160 real)
    teacher_iters: int = 300  # synthetic teacher training iterations (batch 8)
    teacher_lr: float = 1e-3  # synthetic teacher lr: from scratch it needs more than the fine-tuning recipe's 1e-4
    student: str = ""  # student preset (0: vit_micro synthetic, vit_tiny real)
    distill_steps: int = 200  # NMI-HAD optimiser steps (batch 32)
    label_budget: int = 200  # synthetic: labelled scenes the students are fine-tuned on
    finetune_iters: int = 300  # fine-tuning / linear-probing iterations (batch 8) per run
    analyse_images: int = 64  # images for the NMI analysis
    analyse_size: int = 224  # real mode: image side for the NMI analysis
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
    cfg.size = cfg.size or (160 if real else 128)
    cfg.student = cfg.student or ("vit_tiny" if real else "vit_micro")
    return cfg


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None):
    cfg = parse_config(argv)
    real = bool(cfg.teacher)
    if cfg.fresh and os.path.isdir(cfg.out):
        shutil.rmtree(cfg.out)
    os.makedirs(cfg.out, exist_ok=True)
    out = lambda *p: os.path.abspath(os.path.join(cfg.out, *p))
    times, t_start = {}, time.time()

    def stage(name, script, *args, done=None):
        """Run one script as a user would; skip it when its result file already exists."""
        cmd = [sys.executable, os.path.join(HERE, script), *map(str, args)]
        print(f"\n=== {name}\n$ {' '.join(cmd[1:])}", flush=True)
        if done and os.path.exists(done):
            print(f"(already done: {done})")
            return
        t = time.time()
        subprocess.run(cmd, check=True, cwd=HERE)
        times[name] = time.time() - t
        if done:
            open(done, "w").close()

    def final_miou(folder):  # the last evaluation row of a train_seg.py run
        rows = [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]
        return [r for r in rows if "miou" in r][-1]["miou"]

    common = ["--device", cfg.device, "--amp", cfg.amp, "--workers", 1]
    seeds = list(range(cfg.seeds))

    def distil(layer, seed, images):  # NMI-HAD: the teacher layer's logits -> the student's last layer
        folder = out(f"student_l{layer}_s{seed}")
        data_args = ["--infrared", images] if images else []
        stage(f"distil teacher layer {layer} into a {cfg.student} (seed {seed})", "train_pretrain.py",
              "--teacher", teacher_ckpt, "--teacher-arch", cfg.teacher_arch, "--teacher-layer", layer,
              "--model", cfg.student, "--img-size", cfg.size, "--batch-size", 32, "--effective-batch", 32,
              "--epochs", max(1, cfg.distill_steps * 32 // n_unlabelled + 1), "--warmup-epochs", 1, "--lr", 5e-4,
              "--steps", cfg.distill_steps, "--log-every", 10, "--seed", seed, *data_args, *common,
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
        analyse_args = ["--img-size", cfg.analyse_size, "--images", unlabelled]

    # ---------------------------------------------------------------- the teacher's attention patterns
    stage("analyse the teacher's attention", "analyze.py", "--checkpoint", teacher_ckpt, "--arch", cfg.teacher_arch,
          "--num-images", cfg.analyse_images, *analyse_args, "--device", cfg.device, "--workers", 1, "--out", out("analyze"),
          done=out("analyze", "done"))
    nmi = json.load(open(out("analyze", "nmi.json")))
    layer = nmi["recommended_layer"]
    layers = {"rule": layer}
    if real:
        peak = max(range(len(nmi["layers"])), key=lambda i: nmi["layers"][i]) + 1
        layers["control"] = cfg.control_layer or peak

    # ---------------------------------------------------------------- NMI-HAD, then fine-tuning and probing
    inits = {"scratch": None}
    for seed in seeds:
        for kind, l in layers.items():
            inits.setdefault(kind, []).append(distil(l, seed, unlabelled))
    runs = {}  # (row, mode) -> [mIoU per seed]
    rows = ["scratch", *layers] + (["teacher"] if real else [])
    for seed in seeds:
        for row in rows:
            for mode in ("finetune", "linear"):
                name = f"{mode}_{row}_s{seed}"
                if row == "teacher":
                    init = ["--model", cfg.teacher_arch, "--init", teacher_ckpt]
                else:
                    init = ["--model", cfg.student] + (["--init", inits[row][seed]] if inits[row] else [])
                lr = ["--lr", 1e-3] if mode == "linear" else []  # a lone 1x1 conv wants a larger lr
                stage(f"{mode} {row} (seed {seed})", "train_seg.py", *seg_common, *init, *lr,
                      "--iters", cfg.finetune_iters, "--seed", seed, "--mode", mode, "--out", out(name),
                      "--resume", "auto", done=out(name, "done"))
                runs.setdefault((row, mode), []).append(final_miou(out(name)))

    # ---------------------------------------------------------------- the table
    label = {"scratch": f"{cfg.student} from scratch (random init)",
             "rule": f"UNIP {cfg.student} <- layer {layers['rule']} (the rule's, NMI {nmi['layers'][layers['rule'] - 1]:.3f})",
             "teacher": f"the teacher {cfg.teacher_arch} itself"}
    if "control" in layers:
        label["control"] = (f"UNIP {cfg.student} <- layer {layers['control']} (control, NMI "
                            f"{nmi['layers'][layers['control'] - 1]:.3f})")
    wall = time.time() - t_start
    print("\n" + "=" * 96)
    if real:
        print(f"teacher {cfg.teacher_arch} ({cfg.teacher}); rule: {nmi['reason']}")
        if nmi.get("warning"):
            print(f"  note: {nmi['warning']}")
        print(f"labelled task {cfg.labelled}: {len(train)} train / {len(val)} val images, crop {cfg.size}, "
              f"{cfg.finetune_iters} iterations per run; NMI-HAD: {n_unlabelled} unlabelled frames, "
              f"{cfg.distill_steps} steps x 32")
    else:
        print(f"teacher {cfg.teacher_arch}: {cfg.teacher_iters} iterations on 2000 labelled scenes -> mIoU "
              f"{final_miou(out('teacher')):.1f}; distilled layer {layer} (mean NMI {nmi['layers'][layer - 1]:.3f})")
        print(f"students ({cfg.student}), {cfg.label_budget} labelled scenes, {cfg.finetune_iters} iterations each")
    n = len(seeds)
    print(f"mIoU (%) on the validation images, {'mean +- std over ' + str(n) + ' seeds' if n > 1 else 'one seed'}:\n")
    cell = lambda v: f"{mean_std(v)[0]:.1f} +- {mean_std(v)[1]:.1f}" if n > 1 else f"{v[0]:.1f}"
    print(f"| {'init':<52} | {'fine-tune (LL-FPN + UperNet)':>28} | {'linear probe':>14} |")
    print(f"|{'-' * 54}|{'-' * 30}|{'-' * 16}|")
    for row in rows:
        print(f"| {label[row]:<52} | {cell(runs[(row, 'finetune')]):>28} | {cell(runs[(row, 'linear')]):>14} |")
    print("\nper seed: " + "; ".join(f"{r} {m} {[round(v, 1) for v in runs[(r, m)]]}" for r in rows
                                     for m in ("finetune", "linear")))
    print(f"wall time {wall / 60:.1f} min ({len(times)} stages run now)")
    if times:
        print("stage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    with open(out("results.json"), "w") as f:
        json.dump({"layers": layers, "layer_nmi": nmi["layers"], "reason": nmi.get("reason"),
                   "runs": {f"{r}/{m}": v for (r, m), v in runs.items()}, "config": dataclasses.asdict(cfg),
                   "seconds": times, "wall_seconds": wall}, f, indent=1)


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:  # the stage printed its own error above
        raise SystemExit(f"error: {os.path.basename(e.cmd[1])} failed (exit status {e.returncode}), see above") from None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
