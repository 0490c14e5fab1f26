r"""
Speed, memory and model-FLOP utilisation (MFU) of the steps this project runs (UNIP, ICLR 2025):

  pretrain  one NMI-HAD step: teacher to layer L under no_grad + student forward/backward + AdamW,
            students T/S/B x teachers ViT-B@9 / ViT-L@18, through the project's fast path and through
            a NAIVE path written like the authors' code (see naive_logits); the ratio fast/naive
  seg       one fine-tuning step at 512: ViT-S + LL-FPN + UperNet + auxiliary FCN, forward/backward/AdamW
  slide     sliding-window inference of one 512x683 image (unip.slide_inference, window 512, stride 341)
  nmi       unip.layer_nmi over every layer of ViT-B / ViT-L at 224
  data      the data loader alone: SyntheticThermal (and an InfMix folder with --infrared) + PretrainTransform
  memory    peak memory of one fine-tuning forward + backward at 512 (--mem-models: ViT-B, ViT-L as train_seg.py
            builds them), with and without --grad-checkpoint; each case in a fresh process (not in the default --only)

    python tools/bench.py                                  # every section, CUDA if there is one
    python tools/bench.py --device cpu                     # the CPU table of docs/speed.md (bf16 where the CPU has it + fp32)
    python tools/bench.py --quick --device cpu             # small sizes, under a minute on 2 CPU cores
    python tools/bench.py --only pretrain --compile --json out.json
    python tools/bench.py --only pretrain --pairs vit_small=vit_large@18 --amp bf16   # one case
    python tools/bench.py --only memory --device cpu --amp none --seg-batch 2  # docs/speed.md: activation checkpointing

Conventions.
  Time: every path (fast, naive) of a case in every precision (--amp; default: what training would pick,
    and fp32) is built and runs `warmup` untimed steps; then their timed steps alternate for `reps` rounds,
    so that other work on the machine slows them alike (CUDA events on the GPU's stream, perf_counter on the
    CPU, or with --cpu-time the process's CPU time: with --threads 1 it leaves out the time other processes
    take the core). img/s = batch / median. fast/naive: the two paths in one precision; x fp32: speed against
    the case's fp32 baseline (its naive path where it has one). Both ratios are medians over the rounds of the
    ratio within a round: a round's steps run back to back, so a slow spell of a shared machine cancels out.
    Inputs are random tensors already on the device.
  FLOPs: 2 per multiply-add. Pre-training: analytic (vit_flops): patch embedding, linear layers and the
    two attention matmuls; backward = 2x forward; only what the step must run (teacher blocks 1..L-1 plus
    q/k of block L; student blocks 1..11 plus q/k of block 12). Other sections: counted once with
    torch.utils.flop_counter (math attention so it is counted). The naive path is charged the same useful
    FLOPs, so its MFU shows the waste. MFU = FLOPs/s / peak (--peak-tflops, else the device's dense
    bf16/fp16 peak; fp32 runs are compared with half of it, the TF32 peak).
  Memory: peak minus the level before the case was built, so weights + optimiser state + activations.
    CUDA: max_memory_allocated over the warm-up steps after the first (the first holds cudnn.benchmark's
    algorithm search; AdamW's state, made there too, stays allocated and so still counts). CPU: peak RSS
    (VmHWM) after resetting it through /proc/self/clear_refs, so every case is measured on its own in one
    process. Loader workers are other processes: not counted.
    The memory section runs each case in a fresh process and marks the level after the model is built: its peak
    is activations + gradients of one forward + backward (no optimiser state), the weights given apart.
"""

import contextlib
import copy
import ctypes
import functools
import gc
import json
import multiprocessing
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
import data  # noqa: E402
import plumbing  # noqa: E402
import unip  # noqa: E402


@dataclass
class Config:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto,none"  # precisions, alternating: auto | bf16 | fp16 | none; auto: bf16 on GPUs of capability 8.0+ (older: fp16), AMX / AVX512-BF16 CPUs
    compile: bool = False  # torch.compile the fast path (pre-training wrappers, segmenter); naive stays eager
    compile_backend: str = "inductor"  # torch.compile backend; eager / aot_eager only trace, without code generation (a quick CPU check)
    quick: bool = False  # small sizes for a CPU smoke run: images 64, batch 2, students T and S, 2 reps
    only: str = "pretrain,seg,slide,nmi,data"  # sections to run, comma-separated (also: memory)
    mem_models: str = "vit_base,vit_large"  # memory section: backbones (LL-FPN; vit_large: its multi-layer pyramid)
    batch: int = 0  # pre-training and NMI images per step (0: 256 on CUDA, 8 on CPU, 2 with --quick)
    seg_batch: int = 0  # fine-tuning images per step (0: 8, the recipe's total batch, on CUDA; else 2)
    img: int = 0  # pre-training / NMI image size (0: 224; 64 with --quick)
    seg_img: int = 0  # fine-tuning crop and sliding window (0: 512; 64 with --quick)
    students: str = ""  # student presets (default: vit_tiny,vit_small,vit_base on CUDA; else without vit_base)
    teachers: str = "vit_base@9,vit_large@18"  # teacher preset@layer (DINO-B layer 9, MAE-L layer 18)
    pairs: str = ""  # student=teacher@layer cases instead of --students x --teachers, e.g. vit_small=vit_large@18
    warmup: int = 0  # untimed steps per case (0: 5 on CUDA; 1 on CPU or with --quick)
    reps: int = 0  # timed steps per case; its paths and precisions alternate (0: 20 on CUDA, 7 on CPU; 2 --quick)
    workers: int = -1  # data-loader worker processes (-1: 8; 2 with --quick)
    infrared: str = ""  # also time an InfMix infrared folder (<dataset>/thermal/* or plain images)
    cudnn_benchmark: bool = True  # torch.backends.cudnn.benchmark, as train_seg.py sets it on CUDA
    peak_tflops: float = 0.0  # peak for MFU in TFLOP/s (0: known from the device name, CUDA only)
    json: str = ""  # also write the results as JSON to this file; '-' = stdout (the table goes to stderr)
    threads: int = 0  # CPU threads for torch (0: its default; 1 with --quick: OpenMP stalls when the cores are shared)
    cpu_time: bool = False  # CPU: time by this process's CPU time, not wall time (with --threads 1: steady on a busy CPU)
    seed: int = 0  # seed of the random weights and inputs


def parse_config(argv=None):
    # The command line is the dataclass: --seg-batch for seg_batch, help from the trailing comment.
    return plumbing.parse_config(Config, argv, __doc__)


SECTIONS = ("pretrain", "seg", "slide", "nmi", "data", "memory")


def parse_pairs(text):
    """--pairs 'student=teacher@layer,...' -> [(student, teacher, layer), ...], the presets checked."""
    try:
        pairs = [(s, t, int(layer)) for s, t, layer in (re.fullmatch(r"(\w+)=(\w+)@(\d+)", p.strip()).groups()
                                                     for p in text.split(","))]
    except AttributeError:
        raise SystemExit(f"--pairs {text!r}: expected student=teacher@layer[,...], e.g. vit_small=vit_large@18")
    unknown = sorted({a for s, t, _ in pairs for a in (s, t)} - set(unip.PRESETS))
    if unknown:
        raise SystemExit(f"--pairs: unknown presets {unknown}; choose from {sorted(unip.PRESETS)}")
    return pairs


# -----------------------------------------------------------------------------
# FLOPs (2 per multiply-add)


def vit_flops(vit, img, upto=None):
    """Forward FLOPs of `vit` on one img x img image. upto=None: the whole model (all blocks);
    upto=L: what attention_logits(x, L) runs: blocks 1..L-1, then only q/k and q·kᵀ of block L
    ('last' = the student's last block).
    ViT-B/16 at 224, whole: 17.56 GMACs = 35.13 GFLOPs (patch 0.12 + 12 x (1.39 linear + 0.06 attention))."""
    D, p = vit.dim, vit.patch_size
    upto = len(vit.blocks) if upto == "last" else upto
    n = (img // p) ** 2
    N = n + 1  # + CLS
    hidden = vit.blocks[0].mlp.fc1.out_features
    patch = n * D * 3 * p * p  # the patch projection is a linear map of each 16x16x3 patch
    block = N * D * 3 * D + 2 * N * N * D + N * D * D + 2 * N * D * hidden  # qkv, q·kᵀ and attn·v, proj, MLP
    qk_only = N * D * 2 * D + N * N * D  # q and k rows of qkv, q·kᵀ (the same for any head count)
    macs = patch + (len(vit.blocks) * block if upto is None else (upto - 1) * block + qk_only)
    return 2 * macs


def counted_flops(fn):
    """FLOPs of running fn() once, counted by torch's flop counter (math attention, so it shows)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


PEAK_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "A100": 312}  # dense bf16/fp16


def peak_tflops(device, amp, given):
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return peak and (peak / 2 if amp == "none" else peak)  # fp32 matmuls run as TF32: half the bf16 rate


# -----------------------------------------------------------------------------
# the naive path: the authors' attention with return_attention, written over unip's modules


def naive_logits(vit, x, layer):
    """Pre-softmax logits of block `layer` the way the reference code gets them: explicit attention
    softmax(q·kᵀ)·v in every block, q·kᵀ computed a second time for the returned logits, and the
    whole block `layer` run (v, proj, MLP) although only its logits are used. Same values as
    vit.attention_logits(x, layer): (B, H, N, N)."""
    x = vit.prepare_tokens(x)
    for i, blk in enumerate(vit.blocks[:layer], start=1):
        a = blk.attn
        q, k, v = a._split(a.qkv(blk.norm1(x)), 3)  # (B, H, N, hd) each
        attn = (q @ k.transpose(-2, -1)) * a.scale  # (B, H, N, N)
        if i == layer:
            logits = (q @ k.transpose(-2, -1)) * a.scale  # the reference's `qk`: the same product again
        y = a.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).flatten(2))
        x = blk._residual(x, y, blk.gamma_1)
        x = blk._residual(x, blk.mlp(blk.norm2(x)), blk.gamma_2)
    return logits


# -----------------------------------------------------------------------------
# timing and memory


def clone(model, device, depth=None):
    """A fresh copy of `model` on `device`, with only its first `depth` blocks if given. Every case copies
    one prototype: initialising a ViT-L on a CPU takes seconds, copying it a fraction of a second."""
    blocks = model.blocks if depth else None
    if depth:
        model.blocks = blocks[:depth]  # the copy gets only these
    try:
        return copy.deepcopy(model).to(device)
    finally:
        if depth:
            model.blocks = blocks


def _proc_status_kb(field):  # VmRSS / VmHWM of this process, in kB
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])


def memory_mark(device):
    """Free what can be freed and start a new peak; returns the current level (bytes) or None."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc: hand freed heap back, so the next peak starts low
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM (peak RSS) to the current RSS
        return _proc_status_kb("VmRSS") * 1024
    except OSError:
        return None  # no per-case CPU peak on this system


def memory_peak(device, mark):
    if mark is None:
        return None
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _proc_status_kb("VmHWM") * 1024
    return peak - mark


def measure(builds, device, warmup, reps, clock=time.perf_counter):
    """builds: {name: build}; build() makes the models and returns step(); its memory counts.
    The cases are built and warmed up one at a time (each its own memory peak), then their timed steps
    alternate, so that other work on the machine slows them alike.
    -> {name: (median s/step, peak bytes, [s/step of each round])}."""
    steps, peaks = {}, {}
    for name, build in builds.items():
        mark = memory_mark(device)
        steps[name] = build()
        for i in range(warmup):
            steps[name]()
            if i == 0 and warmup > 1 and device.type == "cuda":
                # step 1 holds cudnn.benchmark's algorithm search: its trial workspaces are not the run's memory
                # (docs/speed.md, the H200 table)
                torch.cuda.reset_peak_memory_stats(device)
        peaks[name] = memory_peak(device, mark)
    if device.type == "cuda":  # events on the stream: no host sync inside the timed loop
        events = {name: [] for name in steps}
        torch.cuda.synchronize(device)
        for _ in range(reps):
            for name, step in steps.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                events[name].append((start, end))
        torch.cuda.synchronize(device)
        times = {name: [start.elapsed_time(end) / 1e3 for start, end in ev] for name, ev in events.items()}
    else:
        times = {name: [] for name in steps}
        for _ in range(reps):
            for name, step in steps.items():
                t = clock()
                step()
                times[name].append(clock() - t)
    del steps
    return {name: (statistics.median(times[name]), peaks[name], times[name]) for name in builds}


def round_ratio(slow, fast):
    """How many times faster `fast` is than `slow`: the median over rounds of slow[r] / fast[r]."""
    return statistics.median(s / f for s, f in zip(slow, fast))


def time_loader(dataset, batch, workers):
    """Seconds per batch of a DataLoader in steady state: the first wave of batches (one per worker, all
    started together) is untimed, then 3 more waves are timed."""
    wave = max(workers, 1)
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    for _ in range(wave):
        next(it)
    t = time.perf_counter()
    for _ in range(3 * wave):
        next(it)
    dt = (time.perf_counter() - t) / (3 * wave)
    del it
    return dt


def make_row(section, case, path, n, seconds, mem, peak, flops_per_img=None, amp=None, **extra):
    """One result row: n images in `seconds` per step, `mem` peak bytes; MFU against peak[amp] (TFLOP/s)."""
    row = {"section": section, "case": case, "path": path, "amp": amp, "batch": n, "img_per_s": n / seconds,
           "ms_per_step": 1e3 * seconds, "mem_gb": None if mem is None else mem / 2**30,
           "gflop_per_img": flops_per_img and flops_per_img / 1e9, "tflops": None, "mfu_pct": None, **extra}
    if flops_per_img:
        row["tflops"] = flops_per_img * n / seconds / 1e12
        row["mfu_pct"] = peak[amp] and 100 * row["tflops"] / peak[amp]
    return row


def case_rows(section, case, n, results, peak, flops_per_img=None):
    """results {(path, amp): (s/step, peak bytes, round times)} of one case -> a row each, with fast/naive
    in each precision and 'x fp32', the speed against the case's fp32 baseline (its naive path where it has
    one), both round by round."""
    base = results.get(("naive", "none")) or results.get(("fast", "none"))
    rows = []
    for (path, amp), (sec, mem, times) in results.items():
        naive = results.get(("naive", amp)) if path == "fast" else None
        rows.append(make_row(section, case, path, n, sec, mem, peak, flops_per_img, amp,
                             speedup=naive and round_ratio(naive[2], times), vs_fp32=base and round_ratio(base[2], times)))
    return rows


def row_text(row):  # the line printed as each row is measured
    return " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if v is not None)


def markdown(rows):
    cols = ["section", "case", "path", "amp", "batch", "img/s", "ms/step", "peak GB", "GFLOP/img", "TFLOP/s", "MFU %",
            "fast/naive", "x fp32"]
    keys = ["section", "case", "path", "amp", "batch", "img_per_s", "ms_per_step", "mem_gb", "gflop_per_img", "tflops",
            "mfu_pct", "speedup", "vs_fp32"]
    if any("mem_saving_pct" in r for r in rows):  # the memory section's columns
        cols, keys = cols + ["weights GB", "saving %"], keys + ["weights_gb", "mem_saving_pct"]
    fmt = lambda v: "" if v is None else f"{v:.3g}" if isinstance(v, float) and abs(v) < 100 else \
        f"{v:.0f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the steps measured: each builder makes its models and inputs and returns step()


def low_dtype(amp):  # the autocast dtype of a precision
    return torch.float16 if amp == "fp16" else torch.bfloat16


def prototype(protos, seed, arch, **kw):
    """One CPU prototype per configuration, cached in `protos`, built before its cases are measured."""
    key = (arch, *sorted(kw.items()))
    if key not in protos:
        torch.manual_seed(seed)
        protos[key] = unip.PRESETS[arch](**kw)
    return protos[key]


def pretrain_step(t_proto, s_proto, layer, device, batch, img, naive, amp, autocast, compile_backend=None):
    """One NMI-HAD step: the teacher's logits at `layer` under no_grad, the student's at its last block,
    distill_loss, backward, AdamW. naive: the reference's way (naive_logits); else train_pretrain.py's."""
    teacher = clone(t_proto, device, depth=layer).eval().requires_grad_(False)  # stops at the distilled layer
    if not naive and amp != "none":  # as train_pretrain.py keeps it: weights in the autocast dtype, q/k fp32
        unip.autocast_weights_(teacher, low_dtype(amp), keep=[teacher.blocks[-1].attn.qkv])
    student = clone(s_proto, device).train()
    depth = len(student.blocks)
    if naive:  # the reference: explicit attention everywhere, nothing frozen, AdamW not fused
        student_fn = lambda x: naive_logits(student, x, depth)
        teacher_fn = lambda x: naive_logits(teacher, x, layer)
    else:  # train_pretrain.py: freeze what gets no gradient, logits-only wrappers, fused AdamW
        unip.freeze_unreached(student)
        # the student trains: SDPA unless CPU bf16, where the explicit product trains faster; the frozen
        # teacher keeps SDPA
        unip.set_fused_attention(student, unip.sdpa_for_training(device, amp))
        student_fn, teacher_fn = unip.AttentionLogits(student, depth), unip.AttentionLogits(teacher, layer)
        if compile_backend:
            compiled = functools.partial(torch.compile, backend=compile_backend)
            student_fn, teacher_fn = compiled(student_fn), compiled(teacher_fn)
    opt = torch.optim.AdamW(unip.param_groups(student, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=device.type in ("cuda", "cpu") and not naive)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    x = torch.randn(batch, 3, img, img, device=device)

    def step():
        with autocast():
            with torch.no_grad():
                target = teacher_fn(x)  # (B, H, N, N)
            loss = unip.distill_loss(student_fn(x), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step


def seg_step(seg_proto, device, crop, num_classes, n, amp, autocast, compile_backend=None, optimise=True):
    """One fine-tuning step of the segmenter on n random crops: forward, loss with the auxiliary head,
    backward, layer-decay AdamW (optimise=False: up to the backward, for counting FLOPs)."""
    seg = clone(seg_proto, device).train()
    unip.set_fused_attention(seg, unip.sdpa_for_training(device, amp))  # as train_seg.py fine-tunes the backbone
    model = torch.compile(seg, backend=compile_backend) if (compile_backend and optimise) else seg
    opt = torch.optim.AdamW(unip.param_groups(seg, layer_decay=0.85), lr=1e-4, betas=(0.9, 0.999), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    x = torch.randn(n, 3, crop, crop, device=device)
    y = torch.randint(0, num_classes, (n, crop, crop), device=device)

    def step():
        with autocast():
            out, aux = model(x)  # (B, K, S/4, S/4), (B, K, S/16, S/16)
        loss = unip.seg_loss(out, y) + 0.4 * unip.seg_loss(aux, y)
        scaler.scale(loss).backward()
        if optimise:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
    return step


def slide_step(seg_proto, device, H, W, window, stride, num_classes, autocast):
    """Sliding-window inference of one random H x W image (no gradients: SDPA)."""
    seg = clone(seg_proto, device).eval()
    x = torch.randn(1, 3, H, W, device=device)

    def step():
        with autocast():
            unip.slide_inference(seg, x, num_classes, window, stride)  # (1, K, H, W)
    return step


def nmi_step(vit_proto, device, img, n, autocast):
    """NMI of every head of every layer on n random images."""
    vit = clone(vit_proto, device).eval()
    x = torch.randn(n, 3, img, img, device=device)

    def step():
        with autocast():
            unip.layer_nmi(vit, x)  # (L, B, H)
    return step


def memory_case(arch, crop, n, grad_checkpoint, amp, device, threads, seed):
    """Run in a fresh process (spawn): build `arch` + UperNet as train_seg.py fine-tunes it at `crop` (drop path,
    layer scale; ViT-L with its multi-layer pyramid), then one forward + backward of n random crops.
    -> (seconds, peak bytes above the built model or None, weight bytes)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    amp, _, autocast = plumbing.precision(amp, device)
    torch.manual_seed(seed)
    large = arch == "vit_large"
    backbone = unip.PRESETS[arch](img_size=crop, drop_path=0.2 if large else 0.1, drop_path_schedule="linear",
                                  layer_scale=1.0)
    backbone.grad_checkpoint = grad_checkpoint
    seg = unip.Segmenter(backbone, 21, layers=unip.multi_layers(len(backbone.blocks)) if large else None)
    weights = sum(p.numel() * p.element_size() for p in seg.parameters())
    step = seg_step(seg, device, crop, 21, n, amp, autocast, optimise=False)  # works on its own copy
    del seg, backbone
    mark = memory_mark(device)
    t = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t, memory_peak(device, mark), weights


def fresh_process(fn, *args):
    """fn(*args) in a new Python process: its memory peak starts from nothing this process holds."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def loader_sets(img, n, seed, infrared=""):
    """[(name, dataset)] the data section times: SyntheticThermal, and an InfMix folder if given."""
    tf = data.PretrainTransform(img)
    sets = [("SyntheticThermal 256x320", data.SyntheticThermal("train", num_images=n, transform=tf, seed=seed))]
    if infrared:
        mix = data.InfMix(infrared=infrared, transform=tf, seed=seed)
        sets.append((f"InfMix {infrared}", Subset(mix, range(min(n, len(mix))))))
    return sets


def write_json(path, result):  # '-': stdout
    if path == "-":
        print(json.dumps(result, indent=1))
    else:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


# -----------------------------------------------------------------------------


def main(argv=None):
    # ---------------------------------------------------------------- config
    cfg = parse_config(argv)
    q = cfg.quick
    img, seg_img = cfg.img or (64 if q else 224), cfg.seg_img or (64 if q else 512)
    workers = cfg.workers if cfg.workers >= 0 else (2 if q else 8)
    teachers = [(arch, int(layer)) for arch, layer in (t.split("@") for t in cfg.teachers.split(","))]
    sections = set(cfg.only.split(","))
    if sections - set(SECTIONS):
        raise SystemExit(f"--only: unknown sections {sorted(sections - set(SECTIONS))}")
    out = sys.stderr if cfg.json == "-" else sys.stdout  # with --json -, stdout carries the JSON alone
    say = lambda *a: print(*a, file=out, flush=True)

    # ---------------------------------------------------------------- device, precision
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if cfg.threads or (q and not cuda):
        torch.set_num_threads(cfg.threads or 1)
    batch = cfg.batch or (256 if cuda else 2 if q else 8)
    seg_batch = cfg.seg_batch or (8 if cuda and not q else 2)
    # a CPU is ~100x slower than a GPU: fewer steps, no ViT-B student
    warmup, reps = cfg.warmup or (5 if cuda and not q else 1), cfg.reps or (2 if q else 20 if cuda else 7)
    students = (cfg.students or ("vit_tiny,vit_small,vit_base" if cuda and not q else "vit_tiny,vit_small")).split(",")
    pairs = parse_pairs(cfg.pairs) if cfg.pairs else None  # chosen cases instead of every student with every teacher
    if pairs:
        students = list(dict.fromkeys(s for s, _, _ in pairs))
        teachers = list(dict.fromkeys((t, layer) for _, t, layer in pairs))
    why, autocast = {}, {}  # per precision, in order, no repeats: why it runs, its autocast() (TF32 on CUDA)
    for a in cfg.amp.split(","):
        amp, why_amp, autocast_amp = plumbing.precision(a, device)
        why[amp], autocast[amp] = why_amp, autocast_amp
    amps = list(why)
    if cuda:
        torch.cuda.set_device(device.index or 0)  # plain 'cuda': GPU 0 (set_device wants an index)
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    peak = {amp: peak_tflops(device, amp, cfg.peak_tflops) for amp in amps}
    timed = functools.partial(measure, device=device, warmup=warmup, reps=reps,
                              clock=time.process_time if cfg.cpu_time and not cuda else time.perf_counter)
    compile_backend = cfg.compile and cfg.compile_backend  # the fast paths only
    dev_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    say(json.dumps(asdict(cfg), indent=1))
    say(f"device {dev_name} | torch {torch.__version__} | amp {', '.join(f'{a} ({w})' for a, w in why.items())} | "
        f"compile {compile_backend} | peak {' / '.join(str(p or '?') for p in peak.values())} TFLOP/s | "
        f"batch {batch} @ {img}px, seg {seg_batch} @ {seg_img}px | warm-up {warmup}, reps {reps}"
        + (" | CPU time" if cfg.cpu_time and not cuda else ""))
    rows, protos = [], {}

    def add(new):  # keep the rows, print each
        for row in new:
            rows.append(row)
            say(row_text(row))

    # ---------------------------------------------------------------- pre-training: NMI-HAD step, fast and naive
    if "pretrain" in sections:
        for teacher_arch, layer in teachers:
            for student_arch in students:
                if pairs and (student_arch, teacher_arch, layer) not in pairs:
                    continue
                t_proto = prototype(protos, cfg.seed, teacher_arch, img_size=img)
                heads = t_proto.blocks[layer - 1].attn.heads  # the student's last block gets the teacher's heads
                s_proto = prototype(protos, cfg.seed, student_arch, img_size=img, drop_path=0.1, last_heads=heads)
                # analytic model FLOPs per image: teacher forward + student forward and backward (= 2x forward)
                flops = vit_flops(t_proto, img, layer) + 3 * vit_flops(s_proto, img, "last")
                if cfg.compile:  # a fresh start per case: dynamo recompiles a function at most 8 times
                    torch._dynamo.reset()
                case = functools.partial(pretrain_step, t_proto, s_proto, layer, device, batch, img)
                if not rows:  # one untimed step first, so that the first case does not also pay the process's
                    case(True, amps[0], autocast[amps[0]])()  # one-time costs (pages, workspaces)
                builds = {(path, amp): functools.partial(case, path == "naive", amp, autocast[amp],
                                                         compile_backend=compile_backend)
                          for amp in amps for path in ("fast", "naive")}
                add(case_rows("pretrain", f"{student_arch} <- {teacher_arch}@{layer}", batch, timed(builds), peak, flops))

    # ---------------------------------------------------------------- fine-tuning step: ViT-S + LL-FPN + UperNet
    num_classes = 21  # SODA
    if "seg" in sections or "slide" in sections:
        torch.manual_seed(cfg.seed)
        backbone = unip.vit_small(img_size=seg_img, drop_path=0.1, drop_path_schedule="linear")
        seg_proto = unip.Segmenter(backbone, num_classes)  # LL-FPN + UperNet + auxiliary FCN head
    if "seg" in sections:
        case = functools.partial(seg_step, seg_proto, device, seg_img, num_classes)
        flops = counted_flops(case(2, "none", contextlib.nullcontext, optimise=False)) / 2  # BatchNorm needs 2 images
        builds = {("fast", amp): functools.partial(case, seg_batch, amp, autocast[amp], compile_backend=compile_backend)
                  for amp in amps}
        add(case_rows("seg", f"vit_small LL-FPN UperNet {seg_img}px", seg_batch, timed(builds), peak, flops))

    # ---------------------------------------------------------------- sliding-window inference
    if "slide" in sections:
        H, W, stride = seg_img, round(seg_img * 683 / 512), seg_img * 2 // 3  # 512x683: two windows, stride 341
        case = functools.partial(slide_step, seg_proto, device, H, W, seg_img, stride, num_classes)
        flops = counted_flops(case(contextlib.nullcontext))
        builds = {("fast", amp): functools.partial(case, autocast[amp]) for amp in amps}
        add(case_rows("slide", f"vit_small {H}x{W}, window {seg_img}/{stride}", 1, timed(builds), peak, flops))

    # ---------------------------------------------------------------- NMI analysis: every layer, every head
    if "nmi" in sections:
        for arch in ("vit_base", "vit_large"):
            vit_proto = prototype(protos, cfg.seed, arch, img_size=img)
            flops = counted_flops(nmi_step(vit_proto, device, img, 1, contextlib.nullcontext))
            builds = {("fast", amp): functools.partial(nmi_step, vit_proto, device, img, batch, autocast[amp])
                      for amp in amps}
            add(case_rows("nmi", f"{arch} all layers {img}px", batch, timed(builds), peak, flops))
    protos.clear()

    # ---------------------------------------------------------------- peak memory with and without checkpointing
    if "memory" in sections:
        for arch in cfg.mem_models.split(","):
            for amp in amps:
                res = {ck: fresh_process(memory_case, arch, seg_img, seg_batch, ck, amp, str(device), cfg.threads,
                                         cfg.seed) for ck in (False, True)}
                plain = res[False][1]
                for ck, (sec, mem, weights) in res.items():
                    saving = None if not (mem and plain) else 100 * (1 - mem / plain)
                    add([make_row("memory", f"{arch} UperNet {seg_img}px fwd+bwd", "grad checkpoint" if ck else "plain",
                                  seg_batch, sec, mem, peak, amp=amp, weights_gb=weights / 2**30,
                                  mem_saving_pct=saving)])

    # ---------------------------------------------------------------- data loader alone
    if "data" in sections:
        data_batch = 4 if q else 32
        n = 4 * max(workers, 1) * data_batch  # enough for the untimed wave and three timed ones
        for name, ds in loader_sets(img, n, cfg.seed, cfg.infrared):
            if len(ds) < n:
                say(f"data: {name} has {len(ds)} images, fewer than the {n} needed; skipped")
                continue
            dt = time_loader(ds, data_batch, workers)
            add([make_row("data", f"{name} -> {img}px, {workers} workers", "loader", data_batch, dt, None, peak)])

    # ---------------------------------------------------------------- report
    say("\n" + markdown(rows))
    if cfg.json:
        write_json(cfg.json, {"device": dev_name, "torch": torch.__version__, "cuda": torch.version.cuda, "amp": why,
                              "peak_tflops": peak, "config": asdict(cfg), "rows": rows})
    return rows


if __name__ == "__main__":
    plumbing.run(main)
