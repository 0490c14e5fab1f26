"""DINOv2 teachers: patch 14, layer scale, register tokens; a teacher whose patch size differs from the
student's; registers in the distillation loss; the rule that picks the layer to distil. CPU, seconds.
Tests on the real DINOv2 ViT-S/14 file run when UNIP_TEACHERS names its folder (set by .ci/run), and on
real frames when UNIP_SAMPLE_DATA names the sample data; they skip otherwise."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train_pretrain
import unip
from conftest import run_main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def official_layout(model, mask_token=True):
    """A state dict laid out as the official DINOv2 checkpoints: ls1.gamma / ls2.gamma, mask_token."""
    sd = {}
    for k, v in model.state_dict().items():
        sd[k.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")] = v.clone()
    if mask_token:
        sd["mask_token"] = torch.zeros(1, model.dim)
    return sd


def random_dinov2(num_registers=0, img_size=98, dim=48, depth=3, heads=3, seed=0):
    """A small DINOv2-shaped ViT with every weight random (layer scale far from 1, registers far from 0)."""
    torch.manual_seed(seed)
    m = unip.ViT(img_size=img_size, patch_size=14, dim=dim, depth=depth, heads=heads, layer_scale=1e-5,
                 num_registers=num_registers)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "gamma" in name or "register" in name else 0.1) +
                    (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return m


def official_pos_encoding(pos_embed, H, W, patch, offset, antialias):
    """DINOv2's DinoVisionTransformer.interpolate_pos_encoding (facebookresearch/dinov2,
    dinov2/models/vision_transformer.py), copied in its structure: the table as it is for a square input
    on its own grid; else in float, scale_factor ((h + offset) / M, (w + offset) / M) when offset is set
    (0.1 in the plain models), the target size otherwise ('_reg4': offset 0, antialias True)."""
    N = pos_embed.shape[1] - 1
    h0, w0 = H // patch, W // patch
    if h0 * w0 == N and H == W:
        return pos_embed
    pos = pos_embed.float()
    class_pos, patch_pos, dim, M = pos[:, 0], pos[:, 1:], pos.shape[-1], int(math.sqrt(N))
    kw = {"scale_factor": (float(h0 + offset) / M, float(w0 + offset) / M)} if offset else {"size": (h0, w0)}
    patch_pos = F.interpolate(patch_pos.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                              antialias=antialias, **kw)
    assert (h0, w0) == patch_pos.shape[-2:]
    return torch.cat((class_pos.unsqueeze(0), patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)), dim=1)


def reference_forward(sd, x, patch, heads, eps=1e-6, interp="size"):
    """DINOv2's forward written out from a state dict in the official layout: patch conv, CLS + position,
    registers after CLS without position, pre-norm blocks with layer scale, final norm. pos_embed is
    resampled to the input's grid by `interp`: 'size' bicubic by size (align_corners False), as the
    exported ONNX model does; 'dinov2' / 'dinov2_reg4' as the official code (official_pos_encoding)."""
    B = x.shape[0]
    tok = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    gh, gw = tok.shape[-2:]
    tok = tok.flatten(2).transpose(1, 2)
    pos = sd["pos_embed"]
    if interp == "size":
        old = math.isqrt(pos.shape[1] - 1)
        grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
    else:
        offset, antialias = (0.1, False) if interp == "dinov2" else (0.0, True)
        grid = official_pos_encoding(pos, x.shape[-2], x.shape[-1], patch, offset, antialias)[:, 1:]
    parts = [sd["cls_token"].expand(B, -1, -1) + pos[:, :1]]
    if "register_tokens" in sd:
        parts.append(sd["register_tokens"].expand(B, -1, -1))
    h = torch.cat(parts + [tok + grid], dim=1)
    D = h.shape[-1]
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = lambda n: sd[f"blocks.{i}.{n}"]
        y = F.layer_norm(h, (D,), p("norm1.weight"), p("norm1.bias"), eps)
        q, k, v = (y @ p("attn.qkv.weight").T + p("attn.qkv.bias")).chunk(3, dim=-1)
        split = lambda t: t.reshape(B, -1, heads, D // heads).transpose(1, 2)
        a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(D // heads), dim=-1)
        o = (a @ split(v)).transpose(1, 2).reshape(B, -1, D) @ p("attn.proj.weight").T + p("attn.proj.bias")
        h = h + p("ls1.gamma") * o
        y = F.layer_norm(h, (D,), p("norm2.weight"), p("norm2.bias"), eps)
        y = F.gelu(y @ p("mlp.fc1.weight").T + p("mlp.fc1.bias")) @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
        h = h + p("ls2.gamma") * y
        i += 1
    return F.layer_norm(h, (D,), sd["norm.weight"], sd["norm.bias"], eps)


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("registers", [0, 4])
def test_official_layout_loads_and_computes_dinov2s_forward(registers):
    src = random_dinov2(registers, img_size=98)  # pos_embed on a 7x7 grid
    sd = official_layout(src)
    model = unip.ViT(img_size=56, patch_size=14, dim=48, depth=3, heads=3, layer_scale=1e-5, num_registers=registers)
    report = unip.load_pretrained(model, {"teacher": sd}, verbose=False)
    assert report["ignored"] == ["mask_token"] and report["resampled"] == (7, 4)
    assert torch.equal(model.blocks[1].gamma_2, sd["blocks.1.ls2.gamma"])
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        got, want = model.eval()(x), reference_forward(sd, x, 14, 3)
    assert got.shape == (2, 1 + registers + 16, 48)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_layer_scale_keys_round_trip():
    src = random_dinov2(4)
    sd = official_layout(src, mask_token=False)
    a = unip.ViT(img_size=98, patch_size=14, dim=48, depth=3, heads=3, layer_scale=1e-5, num_registers=4)
    unip.load_pretrained(a, sd, verbose=False)
    back = official_layout(a, mask_token=False)  # our keys -> the official names again: the same tensors
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    b = unip.ViT(img_size=98, patch_size=14, dim=48, depth=3, heads=3, layer_scale=1e-5, num_registers=4)
    unip.load_pretrained(b, a.state_dict(), verbose=False)  # and our own layout loads too
    x = torch.randn(1, 3, 98, 98)
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_registers_take_part_in_attention():
    m = random_dinov2(4).eval()
    x = torch.randn(1, 3, 98, 98)
    before = m(x)[:, 5:]  # patch tokens
    with torch.no_grad():
        m.register_tokens.add_(torch.randn_like(m.register_tokens))  # (a constant would vanish in LayerNorm)
    assert not torch.allclose(before, m(x)[:, 5:], atol=1e-3)
    assert m.attention_logits(x, 2).shape == (1, 3, 1 + 49, 1 + 49)  # registers left out of the logits
    assert m.features(x, [3])[0].shape == (1, 48, 7, 7)


def test_register_and_layer_scale_mismatches_are_refused_by_name():
    with_regs, without = official_layout(random_dinov2(4)), official_layout(random_dinov2(0))
    plain = lambda R=0, ls=1e-5: unip.ViT(img_size=98, patch_size=14, dim=48, depth=3, heads=3, layer_scale=ls,
                                        num_registers=R)
    with pytest.raises(ValueError, match=r"4 register tokens \('register_tokens'\) and this model 0.*num_registers=4"):
        unip.load_pretrained(plain(0), with_regs, verbose=False)
    with pytest.raises(ValueError, match=r"0 register tokens.*this model 4"):
        unip.load_pretrained(plain(4), without, verbose=False)
    with pytest.raises(ValueError, match=r"layer-scale weight 'blocks.0.gamma_1'"):
        unip.load_pretrained(plain(0, ls=0.0), without, verbose=False)


def test_dinov2_presets():
    with torch.device("meta"):
        for name, (dim, depth, heads, R) in {"dinov2_vits14": (384, 12, 6, 0), "dinov2_vitb14": (768, 12, 12, 0),
                                             "dinov2_vitl14": (1024, 24, 16, 0),
                                             "dinov2_vitl14_reg4": (1024, 24, 16, 4)}.items():
            m = unip.PRESETS[name](img_size=224, layer_scale=0.0)  # layer scale cannot be switched off
            assert (m.dim, len(m.blocks), m.heads, m.num_registers, m.patch_size) == (dim, depth, heads, R, 14)
            # DINOv2's own 37x37 table (518 px) whatever the crop, resampled at every forward as DINOv2 does
            assert m.blocks[0].gamma_1 is not None and m.pos_embed.shape == (1, 1 + 37 * 37, dim)
            assert m.pos_interp == ("dinov2_reg4" if R else "dinov2") and m.pretrained_layer_scale
        assert unip.vit_small().pos_interp == "size" and not unip.vit_small(layer_scale=1.0).pretrained_layer_scale


# ----------------------------------------------------------------------------- registers in the maps and the loss


def test_attention_maps_leave_registers_out_and_renormalise():
    m = random_dinov2(4).eval()
    x = torch.randn(2, 3, 98, 98)
    mid = m.attention_maps(x, [1, 2])[1]  # layer 1 computed mid-pass (full block, registers dropped after)
    last = m.attention_maps(x, [1])[1]  # layer 1 as the last one asked for (logits without registers)
    assert mid.shape == last.shape == (2, 3, 50, 50)
    assert torch.allclose(mid.sum(-1), torch.ones(2, 3, 50), atol=1e-5)
    assert torch.allclose(mid, last, atol=1e-5)


def naive_kl(student, teacher):
    """KL(softmax(t) || softmax(s)) per row with plain loops over batch, head and query."""
    total, n = 0.0, 0
    B, H, N, _ = teacher.shape
    for b in range(B):
        for h in range(H):
            for q in range(N):
                t, s = teacher[b, h, q].double(), student[b, h, q].double()
                pt, ps = torch.exp(t - t.logsumexp(0)), torch.exp(s - s.logsumexp(0))
                total += float((pt * (pt.log() - ps.log())).sum().detach())
                n += 1
    return total / n


def test_distill_loss_with_a_register_teacher_matches_a_naive_formula():
    teacher = random_dinov2(4, img_size=56).eval()  # 4x4 grid
    student = unip.ViT(img_size=64, patch_size=16, dim=48, depth=2, heads=3)  # 4x4 grid, last block 3 heads
    x = torch.randn(2, 3, 64, 64)
    t_logits = unip.AttentionLogits(teacher, 2, size=56)(x)  # (B, 3, 17, 17): CLS + patches
    s_logits = student.attention_logits(x, 2)
    assert t_logits.shape == s_logits.shape == (2, 3, 17, 17)
    # Naive: the teacher's full logits with registers, computed by hand, then register rows and columns dropped.
    with torch.no_grad():
        h = teacher.prepare_tokens(unip.resize_for(x, 56))
        h = teacher.blocks[0](h)
        blk = teacher.blocks[1]
        q, k, _ = blk.attn.qkv(blk.norm1(h)).chunk(3, dim=-1)
        split = lambda t: t.reshape(2, -1, 3, 16).transpose(1, 2)
        full = split(q) @ split(k).transpose(-1, -2) / 4.0  # (B, 3, 21, 21)
    keep = [0] + list(range(5, 21))
    naive = naive_kl(s_logits, full[:, :, keep][:, :, :, keep])
    assert unip.distill_loss(s_logits, t_logits).item() == pytest.approx(naive, rel=1e-5)


# ----------------------------------------------------------------------------- teacher and student patch sizes


def test_teacher_sees_the_crop_resized_to_the_students_grid():
    x = torch.randn(2, 3, 224, 224)
    y = unip.resize_for(x, 196)
    assert y.shape == (2, 3, 196, 196)
    with torch.device("meta"):
        student = unip.vit_small(img_size=224, last_heads=6)
        teacher = unip.dinov2_vits14(img_size=196)
    assert student.grid(x) == teacher.grid(y) == (14, 14)
    const = torch.full((1, 3, 224, 224), 0.3)  # resizing keeps a flat image flat: no shift in intensity
    assert torch.allclose(unip.resize_for(const, 196), torch.full((1, 3, 196, 196), 0.3), atol=1e-5)


def test_train_pretrain_bridges_patch_14_and_16(tmp_path):
    path = tmp_path / "dinov2_like.pth"
    torch.save(official_layout(unip.dinov2_vits14_reg4(img_size=56)), path)
    out = tmp_path / "run"
    p = run_main("train_pretrain.py", "--teacher", path, "--teacher-arch", "dinov2_vits14_reg4", "--teacher-layer",
                 "auto", "--nmi-images", "8", "--model", "vit_micro", "--img-size", "64", "--synthetic-images", "16",
                 "--batch-size", "8", "--effective-batch", "8", "--epochs", "1", "--warmup-epochs", "1", "--steps", "1",
                 "--workers", "0", "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sees the 64 px crops resized to 56 px (4x4 tokens, as the student)" in p.stdout
    assert "chose layer" in p.stdout
    ck = unip.load_checkpoint(out / "ckpt.pt")
    assert ck["config"]["teacher_size"] == 56 and ck["config"]["last_heads"] == 6
    assert math.isfinite(json.loads((out / "log.jsonl").read_text().splitlines()[-1])["loss"])


# ----------------------------------------------------------------------------- the layer to distil

DINOV2_S = [0.10, 0.44, 0.25, 0.39, 0.32, 0.27, 0.19, 0.17, 0.18, 0.17, 0.14, 0.17]  # measured, 48 thermal frames
MAE_LIKE = [0.30, 0.52, 0.47, 0.40, 0.31, 0.22, 0.15, 0.11, 0.085, 0.07, 0.05, 0.04]  # local first, then falling


DINOV2_S_REAL = [0.101, 0.421, 0.248, 0.398, 0.322, 0.271, 0.180, 0.168, 0.173, 0.156, 0.141, 0.171]  # 224 px
CLIP_LIKE = [0.119, 0.173, 0.356, 0.315, 0.262, 0.275, 0.179, 0.102, 0.095, 0.072, 0.063, 0.024]  # the paper's shape
LATE_RISE = [0.30, 0.50, 0.40, 0.20, 0.09, 0.06, 0.30, 0.55, 0.40]  # local again in the last layers


def test_layer_rule_after_the_peak_on_designed_profiles():
    for profile in (DINOV2_S, DINOV2_S_REAL):
        layer, why, warning = unip.layer_choice(profile)
        assert layer == 11 and "after the NMI peak (layer 2" in why and "no searched layer" in warning
        assert unip.choose_layer(profile, rule="closest") == 1  # the plain rule lands before the local phase
    for profile in (MAE_LIKE, CLIP_LIKE):
        layer, why, warning = unip.layer_choice(profile)
        assert layer == 9 and warning is None
        assert unip.choose_layer(profile, rule="closest") == 9  # both rules agree on a paper-like teacher
    assert "after the NMI peak (layer 3, 0.356; the highest of layers 1-6)" in unip.layer_choice(CLIP_LIKE)[1]
    rising = [0.02, 0.03, 0.05, 0.06, 0.08, 0.10]  # the early peak is layer 3 (of 1-3): layers 4-6 searched
    layer, why, warning = unip.layer_choice(rising)
    assert layer == 5 and "among layers 4-6" in why and warning is None
    assert unip.layer_choice([0.3])[0] == 1  # one layer: nothing after its peak, all layers searched
    with pytest.raises(ValueError, match="after-peak, closest"):
        unip.layer_choice(DINOV2_S, rule="first")


def test_layer_rule_a_late_rise_does_not_hide_the_hybrid_layer():
    # the highest layer of all is layer 8 (0.55): searching after it would leave only layer 9 (0.40, local)
    assert max(range(9), key=lambda i: LATE_RISE[i]) + 1 == 8
    layer, why, warning = unip.layer_choice(LATE_RISE)
    assert layer == 5 and warning is None and "after the NMI peak (layer 2, 0.500; the highest of layers 1-5)" in why
    assert unip.layer_choice(torch.tensor(LATE_RISE))[0] == 5  # a tensor of layer means, as the scripts pass
    tie = [0.2, 0.5, 0.5, 0.3, 0.09, 0.2]  # equal maxima: the first is the peak
    assert "(layer 2, 0.500" in unip.layer_choice(tie)[1]


def test_layer_rule_refuses_empty_and_non_finite_profiles():
    with pytest.raises(ValueError, match="profile is empty"):
        unip.layer_choice([])
    with pytest.raises(ValueError, match="profile is empty"):
        unip.layer_choice(torch.zeros(0))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"layer 4 has a non-finite mean NMI"):
            unip.layer_choice([0.1, 0.4, 0.2, bad, 0.09, 0.05], rule="closest")


@pytest.mark.skipif(not os.environ.get("UNIP_TEACHERS"), reason="set UNIP_TEACHERS to the folder of real teachers")
def test_shared_dinov2_file_loads_and_matches_its_forward():
    path = os.path.join(os.environ["UNIP_TEACHERS"], "dinov2_vits14_imgfocus.pth")
    model = unip.dinov2_vits14(img_size=224)
    report = unip.load_pretrained(model, path, verbose=False)
    assert report["ignored"] == [] and len(report["loaded"]) == 174 and report["resampled"] is None
    sd = unip.load_checkpoint(path)
    assert torch.equal(model.pos_embed, sd["pos_embed"])  # the 37x37 table kept as trained
    torch.manual_seed(0)
    for H, W in [(224, 224), (196, 196), (196, 252)]:
        x = torch.randn(1, 3, H, W)
        with torch.no_grad():
            got, want = model.eval()(x), reference_forward(sd, x, 14, 6, interp="dinov2")
            by_size = reference_forward(sd, x, 14, 6, interp="size")  # what the ONNX graph computes
        assert torch.allclose(got, want, atol=1e-4), (H, W, (got - want).abs().max())
        assert not torch.allclose(got, by_size, atol=1e-3)  # the interpolation matters


@pytest.mark.skipif(not (os.environ.get("UNIP_TEACHERS") and os.environ.get("UNIP_SAMPLE_DATA")),
                    reason="set UNIP_TEACHERS and UNIP_SAMPLE_DATA")
def test_analyze_picks_a_layer_after_dinov2s_local_phase(tmp_path):
    path = os.path.join(os.environ["UNIP_TEACHERS"], "dinov2_vits14_imgfocus.pth")
    frames = os.path.join(os.environ["UNIP_SAMPLE_DATA"], "roadscene_flir_ir")
    p = run_main("analyze.py", "--checkpoint", path, "--arch", "dinov2_vits14", "--images", frames,
                 "--num-images", "8", "--workers", "0", "--pictures", "0", "--out", tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "nmi.json").read_text())
    peak = max(range(12), key=lambda i: res["layers"][i]) + 1
    assert res["layers"][0] < 0.2 < res["layers"][peak - 1] and peak <= 4  # low first, then the local phase
    assert res["recommended_layer"] > peak and res["closest_layer"] == 1
    assert "after the NMI peak" in p.stdout and "hybrid band" in p.stdout


# ----------------------------------------------------------------------------- position embeddings as DINOv2 resamples them


def cubic(t, a):
    """The cubic convolution kernel (Keys): a = -0.75 in PyTorch's bicubic, -0.5 in its antialiased one (PIL's)."""
    t = abs(t)
    return ((a + 2) * t - (a + 3)) * t * t + 1 if t < 1 else ((a * t - 5 * a) * t + 8 * a) * t - 4 * a if t < 2 else 0.0


def bicubic_by_scale(M, out, scale):
    """(out, M) weights of bicubic resampling given a scale factor: output i samples the source at
    (i + 0.5) / scale - 0.5 (align_corners False), 4 taps, indices clamped at the border."""
    Wt = torch.zeros(out, M, dtype=torch.float64)
    for i in range(out):
        src = (i + 0.5) / scale - 0.5
        for k in range(math.floor(src) - 1, math.floor(src) + 3):
            Wt[i, min(max(k, 0), M - 1)] += cubic(src - k, -0.75)
    return Wt


def bicubic_antialiased(M, out):
    """(out, M) weights of antialiased bicubic resampling to `out` samples, written as PIL's resampling
    filter: support 2 x the downscale, kernel stretched by it, a = -0.5, weights normalised per output."""
    s = M / out
    f = max(s, 1.0)
    Wt = torch.zeros(out, M, dtype=torch.float64)
    for i in range(out):
        c = s * (i + 0.5)
        lo, hi = max(int(c - 2 * f + 0.5), 0), min(int(c + 2 * f + 0.5), M)
        w = torch.tensor([cubic((j - c + 0.5) / f, -0.5) for j in range(lo, hi)], dtype=torch.float64)
        Wt[i, lo:hi] = w / w.sum()
    return Wt


def by_hand(pos_embed, rows, cols):  # (1, 1 + M*M, D) -> (1, 1 + h*w, D) with (h, M), (w, M) weight matrices
    M, D = math.isqrt(pos_embed.shape[1] - 1), pos_embed.shape[-1]
    table = pos_embed[0, 1:].double().reshape(M, M, D)
    out = torch.einsum("ij,jkd,lk->ild", rows, table, cols).reshape(1, -1, D)
    return torch.cat([pos_embed[:, :1].double(), out], dim=1)


@pytest.mark.parametrize("grid", [(16, 16), (14, 14), (11, 11), (14, 18), (37, 37), (40, 40)])
def test_pos_embed_resampled_as_dinov2_by_hand(grid):
    torch.manual_seed(0)
    # a smooth table like a trained one: low frequencies over the 37x37 grid, plus a little noise
    r = torch.linspace(0, 1, 37)
    base = torch.stack([torch.sin(3 * r[:, None] * k + r[None] * (k + 1)) for k in range(8)], -1).reshape(1, 37 * 37, 8)
    pos = torch.cat([torch.randn(1, 1, 8), base + 0.05 * torch.randn_like(base)], dim=1)
    h, w = grid
    got = unip.resample_pos_embed(pos, grid, mode="dinov2")
    want = by_hand(pos, bicubic_by_scale(37, h, (h + 0.1) / 37), bicubic_by_scale(37, w, (w + 0.1) / 37))
    assert got.shape == (1, 1 + h * w, 8) and torch.allclose(got.double(), want, atol=2e-5)
    assert torch.allclose(got, official_pos_encoding(pos, 14 * h, 14 * w + 1, 14, 0.1, False), atol=1e-6)
    got = unip.resample_pos_embed(pos, grid, mode="dinov2_reg4")
    want = by_hand(pos, bicubic_antialiased(37, h), bicubic_antialiased(37, w))
    assert torch.allclose(got.double(), want, atol=2e-5)
    size = unip.resample_pos_embed(pos, grid)  # today's resampling, kept for the other presets
    want = by_hand(pos, bicubic_by_scale(37, h, h / 37), bicubic_by_scale(37, w, w / 37))
    assert torch.allclose(size.double(), want, atol=2e-5)
    if grid != (37, 37):  # the three differ (at 37 'size' and the antialiased one are the table itself)
        assert not torch.allclose(size, unip.resample_pos_embed(pos, grid, mode="dinov2"), atol=1e-3)
        assert not torch.allclose(size, got, atol=1e-3)
    with pytest.raises(ValueError, match="pos_interp must be one of size, dinov2, dinov2_reg4"):
        unip.resample_pos_embed(pos, grid, mode="bilinear")


@pytest.mark.parametrize("interp,registers", [("dinov2", 0), ("dinov2_reg4", 4), ("size", 0)])
def test_forward_resamples_the_table_as_dinov2_at_every_call(interp, registers):
    src = random_dinov2(registers, img_size=98)  # a 7x7 table
    sd = official_layout(src)
    model = unip.ViT(img_size=98, patch_size=14, dim=48, depth=3, heads=3, layer_scale=1e-5, num_registers=registers,
                     pos_interp=interp, pretrained_layer_scale=interp != "size")
    report = unip.load_pretrained(model, sd, verbose=False)
    assert report["resampled"] is None and torch.equal(model.pos_embed, sd["pos_embed"])
    for H, W in [(56, 56), (98, 98), (98, 112), (70, 42)]:
        x = torch.randn(2, 3, H, W)
        with torch.no_grad():
            got, want = model.eval()(x), reference_forward(sd, x, 14, 3, interp=interp)
        assert torch.allclose(got, want, atol=1e-5), (H, W, (got - want).abs().max())
    assert torch.equal(model.pos_embed, sd["pos_embed"])  # the table itself never changes


def test_dinov2_model_keeps_a_checkpoints_table_of_another_grid():
    src = random_dinov2(0, img_size=70)  # a 5x5 table
    sd = official_layout(src)
    model = unip.ViT(img_size=98, patch_size=14, dim=48, depth=3, heads=3, layer_scale=1e-5, pos_interp="dinov2",
                     pretrained_layer_scale=True)
    report = unip.load_pretrained(model, sd, verbose=False)
    assert report["resampled"] is None and model.pos_embed.shape == (1, 26, 48) and not model.pos_embed.requires_grad
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), reference_forward(sd, x, 14, 3, interp="dinov2"), atol=1e-5)
    again = unip.ViT(img_size=98, patch_size=14, dim=48, depth=3, heads=3, layer_scale=1e-5, pos_interp="dinov2")
    again.load_state_dict(model.state_dict())  # a plain state-dict round trip adopts the grid too
    assert torch.equal(again.eval()(x), model(x))


def test_finetuned_dinov2_keeps_its_table_and_pads_crops(tmp_path):
    torch.manual_seed(0)
    init = tmp_path / "dinov2_s.pth"
    torch.save(official_layout(unip.dinov2_vits14()), init)
    out = tmp_path / "seg"
    p = run_main("train_seg.py", "--model", "dinov2_vits14", "--init", init, "--crop", "50", "--batch-size", "2",
                 "--eval-images", "1", "--workers", "0", "--steps", "2", "--log-every", "1", "--amp", "none", "--out", out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "training crops are padded to 56" in p.stdout
    ck = unip.load_checkpoint(out / "ckpt.pt")
    assert ck["model"]["backbone.pos_embed"].shape == (1, 1370, 384)
    seg = unip.load_segmenter(out / "ckpt.pt")
    assert seg.backbone.pos_interp == "dinov2" and torch.equal(seg.backbone.pos_embed, ck["model"]["backbone.pos_embed"])
    x = torch.randn(1, 3, 50, 50)
    a = unip.slide_inference(seg, x, seg.num_classes, seg.crop, seg.stride)
    x[..., 49] += 3.0  # the last column: beyond 3 full patches of 14 (42 px), but padded to 56 it reaches the model
    assert a.shape == (1, seg.num_classes, 50, 50) and not torch.allclose(a, unip.slide_inference(seg, x, seg.num_classes, 50, 33))


# ----------------------------------------------------------------------------- crops that are not a multiple of the patch


def center_padding_official(x, multiple):
    """DINOv2's CenterPadding (dinov2/hub/utils.py): each side padded to ceil(size / multiple) * multiple,
    half the extra on the left/top (rounded down), the rest on the right/bottom, zeros."""
    pads = []
    for size in x.shape[:1:-1]:  # W, then H: F.pad's order
        extra = math.ceil(size / multiple) * multiple - size
        pads += [extra // 2, extra - extra // 2]
    return F.pad(x, pads)


def test_center_pad_is_dinov2s_center_padding():
    for H, W in [(50, 50), (56, 57), (13, 29), (42, 28)]:
        x = torch.randn(2, 3, H, W)
        got, (top, left) = unip.center_pad(x, 14)
        assert torch.equal(got, center_padding_official(x, 14))
        assert torch.equal(got[..., top:top + H, left:left + W], x)
    y = torch.zeros(1, 50, 50, dtype=torch.int64)
    assert (unip.center_pad(y, 14, value=255)[0] == 255).sum() == 56 * 56 - 50 * 50


def test_slide_inference_lets_every_pixel_reach_a_patch14_model():
    torch.manual_seed(0)
    seg = unip.Segmenter(random_dinov2(4, img_size=98), num_classes=3, aux=False).eval()
    img = torch.randn(1, 3, 60, 75)  # windows of 50 x 50: 3 patches of 14 cover 42 px of each
    out = unip.slide_inference(seg, img, 3, crop=50, stride=25)
    # by hand: every window padded to 56 x 56 (3 px before, 3 after), logits resized to it, the window cut out
    acc, cnt = torch.zeros(1, 3, 60, 75), torch.zeros(1, 1, 60, 75)
    for y in (0, 10):
        for x in (0, 25):
            win = F.pad(img[:, :, y:y + 50, x:x + 50], (3, 3, 3, 3))
            with torch.no_grad():
                logit = F.interpolate(seg(win)[0], size=(56, 56), mode="bilinear", align_corners=False)
            acc[:, :, y:y + 50, x:x + 50] += logit[..., 3:53, 3:53]
            cnt[:, :, y:y + 50, x:x + 50] += 1
    assert torch.allclose(out, acc / cnt, atol=1e-5)
    edge = img.clone()
    edge[..., -4:, :] += 2.0  # rows 56..59: beyond the last full patch of every lowest window without padding
    assert not torch.allclose(unip.slide_inference(seg, edge, 3, crop=50, stride=25)[..., -4:, :], out[..., -4:, :])
    # a patch-16 model at multiples of 16: no padding, results as before
    vit = unip.Segmenter(unip.ViT(img_size=64, dim=48, depth=2, heads=3), 3, aux=False).eval()
    img = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        whole = F.interpolate(vit(img)[0], size=(64, 96), mode="bilinear", align_corners=False)
    assert torch.allclose(unip.slide_inference(vit, img, 3, crop=96, stride=64), whole, atol=1e-5)


def test_student_crop_off_the_patch_grid_is_refused_with_the_nearest_size(tmp_path):
    assert unip.teacher_view(224, 16, 14) == (196, 14) and unip.teacher_view(160, 16, 16) == (160, 10)
    with pytest.raises(ValueError, match=r"--img-size \(the student's crop\) 230 is not a multiple of the patch size "
                                         r"16.*use 224 or 240"):
        unip.teacher_view(230, 16, 14)
    with pytest.raises(ValueError, match="use 160 or 144"):
        unip.teacher_view(155, 16, 14)
    with pytest.raises(ValueError, match="use 154 or 168"):  # a DINOv2 student: its own patch counts
        unip.teacher_view(160, 14, 16)
    p = run_main("train_pretrain.py", "--teacher", "random", "--teacher-arch", "dinov2_vits14", "--teacher-layer", "2",
                 "--model", "vit_micro", "--img-size", "70", "--synthetic-images", "8", "--batch-size", "4",
                 "--effective-batch", "4", "--workers", "0", "--out", tmp_path)
    assert p.returncode != 0 and "error: --img-size (the student's crop) 70" in p.stderr and "use 64 or 80" in p.stderr


# ----------------------------------------------------------------------------- optimiser groups and loading


def test_register_tokens_are_embeddings_in_param_groups():
    seg = unip.Segmenter(random_dinov2(4), num_classes=3)
    groups = unip.param_groups(seg, weight_decay=0.05, layer_decay=0.85)
    where = {n: g for g in groups for n in g["names"]}
    reg, cls = where["backbone.register_tokens"], where["backbone.cls_token"]
    assert reg["layer_id"] == 0 and reg["weight_decay"] == 0.05 and reg["lr_scale"] == pytest.approx(0.85 ** 4)
    assert reg is cls  # the same group as CLS: embeddings, decayed as the reference decays CLS
    assert where["backbone.blocks.0.attn.qkv.weight"]["layer_id"] == 1


def test_dinov2_checkpoint_without_layer_scale_is_refused():
    sd = {k: v for k, v in official_layout(unip.dinov2_vits14()).items() if ".ls" not in k}
    with pytest.raises(ValueError, match=r"(?s)missing 24 keys: blocks.0.gamma_1, blocks.0.gamma_2.*"
                                         r"layer-scale factors are part of this architecture's pre-trained weights"):
        unip.load_pretrained(unip.dinov2_vits14(), sd, verbose=False)
    # upto_layer: the gammas of the blocks a cut teacher never runs may be absent, the others not
    cut = {k: v for k, v in sd.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < 3}
    with pytest.raises(ValueError, match=r"missing 6 keys: blocks.0.gamma_1"):
        unip.load_pretrained(unip.dinov2_vits14(), cut, upto_layer=3, verbose=False)
    # layer scale added at fine-tuning to a plain ViT: an MAE-style checkpoint has none, and they keep their init
    mae = {"model": unip.vit_small().state_dict()}
    model = unip.vit_small(layer_scale=1.0)
    report = unip.load_pretrained(model, mae, verbose=False)
    assert "blocks.0.gamma_1" not in report["loaded"] and torch.equal(model.blocks[0].gamma_1, torch.ones(384))


# ----------------------------------------------------------------------------- analyze.py measures where training does


def eval_batch(folder, size=224):
    """analyze.py's images: every file under `folder`, sorted, as its EvalTransform makes them (B, 3, S, S)."""
    import analyze
    ds = analyze.ImageFolder(str(folder), analyze.EvalTransform(size))
    return torch.stack([ds[i] for i in range(len(ds))])


def run_analyze(*args):
    import analyze
    analyze.main(["--device", "cpu", "--amp", "none", "--workers", "0", "--pictures", "0", *map(str, args)])


def test_analyze_measures_at_the_students_grid_as_train_pretrain(tmp_path):
    import contextlib
    torch.manual_seed(0)
    teacher = unip.dinov2_vits14()
    with torch.no_grad():  # a teacher whose layers differ: strong positions, live blocks, q/k sharper in some
        teacher.pos_embed.mul_(20)
        for i, blk in enumerate(teacher.blocks):
            blk.gamma_1.fill_(1.0)
            blk.gamma_2.fill_(0.3)
            blk.attn.qkv.weight[:768].mul_(1.0 + 0.6 * ((i * 5) % 7))
    path = tmp_path / "dinov2_s.pth"
    torch.save(official_layout(teacher), path)
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        a = (rng.random((90, 120)) * 60 + 40).astype(np.uint8)
        a[20 + 10 * i: 50 + 10 * i, 30:60 + 10 * i] = 230  # a warm object
        Image.fromarray(a).save(folder / f"f{i}.png")
    run_analyze("--checkpoint", path, "--arch", "dinov2_vits14", "--images", folder, "--num-images", 4,
                "--out", tmp_path / "a")
    res = json.loads((tmp_path / "a" / "nmi.json").read_text())
    assert (res["img_size"], res["student_patch"], res["view_size"], res["grid"]) == (224, 16, 196, 14)
    x = eval_batch(folder)
    head_nmi = train_pretrain.teacher_nmi(teacher.eval(), [x], 196, torch.device("cpu"), contextlib.nullcontext())
    assert head_nmi.shape == (12, 6)
    assert np.allclose(res["layers"], head_nmi.mean(1).numpy(), atol=1e-5)
    assert res["recommended_layer"] == unip.choose_layer(head_nmi.mean(1)) and res["warning"] is None
    assert max(res["layers"]) > 0.3 and min(res["layers"]) < 0.03  # local and global layers: a real choice
    at_224 = unip.layer_nmi(teacher, x).mean((1, 2))  # the old measurement: DINOv2 on the 224 px crop, 16x16
    assert not np.allclose(res["layers"], at_224.numpy(), atol=1e-3)
    run_analyze("--checkpoint", path, "--arch", "dinov2_vits14", "--images", folder, "--num-images", 4,
                "--student-patch", 0, "--out", tmp_path / "b")  # the model's own grid: the crop as it is
    own = json.loads((tmp_path / "b" / "nmi.json").read_text())
    assert own["view_size"] == 224 and np.allclose(own["layers"], at_224.numpy(), atol=1e-5)


def test_analyze_refuses_crops_off_the_patch_grid(tmp_path):
    with pytest.raises(ValueError, match=r"--img-size \(the student's crop\) 70 .*use 64 or 80"):
        run_analyze("--arch", "vit_tiny", "--img-size", 70, "--num-images", 2, "--out", tmp_path)
    with pytest.raises(ValueError, match=r"--img-size \(with --student-patch 0, dinov2_vits14's\) 230 .*use 224 or 238"):
        run_analyze("--arch", "dinov2_vits14", "--img-size", 230, "--student-patch", 0, "--num-images", 2,
                    "--out", tmp_path)


@pytest.mark.skipif(not (os.environ.get("UNIP_TEACHERS") and os.environ.get("UNIP_SAMPLE_DATA")),
                    reason="set UNIP_TEACHERS and UNIP_SAMPLE_DATA")
def test_analyze_and_train_pretrain_pick_the_same_layer_of_the_real_dinov2(tmp_path):
    import contextlib
    path = os.path.join(os.environ["UNIP_TEACHERS"], "dinov2_vits14_imgfocus.pth")
    frames = tmp_path / "frames"  # 8 real frames, evenly spaced over the sorted folder
    src = os.path.join(os.environ["UNIP_SAMPLE_DATA"], "roadscene_flir_ir")
    import analyze
    files = analyze.ImageFolder(src, None).files
    os.makedirs(frames)
    for k, i in enumerate(np.linspace(0, len(files) - 1, 8).round().astype(int)):
        os.symlink(files[i], frames / f"{k}_{os.path.basename(files[i])}")
    run_analyze("--checkpoint", path, "--arch", "dinov2_vits14", "--images", frames, "--num-images", 8,
                "--out", tmp_path / "a")
    res = json.loads((tmp_path / "a" / "nmi.json").read_text())
    teacher = unip.dinov2_vits14()
    unip.load_pretrained(teacher, path, verbose=False)
    head_nmi = train_pretrain.teacher_nmi(teacher.eval(), [eval_batch(frames)], 196, torch.device("cpu"),
                                          contextlib.nullcontext())
    assert np.allclose(res["layers"], head_nmi.mean(1).numpy(), atol=1e-5)
    assert res["recommended_layer"] == unip.choose_layer(head_nmi.mean(1)) and res["view_size"] == 196
