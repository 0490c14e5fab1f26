"""DINOv2 teachers: patch 14, layer scale, register tokens; a teacher whose patch size differs from the
student's; registers in the distillation loss; the rule that picks the layer to distil. CPU, seconds.
Tests on the real DINOv2 ViT-S/14 file run when UNIP_TEACHERS names its folder (set by .ci/run), and on
real frames when UNIP_SAMPLE_DATA names the sample data; they skip otherwise."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import train_pretrain
import unip

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


def reference_forward(sd, x, patch, heads, eps=1e-6):
    """DINOv2's forward written out from a state dict in the official layout: patch conv, CLS + position,
    registers after CLS without position, pre-norm blocks with layer scale, final norm. pos_embed is
    resampled to the input's grid by size (bicubic, align_corners False), as the exported model does."""
    B = x.shape[0]
    tok = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    g = tok.shape[-1]
    tok = tok.flatten(2).transpose(1, 2)
    pos = sd["pos_embed"]
    old = math.isqrt(pos.shape[1] - 1)
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, g * g, -1)
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
            assert m.blocks[0].gamma_1 is not None and m.pos_embed.shape == (1, 1 + 16 * 16, dim)


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
    t_logits = train_pretrain.AttentionLogits(teacher, 2, size=56)(x)  # (B, 3, 17, 17): CLS + patches
    s_logits = student.attention_logits(x, 2)
    assert t_logits.shape == s_logits.shape == (2, 3, 17, 17)
    # Naive: the teacher's full logits with registers, computed by hand, then register rows and columns dropped.
    with torch.no_grad():
        h = teacher.prepare_tokens(train_pretrain.resize_for(x, 56))
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
    y = train_pretrain.resize_for(x, 196)
    assert y.shape == (2, 3, 196, 196)
    with torch.device("meta"):
        student = unip.vit_small(img_size=224, last_heads=6)
        teacher = unip.dinov2_vits14(img_size=196)
    assert student.grid(x) == teacher.grid(y) == (14, 14)
    const = torch.full((1, 3, 224, 224), 0.3)  # resizing keeps a flat image flat: no shift in intensity
    assert torch.allclose(train_pretrain.resize_for(const, 196), torch.full((1, 3, 196, 196), 0.3), atol=1e-5)


def test_train_pretrain_bridges_patch_14_and_16(tmp_path):
    path = tmp_path / "dinov2_like.pth"
    torch.save(official_layout(unip.dinov2_vits14_reg4(img_size=56)), path)
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_pretrain.py"), "--teacher", str(path),
                        "--teacher-arch", "dinov2_vits14_reg4", "--teacher-layer", "auto", "--nmi-images", "8",
                        "--model", "vit_micro", "--img-size", "64", "--synthetic-images", "16", "--batch-size", "8",
                        "--effective-batch", "8", "--epochs", "1", "--warmup-epochs", "1", "--steps", "1",
                        "--workers", "0", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sees the 64 px crops resized to 56 px (4x4 tokens, as the student)" in p.stdout
    assert "chose layer" in p.stdout
    ck = unip.load_checkpoint(out / "ckpt.pt")
    assert ck["config"]["teacher_size"] == 56 and ck["config"]["last_heads"] == 6
    assert math.isfinite(json.loads((out / "log.jsonl").read_text().splitlines()[-1])["loss"])


# ----------------------------------------------------------------------------- the layer to distil

DINOV2_S = [0.10, 0.44, 0.25, 0.39, 0.32, 0.27, 0.19, 0.17, 0.18, 0.17, 0.14, 0.17]  # measured, 48 thermal frames
MAE_LIKE = [0.30, 0.52, 0.47, 0.40, 0.31, 0.22, 0.15, 0.11, 0.085, 0.07, 0.05, 0.04]  # local first, then falling


def test_layer_rule_after_the_peak_on_designed_profiles():
    layer, why, warning = unip.layer_choice(DINOV2_S)
    assert layer == 11 and "after the NMI peak (layer 2" in why and "no searched layer" in warning
    assert unip.choose_layer(DINOV2_S, rule="closest") == 1  # the plain rule lands before the local phase
    layer, why, warning = unip.layer_choice(MAE_LIKE)
    assert layer == 9 and warning is None
    assert unip.choose_layer(MAE_LIKE, rule="closest") == 9  # both rules agree on a paper-like teacher
    rising = [0.02, 0.03, 0.05, 0.06, 0.08, 0.10]  # the peak is the last layer: falls back to all layers
    layer, why, warning = unip.layer_choice(rising)
    assert layer == 5 and "nothing comes after it" in why and warning is None
    with pytest.raises(ValueError, match="after-peak, closest"):
        unip.layer_choice(DINOV2_S, rule="first")


@pytest.mark.skipif(not os.environ.get("UNIP_TEACHERS"), reason="set UNIP_TEACHERS to the folder of real teachers")
def test_shared_dinov2_file_loads_and_matches_its_forward():
    path = os.path.join(os.environ["UNIP_TEACHERS"], "dinov2_vits14_imgfocus.pth")
    model = unip.dinov2_vits14(img_size=224)
    report = unip.load_pretrained(model, path, verbose=False)
    assert report["ignored"] == [] and len(report["loaded"]) == 174 and report["resampled"] == (37, 16)
    sd = unip.load_checkpoint(path)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        got, want = model.eval()(x), reference_forward(sd, x, 14, 6)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


@pytest.mark.skipif(not (os.environ.get("UNIP_TEACHERS") and os.environ.get("UNIP_SAMPLE_DATA")),
                    reason="set UNIP_TEACHERS and UNIP_SAMPLE_DATA")
def test_analyze_picks_a_layer_after_dinov2s_local_phase(tmp_path):
    path = os.path.join(os.environ["UNIP_TEACHERS"], "dinov2_vits14_imgfocus.pth")
    frames = os.path.join(os.environ["UNIP_SAMPLE_DATA"], "roadscene_flir_ir")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "analyze.py"), "--checkpoint", path, "--arch", "dinov2_vits14",
                        "--images", frames, "--num-images", "8", "--workers", "0", "--pictures", "0",
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "nmi.json").read_text())
    peak = max(range(12), key=lambda i: res["layers"][i]) + 1
    assert res["layers"][0] < 0.2 < res["layers"][peak - 1] and peak <= 4  # low first, then the local phase
    assert res["recommended_layer"] > peak and res["closest_layer"] == 1
    assert "after the NMI peak" in p.stdout and "hybrid band" in p.stdout
