r"""
The GPU path in one run: checks that every device path of the project works on a GPU, and measures it.

  numerics  on the device, in one process: each SDPA kernel (default choice, flash, memory-efficient, cuDNN,
            math) against the explicit softmax(q·kᵀ)·v, forward and backward, in fp32 / bf16 / fp16 autocast;
            Attention.logits and ViT.attention_logits in fp32 under bf16 / fp16 autocast (also with the teacher
            stored in the autocast dtype, as train_pretrain.py keeps it); distill_loss in fp32 under autocast;
            one pre-training step and one fine-tuning step in each precision: finite loss and gradients
  pretrain  torchrun --nproc_per_node=1 train_pretrain.py: a random ViT-B teacher at layer 9 -> ViT-S, synthetic
            data, 40 steps, a checkpoint; a second run stopped at step 30 and continued with --resume auto must
            end with the weights of the uninterrupted one
  seg       torchrun --nproc_per_node=1 train_seg.py: ViT-S from that checkpoint, 512 crops, 40 iterations,
            two evaluations, checkpoints (SyncBatchNorm on CUDA: torchrun sets RANK)
  predict   predict.py with the seg run's best.pt on two synthetic frames
  bench     bench.py: pre-training steps T<-B@9, S<-B@9, S<-L@18 at batch 256, fast and naive paths; the 512 px
            fine-tuning step; sliding-window inference; bf16 and fp32 (TF32): img/s, peak memory, MFU
  profile   torch.profiler over 3 pre-training steps of S<-L@18 in bf16 at batch 256: where the time goes
  compile   bench.py --compile for S<-B@9 in bf16 (--compile-pairs for more): the same rows compiled, and their gain

    PYTHONUNBUFFERED=1 python tools/gpu_check.py --device cuda --out runs/gpu_check     # one GPU, under 9 minutes
    python tools/gpu_check.py --device cpu --tiny --out /tmp/gpu_check                   # tiny sizes: ~1 min of CPU time

pretrain, seg, predict, bench and compile run the project's scripts as a user runs them; numerics and profile
run this file in a process of their own. Each part has a time limit (the whole run keeps to --budget seconds): a part that fails or runs out of
time is reported, with the end of its log, and the next part still runs. Printed: one PASS / FAIL / SKIP line
per check, a summary table and the bench table. Written to --out: gpu_check.json (versions, every check, the
bench rows), summary.md, a log per part and the runs' log.jsonl files; checkpoints go to --work (a temporary
folder unless given). Exit status 0 only when every part passed.
"""

import contextlib
import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
import data  # noqa: E402
import plumbing  # noqa: E402
import unip  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


@dataclass
class Config:
    device: str = "cuda"  # cuda | cpu (another GPU: CUDA_VISIBLE_DEVICES, as torchrun gives rank 0 the first one)
    tiny: bool = False  # tiny models, images and step counts (the CPU test of this script: ~1 min of CPU time)
    out: str = "runs/gpu_check"  # output folder: gpu_check.json, summary.md, a log per part
    work: str = ""  # folder for the runs and their checkpoints (default: a temporary folder, deleted at the end)
    parts: str = "numerics,pretrain,seg,predict,bench,profile,compile"  # parts to run, in this order
    budget: float = 480.0  # seconds for the whole run; each part gets what is left, at most its own limit
    steps: int = 0  # pre-training steps (0: 40; --tiny 6); the interrupted run stops at 3/4 of them and resumes
    seg_steps: int = 0  # fine-tuning iterations (0: 40; --tiny 4); evaluated at half and at the end
    pairs: str = "vit_tiny=vit_base@9,vit_small=vit_base@9,vit_small=vit_large@18"  # bench.py --pairs (--tiny: vit_tiny=vit_small@6)
    amp: str = "auto,none"  # bench.py precisions (auto: as training picks, unip.resolve_amp; none: fp32, TF32 on CUDA); --tiny: none
    batch: int = 0  # bench.py pre-training batch (0: 256, the recipe's per-GPU batch; halved after an out-of-memory)
    profile: str = "vit_small=vit_large@18"  # the pre-training case profiled with torch.profiler (--tiny: vit_tiny=vit_small@6)
    profile_amp: str = "auto"  # its precision (auto: as training picks on CUDA, fp32 on a CPU)
    compile_pairs: str = "vit_small=vit_base@9"  # cases timed again with --compile ('' = none; each pair takes ~2 min on an H200)
    compile_only: str = "pretrain"  # bench.py sections timed with --compile (pretrain,seg also compiles the fine-tuning step)
    compile_amp: str = "auto"  # precision of the compiled cases (auto: as training picks); --tiny: none
    compile_backend: str = ""  # torch.compile backend (default: inductor; --tiny: eager, as inductor takes minutes on a CPU)
    part: str = ""  # internal: run this part in this process (numerics, profile)
    seed: int = 0  # seed of every run


PART_LIMITS = {"numerics": 120, "pretrain": 180, "seg": 150, "predict": 90, "bench": 240, "profile": 90,
               "compile": 300}  # seconds


def parse_config(argv=None):
    # The command line is the dataclass: --compile-pairs for compile_pairs, help from the trailing comment.
    cfg = plumbing.parse_config(Config, argv, __doc__)
    unknown = set(cfg.parts.split(",")) - set(PART_LIMITS)
    if unknown:
        raise SystemExit(f"--parts: unknown parts {sorted(unknown)}; choose from {','.join(PART_LIMITS)}")
    if cfg.tiny:  # tiny defaults for the settings left at their full-size values
        full = Config()
        for name, small in (("pairs", "vit_tiny=vit_small@6"), ("compile_pairs", "vit_tiny=vit_small@6"),
                            ("profile", "vit_tiny=vit_small@6"), ("amp", "none"), ("compile_amp", "none")):
            if getattr(cfg, name) == getattr(full, name):
                setattr(cfg, name, small)
    return cfg


# -----------------------------------------------------------------------------
# numerics: run in its own process (--part numerics) on the device


AMPS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, amp):
    return torch.autocast(device.type, AMPS[amp] or torch.bfloat16, enabled=amp != "fp32")


def trains_on_sdpa(device, amp):  # unip.sdpa_for_training in this file's precision names ('fp32' is its 'none')
    return unip.sdpa_for_training(device, "none" if amp == "fp32" else amp)


def rel_err(a, ref):
    """max |a - ref| / max |ref|: error on the scale of the tensor (float64)."""
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _sdpa_backends():
    from torch.nn.attention import SDPBackend
    names = {"default": None, "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return {k: (None if v is None else getattr(SDPBackend, v)) for k, v in names.items()
            if v is None or hasattr(SDPBackend, v)}


# the floor of the error bound: what an exact kernel may still differ by, on the tensor's scale
ERR_FLOOR = {"fp32": 1e-5, "bf16": 1e-3, "fp16": 1e-4}


def check_sdpa(device, dim, heads, B, N, amp, backend, seed=0):
    """unip.Attention.forward on SDPA (fused=True, forced to one kernel) against its explicit softmax(q·kᵀ)·v
    path (fused=False), forward and backward, under `amp` autocast. The reference is the explicit path
    in float64; the kernel passes when its error is at most twice the explicit path's own error in the same
    precision plus ERR_FLOOR[amp] (as FlashAttention's own tests compare). Returns (status, detail)."""
    from torch.nn.attention import sdpa_kernel
    kernel = _sdpa_backends()[backend] if backend != "default" else None
    torch.manual_seed(seed)
    attn = unip.Attention(dim, heads).to(device)
    x0 = torch.randn(B, N, dim, device=device)
    g = torch.randn(B, N, dim, device=device)  # the upstream gradient

    def run(module, x, amp, explicit, ctx=contextlib.nullcontext()):  # -> [y, dx, dWqkv, dWproj] (float64)
        x = x.detach().clone().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        module.fused = not explicit
        with ctx, autocast(device, amp):
            y = module(x)
        (y.double() * g.to(y.device, torch.float64)).sum().backward()
        return [t.detach().double() for t in (y, x.grad, module.qkv.weight.grad, module.proj.weight.grad)]

    if not trains_on_sdpa(device, amp):
        return "SKIP", f"unip.sdpa_for_training: {device.type} {amp} training runs the explicit path, not SDPA"
    ref = run(copy.deepcopy(attn).double(), x0.double(), "fp32", explicit=True)
    low = run(attn, x0, amp, explicit=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            forced = sdpa_kernel([kernel]) if kernel is not None else contextlib.nullcontext()
            fast = run(attn, x0, amp, explicit=False, ctx=forced)
        except RuntimeError as e:
            if "No available kernel" in str(e) or "No viable backend" in str(e):  # this kernel refuses the case
                why = "; ".join(dict.fromkeys(str(w.message).split("\n")[0][:160] for w in caught
                                              if "because" in str(w.message) or "requires" in str(w.message)))
                return "SKIP", f"refused: {why or str(e).splitlines()[0][:160]}"
            raise
    names = ["out", "dx", "dWqkv", "dWproj"]
    e_fast = {n: rel_err(a, r) for n, a, r in zip(names, fast, ref)}
    e_low = {n: rel_err(a, r) for n, a, r in zip(names, low, ref)}
    bad = [n for n in names if not e_fast[n] <= 2 * e_low[n] + ERR_FLOOR[amp]]
    detail = "err " + " ".join(f"{n} {e_fast[n]:.1e}/{e_low[n]:.1e}" for n in names) + " (kernel/explicit)"
    return ("FAIL" if bad else "PASS"), detail + (f"; over the bound: {', '.join(bad)}" if bad else "")


def check_logits(device, arch, img, layer, B, amp, seed=0):
    """The distilled logits under `amp` autocast: ViT.attention_logits is fp32 and equals Attention.logits of
    the same hidden state computed outside autocast; autocast's own q·kᵀ would be far off; the teacher stored
    in the autocast dtype (unip.autocast_weights_, as train_pretrain.py) gives the same logits; and they stay
    close to the all-fp32 model's."""
    torch.manual_seed(seed)
    vit = unip.PRESETS[arch](img_size=img).to(device).eval()
    x = torch.randn(B, 3, img, img, device=device)
    blk = vit.blocks[layer - 1]
    with torch.no_grad():
        full = vit.attention_logits(x, layer)  # all fp32
        with autocast(device, amp):
            out = vit.attention_logits(x, layer)
            h = vit.prepare_tokens(x)
            for b in vit.blocks[: layer - 1]:
                h = b(h)  # the blocks before the distilled one, in the low precision as in training
            q, k = blk.attn._split(blk.attn.qkv(blk.norm1(h)), 3)[:2]
            plain = (q @ k.transpose(-2, -1)) * blk.attn.scale  # what autocast alone would give
        exact = blk.attn.logits(blk.norm1(h.float()))  # fp32 from the same hidden state
        cut = copy.deepcopy(vit)
        del cut.blocks[layer:]
        unip.autocast_weights_(cut, AMPS[amp], keep=[cut.blocks[layer - 1].attn.qkv])
        with autocast(device, amp):
            stored = cut.attention_logits(x, layer)
    e_out, e_plain = rel_err(out, exact), rel_err(plain, exact)
    e_stored, e_full = rel_err(stored, out), rel_err(out, full)
    bound = {"bf16": 0.1, "fp16": 0.02}[amp]  # rounding of the blocks before: a sanity bound, a wrong path is O(1)
    ok = (out.dtype == stored.dtype == torch.float32 and plain.dtype == AMPS[amp] and e_out <= 1e-5
          and e_plain > 100 * e_out and e_stored <= 1e-5 and e_full <= bound)
    detail = (f"dtype {str(out.dtype)[6:]}, err vs fp32 from the same hidden state {e_out:.1e} (autocast q·kᵀ "
              f"{e_plain:.1e}), stored-{amp} teacher {e_stored:.1e}{' (bitwise)' if e_stored == 0 else ''}, "
              f"vs the all-fp32 model {e_full:.1e} (bound {bound})")
    return ("PASS" if ok else "FAIL"), detail


def check_distill_loss(device, B, H, N, amp, seed=0):
    """distill_loss of low-precision logits under autocast: fp32, equal to the KL written out in float64, and
    its gradient equal to the closed form (softmax(s) - softmax(t)) / (B H N)."""
    torch.manual_seed(seed)
    s = (torch.randn(B, H, N, N, device=device) * 4).to(AMPS[amp]).requires_grad_(True)
    t = (torch.randn(B, H, N, N, device=device) * 4).to(AMPS[amp])
    with autocast(device, amp):
        loss = unip.distill_loss(s, t)
    loss.backward()
    p_t, p_s = t.double().softmax(-1), s.detach().double().softmax(-1)
    ref = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    e_loss = abs(loss.item() - ref.item()) / abs(ref.item())
    e_grad = rel_err(s.grad, (p_s - p_t) / (B * H * N))
    ok = loss.dtype == torch.float32 and e_loss <= 1e-4 and e_grad <= {"bf16": 1e-2, "fp16": 2e-3}[amp]
    return ("PASS" if ok else "FAIL"), f"loss {str(loss.dtype)[6:]} {loss.item():.5f}, rel err {e_loss:.1e}; grad err {e_grad:.1e}"


class PretrainStep:
    """One NMI-HAD step as train_pretrain.py runs it: the teacher cut at `layer` and stored in the autocast
    dtype, the last-block parts that get no gradient frozen, logits-only wrappers, fused AdamW, GradScaler
    for fp16. Random images of the batch, already on the device."""

    def __init__(self, device, teacher_arch, layer, student_arch, img, B, amp, seed=0):
        torch.manual_seed(seed)
        teacher = unip.PRESETS[teacher_arch](img_size=img)
        del teacher.blocks[layer:]
        teacher.to(device).eval().requires_grad_(False)
        if amp != "fp32":
            unip.autocast_weights_(teacher, AMPS[amp], keep=[teacher.blocks[layer - 1].attn.qkv])
        heads = teacher.blocks[layer - 1].attn.heads
        self.student = unip.PRESETS[student_arch](img_size=img, drop_path=0.1, last_heads=heads).to(device).train()
        # as train_pretrain.py: the student's attention by sdpa_for_training, the frozen teacher's SDPA
        unip.set_fused_attention(self.student, trains_on_sdpa(device, amp))
        unip.freeze_unreached(self.student)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(unip.param_groups(self.student, 0.05), lr=1e-4,
                                     betas=(0.9, 0.95), fused=True)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.student_fn = unip.AttentionLogits(self.student, len(self.student.blocks))
        self.teacher_fn = unip.AttentionLogits(teacher, layer)
        self.x = torch.randn(B, 3, img, img, device=device)
        self.device, self.amp = device, amp

    def backward(self):  # -> loss, teacher logits; gradients scaled when fp16
        with autocast(self.device, self.amp):
            with torch.no_grad():
                target = self.teacher_fn(self.x)  # (B, H, N, N)
            loss = unip.distill_loss(self.student_fn(self.x), target)
        self.scaler.scale(loss).backward()
        return loss, target

    def update(self):
        self.scaler.step(self.opt)  # skipped by the scaler when a gradient is not finite
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)

    def __call__(self):
        self.backward()
        self.update()


def check_pretrain_step(device, teacher_arch, layer, student_arch, img, B, amp, seed=0):
    """Pre-training steps (PretrainStep): finite losses, finite unscaled gradients on every trainable weight,
    none on the frozen ones, q/k of the last block learning (its v rows: zero gradient), and updated finite
    weights. fp16 may skip a first step while its loss scale settles: up to 3 steps for 2 applied ones."""
    run = PretrainStep(device, teacher_arch, layer, student_arch, img, B, amp, seed)
    params, last = run.params, run.student.blocks[-1]
    before = [p.detach().clone() for p in params]
    losses, finite, applied = [], [], 0
    while applied < 2 and len(losses) < 3:  # the second applied step runs with Adam state
        loss, target = run.backward()
        run.scaler.unscale_(run.opt)
        finite.append(all(torch.isfinite(p.grad).all().item() for p in params))
        losses.append(loss.item())
        applied += finite[-1]
        qkv_grad = last.attn.qkv.weight.grad.clone()
        run.update()
    D = run.student.dim
    qk, v = qkv_grad[: 2 * D], qkv_grad[2 * D:]
    frozen = [p for p in run.student.parameters() if not p.requires_grad]  # unip.freeze_unreached's
    frozen_clean = len(frozen) > 0 and all(p.grad is None for p in frozen)
    moved = sum(not torch.equal(a, p) for a, p in zip(before, params))
    # fp16: a non-finite gradient may only come before the loss scale has settled, and is then skipped
    finite_ok = finite[-1] and (all(finite) or amp == "fp16")
    ok = (all(math.isfinite(v) for v in losses) and finite_ok and applied >= 1 and target.dtype == torch.float32
          and qk.abs().sum() > 0 and v.abs().sum() == 0 and frozen_clean and moved == len(params)
          and all(torch.isfinite(p).all() for p in params))
    detail = (f"losses {', '.join(f'{v:.4f}' for v in losses)}; grads finite {finite}; last-block q/k grad "
              f"{qk.abs().sum().item():.2e}, v grad {v.abs().sum().item():.0e}; {moved}/{len(params)} weights updated"
              + (f"; loss scale {run.scaler.get_scale():.0f}" if amp == "fp16" else ""))
    return ("PASS" if ok else "FAIL"), detail


def check_seg_step(device, arch, crop, B, amp, seed=0):
    """One fine-tuning step as train_seg.py runs it (ViT + LL-FPN + UperNet + auxiliary head, layer-decay AdamW,
    GradScaler for fp16): finite loss and gradients on every trainable weight."""
    torch.manual_seed(seed)
    backbone = unip.PRESETS[arch](img_size=crop, drop_path=0.1, drop_path_schedule="linear", layer_scale=1.0)
    unip.set_fused_attention(backbone, trains_on_sdpa(device, amp))  # as train_seg.py fine-tunes it
    seg = unip.Segmenter(backbone, 21).to(device).train()
    opt = torch.optim.AdamW(unip.param_groups(seg, layer_decay=0.85), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    x = torch.randn(B, 3, crop, crop, device=device)
    y = torch.randint(0, 21, (B, crop, crop), device=device)
    y[:, :4] = 255  # some ignored pixels
    with autocast(device, amp):
        out, aux = seg(x)  # (B, K, S/4, S/4), (B, K, S/16, S/16)
    loss = unip.seg_loss(out, y) + 0.4 * unip.seg_loss(aux, y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    params = [(n, p) for n, p in seg.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None]
    finite = all(torch.isfinite(p.grad).all() for _, p in params if p.grad is not None)
    scaler.step(opt)
    scaler.update()
    ok = math.isfinite(loss.item()) and finite and not missing
    return ("PASS" if ok else "FAIL"), (f"loss {loss.item():.4f}, out {str(out.dtype)[6:]}; grads finite {finite}; "
                                        f"{len(params) - len(missing)}/{len(params)} weights with a gradient")


def numerics(cfg, device):
    """Every numerical check on the device: [{name, status, detail, seconds}]."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device.index or 0)  # plain 'cuda': GPU 0 (set_device wants an index)
    # references in true fp32: no TF32 here (the scripts turn it on; that is measured by bench)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    tiny = cfg.tiny
    # (dim, heads, B, N): ViT-S blocks (head_dim 64), the distilled last block with a ViT-B / ViT-L teacher's
    # heads (32, 24), and the 512 px fine-tuning length (1025 tokens)
    shapes = [(48, 3, 2, 17), (48, 4, 2, 17)] if tiny else [(384, 6, 4, 197), (384, 12, 4, 197), (384, 16, 4, 197),
                                                             (384, 6, 2, 1025)]
    checks = []
    for dim, heads, B, N in shapes:
        for amp in AMPS:
            for backend in _sdpa_backends():
                checks.append((f"sdpa {backend} {amp} N={N} head_dim={dim // heads}", check_sdpa,
                               (device, dim, heads, B, N, amp, backend, cfg.seed)))
    t_arch, t_layer, s_arch, img = ("vit_small", 6, "vit_tiny", 32) if tiny else ("vit_base", 9, "vit_small", 224)
    for amp in ("bf16", "fp16"):
        checks.append((f"attention_logits {amp} ({t_arch}@{t_layer})", check_logits,
                       (device, t_arch, img, t_layer, 2 if tiny else 8, amp, cfg.seed)))
        checks.append((f"distill_loss {amp}", check_distill_loss,
                       (device, 2, 3, 17, amp, cfg.seed) if tiny else (device, 8, 12, 197, amp, cfg.seed)))
    for amp in AMPS:
        checks.append((f"pretrain step {amp} ({s_arch} <- {t_arch}@{t_layer})", check_pretrain_step,
                       (device, t_arch, t_layer, s_arch, img, 2 if tiny else 16, amp, cfg.seed)))
        checks.append((f"seg step {amp} ({s_arch} {64 if tiny else 512}px)", check_seg_step,
                       (device, s_arch, 64 if tiny else 512, 2, amp, cfg.seed)))
    results = []
    for name, fn, args in checks:
        t = time.time()
        try:
            status, detail = fn(*args)
        except Exception as e:  # one check failing (an op without a kernel, OOM) must not stop the others
            status, detail = "FAIL", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            traceback.print_exc()
        results.append({"name": name, "status": status, "detail": detail, "seconds": round(time.time() - t, 2)})
        print(f"{status:4s}  {name:48s} {detail}", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    return results


def run_profile_part(cfg):
    """torch.profiler over a few pre-training steps of the --profile case (the fast path, as train_pretrain.py):
    where the time goes, op by op, in OUT/profile.txt (the top ops also printed)."""
    from torch.profiler import ProfilerActivity, profile
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device.index or 0)  # plain 'cuda': GPU 0 (set_device wants an index)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the scripts
    (student, teacher, layer), = pair_names(cfg.profile)
    amp = cfg.profile_amp if cfg.profile_amp != "auto" else unip.resolve_amp("auto", device)[0] if cuda else "none"
    amp = "fp32" if amp == "none" else amp  # this file's name for no autocast
    img, B = (32, 2) if cfg.tiny else (224, cfg.batch or 256)
    step = PretrainStep(device, teacher, layer, student, img, B, amp, cfg.seed)
    for _ in range(3):  # warm-up: allocator, cuBLAS / cuDNN workspaces, kernel choices
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    title = f"{student} <- {teacher}@{layer}, {amp}, batch {B} at {img} px: 3 steps, sorted by {key}"
    table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70)
    with open(os.path.join(cfg.out, "profile.txt"), "w") as f:
        f.write(title + "\n" + table + "\n")
    print(title + "\n" + "\n".join(table.splitlines()[:18]), flush=True)


def pair_names(pairs):
    """'vit_small=vit_large@18,...' -> [('vit_small', 'vit_large', 18), ...] (bench.py --pairs)."""
    return [(s, t, int(layer)) for s, t, layer in (re.fullmatch(r"(\w+)=(\w+)@(\d+)", p.strip()).groups()
                                                   for p in pairs.split(","))]


def run_numerics_part(cfg):
    device = torch.device(cfg.device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(capability=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 2**30, 1))
    print(json.dumps(info), flush=True)
    checks = numerics(cfg, device)
    with open(os.path.join(cfg.out, "numerics.json"), "w") as f:
        json.dump({**info, "checks": checks}, f, indent=1)


# -----------------------------------------------------------------------------
# the parent: each part a process with a time limit


class Runner:
    """Runs the parts' commands with logs in OUT and a shared deadline."""

    def __init__(self, cfg, env):
        self.cfg, self.env, self.deadline = cfg, env, time.time() + cfg.budget
        self.limit = None  # the current part's own deadline
        self.min_left = 5  # seconds: with less left a command is not started at all

    def __call__(self, cmd, log_name):
        """Run cmd (cwd: the repository) with stdout and stderr into OUT/log_name; -> (exit status, log text).
        On running out of time the whole process group (torchrun and its workers) is killed: status 'timeout'."""
        left = min(self.deadline, self.limit) - time.time()
        path = os.path.join(self.cfg.out, log_name)
        cmd = [str(c) for c in cmd]
        with open(path, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            start = log.tell()  # the text of this command only: the log may hold earlier ones
            if left < self.min_left:
                log.write("not run: out of time\n")
                return "timeout", "not run: out of time"
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own group: a timeout kills its children too
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = "timeout"
        with open(path, errors="replace") as f:
            f.seek(start)
            return rc, f.read()


def tail(text, n=25):
    lines = [line[-300:] for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return "\n".join("    | " + line for line in lines[-n:])


class PartFailed(Exception):
    pass


def expect(cond, msg):
    if not cond:
        raise PartFailed(msg)


def ran(result, what):
    rc, text = result
    expect(rc == 0, f"{what} " + ("ran out of time" if rc == "timeout" else f"exited with status {rc}") + ":\n" + tail(text))
    return text


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def weight_diff(a, b):
    """(bitwise equal, ||a - b|| over all tensors) of two state dicts with the same keys."""
    expect(set(a) == set(b), f"the checkpoints hold different keys: {sorted(set(a) ^ set(b))[:5]}")
    sq = sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in a if a[k].is_floating_point())
    return all(torch.equal(a[k], b[k]) for k in a), math.sqrt(sq)


def versions_of(cuda):
    """torch, CUDA, cuDNN, Python and the repository's commit: the head line of the report."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:  # no git on the machine
        commit = ""
    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "python": sys.version.split()[0],
            "commit": commit or None}


# torchrun with one process on this machine: the scripts' distributed path (RANK set), as a user launches them
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]

# Each part(cfg, run, state, work): run(...) its commands, check what they wrote (expect / PartFailed) and return
# (detail, checks or None); `work` holds the runs and their checkpoints. `state` carries what a later part or the
# report reads: the device name, the student checkpoint, the bench rows.


# ---------------------------------------------------------------- a: numerics on the device
def part_numerics(cfg, run, state, work):
    ran(run([sys.executable, "tools/gpu_check.py", "--part", "numerics", "--device", cfg.device, "--out", cfg.out,
             "--seed", cfg.seed] + (["--tiny"] if cfg.tiny else []), "numerics.log"), "gpu_check.py --part numerics")
    with open(os.path.join(cfg.out, "numerics.json")) as f:
        res = json.load(f)
    state["device_name"] = res["device"]
    for c in res["checks"]:
        print(f"  {c['status']:4s}  {c['name']:48s} {c['detail']}")
    n = {s: sum(c["status"] == s for c in res["checks"]) for s in ("PASS", "FAIL", "SKIP")}
    failed = [c["name"] for c in res["checks"] if c["status"] == "FAIL"]
    expect(not failed, f"{n['FAIL']} of {len(res['checks'])} checks failed: {'; '.join(failed[:8])}")
    ran_sdpa = [c for c in res["checks"] if c["name"].startswith("sdpa") and c["status"] == "PASS"]
    expect(ran_sdpa, "no SDPA kernel ran")
    return f"{len(res['checks'])} checks: {n['PASS']} passed, {n['SKIP']} skipped (a kernel refusing a case)", res["checks"]


# ---------------------------------------------------------------- b: torchrun pre-training, resume, seg, predict
def part_pretrain(cfg, run, state, work):
    """train_pretrain.py run through, and again stopped at 3/4 of the steps and continued with --resume auto:
    the two must end on the same weights."""
    tiny, cuda = cfg.tiny, cfg.device.startswith("cuda")
    steps = cfg.steps or (6 if tiny else 40)
    stop = steps * 3 // 4
    if tiny:
        pre = ["--teacher-arch", "vit_small", "--teacher-layer", "6", "--model", "vit_tiny", "--img-size", 32,
               "--synthetic-images", 32, "--batch-size", 4, "--workers", 0]
    else:  # 20 steps an epoch: step 30 is in the middle of the second epoch
        pre = ["--teacher-arch", "vit_base", "--teacher-layer", "9", "--model", "vit_small", "--img-size", 224,
               "--synthetic-images", 640, "--batch-size", 32, "--workers", 8]
    pre += ["--teacher", "random", "--accum-steps", 1, "--lr", 5e-4, "--epochs", 4, "--warmup-epochs", 1, "--log-every", 1 if tiny else 10,
            "--keep-every", 0, "--device", "cuda" if cuda else "cpu", "--seed", cfg.seed]
    full_dir, resumed_dir = os.path.join(work, "pretrain_full"), os.path.join(work, "pretrain_resumed")
    for d in (full_dir, resumed_dir):
        shutil.rmtree(d, ignore_errors=True)
    ran(run(TORCHRUN + ["train_pretrain.py", *pre, "--steps", steps, "--out", full_dir], "pretrain.log"),
        "the uninterrupted run")
    ran(run(TORCHRUN + ["train_pretrain.py", *pre, "--steps", stop, "--out", resumed_dir], "pretrain.log"),
        f"the run stopped at step {stop}")
    mid = unip.load_checkpoint(os.path.join(resumed_dir, "ckpt.pt"))
    expect(mid["step"] == stop, f"the stopped run saved step {mid['step']}, not {stop}")
    text = ran(run(TORCHRUN + ["train_pretrain.py", *pre, "--steps", steps, "--resume", "auto", "--out", resumed_dir],
                   "pretrain.log"), "the resumed run")
    expect(f"resumed from {os.path.join(resumed_dir, 'ckpt.pt')} at step {stop}" in text, "the resumed run did not say it resumed")
    a, b = (unip.load_checkpoint(os.path.join(d, "ckpt.pt")) for d in (full_dir, resumed_dir))
    expect(a["step"] == b["step"] == steps, f"final steps {a['step']}, {b['step']}, not {steps}")
    expect(a["config"]["teacher_layer"] == (6 if tiny else 9), "wrong teacher layer in the checkpoint")
    expect(all(torch.isfinite(v).all() for v in a["model"].values()), "non-finite weights")
    for name, d in (("pretrain_full", full_dir), ("pretrain_resumed", resumed_dir)):
        shutil.copyfile(os.path.join(d, "log.jsonl"), os.path.join(cfg.out, f"{name}.jsonl"))
    rows_a, rows_b = jsonl(os.path.join(full_dir, "log.jsonl")), jsonl(os.path.join(resumed_dir, "log.jsonl"))
    expect(all(math.isfinite(r["loss"]) for r in rows_a + rows_b), "a non-finite logged loss")
    bitwise, diff = weight_diff(a["model"], b["model"])
    _, update = weight_diff(b["model"], mid["model"])  # how far the last steps moved the weights
    # The CPU is deterministic: bit for bit. CUDA's fused attention backward accumulates in a varying order
    # (atomics), so there the two runs may differ by float noise: required below 1% of the last steps' update.
    expect(bitwise or (cuda and diff <= 1e-2 * update),
           f"resumed weights differ from the uninterrupted run's: ||diff|| {diff:.3e} (update of the last "
           f"{steps - stop} steps {update:.3e})")
    last = {r["step"]: r for r in rows_a}[steps], {r["step"]: r for r in rows_b}[steps]
    speed = [r["img_per_s"] for r in rows_a if r["step"] > (1 if tiny else 10)]
    return (f"{steps} steps, stopped at {stop} and resumed: weights " + ("bit for bit equal" if bitwise else
            f"||diff|| {diff:.2e} = {diff / update:.1e} x the last {steps - stop} steps' update")
            + f"; loss {rows_a[0]['loss']:.4f} -> {last[0]['loss']:.4f} (resumed run {last[1]['loss']:.4f}); "
            f"{np.median(speed):.0f} img/s"
            + (f", {rows_a[-1]['mem_gb']} GB" if cuda else "")), None


def part_seg(cfg, run, state, work):
    """train_seg.py from the pre-trained student (when that part wrote it): two evaluations, checkpoints, and
    SyncBatchNorm exactly on CUDA."""
    tiny, cuda = cfg.tiny, cfg.device.startswith("cuda")
    seg_steps = cfg.seg_steps or (4 if tiny else 40)
    seg_dir = os.path.join(work, "seg")
    shutil.rmtree(seg_dir, ignore_errors=True)
    init = ["--init", state["student"]] if os.path.exists(state["student"]) else []
    size = (["--model", "vit_tiny", "--crop", 64, "--batch-size", 2, "--eval-images", 1, "--workers", 0] if tiny else
            ["--model", "vit_small", "--crop", 512, "--batch-size", 8, "--eval-images", 8, "--workers", 8])
    text = ran(run(TORCHRUN + ["train_seg.py", "--dataset", "synthetic", *size, *init, "--iters", seg_steps,
                               "--warmup", max(1, seg_steps // 10), "--eval-every", seg_steps // 2,
                               "--log-every", 1 if tiny else 10, "--device", "cuda" if cuda else "cpu",
                               "--seed", cfg.seed, "--out", seg_dir], "seg.log"), "train_seg.py")
    ck = unip.load_checkpoint(os.path.join(seg_dir, "ckpt.pt"))
    expect(ck["step"] == seg_steps and "segmenter" in ck, f"ckpt.pt at step {ck['step']}, not {seg_steps}")
    expect(os.path.exists(os.path.join(seg_dir, "best.pt")), "no best.pt")
    rows = jsonl(os.path.join(seg_dir, "log.jsonl"))
    shutil.copyfile(os.path.join(seg_dir, "log.jsonl"), os.path.join(cfg.out, "seg.jsonl"))
    evals = [r for r in rows if "miou" in r]
    expect(len(evals) == 2 and all(math.isfinite(r["miou"]) for r in evals), f"{len(evals)} evaluations, not 2")
    losses = [r["loss"] for r in rows if "loss" in r]
    expect(losses and all(math.isfinite(v) for v in losses), "a non-finite logged loss")
    sync = "SyncBatchNorm" in text
    expect(sync == cuda, "SyncBatchNorm " + ("missing under torchrun on CUDA" if cuda else "on a CPU"))
    speed = [r["img_per_s"] for r in rows if "img_per_s" in r][1:] or [0]
    return (f"{seg_steps} iterations" + (" from the pre-trained student" if init else " (no pre-trained student)")
            + f", SyncBatchNorm {'on' if sync else 'off (CPU)'}, mIoU {evals[0]['miou']:.1f} -> {evals[-1]['miou']:.1f}, "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {np.median(speed):.1f} img/s"), None


def part_predict(cfg, run, state, work):
    """predict.py with the seg part's best.pt on two synthetic frames: masks and overlays of the frames' size."""
    best = os.path.join(work, "seg", "best.pt")
    expect(os.path.exists(best), "no train_seg.py checkpoint (the seg part failed)")
    frames, pred_dir = os.path.join(work, "frames"), os.path.join(work, "predict")
    os.makedirs(frames, exist_ok=True)
    shapes = {}
    val = data.SyntheticThermal("val", num_images=2, seed=cfg.seed + 1)
    for i in range(2):
        img, _ = val.load(i)  # (H, W) uint8
        Image.fromarray(img).save(os.path.join(frames, f"frame{i}.png"))
        shapes[f"frame{i}.png"] = img.shape
    ran(run([sys.executable, "predict.py", "--checkpoint", best, "--images", frames, "--out", pred_dir,
             "--device", cfg.device], "predict.log"), "predict.py")
    K = len(unip.load_checkpoint(best)["classes"])
    for name, shape in shapes.items():
        mask = np.array(Image.open(os.path.join(pred_dir, "masks", name)))
        expect(mask.shape == shape and mask.max() < K, f"mask {name}: shape {mask.shape}, max {mask.max()}")
        expect(os.path.exists(os.path.join(pred_dir, "overlays", name)), f"no overlay for {name}")
    return f"{len(shapes)} frames -> masks and overlays of the frames' size, {K} classes", None


# ---------------------------------------------------------------- c: bench.py
def run_bench(cfg, run, state, extra, log, json_name, expect_paths):
    """Run bench.py; on an out-of-memory error, again with half the batch. -> rows."""
    bench_args = ["--device", cfg.device]
    if cfg.tiny:
        bench_args += ["--quick", "--threads", 1, "--img", 32, "--reps", 1, "--warmup", 1]
    batch = cfg.batch
    while True:
        path = os.path.join(cfg.out, json_name)
        rc, text = run([sys.executable, "tools/bench.py", *bench_args, *extra, "--json", path] + (["--batch", batch] if batch else []), log)
        oom = rc != 0 and ("OutOfMemoryError" in text or "out of memory" in text)
        if not oom or (batch or 256) <= 16:
            break
        batch = (batch or 256) // 2
        print(f"  bench.py: out of memory, again with --batch {batch}", flush=True)
    ran((rc, text), "bench.py")
    with open(path) as f:
        res = json.load(f)
    state["bench_device"] = res["device"]
    rows = res["rows"]
    expect(rows and all(r["img_per_s"] > 0 and math.isfinite(r["img_per_s"]) for r in rows), "no or bad rows")
    for section, case, path_ in expect_paths:
        expect(any(r["section"] == section and case in r["case"] and r["path"] == path_ for r in rows),
               f"no {section} {case} {path_} row")
    if cfg.device.startswith("cuda"):
        expect(all(r["mfu_pct"] for r in rows if r["section"] == "pretrain"), "no MFU (unknown peak: --peak-tflops)")
    return rows


def part_bench(cfg, run, state, work):
    want = [("pretrain", f"{s} <- {t}@{layer}", p) for s, t, layer in pair_names(cfg.pairs) for p in ("fast", "naive")] + \
           [("seg", "LL-FPN", "fast"), ("slide", "window", "fast")]
    rows = run_bench(cfg, run, state, ["--only", "pretrain,seg,slide", "--pairs", cfg.pairs, "--amp", cfg.amp],
                     "bench.log", "bench.json", want)
    state["bench_rows"] = rows
    big = max((r for r in rows if r["section"] == "pretrain"), key=lambda r: r["batch"])
    return f"{len(rows)} rows, pre-training batch {big['batch']}", None


def part_compile(cfg, run, state, work):
    # one bench.py process per case: running out of time costs only the cases not yet done
    rows, gains = [], []
    eager = {(r["section"], r["case"], r["path"], r["amp"]): r for r in state.get("bench_rows", [])}
    state["compile_rows"] = rows
    backend = cfg.compile_backend or ("eager" if cfg.tiny else "inductor")
    sections, pairs = cfg.compile_only.split(","), [p for p in cfg.compile_pairs.split(",") if p]
    cases = [(p, "pretrain") for p in pairs] if "pretrain" in sections else []
    rest = [x for x in sections if x != "pretrain"]
    if rest:  # the other sections in one more process (they need no pair; bench.py parses one anyway)
        cases.append((pairs[0] if pairs else "vit_small=vit_base@9", ",".join(rest)))
    for i, (pair, only) in enumerate(cases):
        (s_, t_, layer), = pair_names(pair)
        want = [("pretrain", f"{s_} <- {t_}@{layer}", "fast")] if only == "pretrain" else []
        new = run_bench(cfg, run, state, ["--only", only, "--pairs", pair, "--amp", cfg.compile_amp, "--compile",
                                          "--compile-backend", backend], "bench_compile.log", f"bench_compile{i + 1}.json", want)
        for r in new:
            r["compiled"] = r["path"] == "fast"  # bench.py compiles the fast path; naive stays eager
            base = eager.get((r["section"], r["case"], r["path"], r["amp"]))
            if r["compiled"] and base:
                r["x_eager"] = r["img_per_s"] / base["img_per_s"]
                gains.append(f"{r['case']} {r['amp']} x{r['x_eager']:.2f}")
        rows += new
    return f"{backend}, compiled vs eager: " + (", ".join(gains) if gains else "no eager rows to compare"), None


def part_profile(cfg, run, state, work):
    text = ran(run([sys.executable, "tools/gpu_check.py", "--part", "profile", "--device", cfg.device, "--out", cfg.out,
                    "--profile", cfg.profile, "--profile-amp", cfg.profile_amp, "--batch", cfg.batch,
                    "--seed", cfg.seed] + (["--tiny"] if cfg.tiny else []), "profile.log"), "gpu_check.py --part profile")
    path = os.path.join(cfg.out, "profile.txt")
    expect(os.path.exists(path), "no profile.txt")
    print("\n".join("  " + line for line in text.splitlines()[-18:]))
    return f"{cfg.profile}: the top ops in profile.txt", None


PARTS = {"numerics": part_numerics, "pretrain": part_pretrain, "seg": part_seg, "predict": part_predict,
         "bench": part_bench, "profile": part_profile, "compile": part_compile}


def run_part(name, part, cfg, run, state, work):
    """One part under its time limit: -> its row {name, status, seconds, detail[, checks]}. A failure is
    reported in the row, never raised: the next part still runs."""
    t = time.time()
    run.limit = t + PART_LIMITS[name]
    print(f"\n== {name} (limit {min(PART_LIMITS[name], max(0, run.deadline - t)):.0f} s)", flush=True)
    checks = None
    try:
        detail, checks = part(cfg, run, state, work)
        status = "PASS"
    except PartFailed as e:
        status, detail = "FAIL", str(e)
    except Exception as e:  # a bug of this script or a file the run did not write: reported, the rest runs
        status, detail = "FAIL", f"{type(e).__name__}: {e}\n" + tail(traceback.format_exc(), 8)
    row = {"name": name, "status": status, "seconds": round(time.time() - t, 1), "detail": detail,
           **({"checks": checks} if checks else {})}
    print(f"{status:4s}  {name} ({row['seconds']:.0f} s): {detail}", flush=True)
    return row


# ---------------------------------------------------------------- report
def write_report(cfg, parts, state, versions, elapsed):
    """The header line, the summary and bench tables (printed and in summary.md) and gpu_check.json. -> every
    part passed."""
    device_name = state["device_name"] or state.get("bench_device") or cfg.device
    bench_rows = state.get("bench_rows", []) + state.get("compile_rows", [])
    ok = all(p["status"] == "PASS" for p in parts)
    summary = summary_table(parts) + "\n\n" + (bench_table(bench_rows) if bench_rows else "(no bench rows)")
    header = (f"gpu_check on {device_name} | torch {versions['torch']} | CUDA {versions['cuda']} | cuDNN {versions['cudnn']} | "
              f"commit {versions['commit']} | {elapsed:.0f} s | {'ALL PASSED' if ok else 'FAILED: ' + ', '.join(p['name'] for p in parts if p['status'] != 'PASS')}")
    print("\n" + header + "\n\n" + summary, flush=True)
    with open(os.path.join(cfg.out, "summary.md"), "w") as f:
        f.write(header + "\n\n" + summary + "\n")
    with open(os.path.join(cfg.out, "gpu_check.json"), "w") as f:
        json.dump({"ok": ok, "device": device_name, **versions, "elapsed_s": round(elapsed, 1), "config": asdict(cfg),
                   "parts": parts, "bench": bench_rows}, f, indent=1)
    print(f"\nwrote {os.path.join(cfg.out, 'gpu_check.json')} and summary.md; logs in {cfg.out}", flush=True)
    return ok


def main(argv=None):
    cfg = parse_config(argv)
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.part in ("numerics", "profile"):
        return run_numerics_part(cfg) if cfg.part == "numerics" else run_profile_part(cfg)
    if cfg.part:
        raise SystemExit(f"--part {cfg.part!r}: numerics or profile")

    t_start = time.time()
    cuda = cfg.device.startswith("cuda")
    work = cfg.work or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "10"}
    if not cuda:
        env["OMP_NUM_THREADS"] = "1"  # several processes on few cores: no OpenMP spin-waiting
    run = Runner(cfg, env)
    versions = versions_of(cuda)
    print(f"gpu_check | device {cfg.device}{' (tiny)' if cfg.tiny else ''} | " + " | ".join(f"{k} {v}" for k, v in versions.items())
          + f" | budget {cfg.budget:.0f} s | out {cfg.out} | work {work}", flush=True)
    print(json.dumps(asdict(cfg)), flush=True)

    # ---------------------------------------------------------------- the parts, in --parts order
    # the seg part starts from the pre-training part's student when that part wrote it
    state = {"device_name": None, "student": os.path.join(work, "pretrain_full", "ckpt.pt")}
    parts = [run_part(name, PARTS[name], cfg, run, state, work) for name in cfg.parts.split(",")]

    # ---------------------------------------------------------------- report
    ok = write_report(cfg, parts, state, versions, time.time() - t_start)
    if not cfg.work:
        shutil.rmtree(work, ignore_errors=True)
    return ok


def summary_table(parts):
    lines = ["| part | status | s | result |", "|---|---|---|---|"]
    lines += [f"| {p['name']} | {p['status']} | {p['seconds']:.0f} | {p['detail'].splitlines()[0][:200]} |" for p in parts]
    return "\n".join(lines)


def bench_table(rows):
    cols = [("section", "section"), ("case", "case"), ("path", "path"), ("amp", "amp"), ("compiled", "compile"),
            ("batch", "batch"), ("img_per_s", "img/s"), ("ms_per_step", "ms/step"), ("mem_gb", "peak GB"),
            ("mfu_pct", "MFU %"), ("speedup", "fast/naive"), ("vs_fp32", "x fp32"), ("x_eager", "x eager")]
    fmt = lambda v: "" if v is None else ("yes" if v else "") if isinstance(v, bool) else \
        f"{v:.3g}" if isinstance(v, float) and abs(v) < 100 else f"{v:.0f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(c for _, c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(0 if plumbing.run(main) in (True, None) else 1)  # 0 only when every part passed
