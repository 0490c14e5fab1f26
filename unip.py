"""
UNIP in one file: the model side of

    Tao Zhang, Jinyong Wen, Zhen Chen, Kun Ding, Shiming Xiang, Chunhong Pan.
    "UNIP: Rethinking Pre-trained Attention Patterns for Infrared Semantic
    Segmentation." ICLR 2025. arXiv:2502.02257

A large pre-trained ViT (the teacher) shows three attention patterns per head:
local, hybrid and global. The hybrid pattern matters most for infrared
segmentation. UNIP measures the pattern of every head with the normalised
mutual information (NMI) between query and key positions, picks the teacher
layer whose mean NMI is closest to 0.09 (a hybrid layer), and distils that
layer's attention logits into the last layer of a small ViT (NMI-HAD). The
student is then fine-tuned with a pyramid built from its last layer (LL-FPN)
and an UperNet head.

Contents, in reading order. The method:
  1. helpers            sin-cos position embedding, resampling (POS_INTERP), centre padding,
                        stochastic depth
  2. Attention, MLP, Block
  3. ViT                standard key names; layer scale and register tokens (DINOv2);
                        QuickGELU, a LayerNorm before the blocks, no patch bias (CLIP);
                        attention_logits / attention_maps / features
  4. NMI analysis       nmi, classify_heads, layer_choice / choose_layer, layer_nmi
  5. NMI-HAD            distill_loss (UNIP §3.2); the teacher's view of the student's crop
  6. segmentation       LL-FPN, UperNet, FCN auxiliary head, linear probes, layer-wise lr decay
  7. size presets       vit_tiny, vit_small, vit_base, vit_large (+ vit_micro for CPU demos),
                        dinov2_vits14 / vitb14 / vitl14 (+ _reg4), clip_vitb16
Then what a copier needs around it:
  8. checkpoints        load_checkpoint, save_checkpoint, load_pretrained (MAE, DINO, iBOT, DeiT,
                        DINOv2, CLIP, UNIP), load_segmenter (a train_seg.py checkpoint -> a model)
  9. training helpers   precision (resolve_amp, autocast_weights_), SDPA or explicit attention,
                        AttentionLogits (the module DDP and torch.compile wrap)
 10. inference          sliding-window inference, mIoU

Shapes: B batch, N tokens (1 + h*w, CLS first; register tokens, if any, sit after CLS inside
the blocks but never in an output), D width, H heads, h/w patch grid.
Importing this module only defines things.
"""

import argparse
import contextlib
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# 1. helpers


def sincos_pos_embed(dim, grid_h, grid_w=None):
    """Fixed 2-D sin-cos position embedding with a zero CLS row: (1 + h*w, dim).

    Same construction as MAE (and the UNIP students): the first half of the
    channels encodes the column index, the second half the row index, each as
    [sin | cos] over dim/4 frequencies. Tokens are in row-major order.
    Computed in float64 like MAE's numpy code, then cast.
    """
    grid_w = grid_h if grid_w is None else grid_w
    assert dim % 4 == 0, "sin-cos position embedding needs dim divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def embed_1d(pos):  # (h*w,) -> (h*w, D/2)
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([embed_1d(cols), embed_1d(rows)], dim=1)  # (h*w, D)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb]).float()


# How a position table is resampled to another token grid (ViT's `pos_interp`):
#   'size'        bicubic to the grid's size, align_corners False, no antialias (MAE, mmseg, timm); the table
#                 is resampled once at load to the model's grid (load_pretrained) and again only if an
#                 input's grid differs.
#   'dinov2'      DINOv2's interpolate_pos_encoding (interpolate_offset 0.1, no antialias): bicubic with
#                 scale_factor (g + 0.1) / M from the M x M table as trained, at every forward.
#   'dinov2_reg4' the hub's '_reg4' models (interpolate_offset 0, interpolate_antialias True): bicubic to
#                 the grid's size with antialias, from the table as trained, at every forward.
# The two DINOv2 settings give other numbers than 'size' (on the 37x37 ViT-S table to 16x16: about 9% mean
# relative difference per position for 'dinov2', 19-23% for 'dinov2_reg4'), so each preset carries its own.
POS_INTERP = ("size", "dinov2", "dinov2_reg4")


def resample_pos_embed(pos_embed, grid, num_prefix=1, mode="size"):
    """Resample the patch part of a (1, prefix + g*g, D) position embedding to
    `grid` = (h, w) by `mode` (see POS_INTERP), in float32 as DINOv2 does;
    prefix rows (CLS) are kept as they are. 'size' returns the table itself
    when the grid matches; the DINOv2 modes always resample (their forward
    skips the call when the grid matches and the input is square)."""
    if mode not in POS_INTERP:
        raise ValueError(f"pos_interp must be one of {', '.join(POS_INTERP)}, got {mode!r}")
    prefix, patch = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = int(math.isqrt(patch.shape[1]))
    if old * old != patch.shape[1]:
        raise ValueError(f"pos_embed has {patch.shape[1]} patch rows: not a square grid")
    grid = tuple(grid)
    if mode == "size" and (old, old) == grid:
        return pos_embed
    dim = patch.shape[-1]
    patch = patch.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    if mode == "dinov2":  # the scale factor, not the size, sets the sampling positions: (g + 0.1) / M
        scale = ((grid[0] + 0.1) / old, (grid[1] + 0.1) / old)
        patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", align_corners=False)
        if tuple(patch.shape[-2:]) != grid:  # floor(M * (g + 0.1) / M) = g; DINOv2 asserts the same
            raise RuntimeError(f"pos_embed resampled to {tuple(patch.shape[-2:])}, expected {grid}")
    else:
        patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False, antialias=mode == "dinov2_reg4")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, patch], dim=1)


def center_pad(x, multiple, value=0):
    """Pad the last two sides of `x` to multiples of `multiple`, the extra split evenly (the odd pixel at
    the end), as DINOv2's CenterPadding does; images get 0 (the mean after normalisation), labels the
    ignore value. Returns (padded, (top, left)) so that outputs can be cropped back."""
    H, W = x.shape[-2:]
    ph, pw = -H % multiple, -W % multiple
    if not (ph or pw):
        return x, (0, 0)
    top, left = ph // 2, pw // 2
    return F.pad(x, (left, pw - left, top, ph - top), value=value), (top, left)


def patch_multiple(size, patch, what):
    """`size` itself when it is a multiple of `patch`; else a ValueError naming the nearest valid sizes:
    a side that is not a multiple loses its last pixels (the patch grid is floored)."""
    if size % patch == 0:
        return size
    lo, hi = size // patch * patch, (size // patch + 1) * patch
    near = [s for s in sorted((lo, hi), key=lambda s: (abs(s - size), s)) if s > 0]
    raise ValueError(f"{what} {size} is not a multiple of the patch size {patch}: pixels {lo}-{size - 1} would "
                     f"never reach the model; use {' or '.join(map(str, near))}")


def fp32(device_type):
    """A context with autocast off (for the few ops that need full precision), on any device."""
    available = torch.amp.is_autocast_available(device_type)
    return torch.autocast(device_type, enabled=False) if available else contextlib.nullcontext()


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch per sample."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


# -----------------------------------------------------------------------------
# 2. Attention, MLP, Block


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (standard keys
    `qkv`, `proj`). `forward` uses SDPA (`fused`, on by default) or the same
    softmax(q·kᵀ)·v written out (a switch, as timm's `fused_attn`; the tests
    hold one against the other); forward_with_attention and logits give the
    map (post- or pre-softmax), with q·kᵀ computed once."""

    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5  # uses *this* block's head_dim (16 heads on ViT-S -> 24)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fused = True  # SDPA: flash / memory-efficient kernels, no (B, H, N, N) map kept for the backward

    def _split(self, x, parts):  # (B, N, parts*D) -> parts x (B, H, N, hd)
        B, N, _ = x.shape
        return x.view(B, N, parts, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x):  # (B, N, D) -> (B, N, D)
        q, k, v = self._split(self.qkv(x), 3)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        else:  # the scale on q: (B, H, N, hd) multiplies instead of (B, H, N, N)
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).flatten(2))

    def forward_with_attention(self, x):  # (B, N, D) -> (B, N, D), post-softmax map (B, H, N, N)
        q, k, v = self._split(self.qkv(x), 3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).flatten(2)), attn

    def logits(self, x):  # (B, N, D) -> (B, H, N, N), always fp32
        # Only the q and k rows of qkv: distillation never needs v or proj. In fp32 even under
        # autocast: the KL over N keys needs small logit differences that bf16 (8-bit mantissa) rounds
        # away; it is one projection and one matmul per model, and TF32 keeps it fast on GPUs.
        D = self.heads * self.head_dim
        bias = None if self.qkv.bias is None else self.qkv.bias[: 2 * D].float()
        with fp32(x.device.type):
            q, k = self._split(F.linear(x.float(), self.qkv.weight[: 2 * D].float(), bias), 2)
            return (q * self.scale) @ k.transpose(-2, -1)  # the scale on q: N x hd multiplies, not N x N


def quick_gelu(x):
    """CLIP's activation: x * sigmoid(1.702 x), a sigmoid fit of GELU (OpenAI CLIP, Radford et al. 2021)."""
    return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    def __init__(self, dim, hidden, act=F.gelu):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = act  # exact (erf) GELU, as in MAE/DINO; quick_gelu for CLIP

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block. `layer_scale` > 0 adds per-channel residual
    scales `gamma_1`, `gamma_2` (BEiT/MAE fine-tuning); off by default."""

    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0, layer_scale=0.0, norm_eps=1e-6, act=F.gelu):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)
        self.drop_path = drop_path
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale else None
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale else None

    def _residual(self, x, y, gamma):
        y = y if gamma is None else gamma * y
        return x + drop_path(y, self.drop_path, self.training)

    def forward(self, x):  # (B, N, D) -> (B, N, D)
        x = self._residual(x, self.attn(self.norm1(x)), self.gamma_1)
        return self._residual(x, self.mlp(self.norm2(x)), self.gamma_2)

    def forward_with_attention(self, x):  # (B, N, D) -> (B, N, D), (B, H, N, N)
        y, attn = self.attn.forward_with_attention(self.norm1(x))
        x = self._residual(x, y, self.gamma_1)
        return self._residual(x, self.mlp(self.norm2(x)), self.gamma_2), attn


# -----------------------------------------------------------------------------
# 3. ViT


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, dim, bias=True):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):  # (B, C, H, W) -> (B, D, h, w); sides are floored to the patch grid
        return self.proj(x)


class ViT(nn.Module):
    """Plain ViT with the standard state-dict keys (`patch_embed.proj`,
    `cls_token`, `pos_embed`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,
    mlp.fc1,mlp.fc2}`, `norm`), so MAE / DINO / iBOT / DeiT / UNIP weights load.

    last_heads: head count of the last block. UNIP builds the student's last
        block with the teacher's head count so its logits match the teacher's
        shape; the parameter shapes do not change.
    drop_path_schedule: 'uniform' (UNIP pre-training: the same rate in every
        block) or 'linear' (fine-tuning: rising from 0 to `drop_path`).
    layer_scale: > 0 adds per-channel residual scales with this init value
        (DINOv2 teachers; the reference's fine-tuning uses 1.0).
    num_registers: R extra learned tokens after CLS (`register_tokens`,
        DINOv2 "_reg4" models) that take part in attention in every block.
        They have no position embedding and never reach an output: logits,
        maps and features cover CLS + patches only.
    pos_interp: how `pos_embed` meets another token grid (POS_INTERP):
        'size' (MAE, DINO, iBOT, the students) or DINOv2's own settings,
        'dinov2' / 'dinov2_reg4', which keep the table as trained (of any
        grid: loading adopts the checkpoint's) and resample it at every forward.
    pretrained_layer_scale: the layer-scale factors belong to the pre-trained
        weights (DINOv2): load_pretrained refuses a checkpoint without them.
        False: they may be new (layer scale added at fine-tuning keeps its init).
    act, norm_eps: the MLP's activation and the LayerNorms' eps (CLIP:
        quick_gelu, 1e-5).
    pre_norm: a LayerNorm (`norm_pre`) over the tokens before the first
        block (CLIP's ln_pre, timm's key).
    patch_bias: a bias in the patch projection (CLIP's conv1 has none).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, dim=768, depth=12, heads=12,
                 last_heads=None, mlp_ratio=4.0, drop_path=0.0, drop_path_schedule="uniform",
                 layer_scale=0.0, num_registers=0, pos_interp="size", pretrained_layer_scale=False,
                 act=F.gelu, norm_eps=1e-6, pre_norm=False, patch_bias=True):
        super().__init__()
        if pos_interp not in POS_INTERP:
            raise ValueError(f"pos_interp must be one of {', '.join(POS_INTERP)}, got {pos_interp!r}")
        self.patch_size, self.dim, self.depth, self.heads = patch_size, dim, depth, heads
        self.last_heads = last_heads or heads
        self.num_registers = num_registers
        self.pos_interp, self.pretrained_layer_scale = pos_interp, pretrained_layer_scale
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim, patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, dim)) if num_registers else None
        # Fixed (frozen) sin-cos embedding, stored as a parameter like MAE so the key exists.
        self.pos_embed = nn.Parameter(sincos_pos_embed(dim, grid)[None], requires_grad=False)
        self.norm_pre = nn.LayerNorm(dim, eps=norm_eps) if pre_norm else nn.Identity()
        if drop_path_schedule == "uniform":
            rates = [drop_path] * depth
        elif drop_path_schedule == "linear":
            rates = torch.linspace(0, drop_path, depth).tolist()
        else:
            raise ValueError(f"drop_path_schedule must be 'uniform' or 'linear', got {drop_path_schedule!r}")
        self.blocks = nn.ModuleList(
            Block(dim, self.last_heads if i == depth - 1 else heads, mlp_ratio, rates[i], layer_scale, norm_eps, act)
            for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.init_weights()

    def init_weights(self):
        # MAE initialisation: xavier for linears and the patch projection (seen as a linear).
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)  # DINOv2's init
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def grid(self, x):  # patch grid (h, w) of an image batch
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def prepare_tokens(self, x):  # (B, C, H, W) -> (B, 1 + R + h*w, D)
        grid, square = self.grid(x), x.shape[-2] == x.shape[-1]
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, h*w, D)
        pos = self.pos_embed
        # 'size': a no-op when the grid matches. DINOv2 uses its table as it is only for a square input on the
        # table's own grid, and otherwise resamples it from scratch at every forward.
        if self.pos_interp == "size" or not (square and grid == (math.isqrt(pos.shape[1] - 1),) * 2):
            pos = resample_pos_embed(pos, grid, mode=self.pos_interp)
        prefix = [(self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)]
        if self.register_tokens is not None:  # after CLS, no position (as DINOv2 does)
            prefix.append(self.register_tokens.expand(x.shape[0], -1, -1))
        return self.norm_pre(torch.cat(prefix + [x + pos[:, 1:]], dim=1))  # norm_pre: identity but for CLIP

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A DINOv2 model keeps the position table it was trained with, of whatever grid, and resamples it at
        # every forward: it takes a checkpoint's table at the checkpoint's shape (never resampled at load).
        pe = state_dict.get(prefix + "pos_embed")
        if (self.pos_interp != "size" and pe is not None and pe.shape != self.pos_embed.shape
                and pe.ndim == 3 and pe.shape[-1] == self.dim):
            self.pos_embed = nn.Parameter(self.pos_embed.new_empty(pe.shape), requires_grad=self.pos_embed.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _drop_registers(self, x, dim=1):  # token axis `dim`: 1 + R + h*w -> 1 + h*w (CLS and patches)
        R = self.num_registers
        return x if not R else torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 1 + R, x.shape[dim] - 1 - R)], dim)

    def forward(self, x):  # (B, C, H, W) -> (B, N, D), after the final norm
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def _check_layers(self, layers):
        for layer in layers:
            if not 1 <= layer <= len(self.blocks):
                raise ValueError(f"layer {layer} is out of range: this ViT has layers 1..{len(self.blocks)}")

    def attention_logits(self, x, layer):
        """Pre-softmax scaled logits q·kᵀ/sqrt(head_dim) of block `layer`
        (counted from 1, as the paper does): (B, H, N, N) with N = 1 + h*w,
        CLS included, register tokens left out (their rows and columns are
        never computed, so a softmax over these logits renormalises over CLS
        and patches). Runs blocks 1..layer-1, then only norm1 and q/k."""
        self._check_layers([layer])
        x = self.prepare_tokens(x)
        for blk in self.blocks[: layer - 1]:
            x = blk(x)
        blk = self.blocks[layer - 1]
        return blk.attn.logits(self._drop_registers(blk.norm1(x)))

    def attention_maps(self, x, layers=None, reduce=None):
        """Post-softmax attention of several layers (1-based) in one pass:
        {layer: (B, H, N, N)}. `reduce`, if given, is applied to each map as
        soon as it exists (e.g. `nmi`) so only its result is kept; the pass
        stops after the deepest layer asked for. Register tokens are left out
        (rows and columns dropped, rows renormalised): N = 1 + h*w."""
        layers = list(range(1, len(self.blocks) + 1)) if layers is None else sorted(set(layers))
        self._check_layers(layers)
        out = {}
        x = self.prepare_tokens(x)
        for i, blk in enumerate(self.blocks[: layers[-1]], start=1):
            if i in layers:
                if i == layers[-1]:  # the last one needed: no need to finish the block
                    probs = blk.attn.logits(self._drop_registers(blk.norm1(x))).softmax(dim=-1)
                else:
                    x, probs = blk.forward_with_attention(x)
                    if self.num_registers:  # (B, H, N, N) over CLS + patches, rows summing to 1 again
                        probs = self._drop_registers(self._drop_registers(probs, 2), 3)
                        probs = probs / probs.sum(-1, keepdim=True)
                out[i] = probs if reduce is None else reduce(probs)
            else:
                x = blk(x)
        return out

    def features(self, x, layers):
        """Outputs of blocks `layers` (1-based), patch tokens only, no norm,
        as maps (B, D, h, w); stops after the deepest one asked for."""
        self._check_layers(layers)
        h, w = self.grid(x)
        x = self.prepare_tokens(x)
        out = {}
        for i, blk in enumerate(self.blocks[: max(layers)], start=1):
            x = blk(x)
            if i in layers:
                out[i] = x[:, 1 + self.num_registers:].transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return [out[i] for i in layers]


# -----------------------------------------------------------------------------
# 4. NMI analysis (UNIP §3.1; the formula of Park et al., ICLR 2023)


# For one head, read the post-softmax map A (L x L) as a joint distribution of
# query and key positions: p(q, k) = A[q, k] / L, so p(q) = 1/L and
# p(k) = mean_q A[q, k].  Then
#     I(Q;K) = sum p(q,k) log(p(q,k) / (p(q) p(k))) = H(K) - mean_q H(A[q, :])
#     NMI    = I(Q;K) / sqrt(H(Q) H(K)),  H(Q) = log L.
# Identity attention -> 1 (local); identical rows (incl. uniform) -> 0 (global).
# CLS: by default its row and column are dropped and the rows renormalised, as
# Park et al. do, so the measure is about spatial positions only.

PATTERN_THRESHOLDS = (0.06, 0.12)  # global < 0.06 <= hybrid <= 0.12 < local; the project's choice


def _entropy(p, dim=-1):  # sum -p log p, with 0 log 0 = 0
    return -torch.special.xlogy(p, p).sum(dim)


def nmi(attn, drop_cls=True, eps=1e-8):
    """NMI between query and key positions of post-softmax maps (B, H, N, N) -> (B, H)."""
    a = attn.float()
    if drop_cls:
        a = a[..., 1:, 1:]
        a = a / (a.sum(-1, keepdim=True) + eps)
    L = a.shape[-1]
    p_k = a.mean(-2)  # (B, H, L): key marginal
    h_k = _entropy(p_k)  # H(K)
    mi = h_k - _entropy(a).mean(-1)  # H(K) - H(K|Q)
    out = mi / torch.sqrt(math.log(L) * h_k).clamp_min(eps)
    return out.clamp(0.0, 1.0)  # float error can leave tiny negatives; all mass on one key gives 0/0 -> 0


def classify_heads(nmi_values, thresholds=PATTERN_THRESHOLDS):
    """Pattern of each head from its (mean) NMI: 'global' / 'hybrid' / 'local'."""
    low, high = thresholds
    vals = nmi_values.tolist() if torch.is_tensor(nmi_values) else list(nmi_values)
    return ["global" if v < low else "local" if v > high else "hybrid" for v in vals]


LAYER_RULES = ("after-peak", "closest")


def layer_choice(layer_means, target=0.09, rule="after-peak", band=PATTERN_THRESHOLDS):
    """UNIP's rule for the teacher layer to distil: the layer whose mean NMI is
    closest to `target` (0.09), searched among
      'closest':    every layer (the rule as the paper states it);
      'after-peak': the layers after the NMI peak of the early local phase,
                    the highest layer mean in the first half of the depth
                    (layers 1..ceil(L/2); the first such layer on a tie).
    Why 'after-peak' is the default: in the paper's teachers NMI falls with
    depth once the early local layers are past, and the hybrid layers it
    distils (MAE-L 18, iBOT-L 21, DINO-B 9) come after that local phase. A
    model can also start with low-NMI layers *before* it turns local (DINOv2-S
    layer 1: 0.10, then 0.44 at layer 2); such a layer is not hybrid in the
    paper's sense, and 'closest' would pick it. Why the peak is looked for in
    the first half only: the local phase of pre-trained ViTs is early, and some
    models turn local again in their last layers (NMI 0.30, 0.50, 0.40, 0.20,
    0.09, 0.06, 0.30, 0.55, 0.40); the highest layer of the whole depth would
    then be one of those, and the hybrid layer in the middle (layer 5, 0.09)
    would lie before it, out of the search. A one-layer model falls back to
    'closest'.
    Returns (layer counted from 1, reason, warning or None); the warning says
    when no searched layer lies in the hybrid band. An empty profile or a
    non-finite layer mean is an error (naming the layer)."""
    vals = layer_means.tolist() if torch.is_tensor(layer_means) else list(layer_means)
    if rule not in LAYER_RULES:
        raise ValueError(f"layer rule must be one of {', '.join(LAYER_RULES)}, got {rule!r}")
    if not vals:
        raise ValueError("no layer means to choose from: the NMI profile is empty (no layers measured)")
    bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"layer {bad[0] + 1} has a non-finite mean NMI ({vals[bad[0]]}): the attention maps of "
                         "that layer overflowed or the images hold NaN; no layer can be chosen")
    half = (len(vals) + 1) // 2
    peak = max(range(half), key=lambda i: (vals[i], -i))  # 0-based; the first of equal maxima
    candidates = list(range(len(vals)))
    reason = f"closest to {target} of all {len(vals)} layers"
    if rule == "after-peak":
        if peak + 1 < len(vals):
            candidates = candidates[peak + 1:]
            reason = (f"closest to {target} among layers {peak + 2}-{len(vals)}, after the NMI peak "
                      f"(layer {peak + 1}, {vals[peak]:.3f}; the highest of layers 1-{half})")
        else:
            reason += " (a one-layer model: nothing comes after its NMI peak)"
    best = min(candidates, key=lambda i: abs(vals[i] - target))
    reason = f"layer {best + 1} (mean NMI {vals[best]:.3f}): {reason}"
    low, high = band
    warning = None
    if not any(low <= vals[i] <= high for i in candidates):
        warning = (f"no searched layer reaches the hybrid band [{low}, {high}]; layer {best + 1} "
                   f"({vals[best]:.3f}) is only the nearest: this teacher may have no hybrid layer")
    return best + 1, reason, warning


def choose_layer(layer_means, target=0.09, rule="after-peak"):
    """The layer (counted from 1) that `layer_choice` picks."""
    return layer_choice(layer_means, target, rule)[0]


@torch.no_grad()
def layer_nmi(model, images, layers=None, drop_cls=True):
    """NMI of every head of `layers` (default all) on a batch: (L, B, H).
    Maps cover CLS + patches (registers are left out by attention_maps)."""
    maps = model.attention_maps(images, layers, reduce=lambda a: nmi(a, drop_cls=drop_cls))
    return torch.stack([maps[i] for i in sorted(maps)])


# -----------------------------------------------------------------------------
# 5. NMI-HAD (UNIP §3.2): the distillation loss, the teacher's view of the crop


def distill_loss(student_logits, teacher_logits):
    """KL(softmax(teacher row) || softmax(student row)) summed over keys and
    averaged over batch, heads and query rows (CLS row included), in fp32:
    over 197 keys the small probabilities matter and bf16 would drop them.
    Inputs: pre-softmax logits (B, H, N, N)."""
    if student_logits.shape != teacher_logits.shape:
        s, t = tuple(student_logits.shape), tuple(teacher_logits.shape)
        hint = ""
        if len(s) == 4 and len(t) == 4 and s[1] != t[1]:
            hint = f" Build the student with last_heads={t[1]} (the teacher's head count)."
        elif len(s) == 4 and len(t) == 4 and s[2] != t[2]:
            hint = " Student and teacher must see the same image size and patch size."
        raise ValueError(f"student logits {s} and teacher logits {t} differ in shape.{hint}")
    with fp32(student_logits.device.type):
        log_p_s = student_logits.float().log_softmax(dim=-1)
        log_p_t = teacher_logits.float().log_softmax(dim=-1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()


# The teacher and the student see the same crop. A teacher with another patch size (DINOv2: 14) sees it
# resized so that both token grids are equal and the logits line up token by token.


def teacher_view(img_size, student_patch, teacher_patch, flag="--img-size"):
    """(teacher side, grid): the side at which the teacher sees the student's crop, the student's token grid
    times the teacher's patch (224 px, patch 16 -> 14x14 tokens -> 196 px for a patch-14 teacher), and that
    grid. A crop that is not a multiple of the student's patch is refused, naming the nearest valid sizes: the
    student would drop its last pixels while the teacher sees the whole crop resized, and the grids would
    no longer cover the same pixels."""
    patch_multiple(img_size, student_patch, f"{flag} (the student's crop)")
    grid = img_size // student_patch
    return grid * teacher_patch, grid


def resize_for(x, size):
    """The student's crop (B, 3, S, S) resized to the teacher's view (B, 3, size, size): bicubic, antialiased."""
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


# -----------------------------------------------------------------------------
# 6. segmentation: LL-FPN + UperNet (UNIP §3.3), linear probes


# Initialisation as mmseg's (0.11) heads: conv-BN-ReLU convs kaiming-normal (fan_out, relu), BN 1/0,
# classifier convs N(0, 0.01) with zero bias, so that the first logits are small and near-uniform.


def conv_bn_relu(cin, cout, k):
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def classifier(cin, num_classes):  # the 1x1 conv that gives the logits
    conv = nn.Conv2d(cin, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class LLFPN(nn.Module):
    """Simple feature pyramid: four stride-16 maps -> strides 4, 8, 16, 32.
    LL-FPN feeds the last block's output to all four; the multi-layer
    baseline feeds blocks 4, 6, 8, 12."""

    def __init__(self, dim):
        super().__init__()
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, stride=2)

    def forward(self, feats):  # 4 x (B, D, h, w) -> (B, D, 4h, 4w), (B, D, 2h, 2w), (B, D, h, w), (B, D, h/2, w/2)
        return [op(f) for op, f in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]


def _up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UperHead(nn.Module):
    """UperNet (Xiao et al. 2018) as in mmseg's UPerHead: pyramid pooling on
    the coarsest map, laterals + top-down path, 3x3 FPN convs, fusion at the
    finest stride, Dropout2d 0.1, 1x1 classifier."""

    def __init__(self, in_dim, channels, num_classes, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_dim, channels, 1))
                                 for s in pool_scales)
        self.bottleneck = conv_bn_relu(in_dim + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(in_dim, channels, 1) for _ in range(3))
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fuse = conv_bn_relu(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = classifier(channels, num_classes)

    def forward(self, feats):  # strides 4, 8, 16, 32 -> (B, K, H/4, W/4)
        top = feats[3]
        pooled = [_up(p(top), top.shape[-2:]) for p in self.ppm]
        lat = [conv(f) for conv, f in zip(self.lateral, feats[:3])] + [self.bottleneck(torch.cat([top] + pooled, 1))]
        for i in range(3, 0, -1):  # top-down: coarse context added to the finer map
            lat[i - 1] = lat[i - 1] + _up(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, lat[:3])] + [lat[3]]
        outs = [outs[0]] + [_up(x, outs[0].shape[-2:]) for x in outs[1:]]
        return self.classifier(self.dropout(self.fuse(torch.cat(outs, 1))))


class FCNHead(nn.Module):
    """Auxiliary head on the stride-16 map: 3x3 conv-BN-ReLU (256), dropout, 1x1."""

    def __init__(self, in_dim, num_classes, channels=256):
        super().__init__()
        self.conv = conv_bn_relu(in_dim, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = classifier(channels, num_classes)

    def forward(self, x):
        return self.classifier(self.dropout(self.conv(x)))


def multi_layers(depth):
    """Blocks of the multi-layer pyramid and the linear probe: 4, 6, 8, 12 of 12
    (1-based), scaled to other depths (8, 12, 16, 24 for ViT-L)."""
    return tuple(depth * k // 12 for k in (4, 6, 8, 12))


class Segmenter(nn.Module):
    """A ViT backbone with one of the paper's segmentation heads.

    mode 'finetune': pyramid + UperNet (+ FCN auxiliary head); `layers` picks
        the blocks feeding the pyramid: (depth,)*4 is LL-FPN (default),
        multi_layers(depth) the multi-layer baseline (4, 6, 8, 12 of 12).
    mode 'linear': frozen backbone; blocks multi_layers(depth) (or `layers`),
        resized to the first map's size and concatenated -> one 1x1 conv.
    mode 'layer-linear': frozen backbone; one block (`layers`=(n,)) -> 1x1 conv.
    forward returns (logits at stride 4 or 16, auxiliary logits or None).
    The backbone's final `norm` is not used by any head and is frozen.
    """

    def __init__(self, backbone, num_classes, mode="finetune", layers=None, aux=True):
        super().__init__()
        self.backbone, self.mode, self.num_classes = backbone, mode, num_classes
        depth, dim = len(backbone.blocks), backbone.dim
        if mode == "finetune":
            self.layers = tuple(layers or (depth,) * 4)
            assert len(self.layers) == 4, "the pyramid takes 4 maps"
            self.pyramid = LLFPN(dim)
            self.head = UperHead(dim, dim, num_classes)
            self.aux_head = FCNHead(dim, num_classes) if aux else None
        elif mode in ("linear", "layer-linear"):
            default = multi_layers(depth) if mode == "linear" else (depth,)
            self.layers = tuple(layers or default)
            if mode == "layer-linear" and len(self.layers) != 1:
                raise ValueError("layer-linear probing takes exactly one layer")
            self.head = classifier(dim * len(self.layers), num_classes)
            self.aux_head = None
            backbone.requires_grad_(False)
        else:
            raise ValueError(f"mode must be finetune, linear or layer-linear, got {mode!r}")
        backbone._check_layers(self.layers)
        backbone.norm.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        if self.mode != "finetune":
            self.backbone.eval()  # frozen backbone: no stochastic depth
        return self

    def forward(self, x):
        uniq = sorted(set(self.layers))
        # On a CPU the heads run in channels-last (NHWC) memory: oneDNN's bf16 convolutions and the bilinear
        # upsampling are 1.5-5x faster so (fp32: no change). On a GPU (H200, bench.py) it gained nothing.
        layout = torch.channels_last if x.device.type == "cpu" else torch.contiguous_format
        maps = {i: f.contiguous(memory_format=layout) for i, f in zip(uniq, self.backbone.features(x, uniq))}
        feats = [maps[i] for i in self.layers]
        if self.mode == "finetune":
            pyr = self.pyramid(feats)
            aux = self.aux_head(pyr[2]) if (self.aux_head is not None and self.training) else None
            return self.head(pyr), aux
        feats = [feats[0]] + [_up(f, feats[0].shape[-2:]) for f in feats[1:]]
        return self.head(torch.cat(feats, 1)), None


def seg_loss(logits, label, ignore_index=255):
    """Cross-entropy of (B, K, h, w) logits upsampled bilinearly to the (B, H, W) label. Averaged over all
    pixels, ignored ones counting 0, as mmseg 0.11 does: a crop that is all ignore gives 0, not NaN."""
    logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="none").mean()


def layer_decay_groups(model, weight_decay=0.05, layer_decay=0.85):
    """AdamW parameter groups with layer-wise lr decay (BEiT/MAE rule):
    patch_embed, cls_token, pos_embed, register_tokens and norm_pre (CLIP's
    LayerNorm before the first block) -> id 0; block i (0-based)
    -> i + 1; everything else (pyramid, heads) -> depth + 1. lr scale =
    decay^(depth+1-id). No weight decay on biases, 1-D parameters, pos_embed,
    cls_token and register_tokens (learned tokens like CLS: DINOv2 and timm
    put them with the embeddings).
    Each group carries 'lr_scale'; multiply it into the lr at every step."""
    depth = len(model.backbone.blocks)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("backbone.patch_embed", "backbone.cls_token", "backbone.pos_embed",
                            "backbone.register_tokens", "backbone.norm_pre")):
            lid = 0
        elif name.startswith("backbone.blocks."):
            lid = int(name.split(".")[2]) + 1
        else:
            lid = depth + 1
        no_wd = p.ndim == 1 or name.endswith(".bias") or name.endswith(("pos_embed", "cls_token", "register_tokens"))
        key = (lid, no_wd)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_wd else weight_decay,
                           "lr_scale": layer_decay ** (depth + 1 - lid), "layer_id": lid}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


# -----------------------------------------------------------------------------
# 7. size presets (MLP ratio 4, LayerNorm eps 1e-6, qkv bias; patch 16, DINOv2 patch 14)


def vit_tiny(img_size=224, drop_path=0.0, last_heads=None, **kw):
    return ViT(img_size, dim=192, depth=12, heads=3, last_heads=last_heads, drop_path=drop_path, **kw)


def vit_small(img_size=224, drop_path=0.0, last_heads=None, **kw):
    return ViT(img_size, dim=384, depth=12, heads=6, last_heads=last_heads, drop_path=drop_path, **kw)


def vit_base(img_size=224, drop_path=0.0, last_heads=None, **kw):
    return ViT(img_size, dim=768, depth=12, heads=12, last_heads=last_heads, drop_path=drop_path, **kw)


def vit_large(img_size=224, drop_path=0.0, last_heads=None, **kw):
    return ViT(img_size, dim=1024, depth=24, heads=16, last_heads=last_heads, drop_path=drop_path, **kw)


def vit_micro(img_size=224, drop_path=0.0, last_heads=None, **kw):
    """Not from the paper: a student small enough to pre-train and fine-tune on a CPU (demo.py)."""
    return ViT(img_size, dim=96, depth=6, heads=3, last_heads=last_heads, drop_path=drop_path, **kw)


def _dinov2(dim, depth, heads, num_registers):
    """DINOv2 (Oquab et al. 2023): patch 14, layer scale (init 1e-5; the checkpoint's values are loaded, and
    required), learned pos_embed; '_reg4' models add 4 register tokens (Darcet et al. 2024). The position
    table is DINOv2's, 37x37 (518 px, the hub's img_size), whatever `img_size`: as in DINOv2 it is resampled
    at every forward to the input's grid, with the interpolation of the official models ('dinov2': offset
    0.1; '_reg4': by size, antialiased). `img_size` is accepted for the presets' common signature only."""

    def preset(img_size=224, drop_path=0.0, last_heads=None, **kw):
        kw["layer_scale"] = kw.get("layer_scale") or 1e-5  # never off: the weights need it
        return ViT(518, patch_size=14, dim=dim, depth=depth, heads=heads, last_heads=last_heads,
                   drop_path=drop_path, num_registers=num_registers, pretrained_layer_scale=True,
                   pos_interp="dinov2_reg4" if num_registers else "dinov2", **kw)

    return preset


dinov2_vits14, dinov2_vitb14, dinov2_vitl14 = _dinov2(384, 12, 6, 0), _dinov2(768, 12, 12, 0), _dinov2(1024, 24, 16, 0)


dinov2_vits14_reg4, dinov2_vitb14_reg4, dinov2_vitl14_reg4 = (_dinov2(384, 12, 6, 4), _dinov2(768, 12, 12, 4),
                                                              _dinov2(1024, 24, 16, 4))


def clip_vitb16(img_size=224, drop_path=0.0, last_heads=None, **kw):
    """CLIP ViT-B/16's image tower (Radford et al. 2021): QuickGELU, LayerNorm eps 1e-5, a LayerNorm before the first
    block (`norm_pre`), no patch-projection bias, learned pos_embed (the checkpoint's; its CLS row is not zero).
    `norm` holds CLIP's post-LayerNorm, which CLIP applies to CLS only; forward here applies it to every token (no
    segmentation head uses it). Loads Hugging Face, OpenAI / open_clip and timm checkpoints."""
    return ViT(img_size, dim=768, depth=12, heads=12, last_heads=last_heads, drop_path=drop_path,
               act=quick_gelu, norm_eps=1e-5, pre_norm=True, patch_bias=False, **kw)


PRESETS = {"vit_micro": vit_micro, "vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base,
           "vit_large": vit_large,
           "dinov2_vits14": dinov2_vits14, "dinov2_vitb14": dinov2_vitb14, "dinov2_vitl14": dinov2_vitl14,
           "dinov2_vits14_reg4": dinov2_vits14_reg4, "dinov2_vitb14_reg4": dinov2_vitb14_reg4,
           "dinov2_vitl14_reg4": dinov2_vitl14_reg4, "clip_vitb16": clip_vitb16}


# =============================================================================
# What a copier needs around the method: loading and saving, precision, inference. A reader
# learning UNIP can stop above this line.
# =============================================================================


# -----------------------------------------------------------------------------
# 8. checkpoints


# Formats read: MAE {'model'}, DINO raw, DINO/iBOT full checkpoints
# ({'teacher', 'student', ...}, 'module.'/'backbone.' prefixes), iBOT
# {'state_dict'}, DeiT/timm ({'model'} or raw, 'dist_token'), the released UNIP
# students ({'model', 'optimizer', 'epoch', 'scaler', 'args'} with a pickled
# argparse.Namespace), and this project's own checkpoints.

_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.")
_EXTRA = re.compile(r"^(head|head_dist|fc_norm|decoder|decoder_\w+|mask_token|dist_token|"
                    r"masked_embed)(\.|$)")
# Other names for the same tensors: DINOv2 / timm layer scale, timm registers.
_RENAMES = ((re.compile(r"\.ls1\.gamma$"), ".gamma_1"), (re.compile(r"\.ls2\.gamma$"), ".gamma_2"),
            (re.compile(r"^reg_token$"), "register_tokens"))
# CLIP's image tower, Hugging Face's names (`vision_model.*`) and OpenAI's / open_clip's (`visual.*`), -> the standard
# keys (timm's CLIP checkpoints use those already). Applied in order; HF's separate q/k/v are fused after.
_CLIP_RENAMES = tuple((re.compile(a), b) for a, b in (
    (r"^vision_model\.embeddings\.class_embedding$|^visual\.class_embedding$", "cls_token"),
    (r"^vision_model\.embeddings\.position_embedding\.weight$|^visual\.positional_embedding$", "pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.|^visual\.conv1\.", "patch_embed.proj."),
    (r"^vision_model\.pre_layrnorm\.|^visual\.ln_pre\.", "norm_pre."),
    (r"^vision_model\.post_layernorm\.|^visual\.ln_post\.", "norm."),
    (r"^vision_model\.encoder\.layers\.|^visual\.transformer\.resblocks\.", "blocks."),
    (r"^(blocks\.\d+\.)(?:layer_norm|ln_)([12])\.", r"\1norm\2."),
    (r"^(blocks\.\d+\.)self_attn\.", r"\1attn."),
    (r"^(blocks\.\d+\.attn\.)out_proj\.", r"\1proj."),
    (r"^(blocks\.\d+\.attn\.)in_proj_", r"\1qkv."),  # OpenAI: q, k, v fused already, in that order
    (r"^(blocks\.\d+\.mlp\.)c_fc\.", r"\1fc1."),
    (r"^(blocks\.\d+\.mlp\.)c_proj\.", r"\1fc2."),
))
# What a CLIP file holds besides the image tower: the projection into the joint space, HF's position_ids buffer,
# the text tower (HF `text_model.*`; OpenAI `transformer.*`, `token_embedding`, ...) and OpenAI's config entries.
_CLIP_EXTRA = re.compile(r"^(visual_projection|visual\.proj|vision_model\.embeddings\.position_ids|text_model|"
                         r"text_projection|logit_scale|logit_bias|transformer|token_embedding|positional_embedding|"
                         r"ln_final|input_resolution|context_length|vocab_size)(\.|$)")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: damaged or incomplete, or holding
    objects that weights_only=True refuses to unpickle."""


# What the scripts report as one line ("error: ...") and a non-zero exit instead of a traceback.
USER_ERRORS = (FileNotFoundError, ValueError, CheckpointError)


def load_checkpoint(path):
    """torch.load with weights_only=True. argparse.Namespace (the `args` entry
    of MAE/DINO/iBOT/UNIP checkpoints) is allow-listed; nothing falls back to
    full unpickling. Raises FileNotFoundError, or CheckpointError saying
    whether the file is damaged (truncated copy, not a checkpoint) or holds
    a class that weights_only=True refuses (named)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint not found: {path}") from None
        except IsADirectoryError:
            raise CheckpointError(f"{path} is a folder, not a checkpoint file") from None
        except Exception as e:
            # Only a refused class is about trust; every other failure (EOF, "[Errno 22] Invalid argument",
            # "PytorchStreamReader failed", a bad pickle opcode) means the bytes themselves are broken.
            unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            if unsafe:
                raise CheckpointError(
                    f"{path} holds a {unsafe.group(1)} object, which loading with weights_only=True refuses "
                    "(it could run code when unpickled). If you trust this file, convert it once with "
                    "torch.load(..., weights_only=False) and save its state dict alone.") from None
            size = os.path.getsize(path) if os.path.isfile(path) else 0
            first = str(e).strip().split(". ")[0].splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path} is damaged or incomplete ({size:,} bytes; {first}). An interrupted copy, download "
                "or save leaves such a file: copy it again, or use the previous checkpoint.") from None


def save_checkpoint(obj, path):
    """Write atomically: a crash mid-write leaves the previous file intact."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic on POSIX and Windows


def _is_state_dict(d):
    return isinstance(d, dict) and d and all(torch.is_tensor(v) for v in d.values())


def unwrap_state_dict(obj):
    """Find the backbone state dict inside any of the supported wrappers and
    strip the 'module.' / 'backbone.' / '_orig_mod.' / 'encoder.' prefixes."""
    sd = obj
    for _ in range(3):  # e.g. {'teacher': {...}} or {'model': {'state_dict'...}}
        if _is_state_dict(sd):
            break
        if not isinstance(sd, dict):
            raise ValueError(f"expected a dict checkpoint, got {type(sd).__name__}")
        for key in ("teacher", "model", "state_dict", "model_ema", "module", "student"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
        else:
            raise ValueError(f"no state dict found in checkpoint with keys {sorted(sd)[:10]}")
    if not _is_state_dict(sd):
        raise ValueError("no state dict found in checkpoint")
    out = {}
    for k, v in sd.items():
        while k.startswith(_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def clip_to_vit(sd):
    """A CLIP image tower's state dict (Hugging Face or OpenAI / open_clip names) -> the standard ViT keys:
    renamed, q/k/v fused in q, k, v order, CLS (D,) -> (1, 1, D), position table (N, D) -> (1, N, D).
    Text tower and projection keep their names (load_pretrained ignores them). Other dicts pass unchanged."""
    if not any(k.startswith(("vision_model.", "visual.")) for k in sd):
        return sd
    for pattern, repl in _CLIP_RENAMES:
        sd = {pattern.sub(repl, k): v for k, v in sd.items()}
    for k in [k for k in sd if re.search(r"\.attn\.q_proj\.(weight|bias)$", k)]:
        sd[k.replace("q_proj", "qkv")] = torch.cat([sd.pop(k.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")])
    if sd.get("cls_token") is not None and sd["cls_token"].ndim == 1:
        sd["cls_token"] = sd["cls_token"][None, None]
    if sd.get("pos_embed") is not None and sd["pos_embed"].ndim == 2:
        sd["pos_embed"] = sd["pos_embed"][None]
    return sd


def load_pretrained(model, source, upto_layer=None, verbose=True):
    """Load ViT weights from a path, a checkpoint dict or a state dict into `model`.

    Unwraps and strips prefixes, drops heads / decoders / mask and distillation
    tokens, fuses BEiT-style q_bias/v_bias, maps CLIP's image tower (clip_to_vit;
    its text tower and projection are dropped), resamples `pos_embed` to the
    model's grid (pos_interp 'size'; a DINOv2 model keeps the checkpoint's
    table and resamples it at every forward), and refuses (naming the keys)
    when a weight the model needs is missing or has the wrong shape. A model built shallower than the
    checkpoint (a teacher cut at its distilled layer) ignores the deeper blocks.
    With `upto_layer` = L, the blocks after L and the final norm may be absent
    from the checkpoint: a teacher that stops at layer L never runs them.
    Layer-scale factors (`gamma_1/2`) absent from the checkpoint keep their init
    (layer scale added at fine-tuning), except in a model whose layer scale is
    part of its pre-trained weights (pretrained_layer_scale: DINOv2): refused.
    Returns a report dict: loaded, ignored, resampled.
    """
    from_file = isinstance(source, (str, bytes)) or hasattr(source, "__fspath__")
    name = str(source) if from_file else "<state dict>"
    sd = unwrap_state_dict(load_checkpoint(source) if from_file else source)
    own, depth = model.state_dict(), len(model.blocks)
    block_of = lambda k: int(m.group(1)) if (m := re.match(r"blocks\.(\d+)\.", k)) else None
    report = {"loaded": [], "ignored": [], "resampled": None}
    int8 = [k for k in sd if k.endswith(".int8")]
    if int8:  # weight = int8 * scale[:, None]: loading either part alone would be silently wrong
        raise ValueError(f"{name} holds int8-quantised weights ({int8[0]!r} and {len(int8) - 1} more, each with a "
                         "'.scale'): convert it to an fp32 state dict first with the converter that comes with it, "
                         "`python clip_int8_to_fp32.py OUT.pth`, and load OUT.pth")
    sd = clip_to_vit(sd)

    # BEiT/data2vec keep separate q and v biases (k has none): fuse them.
    for k in [k for k in sd if k.endswith("attn.q_bias")]:
        q_bias, v_bias = sd.pop(k), sd.pop(k.replace("q_bias", "v_bias"))
        sd[k.replace("q_bias", "qkv.bias")] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    for pattern, repl in _RENAMES:
        sd = {pattern.sub(repl, k): v for k, v in sd.items()}

    # Register tokens attend in every block: a model without them computes something else. Refuse by name.
    has, want = sd.get("register_tokens"), model.num_registers
    if (has.shape[1] if has is not None else 0) != want:
        raise ValueError(f"{name} has {has.shape[1] if has is not None else 0} register tokens "
                         f"('register_tokens') and this model {want}: build it with num_registers="
                         f"{has.shape[1] if has is not None else 0} (e.g. a dinov2_*_reg4 preset for the "
                         "'_reg4' checkpoints, a plain dinov2_* preset otherwise)")
    # CLIP's LayerNorm over the tokens before the first block, likewise.
    if ("norm_pre.weight" in sd) != ("norm_pre.weight" in own):
        raise ValueError(f"{name} has {'a' if 'norm_pre.weight' in sd else 'no'} LayerNorm before the first block "
                         f"('norm_pre.weight') and this model {'none' if 'norm_pre.weight' in sd else 'one'}: "
                         + ("a CLIP checkpoint loads into the clip_vitb16 preset (pre_norm=True)" if 'norm_pre.weight'
                            in sd else "build the model with pre_norm=False (every preset but clip_vitb16)"))

    new = {}
    for k, v in sd.items():
        b = block_of(k)
        if k in own:
            new[k] = v
        elif k == "patch_embed.proj.bias":  # a model built with patch_bias=False (CLIP) cannot add it
            raise ValueError(f"{name}: {k!r} has no counterpart in this model (its patch projection has no bias)")
        elif _CLIP_EXTRA.match(k):
            report["ignored"].append(k)
        elif k.startswith(("vision_model.", "visual.")):  # a CLIP variant's weight that clip_to_vit does not map
            raise ValueError(f"{name}: CLIP image-tower weight {k!r} has no counterpart in this model")
        elif _EXTRA.match(k) or (b is not None and b >= depth) or b is None:
            report["ignored"].append(k)
        elif ".gamma_" in k:  # layer scale changes every residual branch: ignoring it is not an option
            raise ValueError(f"{name}: layer-scale weight {k!r} has no counterpart in this model; build it "
                             "with layer scale (the dinov2_* presets have it, or layer_scale=1.0)")
        else:  # a block weight we have no slot for (relative position bias, ...)
            raise ValueError(f"{name}: block weight {k!r} has no counterpart in this model "
                             "(a different architecture?)")

    if "pos_embed" in new and new["pos_embed"].shape[-1] == own["pos_embed"].shape[-1]:
        pe, n = new["pos_embed"], new["pos_embed"].shape[1]
        if math.isqrt(n - 1) ** 2 != n - 1 and math.isqrt(n - 2) ** 2 == n - 2:
            pe = torch.cat([pe[:, :1], pe[:, 2:]], dim=1)  # DeiT distilled: drop the distillation row
        elif math.isqrt(n) ** 2 == n:
            pe = torch.cat([torch.zeros_like(pe[:, :1]), pe], dim=1)  # no CLS row (DeiT III): zero position
        old, g = math.isqrt(pe.shape[1] - 1), math.isqrt(own["pos_embed"].shape[1] - 1)
        if old != g and model.pos_interp == "size":
            pe = resample_pos_embed(pe, (g, g))
            report["resampled"] = (old, g)
        elif old != g:  # DINOv2: the table stays as trained (the model adopts its grid on loading)
            own["pos_embed"] = pe
        new["pos_embed"] = pe

    # A model cut shorter than the checkpoint, or one told it stops at `upto_layer`, never runs `norm`.
    cut = upto_layer is not None or any((block_of(k) or 0) >= depth for k in report["ignored"])
    optional = lambda k: (".gamma_" in k and not model.pretrained_layer_scale  # added at fine-tuning: keeps its init
                          or cut and (k.startswith("norm.") or (upto_layer is not None and (block_of(k) or -1) >= upto_layer)))
    missing = [k for k in own if k not in new and not optional(k)]
    wrong = [f"{k}: checkpoint {tuple(new[k].shape)} vs model {tuple(own[k].shape)}"
             for k in new if new[k].shape != own[k].shape]
    if missing or wrong:
        lines = []
        if missing:
            lines.append(f"missing {len(missing)} keys: {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
            if any(".gamma_" in k for k in missing) and model.pretrained_layer_scale:
                lines.append("the layer-scale factors are part of this architecture's pre-trained weights "
                             "('blocks.N.ls1.gamma' / 'ls2.gamma' in DINOv2 files): without them it computes "
                             "something else")
        if wrong:
            lines.append(f"wrong shape for {len(wrong)} keys: {'; '.join(wrong[:6])}{' ...' if len(wrong) > 6 else ''}")
        raise ValueError(f"{name} does not fit this model ({model.dim} wide, {depth} blocks):\n  "
                         + "\n  ".join(lines))
    model.load_state_dict(new, strict=False)  # only optional keys can be absent: checked above
    report["loaded"] = sorted(new)
    if verbose:
        msg = f"loaded {len(new)} tensors from {name}"
        if report["resampled"]:
            msg += " (pos_embed {0}x{0} -> {1}x{1})".format(*report["resampled"])
        if report["ignored"]:
            kinds = sorted({re.sub(r"\.\d+\..*|\..*", "", k) for k in report["ignored"]})
            msg += f"; ignored {len(report['ignored'])}: {', '.join(kinds)}"
        print(msg)
    return report


def load_segmenter(source, device="cpu"):
    """A train_seg.py checkpoint (path or loaded dict) -> a ready Segmenter in
    eval mode, with what inference needs as attributes: classes (names),
    palette (an RGB triple per class), crop and stride (the sliding window),
    short_side (images are resized to it first) and config (the run's
    train_seg.py settings). Input: grey frames normalised as in training:

        seg = unip.load_segmenter("runs/seg/best.pt")
        x, _ = data.SegEvalTransform(seg.short_side)(data.load_grey("frame.png"), None)   # (3, h, w)
        logits = unip.slide_inference(seg, x[None], seg.num_classes, seg.crop, seg.stride)  # (1, K, h, w)
    """
    from_file = isinstance(source, (str, bytes)) or hasattr(source, "__fspath__")
    name = str(source) if from_file else "<checkpoint>"
    ck = load_checkpoint(source) if from_file else source
    arch = ck.get("segmenter") if isinstance(ck, dict) else None
    if arch is None:
        raise ValueError(f"{name} has no 'segmenter' entry: it is not a checkpoint of train_seg.py "
                         "(a pre-trained backbone loads with load_pretrained)")
    if arch["model"] not in PRESETS:
        raise ValueError(f"{name}: backbone {arch['model']!r} is not one of this unip.py's presets {sorted(PRESETS)}")
    # the backbone at the training crop, so pos_embed has the saved grid; drop path is off in eval mode anyway
    backbone = PRESETS[arch["model"]](img_size=arch["img_size"], last_heads=arch["last_heads"],
                                      layer_scale=arch["layer_scale"])
    seg = Segmenter(backbone, arch["num_classes"], arch["mode"], arch["layers"], aux=arch["aux"])
    seg.load_state_dict(ck["model"])
    seg.classes, seg.palette = list(arch["classes"]), [tuple(c) for c in arch["palette"]]
    seg.crop, seg.stride, seg.short_side = arch["crop"], arch["stride"], arch["short_side"]
    seg.config = ck.get("config", {})
    return seg.to(device).eval()


# -----------------------------------------------------------------------------
# 9. training helpers: precision, attention kernels, the module DDP wraps


def cpu_bf16_units():
    """This CPU's native bf16 matrix instructions, 'AMX-BF16' or 'AVX512-BF16', or None.
    torch.cpu's checks are private: missing or failing counts as None, so the default stays fp32."""
    for name, check in (("AMX-BF16", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        try:
            if getattr(torch.cpu, check)():
                return name
        except Exception:
            pass
    return None


def resolve_amp(amp, device):
    """--amp -> (autocast precision 'bf16' | 'fp16' | 'none', why, for the banner).
    auto: bf16 on CUDA; on a CPU bf16 only where it has bf16 matrix units (there a pre-training step is
    ~2.5x faster than fp32; without them bf16 is emulated and slower than fp32); none elsewhere."""
    device = torch.device(device)
    if amp == "auto" and os.environ.get("UNIP_AMP", "auto") != "auto":
        amp, why = os.environ["UNIP_AMP"], "UNIP_AMP"
    elif amp == "auto":
        units = cpu_bf16_units() if device.type == "cpu" else None
        amp = "bf16" if device.type == "cuda" or units else "none"
        why = f"auto: CPU has {units}" if units else \
            "auto: CPU without bf16 matrix units" if device.type == "cpu" else f"auto: {device.type}"
    else:
        why = "--amp"
    if amp not in ("bf16", "fp16", "none"):
        raise ValueError(f"amp must be auto, bf16, fp16 or none, got {amp!r} ({why})")
    return amp, why


def autocast_weights_(model, dtype, keep=()):
    """Store a frozen model's linear and convolution layers in `dtype`, except the modules in `keep`.
    Autocast to `dtype` rounds their weights so at every call anyway: under it the results are the same, bit
    for bit, without the per-step copies (a frozen ViT-B teacher's bf16 forward: ~4% faster on a CPU), and the
    weights take half the memory. Only for a model that always runs under that autocast."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not any(m is k for k in keep):
            m.to(dtype)
    return model


def sdpa_for_training(device, amp):
    """Whether a model trained on `device` in precision `amp` should run SDPA (Attention.fused): yes, but
    on a CPU in bf16, where SDPA's backward kernel is slow and the explicit softmax(q·kᵀ)·v trains ~2x
    faster at N = 197..577 (224-384 px; at N = 1025, 512 px, they are level). In fp32, and without
    gradients (a frozen teacher, evaluation), SDPA is as fast or faster."""
    return not (torch.device(device).type == "cpu" and amp == "bf16")


def set_fused_attention(model, fused=True):
    """Switch every Attention of `model` between SDPA (True) and the explicit product (False)."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused = fused
    return model


class AttentionLogits(nn.Module):
    """The module DDP and torch.compile see: a ViT's logits at one layer (B, H, N, N), the input first passed
    through `prep` (other input statistics for a teacher, or None) and resized to the teacher's view `size`
    when the teacher's patch size differs from the student's."""

    def __init__(self, vit, layer, size=None, prep=None):
        super().__init__()
        self.vit, self.layer, self.size, self.prep = vit, layer, size, prep

    def forward(self, x):
        if self.prep is not None:
            x = self.prep(x)
        if self.size is not None and x.shape[-1] != self.size:
            x = resize_for(x, self.size)
        return self.vit.attention_logits(x, self.layer)


# -----------------------------------------------------------------------------
# 10. inference: sliding windows, mIoU


@torch.no_grad()
def slide_inference(model, img, num_classes, crop=512, stride=341, batch=4, patch=None):
    """Sliding-window logits (mmseg 'slide' mode): windows of `crop` every
    `stride` pixels, the last window aligned to the border, logits of
    overlapping windows averaged. img (B, C, H, W) -> (B, K, H, W).
    Up to `batch` windows go through the model together (larger products:
    bf16 on a CPU gains ~15%); the result is the same.
    A window whose sides are not multiples of `patch` (default: the model's
    backbone's, e.g. 14 for DINOv2) is padded centred with zeros, as DINOv2's
    CenterPadding does, so that its last pixels reach the model too; its
    logits are cropped back to the window."""
    B, _, H, W = img.shape
    if patch is None:
        patch = getattr(getattr(model, "backbone", None), "patch_size", 1)
    ch, cw = min(crop, H), min(crop, W)
    ny = max(H - ch + stride - 1, 0) // stride + 1
    nx = max(W - cw + stride - 1, 0) // stride + 1
    boxes = [(min(iy * stride, H - ch), min(ix * stride, W - cw)) for iy in range(ny) for ix in range(nx)]
    logits = img.new_zeros(B, num_classes, H, W, dtype=torch.float32)
    count = img.new_zeros(1, 1, H, W, dtype=torch.float32)
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        wins = torch.cat([img[:, :, y:y + ch, x:x + cw] for y, x in chunk])  # (windows * B, C, ch, cw)
        wins, (top, left) = center_pad(wins, patch)  # (windows * B, C, ch', cw'), multiples of the patch
        outs = _up(model(wins)[0].float(), wins.shape[-2:])[..., top:top + ch, left:left + cw].split(B)  # (B, K, ch, cw)
        for (y, x), out in zip(chunk, outs):
            logits[:, :, y:y + ch, x:x + cw] += out
            count[:, :, y:y + ch, x:x + cw] += 1
    return logits / count


def confusion_matrix(pred, label, num_classes, ignore_index=255):
    """(K, K) counts, rows = ground truth, columns = prediction; ignored pixels skipped."""
    keep = label != ignore_index
    idx = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_from_confusion(conf):
    """Per-class IoU = TP / (TP + FP + FN); NaN for a class absent from both
    prediction and ground truth (mmseg leaves it out of the mean)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(conf):
    return torch.nanmean(iou_from_confusion(conf)).item()
