"""UNIP in one file (Zhang et al., "UNIP: Rethinking Pre-trained Attention Patterns for Infrared
Semantic Segmentation", ICLR 2025, arXiv:2502.02257): the NMI of attention maps, NMI-HAD
distillation of a hybrid teacher layer into a small ViT's last layer, LL-FPN + UperNet.

Method: helpers, Attention / MLP / Block, ViT, NMI and the layer rule, NMI-HAD, segmentation, size
presets. After the fence: teacher families (DINOv2, CLIP), checkpoints, training helpers, inference.
Shapes: B batch, N tokens (CLS + h*w patches), D width, H heads, h x w patch grid.
"""

import argparse
import contextlib
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# -----------------------------------------------------------------------------
# 1. helpers


def sincos_pos_embed(dim, grid_h, grid_w=None):
    """MAE's fixed 2-D sin-cos table with a zero CLS row: (1 + h*w, dim). Half the channels encode
    the column, half the row, each [sin | cos]; float64 as MAE's numpy code, then cast."""
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


def fp32(device_type):
    """A context with autocast off, on any device."""
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
    """Multi-head self-attention with one fused qkv. forward runs SDPA, or with `fused` False the
    same product written out (the tests hold one against the other); forward_with_attention and
    logits give the map after / before the softmax, q·kᵀ computed once."""

    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5  # *this* block's head_dim (ViT-S with 16 heads: 24)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fused = True  # SDPA: no (B, H, N, N) map kept for the backward

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

    def forward_with_attention(self, x):  # (B, N, D) -> (B, N, D), map (B, H, N, N)
        q, k, v = self._split(self.qkv(x), 3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).flatten(2)), attn

    def logits(self, x):  # (B, N, D) -> (B, H, N, N), always fp32
        # q and k rows only; fp32 under autocast: the KL over N keys needs what bf16 rounds away
        D = self.heads * self.head_dim
        bias = None if self.qkv.bias is None else self.qkv.bias[: 2 * D].float()
        with fp32(x.device.type):
            q, k = self._split(F.linear(x.float(), self.qkv.weight[: 2 * D].float(), bias), 2)
            return (q * self.scale) @ k.transpose(-2, -1)


class MLP(nn.Module):
    def __init__(self, dim, hidden, act=F.gelu):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = act  # exact (erf) GELU, as MAE and DINO

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; `layer_scale` > 0 adds per-channel residual scales."""

    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0, layer_scale=0.0, norm_eps=1e-6,
                 act=F.gelu):
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

    def forward(self, x):  # (B, C, H, W) -> (B, D, h, w); sides floored to the patch grid
        return self.proj(x)


class ViT(nn.Module):
    """Plain ViT with the standard state-dict keys, so MAE / DINO / iBOT / DeiT / UNIP weights load.

    last_heads: the last block's head count; UNIP gives the student the teacher's, so that the
        logits line up (same parameter shapes).
    drop_path_schedule: 'uniform' (pre-training) or 'linear' from 0 to `drop_path` (fine-tuning).
    layer_scale: > 0 adds residual scales with this init (the reference fine-tunes with 1.0).
    grad_checkpoint (attribute, off): recompute each block in the backward, keeping no activations.
    The later options serve DINOv2 and CLIP teachers (section 8).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, dim=768, depth=12, heads=12,
                 last_heads=None, mlp_ratio=4.0, drop_path=0.0, drop_path_schedule="uniform",
                 layer_scale=0.0, num_registers=0, pos_interp="size", pretrained_layer_scale=False,
                 act=F.gelu, norm_eps=1e-6, pre_norm=False, patch_bias=True):
        super().__init__()
        check_pos_interp(pos_interp)
        self.patch_size, self.dim, self.depth, self.heads = patch_size, dim, depth, heads
        self.last_heads = last_heads or heads
        self.num_registers = num_registers
        self.pos_interp, self.pretrained_layer_scale = pos_interp, pretrained_layer_scale
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim, patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_registers, dim))
                                if num_registers else None)
        # fixed sin-cos, stored as a frozen parameter like MAE so that the key exists
        self.pos_embed = nn.Parameter(sincos_pos_embed(dim, grid)[None], requires_grad=False)
        self.norm_pre = nn.LayerNorm(dim, eps=norm_eps) if pre_norm else nn.Identity()
        if drop_path_schedule == "uniform":
            rates = [drop_path] * depth
        elif drop_path_schedule == "linear":
            rates = torch.linspace(0, drop_path, depth).tolist()
        else:
            raise ValueError(f"drop_path_schedule must be 'uniform' or 'linear', "
                             f"got {drop_path_schedule!r}")
        self.blocks = nn.ModuleList(
            Block(dim, self.last_heads if i == depth - 1 else heads, mlp_ratio, rates[i],
                  layer_scale, norm_eps, act)
            for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.grad_checkpoint = False
        self.init_weights()

    def init_weights(self):
        # MAE's: xavier for linears and the patch projection (seen as a linear)
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
        if self.pos_interp == "size":  # the table itself on its own grid, else bicubic to this one
            pos = resample_pos_embed(self.pos_embed, self.grid(x))
        else:
            pos = dinov2_pos_embed(self.pos_embed, self.grid(x), x.shape[-2] == x.shape[-1],
                                   self.pos_interp)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, h*w, D)
        prefix = [(self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)]
        if self.register_tokens is not None:  # DINOv2 registers: after CLS, no position
            prefix.append(self.register_tokens.expand(x.shape[0], -1, -1))
        return self.norm_pre(torch.cat(prefix + [x + pos[:, 1:]], dim=1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_pos_embed(self, state_dict, prefix)  # DINOv2 takes a checkpoint's table at its shape
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _drop_registers(self, x, dim=1):  # token axis `dim`: 1 + R + h*w -> 1 + h*w
        R = self.num_registers
        return x if not R else torch.cat([x.narrow(dim, 0, 1),
                                          x.narrow(dim, 1 + R, x.shape[dim] - 1 - R)], dim)

    def run_block(self, blk, x):  # (B, N, D) -> (B, N, D)
        # keep only the block's input; the replayed RNG state makes drop path drop the same samples
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward(self, x):  # (B, C, H, W) -> (B, N, D), after the final norm
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = self.run_block(blk, x)
        return self.norm(x)

    def _check_layers(self, layers):
        for layer in layers:
            if not 1 <= layer <= len(self.blocks):
                raise ValueError(f"layer {layer} is out of range: "
                                 f"this ViT has layers 1..{len(self.blocks)}")

    def attention_logits(self, x, layer):
        """Pre-softmax logits q·kᵀ/sqrt(head_dim) of block `layer` (from 1, as the paper counts):
        (B, H, N, N), CLS included. Runs blocks 1..layer-1, then only norm1 and q/k."""
        self._check_layers([layer])
        x = self.prepare_tokens(x)
        for blk in self.blocks[: layer - 1]:
            x = self.run_block(blk, x)
        blk = self.blocks[layer - 1]
        return blk.attn.logits(self._drop_registers(blk.norm1(x)))

    def attention_maps(self, x, layers=None, reduce=None):
        """Post-softmax maps of several layers in one pass: {layer: (B, H, N, N)}. `reduce` (e.g.
        nmi) is applied as soon as a map exists; the pass stops after the deepest layer."""
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
                    if self.num_registers:  # CLS + patches only, rows summing to 1 again
                        probs = self._drop_registers(self._drop_registers(probs, 2), 3)
                        probs = probs / probs.sum(-1, keepdim=True)
                out[i] = probs if reduce is None else reduce(probs)
            else:
                x = blk(x)
        return out

    def features(self, x, layers):
        """Outputs of blocks `layers`, patch tokens only, no norm, as maps (B, D, h, w)."""
        self._check_layers(layers)
        h, w = self.grid(x)
        x = self.prepare_tokens(x)
        out = {}
        for i, blk in enumerate(self.blocks[: max(layers)], start=1):
            x = self.run_block(blk, x)
            if i in layers:
                out[i] = x[:, 1 + self.num_registers:].transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return [out[i] for i in layers]


# -----------------------------------------------------------------------------
# 4. NMI analysis (UNIP §3.1; the formula of Park et al., ICLR 2023)
#
# One head's map A (L x L) as a joint distribution: p(q, k) = A[q, k] / L, p(q) = 1/L,
# p(k) = mean_q A[q, k]. I(Q;K) = H(K) - mean_q H(A[q, :]); NMI = I / sqrt(H(Q) H(K)),
# H(Q) = log L. Identity attention -> 1 (local); identical rows -> 0 (global).

PATTERN_THRESHOLDS = (0.06, 0.12)  # global < 0.06 <= hybrid <= 0.12 < local: the project's choice


def _entropy(p, dim=-1):  # sum -p log p, with 0 log 0 = 0
    return -torch.special.xlogy(p, p).sum(dim)


def nmi(attn, drop_cls=True, eps=1e-8):
    """NMI of post-softmax maps (B, H, N, N) -> (B, H); by default CLS out, rows renormalised."""
    a = attn.float()
    if drop_cls:
        a = a[..., 1:, 1:]
        a = a / (a.sum(-1, keepdim=True) + eps)
    L = a.shape[-1]
    p_k = a.mean(-2)  # (B, H, L): key marginal
    h_k = _entropy(p_k)  # H(K)
    mi = h_k - _entropy(a).mean(-1)  # H(K) - H(K|Q)
    out = mi / torch.sqrt(math.log(L) * h_k).clamp_min(eps)
    return out.clamp(0.0, 1.0)  # tiny negatives from float error; one-key maps give 0/0 -> 0


def classify_heads(nmi_values, thresholds=PATTERN_THRESHOLDS):
    """Pattern of each head from its (mean) NMI: 'global' / 'hybrid' / 'local'."""
    low, high = thresholds
    vals = nmi_values.tolist() if torch.is_tensor(nmi_values) else list(nmi_values)
    return ["global" if v < low else "local" if v > high else "hybrid" for v in vals]


LAYER_RULES = ("after-peak", "closest")


def layer_choice(layer_means, target=0.09, rule="after-peak", band=PATTERN_THRESHOLDS):
    """UNIP's rule: the layer whose mean NMI is closest to `target`, searched among every layer
    ('closest', as the paper states it) or among those after the NMI peak of the first half of the
    depth ('after-peak', the default; why: docs/design.md). Returns (layer from 1, reason, warning
    or None); the warning says when no searched layer lies in the hybrid band."""
    vals = layer_means.tolist() if torch.is_tensor(layer_means) else list(layer_means)
    if rule not in LAYER_RULES:
        raise ValueError(f"layer rule must be one of {', '.join(LAYER_RULES)}, got {rule!r}")
    if not vals:
        raise ValueError("no layer means to choose from: "
                         "the NMI profile is empty (no layers measured)")
    bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"layer {bad[0] + 1} has a non-finite mean NMI ({vals[bad[0]]}): the "
                         "attention maps of that layer overflowed or the images hold NaN; "
                         "no layer can be chosen")
    half = (len(vals) + 1) // 2
    peak = max(range(half), key=lambda i: (vals[i], -i))  # 0-based; the first of equal maxima
    candidates = list(range(len(vals)))
    reason = f"closest to {target} of all {len(vals)} layers"
    if rule == "after-peak":
        if peak + 1 < len(vals):
            candidates = candidates[peak + 1:]
            reason = (f"closest to {target} among layers {peak + 2}-{len(vals)}, after the NMI "
                      f"peak (layer {peak + 1}, {vals[peak]:.3f}; the highest of layers 1-{half})")
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
    """NMI of every head of `layers` (default all) on a batch: (L, B, H)."""
    maps = model.attention_maps(images, layers, reduce=lambda a: nmi(a, drop_cls=drop_cls))
    return torch.stack([maps[i] for i in sorted(maps)])


# -----------------------------------------------------------------------------
# 5. NMI-HAD (UNIP §3.2): the distillation loss, the teacher's view of the crop


def distill_loss(student_logits, teacher_logits):
    """KL(softmax(teacher row) || softmax(student row)) of logits (B, H, N, N), summed over keys,
    averaged over batch, heads and query rows (CLS included), in fp32: bf16 would drop the small
    probabilities of 197 keys."""
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


def teacher_view(img_size, student_patch, teacher_patch, flag="--img-size"):
    """(side, grid): a teacher with another patch size (DINOv2: 14) sees the student's crop resized
    to the student's grid times its patch, so the logits line up token by token (224 px, patch 16:
    14x14 -> 196 px). A crop that is not a multiple of the student's patch is refused: the two
    grids would not cover the same pixels."""
    patch_multiple(img_size, student_patch, f"{flag} (the student's crop)")
    grid = img_size // student_patch
    return grid * teacher_patch, grid


def resize_for(x, size):
    """The student's crop (B, 3, S, S) -> the teacher's view (B, 3, size, size), bicubic."""
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


# -----------------------------------------------------------------------------
# 6. segmentation: LL-FPN + UperNet (UNIP §3.3), linear probes
#
# Initialised as mmseg's (0.11) heads: conv-BN-ReLU kaiming-normal (fan_out), BN 1/0, classifiers
# N(0, 0.01) with zero bias, so the first logits are small and near-uniform.


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
    """Simple feature pyramid: four stride-16 maps -> strides 4, 8, 16, 32. LL-FPN feeds the last
    block's output to all four; the multi-layer baseline feeds blocks 4, 6, 8, 12."""

    def __init__(self, dim):
        super().__init__()
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim),
                                  nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, stride=2)

    def forward(self, feats):  # 4 x (B, D, h, w) -> sides 4h, 2h, h, h/2
        return [op(f) for op, f in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]


def _up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UperHead(nn.Module):
    """UperNet (Xiao et al. 2018) as mmseg's UPerHead: pyramid pooling on the coarsest map,
    laterals + top-down path, 3x3 FPN convs, fusion at the finest stride, dropout, classifier."""

    def __init__(self, in_dim, channels, num_classes, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_dim, channels, 1))
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
        lat = [conv(f) for conv, f in zip(self.lateral, feats[:3])]
        lat.append(self.bottleneck(torch.cat([top] + pooled, 1)))
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
    """Blocks 4, 6, 8, 12 of 12 (from 1) scaled to other depths: the multi-layer pyramid, probe."""
    return tuple(depth * k // 12 for k in (4, 6, 8, 12))


class Segmenter(nn.Module):
    """A ViT backbone with one of the paper's heads; forward -> (logits, auxiliary logits or None).

    'finetune': pyramid + UperNet (head_channels wide; None: D, as the reference) + FCN auxiliary head;
        `layers` feed the pyramid: (depth,)*4 is LL-FPN (default), multi_layers(depth) the baseline.
    'linear': frozen backbone; blocks multi_layers(depth) (or `layers`) resized to the first map's
        size and concatenated -> one 1x1 conv. 'layer-linear': one block -> 1x1 conv.
    The backbone's final `norm` feeds no head and is frozen.
    """

    def __init__(self, backbone, num_classes, mode="finetune", layers=None, aux=True, head_channels=None):
        super().__init__()
        self.backbone, self.mode, self.num_classes = backbone, mode, num_classes
        depth, dim = len(backbone.blocks), backbone.dim
        if head_channels is not None and (mode != "finetune" or head_channels < 1):
            raise ValueError(f"head_channels {head_channels}: a width of 1 or more, and only in finetune mode "
                             f"(mode {mode!r})")
        if mode == "finetune":
            self.layers = tuple(layers or (depth,) * 4)
            assert len(self.layers) == 4, "the pyramid takes 4 maps"
            self.pyramid = LLFPN(dim)
            # narrower than D: a cheaper head (on a CPU it dominates a small model's step)
            self.head = UperHead(dim, head_channels or dim, num_classes)
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
        # channels-last heads on a CPU: oneDNN's convolutions are faster so (docs/speed.md)
        layout = torch.channels_last if x.device.type == "cpu" else torch.contiguous_format
        maps = {i: f.contiguous(memory_format=layout)
                for i, f in zip(uniq, self.backbone.features(x, uniq))}
        feats = [maps[i] for i in self.layers]
        if self.mode == "finetune":
            pyr = self.pyramid(feats)
            aux = self.aux_head(pyr[2]) if (self.aux_head is not None and self.training) else None
            return self.head(pyr), aux
        feats = [feats[0]] + [_up(f, feats[0].shape[-2:]) for f in feats[1:]]
        return self.head(torch.cat(feats, 1)), None


def seg_loss(logits, label, ignore_index=255, weight=None):
    """Cross-entropy of (B, K, h, w) logits upsampled to the (B, H, W) label, averaged over all
    pixels with ignored ones counting 0 (mmseg 0.11): an all-ignore crop gives 0, not NaN.
    weight (K,): per-pixel loss times weight[class], still averaged over all pixels (not torch's
    weighted mean)."""
    logits = _up(logits.float(), label.shape[-2:])
    return F.cross_entropy(logits, label, weight=weight, ignore_index=ignore_index, reduction="none").mean()


# -----------------------------------------------------------------------------
# 7. size presets (patch 16, MLP ratio 4, LayerNorm eps 1e-6, qkv bias)


def _vit(dim, depth, heads):
    def preset(img_size=224, drop_path=0.0, last_heads=None, **kw):
        return ViT(img_size, dim=dim, depth=depth, heads=heads, last_heads=last_heads,
                   drop_path=drop_path, **kw)

    return preset


vit_tiny, vit_small, vit_base = _vit(192, 12, 3), _vit(384, 12, 6), _vit(768, 12, 12)
vit_large = _vit(1024, 24, 16)
vit_micro = _vit(96, 6, 3)  # not from the paper: a student small enough for a CPU (demo.py)


# =============================================================================
# What a copier needs around the method: teacher families, loading and saving, precision,
# inference. A reader learning UNIP can stop above this line.
# =============================================================================


# -----------------------------------------------------------------------------
# 8. teacher families: DINOv2 and CLIP as options of the one ViT (why: docs/design.md, "Teacher families")
#
# ViT's options for them:
#   pretrained_layer_scale  the layer-scale factors belong to the pre-trained weights (DINOv2): a checkpoint
#                           without them is refused (otherwise new factors keep their init)
#   num_registers           R learned tokens after CLS (DINOv2 '_reg4'), without position; they attend in every
#                           block but reach no output: logits, maps, features and the NMI cover CLS + patches
#   pos_interp              how the position table meets another token grid (POS_INTERP):
#       'size'              bicubic to the grid's size (MAE, mmseg, timm); at load, then only for another grid
#       'dinov2'            DINOv2's interpolate_pos_encoding: bicubic by scale factor (g + 0.1) / M, from the
#                           table as trained, at every forward
#       'dinov2_reg4'       the hub's '_reg4' models: bicubic to the grid's size, antialiased, likewise
#   act, norm_eps           CLIP: quick_gelu, 1e-5
#   pre_norm                a LayerNorm over the tokens before the first block (`norm_pre`: CLIP's ln_pre)
#   patch_bias              a bias in the patch projection (CLIP's conv1 has none)
POS_INTERP = ("size", "dinov2", "dinov2_reg4")


def check_pos_interp(mode):
    if mode not in POS_INTERP:
        raise ValueError(f"pos_interp must be one of {', '.join(POS_INTERP)}, got {mode!r}")


def resample_pos_embed(pos_embed, grid, num_prefix=1, mode="size"):
    """Resample the patch rows of a (1, prefix + g*g, D) position table to `grid` = (h, w) by `mode`
    (POS_INTERP), in float32 as DINOv2 does; prefix rows (CLS) are kept. 'size' returns the table itself
    when the grid matches; the DINOv2 modes always resample."""
    check_pos_interp(mode)
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


def dinov2_pos_embed(pos_embed, grid, square, mode):
    """A DINOv2 model's table for an input of token grid `grid`: as it is only for a square input on its own grid."""
    if square and grid == (math.isqrt(pos_embed.shape[1] - 1),) * 2:
        return pos_embed
    return resample_pos_embed(pos_embed, grid, mode=mode)


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


def quick_gelu(x):
    """CLIP's activation: x * sigmoid(1.702 x), a sigmoid fit of GELU (OpenAI CLIP, Radford et al. 2021)."""
    return x * torch.sigmoid(1.702 * x)


def _dinov2(dim, depth, heads, num_registers):
    """DINOv2 (Oquab et al. 2023): patch 14, layer scale (init 1e-5; the checkpoint's values are loaded, and
    required), the learned 37x37 table of the hub's 518 px whatever `img_size` (accepted for the presets'
    common signature only); '_reg4' models add 4 register tokens (Darcet et al. 2024)."""

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


# -----------------------------------------------------------------------------
# 9. checkpoints


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



def adopt_pos_embed(model, state_dict, prefix=""):
    """Called as a ViT loads a state dict: a DINOv2 model takes a table of another grid at the checkpoint's
    shape, as trained (POS_INTERP); a 'size' model keeps its own (load_pretrained resamples into it)."""
    pe = state_dict.get(prefix + "pos_embed")
    if (model.pos_interp != "size" and pe is not None and pe.shape != model.pos_embed.shape
            and pe.ndim == 3 and pe.shape[-1] == model.dim):
        model.pos_embed = nn.Parameter(model.pos_embed.new_empty(pe.shape), requires_grad=model.pos_embed.requires_grad)


def standard_state_dict(obj, name="<state dict>"):
    """A loaded checkpoint of any supported format (a wrapper dict or a state dict) -> a new state dict under the
    standard ViT keys: unwrapped and prefixes stripped (unwrap_state_dict), CLIP's image tower renamed
    (clip_to_vit), BEiT-style q/v biases fused, DINOv2 / timm names of layer scale and registers renamed. Other
    parts (heads, decoders, text towers) keep their names: fit_state_dict drops them. `name`: for messages."""
    sd = unwrap_state_dict(obj)
    int8 = [k for k in sd if k.endswith(".int8")]
    if int8:  # weight = int8 * scale[:, None]: loading either part alone would be silently wrong
        raise ValueError(f"{name} holds int8-quantised weights ({int8[0]!r} and {len(int8) - 1} more, each with a "
                         "'.scale'): dequantise it to an fp32 state dict first (weight = int8 * scale[:, None]) "
                         "and load that (the shared CLIP teacher has a converter in its own folder, outside this "
                         "repository: `python clip_int8_to_fp32.py OUT.pth`)")
    sd = clip_to_vit(sd)
    for k in [k for k in sd if k.endswith("attn.q_bias")]:  # BEiT / data2vec: q and v biases, none for k
        q_bias, v_bias = sd.pop(k), sd.pop(k.replace("q_bias", "v_bias"))
        sd[k.replace("q_bias", "qkv.bias")] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    for pattern, repl in _RENAMES:
        sd = {pattern.sub(repl, k): v for k, v in sd.items()}
    return sd


def fit_pos_embed(pe, model):
    """A checkpoint's position table (1, rows, D) -> (the table for `model`, (old, new) grid or None, adopted): DeiT's
    extra or missing row made standard, then resampled to the model's grid ('size'), or kept as trained by a DINOv2
    model, which adopts the table's grid (adopted: True when it differs from the model's)."""
    n = pe.shape[1]
    if math.isqrt(n - 1) ** 2 != n - 1 and math.isqrt(n - 2) ** 2 == n - 2:
        pe = torch.cat([pe[:, :1], pe[:, 2:]], dim=1)  # DeiT distilled: drop the distillation row
    elif math.isqrt(n) ** 2 == n:
        pe = torch.cat([torch.zeros_like(pe[:, :1]), pe], dim=1)  # no CLS row (DeiT III): zero position
    old, g = math.isqrt(pe.shape[1] - 1), math.isqrt(model.pos_embed.shape[1] - 1)
    if old != g and model.pos_interp == "size":
        return resample_pos_embed(pe, (g, g)), (old, g), False
    return pe, None, old != g


def fit_state_dict(model, sd, name="<state dict>", upto_layer=None):
    """Standard keys -> (the tensors `model` takes, report). Drops other parts and the blocks past the model's depth,
    fits pos_embed (DeiT's rows, the grid), refuses by name what the model misses or cannot place. May be absent:
    layer scale (keeps its init) unless pretrained_layer_scale; the final norm and the blocks after `upto_layer`."""
    own, depth = model.state_dict(), len(model.blocks)
    block_of = lambda k: int(m.group(1)) if (m := re.match(r"blocks\.(\d+)\.", k)) else None
    report, new = {"loaded": [], "ignored": [], "resampled": None}, {}
    regs, pre = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0, "norm_pre.weight" in sd
    if regs != model.num_registers:  # registers attend in every block: without them the model computes otherwise
        raise ValueError(f"{name} has {regs} register tokens ('register_tokens') and this model {model.num_registers}: "
                         f"build it with num_registers={regs} (e.g. a dinov2_*_reg4 preset for the '_reg4' "
                         "checkpoints, a plain dinov2_* preset otherwise)")
    if pre != ("norm_pre.weight" in own):  # CLIP's LayerNorm before the first block, likewise
        raise ValueError(f"{name} has {'a' if pre else 'no'} LayerNorm before the first block ('norm_pre.weight') and "
                         f"this model {'none' if pre else 'one'}: " + ("a CLIP checkpoint loads into the clip_vitb16 "
                         "preset (pre_norm=True)" if pre else "build the model with pre_norm=False (every preset but "
                         "clip_vitb16)"))
    for k, v in sd.items():
        b = block_of(k)
        if k in own:
            new[k] = v
        elif k == "patch_embed.proj.bias":  # a model built with patch_bias=False (CLIP) cannot add it
            raise ValueError(f"{name}: {k!r} has no counterpart in this model (its patch projection has no bias)")
        elif k.startswith(("vision_model.", "visual.")) and not _CLIP_EXTRA.match(k):  # clip_to_vit left it
            raise ValueError(f"{name}: CLIP image-tower weight {k!r} has no counterpart in this model")
        elif _CLIP_EXTRA.match(k) or _EXTRA.match(k) or b is None or b >= depth:
            report["ignored"].append(k)
        elif ".gamma_" in k:  # layer scale changes every residual branch: ignoring it is not an option
            raise ValueError(f"{name}: layer-scale weight {k!r} has no counterpart in this model; build it "
                             "with layer scale (the dinov2_* presets have it, or layer_scale=1.0)")
        else:  # a block weight without a slot (relative position bias, ...)
            raise ValueError(f"{name}: block weight {k!r} has no counterpart in this model (a different architecture?)")
    if "pos_embed" in new and new["pos_embed"].shape[-1] == own["pos_embed"].shape[-1]:
        new["pos_embed"], report["resampled"], adopted = fit_pos_embed(new["pos_embed"], model)
        if adopted:  # the model takes the table at its shape (adopt_pos_embed)
            own["pos_embed"] = new["pos_embed"]
    cut = upto_layer is not None or any((block_of(k) or 0) >= depth for k in report["ignored"])  # norm never runs
    late = lambda k: upto_layer is not None and (block_of(k) or -1) >= upto_layer
    optional = lambda k: ".gamma_" in k and not model.pretrained_layer_scale or cut and (k.startswith("norm.") or late(k))
    missing = [k for k in own if k not in new and not optional(k)]
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in new.items()
             if v.shape != own[k].shape]
    if missing or wrong:
        listed = lambda xs, n, sep: sep.join(xs[:n]) + (" ..." if len(xs) > n else "")
        lines = [f"missing {len(missing)} keys: {listed(missing, 12, ', ')}"] if missing else []
        if any(".gamma_" in k for k in missing) and model.pretrained_layer_scale:
            lines.append("the layer-scale factors are part of this architecture's pre-trained weights "
                         "('blocks.N.ls1.gamma' / 'ls2.gamma' in DINOv2 files): without them it computes something else")
        if wrong:
            lines.append(f"wrong shape for {len(wrong)} keys: {listed(wrong, 6, '; ')}")
        raise ValueError(f"{name} does not fit this model ({model.dim} wide, {depth} blocks):\n  " + "\n  ".join(lines))
    return new, report


def load_pretrained(model, source, upto_layer=None, verbose=True):
    """Load ViT weights in any supported format (standard_state_dict) from a path, a checkpoint dict or a state
    dict into `model`, fitted and checked by fit_state_dict: a model built shallower than the checkpoint (a teacher
    cut at its distilled layer) ignores the deeper blocks; with `upto_layer` = L, the blocks after L and the final
    norm may be absent (a teacher that stops at L never runs them). Returns a report: loaded, ignored, resampled."""
    from_file = isinstance(source, (str, bytes)) or hasattr(source, "__fspath__")
    name = str(source) if from_file else "<state dict>"
    new, report = fit_state_dict(model, standard_state_dict(load_checkpoint(source) if from_file else source, name),
                                 name, upto_layer)
    model.load_state_dict(new, strict=False)  # only optional keys can be absent: checked by fit_state_dict
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
    seg = Segmenter(backbone, arch["num_classes"], arch["mode"], arch["layers"], aux=arch["aux"],
                    head_channels=arch.get("head_channels"))  # absent in older checkpoints: D
    seg.load_state_dict(ck["model"])
    seg.classes, seg.palette = list(arch["classes"]), [tuple(c) for c in arch["palette"]]
    seg.crop, seg.stride, seg.short_side = arch["crop"], arch["stride"], arch["short_side"]
    seg.config = ck.get("config", {})
    return seg.to(device).eval()


# -----------------------------------------------------------------------------
# 10. training helpers: precision, attention kernels, the module DDP wraps


def param_groups(model, weight_decay=0.05, layer_decay=None, decay_all=False):
    """AdamW groups over the trainable parameters. Weight decay on everything but 1-D parameters and
    biases (MAE's pre-training rule; the reference's fine-tuning too: its layer-decay constructor means
    to spare pos_embed / cls_token but tests the unprefixed names, so they are decayed);
    decay_all=True decays every parameter (mmseg's plain AdamW: the reference's linear probes).
    layer_decay=None -> two groups, decay and no decay; else one group per layer id: embeddings 0,
    block i (from 0) i + 1, the rest (pyramid, heads, final norm) depth + 1, with
    'lr_scale' = layer_decay^(depth + 1 - id) to multiply into the lr at every step.
    Works on a ViT or on a Segmenter (its 'backbone.' prefix)."""
    vit = getattr(model, "backbone", model)
    prefix = "backbone." if vit is not model else ""
    depth = len(vit.blocks)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        local = name[len(prefix):] if name.startswith(prefix) else None  # None: outside the ViT
        lid = 0
        if layer_decay is not None:
            if local is not None and local.startswith(("patch_embed", "cls_token", "pos_embed",
                                                       "register_tokens", "norm_pre")):
                lid = 0
            elif local is not None and local.startswith("blocks."):
                lid = int(local.split(".")[1]) + 1
            else:
                lid = depth + 1
        no_wd = not decay_all and (p.ndim == 1 or name.endswith(".bias"))
        key = (lid, no_wd)
        if key not in groups:
            scale = 1.0 if layer_decay is None else layer_decay ** (depth + 1 - lid)
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_wd else weight_decay,
                           "lr_scale": scale, "layer_id": lid}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def freeze_unreached(student):
    """NMI-HAD's loss reads q and k of the student's last block and nothing after them: freeze the
    last block's attention output, norm2 and MLP and the final norm (they stay in the checkpoint, so
    it is a full ViT; DDP then needs no find_unused_parameters)."""
    last = student.blocks[-1]
    for m in (last.attn.proj, last.norm2, last.mlp, student.norm):
        m.requires_grad_(False)
    return student


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


def cuda_bf16_native(device):
    """(whether this GPU computes bf16 natively, its compute capability 'major.minor'). Native from 8.0
    (Ampere) on; below it bf16 matrix products are emulated and cuDNN has no bf16 convolutions."""
    major, minor = torch.cuda.get_device_capability(device)
    return major >= 8, f"{major}.{minor}"


def resolve_amp(amp, device):
    """--amp -> (autocast precision 'bf16' | 'fp16' | 'none', why, for the banner).
    auto: on CUDA bf16 where the GPU computes it natively, else fp16 (with the scripts' GradScaler); on a
    CPU bf16 only where it has bf16 matrix units (without them bf16 is emulated and slower than fp32;
    docs/speed.md), else none."""
    device = torch.device(device)
    # a CUDA device that cannot be asked (no CUDA here) keeps bf16; the run fails where it first uses it
    native, cap = cuda_bf16_native(device) if device.type == "cuda" and torch.cuda.is_available() else (True, None)
    if amp == "auto" and os.environ.get("UNIP_AMP", "auto") != "auto":
        amp, why = os.environ["UNIP_AMP"], "UNIP_AMP"
    elif amp == "auto" and device.type == "cuda":
        amp = "bf16" if native else "fp16"
        why = ("auto: cuda" if cap is None else f"auto: CUDA capability {cap} has native bf16" if native
               else f"auto: CUDA capability {cap} has no native bf16 -> fp16")
    elif amp == "auto":
        units = cpu_bf16_units() if device.type == "cpu" else None
        amp = "bf16" if units else "none"
        why = f"auto: CPU has {units}" if units else \
            "auto: CPU without bf16 matrix units" if device.type == "cpu" else f"auto: {device.type}"
    else:
        why = "--amp" if native or amp != "bf16" else \
            f"--amp; warning: CUDA capability {cap} has no native bf16 (slow; --amp fp16 is native)"
    if amp not in ("bf16", "fp16", "none"):
        raise ValueError(f"amp must be auto, bf16, fp16 or none, got {amp!r} ({why})")
    return amp, why


def autocast_weights_(model, dtype, keep=()):
    """Store a frozen model's linear and convolution layers in `dtype`, except the modules in `keep`.
    Autocast to `dtype` rounds their weights so at every call anyway: under it the results are the same, bit
    for bit, without the per-step copies, and the weights take half the memory. Only for a model that always
    runs under that autocast."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not any(m is k for k in keep):
            m.to(dtype)
    return model


def sdpa_for_training(device, amp):
    """Whether a model trained on `device` in precision `amp` should run SDPA (Attention.fused): yes, but
    on a CPU in bf16, where SDPA's backward kernel is slower than the explicit softmax(q·kᵀ)·v at ViT
    lengths (docs/speed.md)."""
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
# 11. inference: sliding windows, mIoU and mAcc


@torch.no_grad()
def slide_inference(model, img, num_classes, crop=512, stride=341, batch=4, patch=None):
    """Sliding-window logits (mmseg 'slide' mode): windows of `crop` every
    `stride` pixels, the last window aligned to the border, logits of
    overlapping windows averaged. img (B, C, H, W) -> (B, K, H, W).
    Up to `batch` windows go through the model together (larger products,
    docs/speed.md); the result is the same.
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


def acc_from_confusion(conf):
    """Per-class accuracy (recall) = TP / ground-truth pixels of the class; NaN for a class with no
    ground-truth pixel, left out of the mean (mAcc) as for IoU."""
    conf = conf.double()
    gt = conf.sum(1)
    return torch.where(gt > 0, conf.diag() / gt.clamp_min(1), torch.full_like(gt, float("nan")))
