"""Tests of bench.py: the analytic FLOP counts, the naive path against the fast one, a quick run."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import bench
import unip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def meta(preset, img=224, **kw):
    """A preset built on the meta device: shapes only, no memory, no initialisation."""
    with torch.device("meta"):
        return unip.PRESETS[preset](img_size=img, **kw), torch.empty(1, 3, img, img)


# ----------------------------------------------------------------------------- FLOPs (2 per multiply-add)


def test_vit_base_forward_is_the_standard_17_6_gmacs():
    vit, x = meta("vit_base")
    flops = bench.vit_flops(vit, 224)
    assert abs(flops / 35.1e9 - 1) < 0.02, flops  # 17.56 GMACs = 35.13 GFLOPs
    # by hand: patch 196*768*768 + 12 blocks x (12*197*768^2 + 2*197^2*768) multiply-adds
    assert flops == 2 * (196 * 768 * 768 + 12 * (12 * 197 * 768**2 + 2 * 197**2 * 768))
    assert bench.counted_flops(lambda: vit(x)) == flops  # torch's own counter agrees exactly


def test_truncated_teacher_counts_blocks_1_to_17_and_qk_of_18():
    vit, x = meta("vit_large")
    N, D, patch = 197, 1024, 196 * 768 * 1024
    block, qk = 12 * N * D**2 + 2 * N**2 * D, 2 * N * D**2 + N**2 * D  # multiply-adds
    expected = (patch + 17 * block + qk) / (patch + 24 * block)  # 0.716
    full, cut = bench.vit_flops(vit, 224), bench.vit_flops(vit, 224, upto=18)
    assert cut < full and math.isclose(cut / full, expected, rel_tol=1e-9) and 0.71 < cut / full < 0.72
    assert bench.counted_flops(lambda: vit.attention_logits(x, 18)) == cut  # what the teacher really runs


def test_student_count_is_11_blocks_and_qk_whatever_the_head_count():
    student, x = meta("vit_small", last_heads=16)
    flops = bench.vit_flops(student, 224, upto="last")
    assert flops == bench.counted_flops(lambda: student.attention_logits(x, 12))
    assert flops < bench.vit_flops(student, 224)


# ----------------------------------------------------------------------------- naive path = fast path


@pytest.mark.parametrize("layer", [2, 4])
def test_naive_logits_equal_the_fast_logits(layer):
    torch.manual_seed(0)
    vit = unip.ViT(img_size=32, dim=48, depth=4, heads=3, last_heads=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fast, naive = vit.attention_logits(x, layer), bench.naive_logits(vit, x, layer)
    assert fast.shape == naive.shape == (2, 4 if layer == 4 else 3, 5, 5)
    torch.testing.assert_close(naive, fast, rtol=1e-5, atol=1e-5)


def test_naive_loss_gradient_equals_the_fast_gradient():
    torch.manual_seed(0)
    teacher = unip.ViT(img_size=32, dim=64, depth=3, heads=4).eval()
    student = unip.ViT(img_size=32, dim=48, depth=4, heads=3, last_heads=4)  # drop path 0: both paths deterministic
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        target = teacher.attention_logits(x, 3)
    grads = {}
    for name, fn in [("fast", student.attention_logits), ("naive", lambda x, l: bench.naive_logits(student, x, l))]:
        student.zero_grad(set_to_none=True)
        unip.distill_loss(fn(x, 4), target).backward()
        grads[name] = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    assert set(grads["fast"]) == set(grads["naive"])
    assert "blocks.3.attn.qkv.weight" in grads["fast"] and "blocks.3.mlp.fc1.weight" not in grads["fast"]
    for n, g in grads["fast"].items():
        torch.testing.assert_close(grads["naive"][n], g, rtol=1e-4, atol=1e-6, msg=n)
    assert grads["fast"]["blocks.0.attn.qkv.weight"].abs().sum() > 0


# ----------------------------------------------------------------------------- a quick run end to end


def test_quick_run_prints_json_rows():
    cmd = [sys.executable, "bench.py", "--quick", "--device", "cpu", "--threads", "1", "--only", "pretrain,data",
           "--img", "32", "--students", "vit_tiny", "--teachers", "vit_base@9", "--reps", "1", "--json", "-"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)  # stdout holds the JSON alone; the table went to stderr
    assert {"device", "torch", "amp", "peak_tflops", "config", "rows"} <= set(out)
    assert "| section |" in res.stderr
    rows = out["rows"]
    assert [(r["section"], r["path"]) for r in rows] == [("pretrain", "fast"), ("pretrain", "naive"), ("data", "loader")]
    keys = {"section", "case", "path", "batch", "img_per_s", "ms_per_step", "mem_gb", "gflop_per_img", "tflops", "mfu_pct"}
    for r in rows:
        assert keys <= set(r) and r["img_per_s"] > 0 and r["ms_per_step"] > 0
    fast, naive = rows[0], rows[1]
    assert fast["case"] == "vit_tiny <- vit_base@9" and fast["batch"] == 2
    assert fast["speedup"] > 0 and math.isclose(fast["speedup"], naive["ms_per_step"] / fast["ms_per_step"])
    assert fast["gflop_per_img"] == naive["gflop_per_img"] > 0 and fast["mfu_pct"] is None  # no peak known on a CPU
    teacher, _ = meta("vit_base", 32)
    student, _ = meta("vit_tiny", 32, last_heads=12)
    expect = bench.vit_flops(teacher, 32, 9) + 3 * bench.vit_flops(student, 32, "last")
    assert math.isclose(fast["gflop_per_img"], expect / 1e9)
