"""
The UNIP experiment in miniature, end to end on the CPU (about 10 minutes on 2 cores):

  1. teacher   train_seg.py      a ViT-T trained from scratch on 2000 synthetic infrared scenes
  2. analyse   analyze.py        NMI of every teacher head; the layer closest to NMI 0.09
  3. distil    train_pretrain.py NMI-HAD: that layer's attention -> the last layer of a ViT-micro,
                                 on the same scenes without their labels
  4. evaluate  train_seg.py      the distilled student and a randomly initialised one, each
                                 fine-tuned (LL-FPN + UperNet) and linearly probed with the same
                                 small label budget, then scored on 100 validation scenes

Every stage is the real script with its real command line (printed before it runs), so
this file doubles as a worked example. Outputs land in --out; a stage that already
finished is not run again (delete the folder, or pass --fresh, to start over).

    python demo.py                 # the whole thing
    python demo.py --help          # budgets, sizes, output folder
"""
import argparse
import dataclasses
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Config:
    out: str = "runs/demo"  # output folder, one sub-folder per stage
    size: int = 128  # image / crop side for every stage (8x8 patches)
    teacher: str = "vit_tiny"  # teacher preset, trained from scratch on labelled scenes
    teacher_iters: int = 300  # teacher training iterations (batch 8)
    teacher_lr: float = 1e-3  # teacher lr: from scratch it needs more than the fine-tuning recipe's 1e-4
    student: str = "vit_micro"  # student preset (96 wide, 6 blocks)
    distill_steps: int = 200  # NMI-HAD optimiser steps (batch 32, unlabelled scenes)
    label_budget: int = 200  # labelled scenes the students are fine-tuned on
    finetune_iters: int = 300  # fine-tuning / linear-probing iterations (batch 8) per student
    analyse_images: int = 64  # images for the NMI analysis
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
    return Config(**vars(p.parse_args(argv)))


def main(argv=None):
    cfg = parse_config(argv)
    if cfg.fresh and os.path.isdir(cfg.out):
        shutil.rmtree(cfg.out)
    os.makedirs(cfg.out, exist_ok=True)
    out = lambda *p: os.path.join(cfg.out, *p)
    times = {}

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

    def final_miou(folder):  # the last evaluation row of a train_seg.py run
        rows = [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]
        return [r for r in rows if "miou" in r][-1]

    seg_common = ["--dataset", "synthetic", "--crop", cfg.size, "--device", cfg.device, "--workers", 1,
                  "--eval-every", 0, "--log-every", 10]

    # 1. the teacher: a ViT-T that learns the scenes with their labels (the stand-in for a big pre-trained model)
    stage("1/4 teacher: train a ViT from scratch", "train_seg.py", *seg_common, "--model", cfg.teacher,
          "--iters", cfg.teacher_iters, "--lr", cfg.teacher_lr, "--out", out("teacher"), "--resume", "auto",
          done=out("teacher", "done"))
    open(out("teacher", "done"), "w").close()

    # 2. its attention patterns: NMI per head and layer, and the layer to distil
    stage("2/4 analyse the teacher's attention", "analyze.py", "--checkpoint", out("teacher", "ckpt.pt"),
          "--arch", cfg.teacher, "--img-size", cfg.size, "--num-images", cfg.analyse_images,
          "--device", cfg.device, "--workers", 1, "--out", out("analyze"), done=out("analyze", "nmi.json"))
    nmi = json.load(open(out("analyze", "nmi.json")))
    layer = nmi["recommended_layer"]

    # 3. NMI-HAD: the chosen layer's logits -> the student's last layer, on unlabelled scenes
    stage(f"3/4 distil teacher layer {layer} into a {cfg.student}", "train_pretrain.py",
          "--teacher", out("teacher", "ckpt.pt"), "--teacher-arch", cfg.teacher, "--teacher-layer", layer,
          "--model", cfg.student, "--img-size", cfg.size, "--batch-size", 32, "--effective-batch", 32,
          "--epochs", max(1, cfg.distill_steps * 32 // 2000 + 1), "--warmup-epochs", 1, "--lr", 5e-4,
          "--steps", cfg.distill_steps, "--device", cfg.device, "--workers", 1, "--log-every", 10,
          "--out", out("student"), "--resume", "auto", done=out("student", "done"))
    open(out("student", "done"), "w").close()

    # 4. the same small label budget for the distilled and the random student, fine-tuned and linearly probed
    budget = ["--model", cfg.student, "--train-images", cfg.label_budget, "--iters", cfg.finetune_iters]
    runs = {}
    for mode in ("finetune", "linear"):
        for init in ("distilled", "random"):
            name = f"{mode}_{init}"
            extra = ["--init", out("student", "ckpt.pt")] if init == "distilled" else []
            lr = ["--lr", 1e-3] if mode == "linear" else []  # a lone 1x1 conv wants a larger lr
            stage(f"4/4 {mode} the {init} student", "train_seg.py", *seg_common, *budget, *extra, *lr,
                  "--mode", mode, "--out", out(name), "--resume", "auto", done=out(name, "done"))
            open(out(name, "done"), "w").close()
            runs[name] = final_miou(out(name))

    # ---------------------------------------------------------------- the table
    teacher = final_miou(out("teacher"))
    print("\n" + "=" * 72)
    print(f"teacher {cfg.teacher}: {cfg.teacher_iters} iterations on 2000 labelled scenes -> "
          f"mIoU {teacher['miou']:.1f}; distilled layer {layer} (mean NMI "
          f"{nmi['layers'][layer - 1]:.3f}, target {nmi['target']})")
    print(f"students ({cfg.student}), {cfg.label_budget} labelled scenes, {cfg.finetune_iters} iterations each,"
          f" mIoU (%) on 100 validation scenes:\n")
    print(f"| {'init':<28} | {'fine-tune (LL-FPN+UperNet)':>27} | {'linear probe':>12} |")
    print(f"|{'-' * 30}|{'-' * 29}|{'-' * 14}|")
    for init, label in (("random", "random (from scratch)"), ("distilled", f"UNIP (NMI-HAD, layer {layer})")):
        print(f"| {label:<28} | {runs['finetune_' + init]['miou']:27.1f} | {runs['linear_' + init]['miou']:12.1f} |")
    gain = runs["finetune_distilled"]["miou"] - runs["finetune_random"]["miou"]
    print(f"\ndistillation changes fine-tuning mIoU by {gain:+.1f} points and linear probing by "
          f"{runs['linear_distilled']['miou'] - runs['linear_random']['miou']:+.1f}.")
    if times:
        print("stage times: " + ", ".join(f"{k.split(' ', 1)[1]} {v / 60:.1f} min" for k, v in times.items()))
    print(f"pictures: {out('analyze', 'nmi_layers.png')}, {out('analyze', 'attention.png')}, "
          f"{out('finetune_distilled', 'pred_*.png')}")
    with open(out("results.json"), "w") as f:
        json.dump({"teacher_miou": teacher["miou"], "layer": layer, "layer_nmi": nmi["layers"],
                   "runs": {k: v["miou"] for k, v in runs.items()}, "config": dataclasses.asdict(cfg),
                   "seconds": times}, f, indent=1)


if __name__ == "__main__":
    main()
