"""
Fine-tune, linearly probe or evaluate a ViT for infrared semantic segmentation (UNIP, ICLR 2025, §3.3):
the backbone's last-block features -> LL-FPN (strides 4/8/16/32) -> UperNet, with an auxiliary FCN head.

    python train_seg.py                                   # CPU demo: synthetic thermal scenes, a few minutes
    python train_seg.py --dataset soda --data-root SODA --model vit_small --init unip_small.pth
    torchrun --nproc_per_node=2 train_seg.py --dataset mfnet --data-root MFNet --init ckpt.pt
    python train_seg.py --mode linear ...                 # frozen backbone, blocks 4/6/8/12 -> one 1x1 conv
    python train_seg.py --mode layer-linear --layer 6 ... # frozen backbone, one block -> 1x1 conv
    python train_seg.py --dataset folder --data-root buffalo_udder_thermal_seg --classes background,udder \\
        --label-map 255:1                                 # binary 0/255 masks: 255 is the ignore value otherwise
    python train_seg.py --resume runs/seg/best.pt --eval-only
    python train_seg.py --model vit_large --accum-steps 4 --grad-checkpoint ...   # ViT-L: batch 2 x 4 = 8 on one GPU
    python predict.py --checkpoint runs/seg/best.pt --images DIR --out DIR   # segment new, unlabelled images

Recipe (the reference's mmseg configs): AdamW lr 1e-4, betas (0.9, 0.999), wd 0.05 (none on 1-D weights
and biases; linear probes: on every weight); layer-wise lr decay 0.85 (fine-tuning only); poly decay (power 1) to 0 with a
linear warm-up from 1e-6x, per iteration; total batch 8; 512 crops; drop_path rising linearly to 0.1;
aux loss 0.4; cross-entropy with ignore 255 on logits upsampled to the label. Iterations (= 100 epochs):
SODA 14,400 (warm-up 1,500), MFNet-T 9,800 (1,000), SCUT-Seg 16,800 (1,700); a folder: 100 epochs.
Evaluation: short side -> 512, sliding windows 512 / stride 341, logits resized to the original label,
mIoU over all classes (background included, 255 ignored), with mAcc (mean per-class recall) beside it; every 800
iterations (SODA, SCUT-Seg), 700 (MFNet). --val-split test_day / test_night: MFNet's day and night test frames.
--class-weight auto: ENet's weights 1 / ln(1.02 + p_c) in the loss (mmseg 0.11's class_weight), counted once.
Heads initialised as mmseg's: conv-BN-ReLU convs kaiming-normal (fan_out), classifiers N(0, 0.01).
--model vit_large takes the reference's ViT-L recipe (the MAE-L baseline) for every flag not given: drop path
0.2, layer decay 0.65, the multi-layer pyramid (blocks 8/12/16/24), 2 images per process (4 GPUs: batch 8).
Backbone: built at img_size = crop, so a pre-trained pos_embed is resampled once to the crop grid (DINOv2
presets keep their 37x37 table and resample it at every forward, as DINOv2 does); it is trained when
fine-tuning, as in the reference. A crop that is not a multiple of the patch (DINOv2: 14) is padded centred
to the next multiple, in training (label 255 on the pad) and in the sliding windows, as DINOv2's CenterPadding. The distilled last block is re-split into the preset's head
count (the reference does so); --keep-distilled-heads keeps the checkpoint's. As in every reference config,
each block gets trainable layer-scale factors initialised to 1.0 (--layer-scale 0: none). The reference's
relative position bias is not built (see docs/design.md, the differences from the authors' code).
The UperNet is as wide as the backbone (D channels), as the reference; --head-channels N narrows it (cheaper,
off the paper's setting); checkpoints record the width, so predict.py and export.py rebuild the same model.
Low memory: --accum-steps N sums the gradients of N micro-batches per optimiser step (the schedule counts
optimiser steps; BatchNorm in the heads sees one micro-batch); --grad-checkpoint recomputes each backbone block
in the backward instead of keeping its activations (docs/speed.md: the memory it saves).
Multi-GPU: BatchNorm becomes SyncBatchNorm under torchrun or srun on CUDA (PyTorch has no CPU SyncBatchNorm:
with gloo on CPUs each process keeps its own statistics). Evaluation splits the images over the processes and sums
the confusion matrices.
Reproducibility: a resumed run continues exactly (weights, optimiser, scaler, step, RNG of every rank, data
position); across machines or thread counts, float reductions may differ in the last bits.
CPU: on a machine whose cores are busy with other work, OpenMP threads spin-wait and a step can take several
times longer; OMP_WAIT_POLICY=PASSIVE (or OMP_NUM_THREADS=1) avoids that.
"""
import json
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import plumbing
import data
import unip

# iterations and warm-up of the reference (100 epochs at batch 8); the synthetic demo is sized for 2 CPU cores
SCHEDULES = {"soda": (14400, 1500), "mfnet": (9800, 1000), "scut": (16800, 1700), "synthetic": (240, 24)}
EVAL_EVERY = {"soda": 800, "mfnet": 700, "scut": 800}  # the reference's evaluation intervals; others: 2000
VAL_SPLITS = {"soda": "test", "mfnet": "val", "scut": "val"}
# The reference's ViT-L configs (the MAE-L baseline): out_indices 7/11/15/23, samples_per_gpu 2. Its
# use_rel_pos_bias=True is not reproduced: see docs/design.md.
LARGE_RECIPE = {"drop_path": 0.2, "layer_decay": 0.65, "pyramid": "multi", "batch_size": 2}


@dataclass
class Config:
    out: str = "runs/seg"               # output folder: log.jsonl, ckpt.pt, best.pt, predicted masks (pred_*.png)
    dataset: str = "synthetic"          # synthetic | soda | mfnet | scut | folder
    data_root: str = ""                 # dataset folder (everything but synthetic)
    img_dir: str = "images"             # folder: image folder inside --data-root
    label_dir: str = "labels"           # folder: label folder inside --data-root (same stems as the images)
    val_img_dir: str = ""               # folder: evaluation images, when the splits sit in separate folders (default: --img-dir)
    val_label_dir: str = ""             # folder: evaluation label folder inside --data-root (default: --label-dir)
    img_suffix: str = ".png"            # folder: image file ending
    label_suffix: str = ".png"          # folder: label file ending
    train_split: str = ""               # folder: file of training stems in --data-root (default: every image)
    val_split: str = ""                 # evaluation split: soda test, mfnet val (or test, test_day, test_night), scut val; folder: a stem file (default: every image)
    train_images: int = 0               # synthetic: number of labelled training scenes (0: 2000); real sets: --train-split
    classes: str = ""                   # folder: class names 'background,udder' or their number K
    label_map: str = ""                 # folder: raw label value -> class, e.g. '255:1' for 0/255 masks; other values kept
    scut_labels: str = "auto"           # scut: label files hold 'ids' (raw Cityscapes ids) or 'index' (0..9); auto: detect
    channel: str = "auto"               # image channel: auto (4-channel rule: a varying 4th channel is thermal; mfnet images/: 3) | luma | N
    thermal_range: str = ""             # LO,HI: 16-bit / float frames mapped linearly LO -> 0, HI -> 255, clipped, the same for every frame ('': a per-image 1st-99th percentile stretch); 8-bit images are unaffected
    skip_mismatched: bool = False       # leave out image/label pairs of different sizes (default: name them all and stop)
    model: str = "vit_tiny"             # backbone: vit_tiny | vit_small | vit_base | vit_large
    init: str = ""                      # pre-trained backbone: train_pretrain.py checkpoint or any unip.load_pretrained format
    keep_distilled_heads: bool = False  # keep the --init checkpoint's last-block head count (config['last_heads'])
    mode: str = "finetune"              # finetune | linear | layer-linear
    layer: int = 0                      # layer-linear: block probed, 1-based (0: the last)
    pyramid: str = "ll"                 # finetune: ll (last block x4, LL-FPN) | multi (blocks 4/6/8/12 of 12; vit_large: multi)
    crop: int = 0                       # training crop and sliding window (0: 512; synthetic 128)
    iters: int = 0                      # schedule length in iterations (0: dataset preset, folder: 100 epochs)
    warmup: int = -1                    # warm-up iterations (-1: dataset preset, else iters/10)
    steps: int = 0                      # stop at this step; the schedule still spans --iters (0: run to --iters)
    batch_size: int = 0                 # images per process per micro-step (0: 8 / (world size x accum steps): total batch 8; vit_large: 2)
    accum_steps: int = 1                # micro-steps per optimiser step (gradients summed): batch = batch-size x processes x this
    grad_checkpoint: bool = False       # recompute each backbone block in the backward instead of keeping its activations
    lr: float = 1e-4                    # base learning rate (AdamW)
    weight_decay: float = 0.05          # AdamW weight decay
    layer_decay: float = 0.85           # layer-wise lr decay (finetune only; vit_large: 0.65)
    drop_path: float = 0.1              # stochastic depth of the last block, linear from 0 (finetune only; vit_large: 0.2)
    layer_scale: float = 1.0            # trainable per-channel residual scales with this init, as the reference (0: off)
    aux_weight: float = 0.4             # weight of the auxiliary FCN loss (0: no auxiliary head)
    head_channels: int = 0              # finetune: UperNet channels (0: the backbone's dim, as the reference)
    class_weight: str = ""              # loss weight per class: auto (ENet: 1 / ln(1.02 + share of training pixels)) | w1,w2,... ('': plain cross-entropy)
    eval_every: int = -1                # evaluate every N steps and at the end (-1: soda/scut 800, mfnet 700, else 2000)
    eval_size: int = 0                  # short side of evaluation images (0: = crop)
    eval_stride: int = 0                # sliding-window stride (0: 2/3 of the crop, 341 at 512)
    eval_images: int = 0                # evaluate on the first N validation images (0: all; synthetic has 100)
    num_samples: int = 4                # predicted masks saved per evaluation as OUT/pred_<name>.png
    eval_only: bool = False             # evaluate the --resume checkpoint and exit
    amp: str = "auto"                   # auto | bf16 | fp16 | none; auto: bf16 on GPUs of compute capability 8.0+ (older: fp16) and on CPUs with AMX or AVX512-BF16, else none (env UNIP_AMP overrides auto)
    compile: bool = False               # torch.compile the training model
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    workers: int = 2                    # DataLoader worker processes
    seed: int = 0                       # seed (+ rank for the global RNG)
    log_every: int = 20                 # steps between log rows (and loss syncs)
    save_every: int = 1000              # steps between checkpoints (also after every evaluation and at the end)
    resume: str = ""                    # checkpoint to resume from, or 'auto' (OUT/ckpt.pt if it exists)


CHOICES = {"mode": ["finetune", "linear", "layer-linear"], "pyramid": ["ll", "multi"], "model": list(unip.PRESETS)}


def parse_config(argv=None) -> Config:
    # --model vit_large: the reference's ViT-L recipe as defaults; flags on the command line still win
    return plumbing.parse_config(Config, argv, __doc__, CHOICES,
                               recipe=lambda c: LARGE_RECIPE if c.model == "vit_large" else None, check=check_config)


def check_config(cfg):
    """Usage errors found from the flags alone: --thermal-range, --class-weight, --head-channels (ValueError)."""
    data.parse_thermal_range(cfg.thermal_range)
    if cfg.head_channels < 0 or (cfg.head_channels and cfg.mode != "finetune"):
        raise ValueError(f"--head-channels {cfg.head_channels}: the UperNet's width, 1 or more (0: the backbone's), "
                         f"and only with --mode finetune (the probes have no UperNet)")
    parse_class_weight(cfg.class_weight, dataset_classes(cfg))


def dataset_classes(cfg):
    """The classes of --dataset, known before any file is read; None for a folder set without --classes."""
    presets = {"synthetic": data.SYN_CLASSES, "soda": data.SODA_CLASSES, "mfnet": data.MFNET_CLASSES,
               "scut": data.SCUT_CLASSES}
    if cfg.dataset in presets:
        return list(presets[cfg.dataset])
    if not cfg.classes:
        return None
    return [str(k) for k in range(int(cfg.classes))] if cfg.classes.isdigit() else cfg.classes.split(",")


def parse_class_weight(text, classes):
    """--class-weight -> None ('': plain cross-entropy), 'auto', or a list of one weight per class. ValueError naming
    the class count and names when the count is wrong."""
    if text in ("", "auto"):
        return text or None
    try:
        weights = [float(v) for v in text.split(",")]
    except ValueError:
        weights = None
    if weights is None or not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise ValueError(f"--class-weight {text!r}: expected auto, or one weight >= 0 per class, comma-separated")
    if classes is not None and len(weights) != len(classes):
        raise ValueError(f"--class-weight: {len(weights)} weights given, but the dataset has {len(classes)} classes "
                         f"({', '.join(classes)}): give {len(classes)} comma-separated weights in that order, or auto")
    return weights


def enet_weights(counts):
    """ENet's class weights (Paszke et al., 2016): w_c = 1 / ln(1.02 + p_c), p_c the class's share of the labelled
    pixels. counts: (K,) pixels per class (ignored pixels not among them). A class without pixels gets the largest
    weight, 1 / ln(1.02) = 50.5."""
    p = np.asarray(counts, np.float64) / max(int(np.sum(counts)), 1)
    return (1.0 / np.log(1.02 + p)).tolist()


def inference_arch(cfg, seg, crop, stride, classes, palette):
    """What unip.load_segmenter needs to rebuild this model for inference (predict.py), stored in every
    checkpoint as 'segmenter'."""
    finetune = cfg.mode == "finetune"
    return dict(model=cfg.model, img_size=crop, last_heads=seg.backbone.blocks[-1].attn.heads,
                layer_scale=cfg.layer_scale if finetune else 0.0, num_classes=seg.num_classes, mode=cfg.mode,
                layers=list(seg.layers), aux=seg.aux_head is not None,
                head_channels=seg.head.classifier.in_channels if finetune else None, classes=list(classes),
                palette=[list(c) for c in palette], crop=crop, stride=stride, short_side=cfg.eval_size or crop)


def poly_lr(step, base, iters, warmup, ratio=1e-6):
    """mmseg poly (power 1, min 0) after a linear warm-up from ratio*lr; `step` = steps done."""
    lr = base * (1 - step / iters)
    if step < warmup:
        lr *= 1 - (1 - step / warmup) * (1 - ratio)
    return lr


def check_labels(counts, classes, n_files):
    """Training labels that cannot teach a class: refuse 0/255-only labels (binary masks read without a label map:
    255 is the ignore value, so every foreground pixel would be ignored) and values that are no class; return a
    warning naming the classes that no training pixel has (their IoU will be 0), or None.
    counts: pixels per label value, (256,)."""
    found = [int(v) for v in np.flatnonzero(counts)]
    if found == [0, 255] and len(classes) > 1:
        raise SystemExit(f"the {n_files} training label files hold only the values 0 and 255, and 255 is the ignore value: "
                         f"every foreground pixel would be ignored and {', '.join(classes[1:])} never learnt. "
                         f"For binary 0/255 masks give --label-map 255:1 (255 -> class 1).")
    extra = [v for v in found if v >= len(classes) and v != 255]
    if extra:
        raise SystemExit(f"the training labels hold values {extra[:12]} that are neither classes 0..{len(classes) - 1} "
                         "nor the ignore value 255: check --classes and --label-map")
    absent = [c for k, c in enumerate(classes) if counts[k] == 0]
    if absent:
        share = ", ".join(f"{v}: {counts[v] / counts.sum():.1%}" for v in found[:12])
        return (f"WARNING: {len(absent)} of {len(classes)} classes never occur in the {n_files} training label files: "
                f"{', '.join(absent)}. They cannot be learnt and their IoU will be 0. Label values found (share of pixels)"
                f" {share}; check --classes and --label-map (binary 0/255 masks: --label-map 255:1).")
    return None


# ----------------------------------------------------------------------------- data


parse_label_map = data.parse_label_map  # --label-map '255:1' -> a 256-entry table (predict.py reads it too)


def build_datasets(cfg, crop, say):
    """(train_set, val_set) of --dataset: random crops for training, the short side resized for evaluation."""
    train_tf = data.SegTrainTransform(crop=crop, scale=(4 * crop, crop))  # (2048, 512) at crop 512
    eval_tf = data.SegEvalTransform(short_side=cfg.eval_size or crop)
    if cfg.dataset != "synthetic" and not os.path.isdir(cfg.data_root):
        raise SystemExit(f"--dataset {cfg.dataset}: data root {cfg.data_root!r} is not a folder (--data-root)")
    channel = data.parse_channel(cfg.channel)
    chan = {} if channel is None else dict(thermal_channel=channel)  # auto: the preset's own (mfnet images/: 3)
    chan["thermal_range"] = data.parse_thermal_range(cfg.thermal_range)  # the same decoding for training and evaluation
    if cfg.dataset == "synthetic":
        train_set = data.SyntheticThermal("train", num_images=cfg.train_images or None, transform=train_tf, seed=cfg.seed)
        val_set = data.SyntheticThermal("val", num_images=100, transform=eval_tf, seed=cfg.seed)
    elif cfg.dataset in data.SEG_PRESETS:
        make = data.SEG_PRESETS[cfg.dataset]
        kw = dict(label_form=cfg.scut_labels, **chan) if cfg.dataset == "scut" else chan
        train_set = make(cfg.data_root, "train", transform=train_tf, seed=cfg.seed, **kw)
        val_set = make(cfg.data_root, cfg.val_split or VAL_SPLITS[cfg.dataset], transform=eval_tf, seed=cfg.seed, **kw)
        if cfg.dataset == "scut":  # the two forms of SCUT-Seg labels; the wrong one turns classes into ignore
            form = {"ids": "raw Cityscapes ids, mapped to 0..9", "index": "class indices 0..9"}[train_set.label_form]
            say(f"SCUT-Seg labels: {form} ({'detected' if cfg.scut_labels == 'auto' else '--scut-labels'})")
    elif cfg.dataset == "folder":
        if not cfg.classes:
            raise SystemExit("--dataset folder needs --classes (names 'a,b,c' or a number)")
        kw = dict(img_suffix=cfg.img_suffix, label_suffix=cfg.label_suffix, classes=dataset_classes(cfg),
                  label_map=parse_label_map(cfg.label_map), seed=cfg.seed, **chan)
        dirs = os.path.join(cfg.data_root, cfg.img_dir), os.path.join(cfg.data_root, cfg.label_dir)
        val_dirs = (os.path.join(cfg.data_root, cfg.val_img_dir or cfg.img_dir),
                    os.path.join(cfg.data_root, cfg.val_label_dir or cfg.label_dir))
        split = lambda s: os.path.join(cfg.data_root, s) if s else None
        train_set = data.SegFolder(*dirs, split(cfg.train_split), transform=train_tf, **kw)
        val_set = data.SegFolder(*val_dirs, split(cfg.val_split), transform=eval_tf, **kw)
    else:
        raise SystemExit(f"unknown --dataset {cfg.dataset!r}: synthetic | soda | mfnet | scut | folder")
    return train_set, val_set


def drop_mismatched_pairs(train_set, val_set, skip, say):
    """Image/label sizes from the file headers: a mismatch stops the run now, not at its item; with --skip-mismatched
    (`skip`) the pairs are left out of their set instead, and named."""
    found = {name: ds.size_mismatches() for name, ds in (("training", train_set), ("validation", val_set))}
    messages = list(dict.fromkeys(m for pairs in found.values() for _, m in pairs))  # a pair in both sets: once
    if messages and not skip:
        raise SystemExit(f"{len(messages)} image/label pairs differ in size (read from the file headers, before "
                         f"training): {'; '.join(messages)}. Fix or remove them, or give --skip-mismatched to "
                         "leave them out")
    for name, pairs in found.items():
        if pairs:
            dataset = train_set if name == "training" else val_set
            dataset.drop([i for i, _ in pairs])
            if not len(dataset):
                raise SystemExit(f"--skip-mismatched: no {name} pairs are left")
            say(f"--skip-mismatched: left out {len(pairs)} {name} pairs whose sizes differ "
                f"({len(dataset)} left): {'; '.join(m for _, m in pairs)}")


def schedule(cfg, n_train):
    """(iters, warmup, stop, eval_every): the dataset's preset unless flags say otherwise; a folder: 100 epochs."""
    preset_iters, preset_warmup = SCHEDULES.get(cfg.dataset, (100 * n_train // 8, None))
    iters = cfg.iters or preset_iters
    warmup = cfg.warmup if cfg.warmup >= 0 else (preset_warmup if iters == preset_iters and preset_warmup else iters // 10)
    stop = min(cfg.steps or iters, iters)
    eval_every = cfg.eval_every if cfg.eval_every >= 0 else EVAL_EVERY.get(cfg.dataset, 2000)
    return iters, warmup, stop, eval_every


# ----------------------------------------------------------------------------- model


def build_backbone(cfg, crop, finetune, master):
    """The backbone at img_size = crop with the --init weights, unip.load_pretrained's report printed (rank 0).
    Drop path and layer scale only when fine-tuning; --keep-distilled-heads reads config['last_heads']."""
    last_heads = None
    if cfg.keep_distilled_heads:
        ckpt = unip.load_checkpoint(cfg.init) if cfg.init else None
        last_heads = (ckpt or {}).get("config", {}).get("last_heads") if isinstance(ckpt, dict) else None
        if not last_heads:
            raise SystemExit("--keep-distilled-heads needs an --init checkpoint with config['last_heads'] "
                             "(train_pretrain.py writes it)")
    backbone = unip.PRESETS[cfg.model](img_size=crop, last_heads=last_heads, drop_path=cfg.drop_path if finetune else 0.0,
                                       drop_path_schedule="linear", layer_scale=cfg.layer_scale if finetune else 0.0)
    if cfg.init:
        try:  # refuses, naming the keys, when a backbone weight is missing or has the wrong shape
            rep = unip.load_pretrained(backbone, cfg.init, verbose=master)
        except ValueError as e:
            raise SystemExit(f"--init {cfg.init}: {e}") from None
        # only weights no head uses (final norm) or new at fine-tuning (layer scale) may be absent: kept at init
        absent = sorted({re.sub(r"blocks\.\d+\.", "blocks.N.", k) for k in set(backbone.state_dict()) - set(rep["loaded"])})
        if absent and master:
            print(f"--init {cfg.init}: weights not in the checkpoint, kept at init: {', '.join(absent)}")
    return backbone


def resume_from(path, seg, opt, scaler, cfg, rt):
    """Load a train_seg.py checkpoint into seg (and opt, scaler, this rank's RNG when it is a full ckpt.pt; best.pt
    holds the model only). Returns (step, (best mIoU, mAcc then, its step), the class weights of its loss or None).
    A checkpoint of another architecture is refused, naming the flags of the run that wrote it."""
    ck = unip.load_checkpoint(path)
    heads = seg.backbone.blocks[-1].attn.heads  # not visible in the weights' shapes: check it
    if ck.get("last_heads", heads) != heads:
        raise SystemExit(f"{path} has {ck['last_heads']} heads in the last block, this model {heads}: "
                         "give the --init and --keep-distilled-heads of that run")
    try:
        seg.load_state_dict(ck["model"])
    except RuntimeError as e:  # another architecture: name the settings of the run that wrote it
        was = ck.get("config", {})
        diff = [f"--{k.replace('_', '-')} {was[k]}" for k in ("model", "mode", "pyramid", "layer", "layer_scale",
                "crop", "dataset", "classes", "aux_weight", "head_channels") if k in was and was[k] != getattr(cfg, k)]
        raise SystemExit(f"{path} does not fit this model ({str(e).splitlines()[0].strip()[:120]} ...); "
                         + (f"it was written with {', '.join(diff)}" if diff else "give the flags of its run")) from None
    if "optimizer" in ck:
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        plumbing.restore_rng(rt, ck["rng"], cfg.seed, ck["step"])  # same world size: each rank continues its stream
    was = ck.get("config", {}).get("class_weight", "")
    if was != cfg.class_weight and not cfg.eval_only:  # the flags of a resumed run win; say so for the loss
        rt.print(f"note: {path} was trained with --class-weight {was or 'none'}, this run goes on with "
                 f"{cfg.class_weight or 'none'}")
    best = ck.get("best_miou", -1.0), ck.get("best_macc", float("nan")), ck.get("best_step", -1)
    return ck["step"], best, ck.get("class_weight")


def loss_weights(cfg, train_set, counts, saved, say):
    """(K,) float32 class weights of the loss, or None (plain cross-entropy), and their table printed: --class-weight
    w1,...; or auto, ENet's weights from the pixel counts of the training labels (`counts`, (256,), or counted here),
    counted once: a resumed run passes the checkpoint's weights as `saved` and they are used as they are."""
    classes = list(train_set.classes)
    spec = parse_class_weight(cfg.class_weight, classes)
    if spec is None:
        return None
    share = None
    if spec != "auto":
        weights, how = spec, "--class-weight"
    elif saved is not None:
        weights, how = [float(w) for w in saved], "auto, from the resumed checkpoint (not counted again)"
    else:
        if counts is None:
            say(f"--class-weight auto: counting the labels of {len(train_set)} training images")
            counts = train_set.label_counts()
        counts = counts[:len(classes)]  # 255 (ignored) and values no class has are not labelled pixels
        weights, share = enet_weights(counts), counts / max(int(counts.sum()), 1)
        how = f"auto: ENet's 1 / ln(1.02 + p), p = share of the labelled pixels of {len(train_set)} training images"
    w = max(len(c) for c in classes)
    say(f"class weights of the loss ({how}):\n" + "\n".join(
        f"  {c:<{w}} {v:8.4f}" + (f"   {share[k]:7.2%} of the pixels" if share is not None else "")
        for k, (c, v) in enumerate(zip(classes, weights))))
    return torch.tensor(weights, dtype=torch.float32)


# ----------------------------------------------------------------------------- training and evaluation


def train_step(model, opt, scaler, batches, lr, aux_weight, autocast, accum, ddp, patch, device, weight=None):
    """One AdamW step at `lr` (times each group's layer-decay scale) on `accum` micro-batches drawn from
    `batches`, their gradients summed; returns the mean of their losses (detached, no host sync).
    weight: (K,) class weights of both losses (--class-weight), or None."""
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for micro in range(accum):
        x, y = next(batches)  # (B, 3, crop, crop) normalised, (B, crop, crop) int64 with 255 = ignore
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # a crop that is not a multiple of the patch (DINOv2: 14): padded, else its last pixels never
        # reach the model; the pad's labels are ignored. A no-op at multiples.
        x, y = unip.center_pad(x, patch)[0], unip.center_pad(y, patch, value=255)[0]
        # DDP reads no_sync during the forward: the whole micro-step sits inside it; the last one all-reduces
        with model.no_sync() if (ddp and micro < accum - 1) else nullcontext():
            with autocast():
                out, aux = model(x)  # (B, K, crop/4, crop/4) [linear: /16], aux (B, K, crop/16, crop/16) or None
            loss = unip.seg_loss(out, y, weight=weight) + (aux_weight * unip.seg_loss(aux, y, weight=weight)
                                                           if aux is not None else 0.0)
            scaler.scale(loss / accum).backward()  # summed over micro-steps: the gradient of their mean loss
        total = total + loss.detach()
    scaler.step(opt)
    scaler.update()
    return total / accum


def evaluate(seg, val_set, n_eval, crop, stride, autocast, rt, workers=0, num_samples=4, seed=0):
    """Sliding-window evaluation of this rank's share of the first n_eval images; confusion summed over
    ranks. Returns the (K, K) confusion matrix, a few (index, prediction) pairs of rank 0, and every image's
    (index, intersection per class, union per class, ground-truth pixels per class), gathered from all ranks, for
    per-image scores."""
    K, attns = seg.num_classes, [m for m in seg.modules() if isinstance(m, unip.Attention)]
    training_fused = [m.fused for m in attns]
    seg.eval()
    unip.set_fused_attention(seg, True)  # no gradients: SDPA (unip.sdpa_for_training), whatever training uses
    idx = list(range(n_eval))[rt.rank::rt.world]
    loader = DataLoader(val_set, batch_size=1, sampler=idx, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed))
    conf, samples, per_image = torch.zeros(K, K, dtype=torch.int64, device=rt.device), [], []
    for i, (x, y) in zip(idx, tqdm(loader, desc="eval", leave=False, disable=not rt.master)):
        x, y = x.to(rt.device), y.to(rt.device)  # (1, 3, h', w') resized, (1, H, W) original size
        with autocast():
            logits = unip.slide_inference(seg, x, K, crop, stride)  # (1, K, h', w')
        pred = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        c = unip.confusion_matrix(pred, y, K)  # (K, K) of this image
        conf += c
        per_image.append((i, c.diag().tolist(), (c.sum(0) + c.sum(1) - c.diag()).tolist(), c.sum(1).tolist()))
        if len(samples) < num_samples:
            samples.append((i, pred[0].cpu().numpy()))
    if rt.ddp:
        dist.all_reduce(conf)
        shares = [None] * rt.world
        dist.all_gather_object(shares, per_image)
        per_image = sorted(r for share in shares for r in share)
    for m, fused in zip(attns, training_fused):  # back to the training path
        m.fused = fused
    seg.train()
    return conf.cpu(), samples, per_image


def report(conf, samples, per_image, val_set, step, epoch, out, master):
    """Print the per-class IoU and accuracy table, log it, write every image's IoU and accuracy per class to
    per_image.json (with the pixel counts behind them, so any subset can be re-scored), save image | label |
    prediction PNGs. Returns (mIoU, mAcc) in %. Accuracy of a class = its pixels predicted right / its ground-truth
    pixels (recall); classes without ground-truth pixels are left out of mAcc, as classes in neither prediction
    nor ground truth are left out of mIoU."""
    class_names = list(val_set.classes)
    iou, cacc = unip.iou_from_confusion(conf) * 100, unip.acc_from_confusion(conf) * 100
    miou, macc = torch.nanmean(iou).item(), torch.nanmean(cacc).item()
    acc = (conf.diag().sum() / conf.sum().clamp_min(1)).item() * 100
    if master:
        w = max(len(c) for c in class_names + ["mIoU / mAcc"])
        cells = lambda v: "     -" if math.isnan(v) else f"{v:6.2f}"
        tqdm.write(f"step {step}: per class (%)\n  {'':<{w}}    IoU    Acc\n" + "\n".join(
            f"  {c:<{w}} {cells(v)} {cells(a)}" for c, v, a in zip(class_names, iou.tolist(), cacc.tolist()))
            + f"\n  {'mIoU / mAcc':<{w}} {miou:6.2f} {macc:6.2f}\n  {'pixel acc':<{w}} {acc:6.2f}")
        finite = lambda v: None if math.isnan(v) else v
        plumbing.log_row(out, {"step": step, "epoch": epoch, "miou": miou, "macc": finite(macc), "acc": acc,
                               "iou": {c: finite(v) for c, v in zip(class_names, iou.tolist())},
                               "class_acc": {c: finite(v) for c, v in zip(class_names, cacc.tolist())}})
        scores = {val_set.name(i): {"iou": [None if u == 0 else 100 * n / u for n, u in zip(inter, union)],
                                    "acc": [None if g == 0 else 100 * n / g for n, g in zip(inter, gt)],
                                    "intersection": inter, "union": union, "gt": gt}
                  for i, inter, union, gt in per_image}
        with open(os.path.join(out, "per_image.json.tmp"), "w") as f:
            json.dump({"step": step, "classes": class_names, "images": scores}, f)
        os.replace(os.path.join(out, "per_image.json.tmp"), os.path.join(out, "per_image.json"))
        for i, pred in samples:
            img, label = val_set.load(i)  # (H, W) uint8, (H, W) int64 at the original size
            panels = [np.repeat(img[..., None], 3, 2), data.colorize(label, val_set.palette),
                      data.colorize(pred, val_set.palette)]
            Image.fromarray(np.concatenate(panels, 1)).save(os.path.join(out, f"pred_{val_set.name(i)}.png"))
    return miou, macc


def recipe_notes(cfg, crop, patch, finetune):
    """The banner lines that say which parts of the recipe this run takes."""
    notes = []
    if finetune:
        notes.append(f"fine-tuning: drop path {cfg.drop_path} | layer decay {cfg.layer_decay} | layer scale "
                     + (f"{cfg.layer_scale:g} (trainable)" if cfg.layer_scale else "off")
                     + (f" | UperNet {cfg.head_channels} channels (the reference: the backbone's dim)"
                        if cfg.head_channels else ""))
    if crop % patch:
        notes.append(f"crop {crop} is not a multiple of {cfg.model}'s patch {patch}: training crops are padded to "
                     f"{crop + -crop % patch} (centred, zeros; label 255 there, ignored), and so are evaluation windows, "
                     "as DINOv2's CenterPadding does, so that every pixel reaches the model")
    if cfg.model == "vit_large":
        notes.append("vit_large: the reference's MAE-L recipe unless a flag overrides it (drop path 0.2, layer decay "
                     "0.65, pyramid from blocks 8/12/16/24, 2 images per GPU; 4 GPUs make its batch 8); its relative "
                     "position bias is not built (docs/design.md: how this differs from the authors' code)")
    return notes


def main(argv=None):
    # ------------------------------------------------------------------ config
    cfg = parse_config(argv)
    crop = cfg.crop or (128 if cfg.dataset == "synthetic" else 512)
    finetune = cfg.mode == "finetune"

    # ------------------------------------------------------------------ distributed setup
    rt = plumbing.setup_distributed(cfg.device)
    device, world = rt.device, rt.world
    rt.print(json.dumps(asdict(cfg), indent=1))
    torch.manual_seed(cfg.seed + rt.rank)  # drop_path and Dropout2d draw from here; saved in checkpoints
    amp, amp_why, autocast = plumbing.precision(cfg.amp, device)  # on CUDA also TF32 for fp32 matmuls
    if cfg.accum_steps < 1:
        raise SystemExit(f"--accum-steps {cfg.accum_steps}: give 1 or more micro-steps per optimiser step")
    accum = cfg.accum_steps
    bs = cfg.batch_size or max(1, 8 // (world * accum))
    eff_batch = bs * world * accum  # images per optimiser step; the schedule counts optimiser steps
    if device.type == "cuda":  # fixed crop and window sizes: let cuDNN pick its kernels once
        torch.backends.cudnn.benchmark = True

    # ------------------------------------------------------------------ data
    train_set, val_set = build_datasets(cfg, crop, rt.print)
    K, class_names = train_set.num_classes, list(train_set.classes)
    counts = None  # pixels per label value of the training labels, (256,)
    if cfg.dataset != "synthetic":  # pairs of different sizes, labels that cannot teach a class: say so now
        drop_mismatched_pairs(train_set, val_set, cfg.skip_mismatched, rt.print)
        counts = train_set.label_counts()
        warning = check_labels(counts, class_names, len(train_set))
        if warning:
            rt.print(warning)
    iters, warmup, stop, eval_every = schedule(cfg, len(train_set))
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rt.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(sampler) // (bs * accum)
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_set)} training images cannot fill one step of {bs} x {accum} accumulation "
                         f"steps x {world} processes = {eff_batch} images")
    n_eval = min(cfg.eval_images or len(val_set), len(val_set))

    # ------------------------------------------------------------------ model
    backbone = build_backbone(cfg, crop, finetune, rt.master)
    depth, patch = len(backbone.blocks), backbone.patch_size
    multi = unip.multi_layers(depth)  # 4/6/8/12 of 12 blocks; 8/12/16/24 for ViT-L
    layers = {"finetune": multi if cfg.pyramid == "multi" else None, "linear": multi,
              "layer-linear": (cfg.layer or depth,)}[cfg.mode]
    seg = unip.Segmenter(backbone, K, cfg.mode, layers, aux=finetune and cfg.aux_weight > 0,
                         head_channels=cfg.head_channels or None)
    backbone.grad_checkpoint = cfg.grad_checkpoint  # less activation memory, one more forward of each block
    backbone.pos_embed.requires_grad_(finetune)  # fine-tuning learns pos_embed, like the reference
    # a backbone that trains takes the attention path that trains fastest here; a frozen one (linear probes) SDPA
    unip.set_fused_attention(backbone, unip.sdpa_for_training(device, amp) if finetune else True)
    stride = cfg.eval_stride or crop * 2 // 3
    arch = inference_arch(cfg, seg, crop, stride, class_names, train_set.palette)
    if rt.ddp and device.type == "cuda":
        seg = nn.SyncBatchNorm.convert_sync_batchnorm(seg)  # batch 8 over GPUs: BN statistics over all of it
        rt.print(f"BatchNorm -> SyncBatchNorm over {world} process{'es' if world > 1 else ' (plain BatchNorm)'}")
    seg.to(device)

    # ------------------------------------------------------------------ optimiser and schedule
    # linear probes: no layer decay, and the head's bias decayed too (the reference's plain AdamW)
    groups = unip.param_groups(seg, cfg.weight_decay, cfg.layer_decay if finetune else 1.0, decay_all=not finetune)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999),
                            fused=device.type in ("cuda", "cpu"))  # one kernel instead of a loop per tensor
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    # ------------------------------------------------------------------ compile, DDP
    model = torch.compile(seg) if cfg.compile else seg
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if device.type == "cuda" else None)

    # ------------------------------------------------------------------ resume
    step, (best, best_macc, best_step), last_ckpt, saved_weight = 0, (-1.0, float("nan"), -1), None, None
    resume = plumbing.resume_path(cfg.resume, cfg.out)
    if resume:
        step, (best, best_macc, best_step), saved_weight = resume_from(resume, seg, opt, scaler, cfg, rt)
        last_ckpt = resume
        rt.print(f"resumed from {resume} at step {step}")
    elif cfg.eval_only:
        raise SystemExit("--eval-only needs --resume PATH (a train_seg.py checkpoint)")

    # ------------------------------------------------------------------ loss weights (counted once: a resume keeps them)
    weight = None if cfg.eval_only else loss_weights(cfg, train_set, counts, saved_weight, rt.print)
    weight = None if weight is None else weight.to(device)

    os.makedirs(cfg.out, exist_ok=True)
    n_train = sum(p.numel() for p in seg.parameters() if p.requires_grad)
    rt.print(f"world {world} | device {device} | amp {amp} ({amp_why}) | torch {torch.__version__} | batch {bs} x "
             f"accum {accum} x world {world} = {eff_batch}" + (" | grad checkpoint" if cfg.grad_checkpoint else "")
             + f" | lr {cfg.lr:g} | iters {iters} (warm-up {warmup}) | crop {crop} | {cfg.model} "
             f"({depth} blocks, last block {backbone.blocks[-1].attn.heads} heads) | {cfg.mode} on blocks {seg.layers} | "
             f"{n_train / 1e6:.2f}M trainable | {len(train_set)} train / {n_eval} val images, {K} classes | "
             + (f"evaluation every {eval_every} steps and at the end" if eval_every else "evaluation at the end"))
    for note in recipe_notes(cfg, crop, patch, finetune):
        rt.print(note)
    if cfg.dataset != "synthetic":  # synthetic scenes are rendered in 8 bits: no file is decoded
        rt.print(data.thermal_range_note(data.parse_thermal_range(cfg.thermal_range)))

    def save(path, full=True):  # a collective call when full (every rank's RNG state)
        obj = {"model": seg.state_dict(), "step": step, "epoch": step // steps_per_epoch, "config": asdict(cfg),
               "classes": class_names, "best_miou": best, "best_macc": best_macc, "best_step": best_step,
               "last_heads": backbone.blocks[-1].attn.heads, "segmenter": arch,
               "class_weight": None if weight is None else weight.cpu()}
        if full:
            obj.update(optimizer=opt.state_dict(), scaler=scaler.state_dict(), rng=plumbing.rng_state(rt))
        if rt.master:
            unip.save_checkpoint(obj, path)

    def evaluate_and_report():  # -> (mIoU, mAcc) in %
        conf, samples, per_image = evaluate(seg, val_set, n_eval, crop, stride, autocast, rt, cfg.workers,
                                            cfg.num_samples, cfg.seed)
        return report(conf, samples, per_image, val_set, step, step // steps_per_epoch, cfg.out, rt.master)

    if cfg.eval_only:
        evaluate_and_report()
        if rt.ddp:
            dist.destroy_process_group()
        return

    # ------------------------------------------------------------------ loop
    loss_sum, loss_n = torch.zeros((), device=device), 0  # since the last log row
    pbar = tqdm(total=stop, initial=step, disable=not rt.master, dynamic_ncols=True)
    t0, t_step = time.time(), step
    seg.train()
    while step < stop:
        epoch = step // steps_per_epoch
        skip = (step - epoch * steps_per_epoch) * bs * accum  # resuming mid-epoch: skip what was seen
        batches = iter(plumbing.epoch_loader(train_set, sampler, epoch, skip, bs, cfg.workers, cfg.seed, device))
        while step < stop and step // steps_per_epoch == epoch:
            lr = poly_lr(step, cfg.lr, iters, warmup)
            loss = train_step(model, opt, scaler, batches, lr, cfg.aux_weight, autocast, accum, rt.ddp, patch, device,
                              weight)
            loss_sum, loss_n = loss_sum + loss, loss_n + 1
            step += 1
            pbar.update(1)

            if step % max(cfg.log_every, 1) == 0 or step == stop:
                value = plumbing.mean_loss(loss_sum, loss_n, rt.ddp)
                loss_sum, loss_n = torch.zeros((), device=device), 0
                plumbing.check_finite(value, step, last_ckpt)
                row = plumbing.progress_row(step, step / steps_per_epoch, value, lr, step - t_step, time.time() - t0,
                                            eff_batch, device)
                plumbing.log_row(cfg.out, row, rt.master)
                pbar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", img_s=f"{row['img_per_s']:.1f}")
                t0, t_step = time.time(), step
            evaluating = (eval_every and step % eval_every == 0) or step == stop
            saving = evaluating or (cfg.save_every and step % cfg.save_every == 0)
            if saving and loss_n:  # a non-finite loss raises here: nothing saved from it
                plumbing.check_finite(plumbing.mean_loss(loss_sum, loss_n, rt.ddp), step, last_ckpt)
            if evaluating:
                miou, macc = evaluate_and_report()
                if miou > best:  # best.pt: the best mIoU; its mAcc is kept beside it
                    best, best_macc, best_step = miou, macc, step
                    save(os.path.join(cfg.out, "best.pt"), full=False)
                t0, t_step = time.time(), step  # evaluation time is not training speed
            if saving:
                save(os.path.join(cfg.out, "ckpt.pt"))
                last_ckpt = os.path.join(cfg.out, "ckpt.pt")
        del batches  # loader workers end with their iterator
    pbar.close()

    # ------------------------------------------------------------------ end (the last step was evaluated and saved)
    rt.print(f"done: step {step}/{iters}; best mIoU {best:.2f} (mAcc {best_macc:.2f}) at step {best_step}; "
             f"checkpoints in {cfg.out}")
    if rt.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    plumbing.run(main)  # a missing file, a damaged checkpoint, labels that do not fit: one line, no traceback
