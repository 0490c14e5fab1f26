"""Numerical tests of unip.py: attention paths, NMI, the NMI-HAD loss, checkpoint loading."""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import unip


def tiny_vit(**kw):
    """A small ViT for fast tests: 64 px (4x4 patches), 48 wide, 4 blocks."""
    args = dict(img_size=64, dim=48, depth=4, heads=3)
    args.update(kw)
    return unip.ViT(**args)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- ViT


def test_vit_small_parameter_count_and_keys():
    sd = unip.vit_small().state_dict()
    assert sum(v.numel() for v in sd.values()) == 21_665_664  # standard ViT-S/16 backbone, no head
    for k in ["patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed",
              "blocks.11.norm1.weight", "blocks.11.attn.qkv.weight", "blocks.11.attn.qkv.bias",
              "blocks.11.attn.proj.weight", "blocks.11.norm2.bias", "blocks.11.mlp.fc1.weight",
              "blocks.11.mlp.fc2.bias", "norm.weight", "norm.bias"]:
        assert k in sd, k
    assert sd["pos_embed"].shape == (1, 197, 384)


@pytest.mark.parametrize("preset,dim,heads,depth", [
    ("vit_micro", 96, 3, 6), ("vit_tiny", 192, 3, 12), ("vit_small", 384, 6, 12), ("vit_base", 768, 12, 12), ("vit_large", 1024, 16, 24)])
def test_presets(preset, dim, heads, depth):
    with torch.device("meta"):  # shapes only: no time spent drawing ViT-L's 300M initial weights
        m = unip.PRESETS[preset](img_size=32)
    assert (m.dim, m.heads, len(m.blocks), m.blocks[-1].attn.heads) == (dim, heads, depth, heads)


def test_sincos_matches_mae_numpy_construction():
    # MAE's recipe written with numpy's 'xy' meshgrid: half the channels from grid[0] (columns), half from grid[1].
    def mae(dim, g):
        grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)), 0)
        def one(d, pos):
            omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
            out = np.outer(pos.reshape(-1), omega)
            return np.concatenate([np.sin(out), np.cos(out)], 1)
        emb = np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], 1)
        return np.concatenate([np.zeros((1, dim)), emb], 0)

    for dim, g in [(384, 14), (192, 32), (48, 4)]:
        ours = unip.sincos_pos_embed(dim, g)
        assert ours.shape == (1 + g * g, dim)
        assert torch.allclose(ours, torch.from_numpy(mae(dim, g)).float(), atol=1e-6)
    assert unip.sincos_pos_embed(48, 4)[0].abs().sum() == 0  # zero CLS row


def test_sdpa_path_matches_explicit_softmax_outputs_and_grads():
    attn = unip.Attention(48, 3)
    x = torch.randn(2, 17, 48, requires_grad=True)
    y_fast = attn(x)
    y_fast.square().sum().backward()
    g_fast = [x.grad.clone()] + [p.grad.clone() for p in attn.parameters()]
    x.grad = None
    attn.zero_grad()

    # plain reference written out: per-head loops, explicit softmax
    B, N, D = x.shape
    qkv = attn.qkv(x).view(B, N, 3, 3, 16)
    heads = []
    for h in range(3):
        q, k, v = qkv[:, :, 0, h], qkv[:, :, 1, h], qkv[:, :, 2, h]
        w = torch.softmax(torch.einsum("bnd,bmd->bnm", q, k) / math.sqrt(16), dim=-1)
        heads.append(torch.einsum("bnm,bmd->bnd", w, v))
    y_ref = attn.proj(torch.cat(heads, -1))
    y_ref.square().sum().backward()
    g_ref = [x.grad.clone()] + [p.grad.clone() for p in attn.parameters()]

    assert torch.allclose(y_fast, y_ref, atol=1e-5)
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a, b, atol=1e-4)
    y_exp, probs = attn.forward_with_attention(x)
    assert torch.allclose(y_exp, y_ref, atol=1e-5) and probs.shape == (2, 3, 17, 17)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3, 17), atol=1e-5)


def test_block_explicit_path_equals_fast_path():
    blk = unip.Block(48, 3).eval()
    x = torch.randn(2, 17, 48)
    y, probs = blk.forward_with_attention(x)
    assert torch.allclose(blk(x), y, atol=1e-5)
    assert torch.allclose(blk.attn.logits(blk.norm1(x)).softmax(-1), probs, atol=1e-6)


def test_attention_logits_reproduce_attention_output():
    m = tiny_vit().eval()
    x = torch.randn(2, 3, 64, 64)
    layer = 3
    logits = m.attention_logits(x, layer)  # (B, H, N, N)
    # hidden state entering block 3, computed by hand
    h = m.prepare_tokens(x)
    for blk in m.blocks[:layer - 1]:
        h = blk(h)
    blk = m.blocks[layer - 1]
    a = blk.attn
    v = a.qkv(blk.norm1(h)).view(2, 17, 3, 3, 16)[:, :, 2].transpose(1, 2)  # (B, H, N, hd)
    out = a.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 17, 48))
    assert torch.allclose(out, a(blk.norm1(h)), atol=1e-5)


def test_attention_logits_stop_at_the_layer():
    m = tiny_vit().eval()
    x = torch.randn(2, 3, 64, 64)
    ref = m.attention_logits(x, 2)
    with torch.no_grad():  # poison everything that must not run: v rows and proj of block 2, blocks 3-4, norm
        m.blocks[1].attn.qkv.weight[96:] = float("nan")
        m.blocks[1].attn.proj.weight.fill_(float("nan"))
        for p in list(m.blocks[1].mlp.parameters()) + list(m.blocks[2:].parameters()) + list(m.norm.parameters()):
            p.fill_(float("nan"))
    out = m.attention_logits(x, 2)
    assert torch.isfinite(out).all() and torch.allclose(out, ref)
    with pytest.raises(ValueError, match="out of range"):
        m.attention_logits(x, 5)


def test_last_heads_gives_teacher_head_count():
    m = unip.vit_small(img_size=64, last_heads=16)
    assert m.attention_logits(torch.randn(1, 3, 64, 64), 12).shape == (1, 16, 17, 17)
    assert m.blocks[-1].attn.head_dim == 24 and m.blocks[-1].attn.scale == 24 ** -0.5
    assert m.blocks[0].attn.heads == 6
    assert m.blocks[-1].attn.qkv.weight.shape == (3 * 384, 384)  # parameter shapes unchanged


def test_attention_maps_match_single_layer_logits_and_stop_early():
    m = tiny_vit().eval()
    x = torch.randn(2, 3, 64, 64)
    maps = m.attention_maps(x, [1, 3])
    assert sorted(maps) == [1, 3]
    for layer in (1, 3):
        assert torch.allclose(maps[layer], m.attention_logits(x, layer).softmax(-1), atol=1e-6)
        assert torch.allclose(maps[layer].sum(-1), torch.ones(2, 3, 17), atol=1e-5)
    with torch.no_grad():
        m.blocks[3].attn.qkv.weight.fill_(float("nan"))
    assert all(torch.isfinite(v).all() for v in m.attention_maps(x, [1, 3]).values())
    red = m.attention_maps(x, [2], reduce=lambda a: a.mean())
    assert red[2].ndim == 0


def test_features_shapes_and_non_square_input():
    m = tiny_vit().eval()
    feats = m.features(torch.randn(2, 3, 64, 96), [2, 4])
    assert [f.shape for f in feats] == [(2, 48, 4, 6)] * 2


def test_pos_embed_resampled_at_run_time_for_other_grids():
    m = tiny_vit(img_size=64).eval()
    x = torch.randn(1, 3, 128, 128)
    tokens = m.prepare_tokens(x)
    assert tokens.shape == (1, 65, 48)
    pos = unip.resample_pos_embed(m.pos_embed, (8, 8))
    patches = m.patch_embed(x).flatten(2).transpose(1, 2)
    assert torch.allclose(tokens[:, 1:], patches + pos[:, 1:], atol=1e-6)


def test_resample_pos_embed_14_to_32():
    pe = unip.sincos_pos_embed(64, 14)[None]
    out = unip.resample_pos_embed(pe, (32, 32))
    assert out.shape == (1, 1 + 32 * 32, 64)
    assert torch.equal(out[:, 0], pe[:, 0])  # CLS row kept
    grid = pe[:, 1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False)
    assert torch.allclose(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, -1, 64))
    assert unip.resample_pos_embed(pe, (14, 14)) is pe


def test_drop_path_only_in_training():
    blk = unip.Block(48, 3, drop_path=0.5)
    x = torch.randn(64, 5, 48)
    blk.eval()
    assert torch.equal(blk(x), blk(x))
    blk.train()
    torch.manual_seed(1)
    a = blk(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, blk(x))


def test_every_parameter_gets_a_gradient_in_full_forward():
    m = tiny_vit(drop_path=0.1)
    m(torch.randn(2, 3, 64, 64)).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def checkpoint_run(model, fn, ckpt):
    """Loss, gradients, bytes autograd kept outside checkpointed blocks, block calls and the RNG state after one
    backward of fn() with model.grad_checkpoint = ckpt; the same seed each time, so drop path draws alike."""
    model.grad_checkpoint = ckpt
    model.zero_grad(set_to_none=True)
    saved, calls = [], []
    hooks = [blk.mlp.register_forward_hook(lambda *a: calls.append(1)) for blk in model.blocks]
    torch.manual_seed(1)
    keep = lambda t: saved.append(t.numel() * t.element_size()) or t  # what autograd stores for the backward
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = fn()
    loss.backward()  # a checkpointed block runs again here
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved), len(calls), torch.get_rng_state()


@pytest.mark.parametrize("path", ["forward", "attention_logits"])
def test_grad_checkpoint_gives_the_same_loss_and_gradients_with_drop_path(path):
    # drop path 0.5 in every block: if the recomputation drew new masks, the gradients would differ
    vit = tiny_vit(drop_path=0.5, last_heads=4).train()
    x, w, target = torch.randn(4, 3, 64, 64), torch.randn(4, 17, 48), torch.randn(4, 4, 17, 17)
    fn = {"forward": lambda: (vit(x) * w).sum(),  # every block
          "attention_logits": lambda: unip.distill_loss(vit.attention_logits(x, 4), target)}[path]  # 1-3, q/k of 4
    loss0, g0, saved0, calls0, rng0 = checkpoint_run(vit, fn, False)
    loss1, g1, saved1, calls1, rng1 = checkpoint_run(vit, fn, True)
    run_blocks = 4 if path == "forward" else 3  # the last block's logits are computed outside the checkpoints
    assert (calls0, calls1) == (run_blocks, 2 * run_blocks)  # each checkpointed block runs again in the backward
    assert saved1 < saved0 / 2  # of a checkpointed block only its input is kept
    assert torch.equal(rng0, rng1)  # the random stream continues as without checkpointing
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert set(g1) == set(g0) and "blocks.0.mlp.fc1.weight" in g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-6, msg=n)  # masks drawn anew would differ far more
    vit.grad_checkpoint = True
    with torch.no_grad():  # no gradients: no checkpoint, each block runs once
        calls = []
        hook = vit.blocks[0].mlp.register_forward_hook(lambda *a: calls.append(1))
        vit(x)
        hook.remove()
    assert calls == [1]


# ----------------------------------------------------------------------------- NMI


def nmi_reference(a):
    """Plain double loop over p(q, k) for one (L, L) map, as written in the notes."""
    a = a.double()
    L = a.shape[0]
    p = a / L
    pk = p.sum(0)
    mi = 0.0
    for q in range(L):
        for k in range(L):
            if p[q, k] > 0:
                mi += p[q, k] * math.log(p[q, k] / ((1 / L) * pk[k]))
    hk = -sum(float(x) * math.log(float(x)) for x in pk if x > 0)
    return float(mi) / math.sqrt(math.log(L) * hk)


def test_nmi_known_cases():
    L = 16
    eye = torch.eye(L)[None, None]
    uniform = torch.full((1, 1, L, L), 1.0 / L)
    row = torch.softmax(torch.randn(L), 0)
    same_rows = row.expand(L, L)[None, None]
    assert unip.nmi(eye, drop_cls=False).item() == pytest.approx(1.0, abs=1e-6)
    assert unip.nmi(uniform, drop_cls=False).item() == pytest.approx(0.0, abs=1e-6)
    assert unip.nmi(same_rows, drop_cls=False).item() == pytest.approx(0.0, abs=1e-6)
    one_key = torch.zeros(1, 1, L, L)
    one_key[..., 3] = 1  # total collapse: H(K) = 0, defined as 0
    assert unip.nmi(one_key, drop_cls=False).item() == 0.0


def test_nmi_matches_reference_and_is_bounded():
    a = torch.softmax(torch.randn(2, 3, 10, 10) * 3, -1)
    out = unip.nmi(a, drop_cls=False)
    assert out.shape == (2, 3)
    for b in range(2):
        for h in range(3):
            assert out[b, h].item() == pytest.approx(nmi_reference(a[b, h]), rel=1e-5)
    assert ((out >= 0) & (out <= 1)).all()


def test_nmi_drops_cls_and_renormalises():
    a = torch.softmax(torch.randn(1, 2, 11, 11) * 2, -1)
    inner = a[..., 1:, 1:]
    inner = inner / inner.sum(-1, keepdim=True)
    assert torch.allclose(unip.nmi(a), unip.nmi(inner, drop_cls=False), atol=1e-6)
    # attention that goes mostly to CLS must not read as "global" once CLS is removed
    eye = torch.eye(11) * 0.1
    eye[:, 0] += 0.9
    assert unip.nmi(eye[None, None]).item() == pytest.approx(1.0, abs=1e-5)


def hand_map(g, kind):
    """Attention over a g x g grid: local (neighbours), hybrid (neighbours + shared keys), global."""
    ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    dist = torch.cdist(pos, pos)
    local = torch.softmax(-dist * 2.0, -1)
    shared = torch.softmax(torch.randn(g * g) * 2, -1).expand(g * g, -1)
    a = {"local": local, "hybrid": 0.5 * local + 0.5 * shared, "global": shared}[kind]
    return a[None, None]


def test_nmi_ranks_local_above_hybrid_above_global():
    vals = {k: unip.nmi(hand_map(8, k), drop_cls=False).item() for k in ("local", "hybrid", "global")}
    assert vals["local"] > vals["hybrid"] > vals["global"]


def test_classify_heads_and_choose_layer():
    assert unip.classify_heads([0.01, 0.06, 0.09, 0.12, 0.5]) == ["global", "hybrid", "hybrid", "hybrid", "local"]
    assert unip.classify_heads(torch.tensor([0.059, 0.07, 0.121])) == ["global", "hybrid", "local"]
    assert unip.classify_heads([0.1], thresholds=(0.2, 0.3)) == ["global"]
    assert unip.choose_layer([0.5, 0.3, 0.1, 0.02]) == 3  # 1-based
    assert unip.choose_layer(torch.tensor([0.5, 0.3, 0.13, 0.02]), target=0.09) == 3
    assert unip.choose_layer([0.5, 0.3, 0.1, 0.02], target=0.01) == 4


def test_layer_nmi_shapes_and_values():
    m = tiny_vit().eval()
    x = torch.randn(2, 3, 64, 64)
    out = unip.layer_nmi(m, x)
    assert out.shape == (4, 2, 3)
    assert torch.allclose(out[1], unip.nmi(m.attention_logits(x, 2).softmax(-1)), atol=1e-6)


# ----------------------------------------------------------------------------- distillation loss


def naive_kl(s, t):
    p_t = torch.softmax(t.double(), -1)
    p_s = torch.softmax(s.double(), -1)
    return (p_t * (torch.log(p_t) - torch.log(p_s))).sum(-1).mean()


def test_distill_loss_zero_for_identical_and_positive_otherwise():
    t = torch.randn(2, 4, 9, 9)
    assert unip.distill_loss(t, t.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert unip.distill_loss(t + 0.0, t + 5.0).item() == pytest.approx(0.0, abs=1e-6)  # row shifts don't matter
    assert unip.distill_loss(torch.randn(2, 4, 9, 9), t).item() > 0


def test_distill_loss_equals_naive_formula_and_gradient():
    s = torch.randn(2, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 9, 9) * 3
    loss = unip.distill_loss(s, t)
    ref = naive_kl(s, t)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    g, = torch.autograd.grad(loss, s)
    g_ref, = torch.autograd.grad(ref, s)
    assert torch.allclose(g.double(), g_ref, atol=1e-7)
    # closed form: d/ds = (softmax(s) - softmax(t)) / (B * H * N)
    expected = (torch.softmax(s.detach(), -1) - torch.softmax(t.double(), -1)) / (2 * 4 * 9)
    assert torch.allclose(g.double(), expected, atol=1e-7)


def test_distill_loss_fp32_under_bf16_autocast():
    s = torch.randn(2, 4, 197, 197) * 4
    t = torch.randn(2, 4, 197, 197) * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = unip.distill_loss(s.bfloat16(), t.bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(naive_kl(s.bfloat16().float(), t.bfloat16().float()).item(), rel=1e-4)


def test_distill_loss_shape_errors_name_last_heads():
    with pytest.raises(ValueError, match="last_heads=16"):
        unip.distill_loss(torch.randn(1, 6, 5, 5), torch.randn(1, 16, 5, 5))
    with pytest.raises(ValueError, match="same image size"):
        unip.distill_loss(torch.randn(1, 6, 5, 5), torch.randn(1, 6, 7, 7))


def test_student_teacher_distillation_step_reaches_only_q_and_k():
    teacher = tiny_vit(dim=96, heads=4).eval()
    student = tiny_vit(last_heads=4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        t = teacher.attention_logits(x, 3)
    loss = unip.distill_loss(student.attention_logits(x, 4), t)
    loss.backward()
    last = student.blocks[-1]
    assert last.attn.qkv.weight.grad[:96].abs().sum() > 0  # q, k rows learn
    assert last.attn.qkv.weight.grad[96:].abs().sum() == 0  # v rows get nothing
    for p in [last.attn.proj.weight, last.mlp.fc1.weight, last.norm2.weight, student.norm.weight]:
        assert p.grad is None



def test_freeze_unreached_freezes_exactly_what_gets_no_gradient():
    teacher, student = tiny_vit(dim=96, heads=4).eval(), tiny_vit(last_heads=4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        t = teacher.attention_logits(x, 3)
    unip.distill_loss(student.attention_logits(x, 4), t).backward()
    no_grad = {n for n, p in student.named_parameters() if p.grad is None and p.requires_grad}
    unip.freeze_unreached(student)
    frozen = {n for n, p in student.named_parameters() if not p.requires_grad} - {"pos_embed"}  # fixed sin-cos
    assert frozen == no_grad and len(frozen) > 0
    assert {n.split(".")[0] for n in frozen} == {"blocks", "norm"}


def test_param_groups_decay_tokens_and_spare_1d_weights_and_biases():
    student = tiny_vit()
    student.pos_embed.requires_grad_(True)
    unip.freeze_unreached(student)
    decay, no_decay = unip.param_groups(student, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert decay["lr_scale"] == no_decay["lr_scale"] == 1.0
    params = [p for p in student.parameters() if p.requires_grad]
    assert [id(p) for p in decay["params"] + no_decay["params"]] == [
        id(p) for p in params if p.ndim > 1] + [id(p) for p in params if p.ndim == 1]
    assert "cls_token" in decay["names"] and "pos_embed" in decay["names"]  # MAE's pre-training decays them
    finetune = {n: g["weight_decay"] for g in unip.param_groups(student, 0.05, 0.85) for n in g["names"]}
    assert finetune["cls_token"] == finetune["pos_embed"] == 0.05  # and so does the reference's fine-tuning
    assert finetune["blocks.0.attn.qkv.bias"] == finetune["blocks.0.norm1.weight"] == 0.0
    probe = unip.param_groups(student, 0.05, 1.0, decay_all=True)  # mmseg's plain AdamW
    assert {g["weight_decay"] for g in probe} == {0.05}
    assert sum(len(g["params"]) for g in probe) == len(params)


# ----------------------------------------------------------------------------- checkpoint loading


def _wrap(kind, sd):
    """Wrap a plain ViT state dict the way each source ships it."""
    extra_head = {"head.weight": torch.randn(10, 48), "head.bias": torch.randn(10)}
    if kind == "mae":
        return {"model": {**sd, "mask_token": torch.zeros(1, 1, 48), "decoder_embed.weight": torch.randn(32, 48),
                          "decoder_pos_embed": torch.zeros(1, 17, 32)}}
    if kind == "dino_raw":
        return dict(sd)
    if kind == "dino_full":
        return {"student": {"module.backbone." + k: v + 1 for k, v in sd.items()},
                "teacher": {**{"backbone." + k: v for k, v in sd.items()}, "head.mlp.0.weight": torch.randn(4, 48)},
                "epoch": 100, "args": argparse.Namespace(arch="vit_small")}
    if kind == "ibot":
        return {"state_dict": {**sd, **extra_head}}
    if kind == "ibot_full":
        return {"teacher": {"module.backbone." + k: v for k, v in sd.items()}}
    if kind == "deit":
        pe = sd["pos_embed"]
        pe2 = torch.cat([pe[:, :1], torch.randn(1, 1, 48), pe[:, 1:]], 1)
        return {"model": {**sd, "pos_embed": pe2, "dist_token": torch.zeros(1, 1, 48), **extra_head,
                          "head_dist.weight": torch.randn(10, 48), "head_dist.bias": torch.randn(10)}}
    if kind == "unip":
        return {"model": dict(sd), "optimizer": {"state": {}, "param_groups": []}, "epoch": 99,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="unip_vit_small_patch16", lr=2.4e-3)}
    if kind == "compiled_ddp":
        return {"model": {"_orig_mod.module." + k: v for k, v in sd.items()}}
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["mae", "dino_raw", "dino_full", "ibot", "ibot_full", "deit", "unip", "compiled_ddp"])
def test_load_pretrained_every_format_gives_identical_logits(kind, tmp_path):
    src = tiny_vit().eval()
    with torch.no_grad():
        src.pos_embed.add_(0.01 * torch.randn_like(src.pos_embed))  # learned position embeddings differ from sin-cos
    path = tmp_path / f"{kind}.pth"
    torch.save(_wrap(kind, src.state_dict()), path)
    dst = tiny_vit().eval()
    report = unip.load_pretrained(dst, str(path), verbose=False)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(dst.attention_logits(x, 4), src.attention_logits(x, 4))
    assert torch.equal(dst(x), src(x))
    if kind in ("mae", "ibot", "deit"):
        assert report["ignored"]  # heads / decoders reported


def test_load_pretrained_resamples_pos_embed_14_to_32():
    src = unip.ViT(img_size=224, dim=48, depth=2, heads=3)
    dst = unip.ViT(img_size=512, dim=48, depth=2, heads=3)
    report = unip.load_pretrained(dst, src.state_dict(), verbose=False)
    assert report["resampled"] == (14, 32)
    assert dst.pos_embed.shape == (1, 1025, 48)
    assert torch.allclose(dst.pos_embed, unip.resample_pos_embed(src.pos_embed, (32, 32)))


def test_load_pretrained_refuses_missing_and_wrong_width():
    src = tiny_vit()
    sd = src.state_dict()
    del sd["blocks.2.attn.qkv.weight"]
    with pytest.raises(ValueError, match=r"blocks\.2\.attn\.qkv\.weight"):
        unip.load_pretrained(tiny_vit(), sd, verbose=False)
    no_block = {k: v for k, v in src.state_dict().items() if not k.startswith("blocks.3.")}
    with pytest.raises(ValueError, match=r"missing .*blocks\.3\."):
        unip.load_pretrained(tiny_vit(), no_block, verbose=False)
    wide = tiny_vit(dim=96).state_dict()
    with pytest.raises(ValueError, match=r"wrong shape .*patch_embed\.proj\.weight"):
        unip.load_pretrained(tiny_vit(), wide, verbose=False)
    with pytest.raises(ValueError, match="no state dict"):
        unip.load_pretrained(tiny_vit(), {"optimizer": {"lr": 1}}, verbose=False)


def test_teacher_cut_at_layer_loads_from_deeper_or_truncated_checkpoint():
    full = tiny_vit().eval()
    x = torch.randn(1, 3, 64, 64)
    cut = tiny_vit(depth=2).eval()  # built only up to the distilled layer
    report = unip.load_pretrained(cut, full.state_dict(), verbose=False)
    assert any(k.startswith("blocks.3.") for k in report["ignored"])
    assert torch.equal(cut.attention_logits(x, 2), full.attention_logits(x, 2))
    truncated = {k: v for k, v in full.state_dict().items() if not k.startswith(("blocks.2.", "blocks.3.", "norm."))}
    with pytest.raises(ValueError, match="missing"):
        unip.load_pretrained(tiny_vit(), truncated, verbose=False)
    m = tiny_vit().eval()
    unip.load_pretrained(m, truncated, upto_layer=2, verbose=False)
    assert torch.equal(m.attention_logits(x, 2), full.attention_logits(x, 2))


def test_load_pretrained_fuses_beit_q_v_bias():
    src = tiny_vit()
    sd = src.state_dict()
    for i in range(4):
        b = sd.pop(f"blocks.{i}.attn.qkv.bias")
        b[48:96] = 0
        sd[f"blocks.{i}.attn.q_bias"], sd[f"blocks.{i}.attn.v_bias"] = b[:48], b[96:]
    dst = tiny_vit()
    unip.load_pretrained(dst, sd, verbose=False)
    assert torch.equal(dst.blocks[0].attn.qkv.bias[48:96], torch.zeros(48))
    assert torch.equal(dst.blocks[0].attn.qkv.bias[:48], sd["blocks.0.attn.q_bias"])


def test_block_weights_without_a_slot_are_refused():
    sd = tiny_vit().state_dict()
    sd["blocks.0.gamma_1"] = torch.ones(48)
    with pytest.raises(ValueError, match="gamma_1"):
        unip.load_pretrained(tiny_vit(), sd, verbose=False)
    unip.load_pretrained(tiny_vit(layer_scale=1.0), {**sd, "blocks.0.gamma_2": torch.ones(48),
                                                       **{f"blocks.{i}.gamma_{j}": torch.ones(48)
                                                          for i in range(1, 4) for j in (1, 2)}}, verbose=False)


class _Evil:
    pass


def test_load_checkpoint_never_falls_back_to_full_unpickling(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_vit().state_dict(), "extra": _Evil()}, path)
    with pytest.raises(RuntimeError, match="weights_only=True"):
        unip.load_checkpoint(str(path))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        unip.load_checkpoint(str(tmp_path / "nope.pth"))


def test_layer_scale_gammas_absent_from_checkpoint_keep_their_init():
    sd = tiny_vit().state_dict()
    m = tiny_vit(layer_scale=1.0)
    report = unip.load_pretrained(m, sd, verbose=False)
    assert "blocks.0.gamma_1" not in report["loaded"]
    assert torch.equal(m.blocks[0].gamma_1, torch.ones(48))


def test_multi_layers_scale_with_depth():
    assert unip.multi_layers(12) == (4, 6, 8, 12)
    assert unip.multi_layers(24) == (8, 12, 16, 24)
    with torch.device("meta"):  # layer numbers only: no time spent drawing ViT-L's initial weights
        seg = unip.Segmenter(unip.vit_large(img_size=32), 5, mode="linear")
    assert seg.layers == (8, 12, 16, 24)


def test_attention_logits_stay_fp32_under_bf16_autocast():
    m = tiny_vit().eval()
    x = torch.randn(2, 3, 64, 64)
    blk = m.blocks[3]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.attention_logits(x, 4)
        h = m.prepare_tokens(x)
        for b in m.blocks[:3]:
            h = b(h)  # the blocks before the distilled one run in bf16, as in training
        q, k = blk.attn._split(blk.attn.qkv(blk.norm1(h)), 3)[:2]
        plain = (q @ k.transpose(-2, -1)) * blk.attn.scale  # what autocast alone would give
    exact = blk.attn.logits(blk.norm1(h.float()))  # fp32 from the same hidden state
    assert out.dtype == torch.float32 and plain.dtype == torch.bfloat16
    assert (out - exact).abs().max() < 1e-4
    assert (plain.float() - exact).abs().max() > 100 * (out - exact).abs().max()
