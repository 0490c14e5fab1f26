r"""
NMI-HAD pre-training (UNIP §3.2): distil the attention of one hybrid layer of a
frozen, pre-trained teacher ViT into the last layer of a small student ViT.

  python train_pretrain.py --teacher mae_pretrain_vit_large.pth --teacher-arch vit_large \
      --teacher-layer 18 --model vit_small --infrared /data/infmix/infrared \
      --imagenet /data/imagenet/train --coco /data/coco
  torchrun --nproc_per_node=8 train_pretrain.py ...          (one node, 8 GPUs)
  torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 \
      --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train_pretrain.py ...
  srun python train_pretrain.py ...                          (SLURM, one task per GPU: docs/recipes.md)

Without data roots it trains on the synthetic infrared scenes of data.py.
Defaults follow the paper's recipe: 100 epochs (5 warm-up), effective batch 4096,
lr = 1.5e-4 x 4096 / 256, AdamW (0.9, 0.95), weight decay 0.05, drop path 0.1.
"""

import functools
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler
from tqdm import tqdm

import plumbing
import data
import unip


@dataclass
class Config:
    out: str = "runs/pretrain"  # output folder: config.json, log.jsonl, ckpt.pt
    teacher: str = ""  # teacher checkpoint (MAE, DINO, iBOT, DeiT, UNIP formats); 'random' = untrained, smoke tests only
    teacher_arch: str = "vit_large"  # teacher preset: vit_base | vit_large | dinov2_vits14 | ... (any of unip.PRESETS)
    teacher_layer: str = "18"  # layer to distil, from 1 (MAE-L 18, iBOT-L 21, DINO-B 9), or 'auto'
    nmi_target: float = 0.09  # --teacher-layer auto: the layer whose mean NMI is closest to this
    layer_rule: str = "after-peak"  # --teacher-layer auto: search the layers after the NMI peak, or 'closest' (all layers)
    nmi_images: int = 256  # --teacher-layer auto: images used to measure NMI
    teacher_norm: str = "infmix"  # teacher's input statistics: infmix (the student's input, as the authors) | clip | imagenet
    model: str = "vit_small"  # student size: vit_tiny | vit_small | vit_base
    img_size: int = 224  # student's crop; the teacher sees it resized to the same token grid (patch 14: 196)
    infrared: str = ""  # InfMix infrared root (<dataset>/thermal/*) or a plain image folder
    imagenet: str = ""  # ImageNet train root (<wnid>/*), capped at --per-class images per class
    coco: str = ""  # COCO root (train2017/*) or a folder of COCO images
    thermal_range: str = ""  # LO,HI: 16-bit / float frames mapped linearly LO -> 0, HI -> 255, clipped, the same for every frame ('': a per-image 1st-99th percentile stretch); 8-bit images are unaffected
    per_class: int = 200  # ImageNet images per class
    synthetic_images: int = 2000  # size of the synthetic set used when no root is given
    epochs: int = 100  # epochs of the lr schedule
    warmup_epochs: int = 5  # linear warm-up, then half-cycle cosine
    batch_size: int = 256  # images per process per micro-step
    effective_batch: int = 4096  # images per optimiser step over all processes (sets accum_steps)
    accum_steps: int = 0  # micro-steps per optimiser step; 0 = reach --effective-batch
    blr: float = 1.5e-4  # base lr; the lr is blr x effective batch / 256
    lr: float = 0.0  # absolute lr; overrides --blr when > 0
    min_lr: float = 0.0  # lr at the end of the cosine
    weight_decay: float = 0.05  # AdamW weight decay (none on biases and 1-D parameters)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    drop_path: float = 0.1  # student stochastic depth, the same in every block
    grad_checkpoint: bool = False  # recompute the student's blocks in the backward instead of keeping their activations
    steps: int = 0  # stop once this many optimiser steps are done in total (0 = the whole schedule)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda if available, one GPU per process)
    amp: str = "auto"  # auto | bf16 | fp16 | none; auto: bf16 on GPUs of compute capability 8.0+ (older: fp16) and on CPUs with AMX or AVX512-BF16, else none (env UNIP_AMP overrides auto)
    compile: bool = False  # torch.compile student and teacher
    workers: int = 8  # data loader processes per training process
    log_every: int = 20  # optimiser steps between log lines (the only host syncs)
    save_every: int = 500  # optimiser steps between checkpoints (also at every epoch end)
    keep_every: int = 20  # also keep a copy OUT/epochN.pt every N epochs (0 = never)
    keep_steps: str = ""  # also keep OUT/stepN.pt (same format as ckpt.pt) at these optimiser steps, e.g. '150,300,600'
    resume: str = ""  # checkpoint to resume from, or 'auto' = OUT/ckpt.pt if it exists
    seed: int = 0  # seed; process r uses seed + r for dropout / drop path


# flags limited to known values (argparse lists them in --help)
CHOICES = {"teacher_arch": list(unip.PRESETS), "model": list(unip.PRESETS), "amp": ["auto", "bf16", "fp16", "none"],
           "layer_rule": list(unip.LAYER_RULES), "teacher_norm": list(data.TEACHER_NORMS)}


@torch.no_grad()
def teacher_nmi(teacher, batches, teacher_size, device, autocast, norm="infmix"):
    """Mean NMI of every head of every layer of `teacher` over image batches (B, 3, S, S) at the student's
    crop, each seen as the teacher sees it in training (--teacher-norm statistics, resized to `teacher_size`):
    (L, H)."""
    sums, n = 0, 0
    with autocast:
        for x in batches:
            x = x.to(device)
            x = unip.resize_for(data.renormalise(x, norm), teacher_size)
            sums = sums + unip.layer_nmi(teacher, x).sum(1)  # (L, H)
            n += x.shape[0]
    return (sums / n).cpu()


def parse_keep_steps(text, last_step):
    """--keep-steps '150,300,600' -> {150, 300, 600}; each a step this run reaches."""
    try:
        steps = {int(v) for v in text.split(",") if v.strip()}
    except ValueError:
        raise ValueError(f"--keep-steps: comma-separated optimiser steps, e.g. '150,300,600'; got {text!r}") from None
    bad = sorted(s for s in steps if not 1 <= s <= last_step)
    if bad:
        raise ValueError(f"--keep-steps {bad}: outside the steps of this run (1..{last_step}; see --steps / --epochs)")
    return steps


def pretrain_dataset(cfg, say):
    """InfMix from the data roots given, else the synthetic infrared scenes; PretrainTransform crops."""
    transform = data.PretrainTransform(cfg.img_size)
    if cfg.infrared or cfg.imagenet or cfg.coco:
        thermal = data.parse_thermal_range(cfg.thermal_range)
        dataset = data.InfMix(cfg.infrared or None, cfg.imagenet or None, cfg.coco or None,
                              per_class=cfg.per_class, transform=transform, seed=cfg.seed, thermal_range=thermal)
        say(dataset.summary())
        say(data.thermal_range_note(thermal))
    else:
        dataset = data.SyntheticThermal("train", num_images=cfg.synthetic_images, transform=transform, seed=cfg.seed)
        say(f"no data roots given: {len(dataset)} synthetic infrared scenes")
    return dataset


def measure_teacher_layer(teacher, dataset, teacher_size, cfg, rt, autocast):
    """--teacher-layer auto: mean NMI of every layer over --nmi-images training images, spread evenly over the
    set; the layer --layer-rule picks for --nmi-target. Prints the table; rank 0's choice binds every rank."""
    n = min(cfg.nmi_images, len(dataset))
    idx = torch.linspace(0, len(dataset) - 1, n).long().tolist()
    teacher.to(rt.device)
    batches = (torch.stack([dataset[j] for j in idx[i:i + cfg.batch_size]]) for i in range(0, n, cfg.batch_size))
    head_nmi = teacher_nmi(teacher, batches, teacher_size, rt.device, autocast, cfg.teacher_norm)  # (L, H)
    layer, why, warning = unip.layer_choice(head_nmi.mean(1), cfg.nmi_target, cfg.layer_rule)
    if rt.ddp:  # every rank measured the same images; rank 0's choice is binding
        box = [layer]
        dist.broadcast_object_list(box, src=0)
        layer = box[0]
    rt.print(f"{'layer':>5} {'NMI':>7}  global hybrid local   (target {cfg.nmi_target}, rule {cfg.layer_rule})")
    for i, row in enumerate(head_nmi, start=1):
        kinds = unip.classify_heads(row)
        rt.print(f"{i:5d} {row.mean():7.4f}  {kinds.count('global'):6d} {kinds.count('hybrid'):6d} "
                 f"{kinds.count('local'):5d}{'   <- distilled' if i == layer else ''}")
    rt.print(f"chose {why}")
    if warning:
        rt.print(f"WARNING: {warning}")
    return layer


def lr_at(step, lr, min_lr, warmup, total_steps):
    """Per optimiser step: linear warm-up, then half-cycle cosine to min_lr."""
    if step < warmup:
        return lr * step / warmup
    t = (step - warmup) / max(1, total_steps - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def resume_from(ckpt, student, optimizer, scaler, rt, seed):
    """Weights, optimiser and scaler state, step and random streams from a checkpoint; returns the step."""
    student.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    step = ckpt["step"]
    rng = ckpt["rng"]
    if not plumbing.restore_rng(rt, rng, seed, step):  # each process continues its own stream, if it can
        runs_on = len(rng["ranks"] if "ranks" in rng else rng["torch"])
        rt.print(f"resuming on {rt.world} processes from a run on {runs_on}: random streams re-seeded")
    return step


def save_pretrain(path, student, optimizer, scaler, step, steps_per_epoch, config, rt):
    """The student (a full ViT), optimiser, scaler, step, config and every process's random state; a collective
    call under DDP (the random states are gathered), written by rank 0."""
    rng = plumbing.rng_state(rt)
    if rt.master:
        unip.save_checkpoint({"model": student.state_dict(), "optimizer": optimizer.state_dict(),
                              "scaler": scaler.state_dict(), "step": step, "epoch": step / steps_per_epoch,
                              "config": config, "rng": rng}, path)


def optimiser_step(model, teacher_fn, batches, optimizer, scaler, autocast, accum, ddp, device):
    """`accum` micro-steps of NMI-HAD, gradients summed, then one optimiser step. Returns the micro-steps'
    losses, detached device tensors (no host sync)."""
    losses = []
    for micro in range(accum):
        x = next(batches).to(device, non_blocking=True)  # (B, 3, S, S)
        # DDP reads no_sync during the forward: the whole micro-step sits inside it
        with model.no_sync() if (ddp and micro < accum - 1) else nullcontext():
            with autocast():
                with torch.no_grad():
                    target = teacher_fn(x)  # (B, H, N, N)
                loss = unip.distill_loss(model(x), target)
            scaler.scale(loss / accum).backward()
        losses.append(loss.detach())
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return losses


def keep_copy(src, dst):
    """A kept copy of a checkpoint (OUT/epochN.pt), atomic as the checkpoint itself."""
    shutil.copyfile(src, dst + ".tmp")
    os.replace(dst + ".tmp", dst)


def main(argv=None):
    cfg = plumbing.parse_config(Config, argv, __doc__, CHOICES, check=data.check_thermal_range)

    # ---------------------------------------------------------------- distributed setup
    rt = plumbing.setup_distributed(cfg.device)
    device, say = rt.device, rt.print
    torch.manual_seed(cfg.seed + rt.rank)
    amp, amp_why, autocast = plumbing.precision(cfg.amp, device)
    os.makedirs(cfg.out, exist_ok=True)

    # ---------------------------------------------------------------- data
    if not cfg.teacher:
        raise SystemExit("--teacher is required: a pre-trained ViT checkpoint (see docs/recipes.md: MAE-L, iBOT-L, "
                         "DINO-B), or 'random' for a smoke test. `python demo.py` trains one from scratch.")
    dataset = pretrain_dataset(cfg, say)
    accum = cfg.accum_steps or max(1, cfg.effective_batch // (cfg.batch_size * rt.world))
    eff_batch = cfg.batch_size * accum * rt.world
    sampler = DistributedSampler(dataset, num_replicas=rt.world, rank=rt.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    steps_per_epoch = len(sampler) // (cfg.batch_size * accum)
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(dataset)} images are too few for one step of {eff_batch} images; "
                         "lower --batch-size / --effective-batch")
    total_steps = cfg.epochs * steps_per_epoch
    last_step = min(cfg.steps, total_steps) if cfg.steps else total_steps
    keep_steps = parse_keep_steps(cfg.keep_steps, last_step)
    lr = cfg.lr or cfg.blr * eff_batch / 256

    # ---------------------------------------------------------------- teacher (frozen, never in DDP)
    # The teacher sees the student's crop resized so that both token grids agree (patch 16 vs 14).
    with torch.device("meta"):  # shape-only models, just to read the patch sizes
        teacher_size, grid = unip.teacher_view(cfg.img_size, unip.PRESETS[cfg.model]().patch_size,
                                               unip.PRESETS[cfg.teacher_arch]().patch_size)
    teacher = unip.PRESETS[cfg.teacher_arch](img_size=teacher_size)
    if teacher_size != cfg.img_size:
        say(f"teacher patch {teacher.patch_size}: it sees the {cfg.img_size} px crops resized to {teacher_size} px "
            f"({grid}x{grid} tokens, as the student)")
    if cfg.teacher == "random":
        say("WARNING: --teacher random: the teacher is untrained; use this only to test the pipeline")
    else:
        layer_hint = None if cfg.teacher_layer == "auto" else int(cfg.teacher_layer)
        unip.load_pretrained(teacher, cfg.teacher, upto_layer=layer_hint, verbose=rt.master)
    teacher.eval().requires_grad_(False)

    resume = plumbing.resume_path(cfg.resume, cfg.out)
    ckpt = unip.load_checkpoint(resume) if resume else None
    if ckpt is not None:  # the layer chosen when the run started, never re-measured
        layer = int(ckpt["config"]["teacher_layer"])
    elif cfg.teacher_layer == "auto":
        layer = measure_teacher_layer(teacher, dataset, teacher_size, cfg, rt, autocast())
    else:
        layer = int(cfg.teacher_layer)
    teacher._check_layers([layer])
    del teacher.blocks[layer:]  # the teacher stops at the distilled layer: later blocks never run
    teacher.to(device)
    if amp != "none":  # frozen, always under autocast: its weights stored as autocast casts them (same numbers)
        unip.autocast_weights_(teacher, torch.float16 if amp == "fp16" else torch.bfloat16,
                               keep=[teacher.blocks[layer - 1].attn.qkv])  # the distilled q/k: fp32
    teacher_heads = teacher.blocks[layer - 1].attn.heads
    say(f"distilling teacher layer {layer} ({cfg.teacher_arch}, {teacher_heads} heads)")

    # ---------------------------------------------------------------- student
    student = unip.PRESETS[cfg.model](img_size=cfg.img_size, drop_path=cfg.drop_path, last_heads=teacher_heads)
    unip.set_fused_attention(student, unip.sdpa_for_training(device, amp))  # CPU + bf16: the explicit product
    unip.freeze_unreached(student)  # only q and k of the last block reach the loss
    student.grad_checkpoint = cfg.grad_checkpoint  # blocks 1..depth-1; the last gives only its logits
    student.to(device)
    config = {**asdict(cfg), "teacher_layer": layer, "last_heads": teacher_heads, "teacher_size": teacher_size}

    # ---------------------------------------------------------------- optimiser and schedule
    optimizer = torch.optim.AdamW(unip.param_groups(student, cfg.weight_decay), lr=lr,
                                  betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type in ("cuda", "cpu"))  # one kernel instead of a loop
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    warmup = cfg.warmup_epochs * steps_per_epoch

    # ---------------------------------------------------------------- compile, DDP
    student_fn = unip.AttentionLogits(student, len(student.blocks))
    prep = None if cfg.teacher_norm == "infmix" else functools.partial(data.renormalise, norm=cfg.teacher_norm)
    teacher_fn = unip.AttentionLogits(teacher, layer, teacher_size, prep)  # other input statistics, if asked
    if cfg.compile:
        student_fn, teacher_fn = torch.compile(student_fn), torch.compile(teacher_fn)
    model = DDP(student_fn, device_ids=[rt.local_rank] if device.type == "cuda" else None) if rt.ddp else student_fn

    # ---------------------------------------------------------------- resume
    step = 0
    if ckpt is not None:
        step = resume_from(ckpt, student, optimizer, scaler, rt, cfg.seed)
        say(f"resumed from {resume} at step {step}")
        del ckpt

    # ---------------------------------------------------------------- banner
    say(json.dumps(config, indent=1))
    say(f"world {rt.world} | device {device} | amp {amp} ({amp_why}) | torch {torch.__version__} | "
        f"batch {cfg.batch_size} x accum {accum} x world {rt.world} = {eff_batch} | "
        + ("grad checkpoint | " if cfg.grad_checkpoint else "") + f"lr {lr:.3g} | "
        f"{steps_per_epoch} steps/epoch, {total_steps} in all, stopping at {last_step}")
    if rt.master:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")

    def save(path):  # every rank calls it (the random states are gathered); rank 0 writes
        save_pretrain(path, student, optimizer, scaler, step, steps_per_epoch, config, rt)

    # ---------------------------------------------------------------- loop
    model.train()
    bar = tqdm(total=last_step, initial=step, disable=not rt.master, dynamic_ncols=True, desc="pretrain")
    loss_sum, loss_n = torch.zeros((), device=device), 0
    t0, t_step = time.time(), step
    while step < last_step:
        epoch = step // steps_per_epoch
        skip = (step % steps_per_epoch) * accum * cfg.batch_size  # resuming mid-epoch: skip what was seen
        batches = iter(plumbing.epoch_loader(dataset, sampler, epoch, skip, cfg.batch_size, cfg.workers, cfg.seed, device))
        while step < last_step and step // steps_per_epoch == epoch:
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, lr, cfg.min_lr, warmup, total_steps)
            for loss in optimiser_step(model, teacher_fn, batches, optimizer, scaler, autocast, accum, rt.ddp, device):
                loss_sum, loss_n = loss_sum + loss, loss_n + 1
            step += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == last_step:
                value = plumbing.mean_loss(loss_sum, loss_n, rt.ddp)
                loss_sum, loss_n = torch.zeros((), device=device), 0
                plumbing.check_finite(value, step, ckpt_path)
                row = plumbing.progress_row(step, step / steps_per_epoch, value, optimizer.param_groups[0]["lr"],
                                            step - t_step, time.time() - t0, eff_batch, device)
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['img_per_s']:.0f}")
                plumbing.log_row(cfg.out, row, rt.master)
                t0, t_step = time.time(), step
            if step % cfg.save_every == 0 or step % steps_per_epoch == 0 or step == last_step or step in keep_steps:
                if loss_n:
                    plumbing.check_finite(plumbing.mean_loss(loss_sum, loss_n, rt.ddp), step, ckpt_path)
                    loss_sum, loss_n = torch.zeros((), device=device), 0
                save(ckpt_path)
                if step in keep_steps:  # snapshots of one schedule: a distillation-length curve from one run
                    save(os.path.join(cfg.out, f"step{step}.pt"))
                done = step // steps_per_epoch
                if rt.master and cfg.keep_every and step % steps_per_epoch == 0 and done % cfg.keep_every == 0:
                    keep_copy(ckpt_path, os.path.join(cfg.out, f"epoch{done}.pt"))
        del batches

    # ---------------------------------------------------------------- end
    bar.close()
    say(f"done: {step} steps; student checkpoint {ckpt_path} (load it with unip.load_pretrained or train_seg.py --init)")
    if rt.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    plumbing.run(main)
