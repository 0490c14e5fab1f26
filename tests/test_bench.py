"""Tests of tools/bench.py: the analytic FLOP counts, the naive path against the fast one, a quick run; and of the
precision the fast paths run in: --amp auto, the explicit attention of CPU bf16 training (the `fused` switch
set by sdpa_for_training), bf16 against fp32."""
import json
import math
import os
import statistics

import pytest
import torch
import torch.nn.functional as F

import bench
import plumbing
import unip
from conftest import run_main  # noqa: E402

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
    args = ["--quick", "--device", "cpu", "--threads", "1", "--only", "pretrain,data", "--img", "32", "--students",
            "vit_tiny", "--teachers", "vit_base@9", "--reps", "1", "--json", "-",
            "--amp", "bf16,none"]  # both precisions, alternating; bf16 runs (emulated if need be) on any CPU
    res = run_main("tools/bench.py", *args)  # in this process, as `python tools/bench.py ...` runs it
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)  # stdout holds the JSON alone; the table went to stderr
    assert {"device", "torch", "amp", "peak_tflops", "config", "rows"} <= set(out)
    assert "| section |" in res.stderr
    rows = out["rows"]
    assert [(r["section"], r["path"], r["amp"]) for r in rows] == [
        ("pretrain", "fast", "bf16"), ("pretrain", "naive", "bf16"), ("pretrain", "fast", "none"),
        ("pretrain", "naive", "none"), ("data", "loader", None)]
    assert out["amp"] == {"bf16": "--amp", "none": "--amp"}
    keys = {"section", "case", "path", "amp", "batch", "img_per_s", "ms_per_step", "mem_gb", "gflop_per_img", "tflops",
            "mfu_pct"}
    for r in rows:
        assert keys <= set(r) and r["img_per_s"] > 0 and r["ms_per_step"] > 0
    fast, naive, base = rows[0], rows[1], rows[3]  # bf16 fast, bf16 naive, fp32 naive (the baseline)
    assert fast["case"] == "vit_tiny <- vit_base@9" and fast["batch"] == 2
    assert fast["speedup"] > 0 and math.isclose(fast["speedup"], naive["ms_per_step"] / fast["ms_per_step"])
    assert math.isclose(fast["vs_fp32"], base["ms_per_step"] / fast["ms_per_step"]) and base["vs_fp32"] == 1
    assert rows[2]["speedup"] == rows[2]["vs_fp32"]  # fp32 fast against fp32 naive, both ways
    assert fast["gflop_per_img"] == naive["gflop_per_img"] > 0 and fast["mfu_pct"] is None  # no peak known on a CPU
    teacher, _ = meta("vit_base", 32)
    student, _ = meta("vit_tiny", 32, last_heads=12)
    expect = bench.vit_flops(teacher, 32, 9) + 3 * bench.vit_flops(student, 32, "last")
    assert math.isclose(fast["gflop_per_img"], expect / 1e9)


# ----------------------------------------------------------------------------- precision: --amp auto, bf16 paths


@pytest.fixture
def cpu_units(monkeypatch):
    """pretend(*units): make torch.cpu report these bf16 units ('amx', 'avx512'; none: a CPU without them)."""
    monkeypatch.delenv("UNIP_AMP", raising=False)

    def pretend(*units):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: "amx" in units, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: "avx512" in units, raising=False)
    return pretend


def test_auto_amp_is_bf16_only_on_cpus_with_bf16_matrix_units(cpu_units, monkeypatch):
    cpu_units()  # there bf16 is emulated and slower than fp32: the default stays fp32
    assert unip.resolve_amp("auto", "cpu") == ("none", "auto: CPU without bf16 matrix units")
    cpu_units("avx512")
    assert unip.resolve_amp("auto", "cpu") == ("bf16", "auto: CPU has AVX512-BF16")
    cpu_units("amx", "avx512")
    assert unip.resolve_amp("auto", torch.device("cpu")) == ("bf16", "auto: CPU has AMX-BF16")
    assert unip.resolve_amp("none", "cpu") == ("none", "--amp") and unip.resolve_amp("fp16", "cpu")[0] == "fp16"
    cpu_units()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CUDA device that cannot be asked: bf16
    assert unip.resolve_amp("auto", "cuda") == ("bf16", "auto: cuda")  # GPUs: whatever the CPU
    assert unip.resolve_amp("bf16", "cpu")[0] == "bf16"  # asked for: honoured
    monkeypatch.setenv("UNIP_AMP", "bf16")  # the environment replaces auto, never an explicit --amp
    assert unip.resolve_amp("auto", "cpu") == ("bf16", "UNIP_AMP") and unip.resolve_amp("none", "cpu")[0] == "none"
    monkeypatch.setenv("UNIP_AMP", "fp64")
    with pytest.raises(ValueError, match="fp64"):
        unip.resolve_amp("auto", "cpu")


@pytest.mark.parametrize("cap, amp, why", [
    ((7, 0), "fp16", "auto: CUDA capability 7.0 has no native bf16 -> fp16"),  # V100
    ((7, 5), "fp16", "auto: CUDA capability 7.5 has no native bf16 -> fp16"),  # T4, RTX 20xx
    ((8, 0), "bf16", "auto: CUDA capability 8.0 has native bf16"),  # A100
    ((9, 0), "bf16", "auto: CUDA capability 9.0 has native bf16")])  # H100
def test_auto_amp_on_cuda_is_bf16_only_where_the_gpu_computes_it_natively(cap, amp, why, cpu_units, monkeypatch):
    cpu_units("amx")  # the CPU's units play no part on a GPU
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or cap)
    assert unip.resolve_amp("auto", "cuda:1") == (amp, why) and asked == [torch.device("cuda:1")]  # the run's GPU
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: (a, k))  # this CPU build cannot make a CUDA one
    # precision() turns TF32 on: restored by hand (these are properties that monkeypatch cannot always undo)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        got, got_why, autocast = plumbing.precision("auto", torch.device("cuda", 0))  # as the scripts ask
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert (got, got_why) == (amp, why) and autocast() == (("cuda", dtype), {"enabled": True})
    bf16, bf16_why = unip.resolve_amp("bf16", "cuda")  # asked for: honoured, with a warning where it is not native
    assert bf16 == "bf16" and bf16_why == ("--amp" if amp == "bf16" else
                                           f"--amp; warning: CUDA capability {cap[0]}.{cap[1]} has no native bf16 "
                                           "(slow; --amp fp16 is native)")
    assert unip.resolve_amp("fp16", "cuda") == ("fp16", "--amp") and unip.resolve_amp("none", "cuda")[0] == "none"
    monkeypatch.setenv("UNIP_AMP", "bf16")  # the environment still replaces auto
    assert unip.resolve_amp("auto", "cuda") == ("bf16", "UNIP_AMP")


def test_auto_amp_stays_fp32_when_the_private_cpu_checks_are_missing_or_fail(cpu_units, monkeypatch):
    def broken():
        raise RuntimeError("cpuinfo failed")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", broken, raising=False)
    assert unip.resolve_amp("auto", "cpu")[0] == "none"


def test_every_script_defaults_to_auto_and_the_bench_banner_says_why(cpu_units, capsys):
    import inspect
    import plumbing
    import train_pretrain
    import train_seg
    for mod in (train_pretrain, train_seg, bench):
        assert plumbing.parse_config(mod.Config, []).amp.split(",")[0] == "auto", mod.__name__
        assert "AVX512-BF16" in inspect.getsource(mod.Config), mod.__name__  # the --help text names the units
    cpu_units("amx")
    threads = torch.get_num_threads()
    try:
        bench.main(["--device", "cpu", "--only", "data", "--quick", "--workers", "0", "--img", "32"])
    finally:
        torch.set_num_threads(threads)  # --quick runs on one thread
    banner = capsys.readouterr().out
    assert "amp bf16 (auto: CPU has AMX-BF16), none (--amp)" in banner  # the default also measures fp32


def bf16_rel_err(a, b):  # relative error of a bf16 result against the fp32 one
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def test_only_cpu_bf16_training_leaves_sdpa_and_the_switch_reaches_every_attention():
    assert not unip.sdpa_for_training("cpu", "bf16")  # CPU, bf16, training: the explicit product
    assert unip.sdpa_for_training("cpu", "none") and unip.sdpa_for_training(torch.device("cpu"), "fp16")
    assert unip.sdpa_for_training("cuda", "bf16") and unip.sdpa_for_training("cuda:1", "none")
    vit = unip.ViT(img_size=32, dim=48, depth=3, heads=3, last_heads=4)
    seg = unip.Segmenter(unip.ViT(img_size=32, dim=48, depth=2, heads=3), 5)
    for model, n in ((vit, 3), (seg, 2)):
        attns = [m for m in model.modules() if isinstance(m, unip.Attention)]
        assert len(attns) == n and all(a.fused for a in attns)  # SDPA unless switched off
        assert unip.set_fused_attention(model, False) is model and not any(a.fused for a in attns)
        unip.set_fused_attention(model)
        assert all(a.fused for a in attns)


def count_sdpa(monkeypatch):
    """Record every F.scaled_dot_product_attention call: [whether its q carries gradients]."""
    calls, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: calls.append(q.requires_grad) or sdpa(q, *a, **k))
    return calls


def test_explicit_attention_equals_sdpa_in_fp32_forward_and_backward(monkeypatch):
    torch.manual_seed(0)
    attn = unip.Attention(96, 4)  # head_dim 24
    x = torch.randn(2, 65, 96)
    calls = count_sdpa(monkeypatch)
    out = {}
    for fused in (True, False):
        attn.fused = fused
        attn.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        y = attn(xg)
        (y * torch.linspace(-1, 1, 96)).sum().backward()
        out[fused] = [y.detach(), xg.grad, attn.qkv.weight.grad, attn.proj.weight.grad]
        assert len(calls) == (1 if fused else 0)  # the switch decides which path runs
        calls.clear()
    # the written-out reference: softmax(q kᵀ / sqrt(d)) v per head, then the projection
    q, k, v = attn.qkv(x).view(2, 65, 3, 4, 24).permute(2, 0, 3, 1, 4)
    a = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", q, k) / 24 ** 0.5, dim=-1)
    ref = attn.proj(torch.einsum("bhnm,bhmd->bnhd", a, v).reshape(2, 65, 96))
    torch.testing.assert_close(out[False][0], ref, rtol=1e-5, atol=1e-5)
    for name, e, s in zip(["out", "dx", "dWqkv", "dWproj"], out[False], out[True]):  # float noise on the tensor's scale
        torch.testing.assert_close(e, s, rtol=0, atol=1e-5 * s.abs().max().item(), msg=name)


def test_cpu_bf16_training_takes_explicit_attention_as_accurate_as_sdpa():
    torch.manual_seed(0)
    attn = unip.Attention(96, 4)
    x = torch.randn(2, 197, 96)

    def run(bf16, fused):  # output, input gradient, qkv weight gradient
        unip.set_fused_attention(attn, fused)
        xg = x.clone().requires_grad_()
        attn.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            y = attn(xg)
        y.float().square().mean().backward()
        return y, xg.grad, attn.qkv.weight.grad.clone()
    ref = run(False, unip.sdpa_for_training("cpu", "none"))  # fp32 training: SDPA
    explicit = run(True, unip.sdpa_for_training("cpu", "bf16"))  # what CPU bf16 training runs
    sdpa = run(True, True)  # what it would run on SDPA
    assert explicit[0].dtype == sdpa[0].dtype == torch.bfloat16
    for e, s, r in zip(explicit, sdpa, ref):
        assert bf16_rel_err(e, r) < 2e-2 and bf16_rel_err(e, r) < 2 * bf16_rel_err(s, r) + 1e-3


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_fast_path_attention_follows_sdpa_for_training_and_the_naive_path_stays_explicit(amp, monkeypatch):
    torch.manual_seed(0)
    teacher = unip.ViT(img_size=32, dim=64, depth=4, heads=4)
    student = unip.ViT(img_size=32, dim=48, depth=3, heads=3, last_heads=4)
    calls = count_sdpa(monkeypatch)
    autocast = plumbing.precision(amp, "cpu")[2]
    for naive in (False, True):
        bench.pretrain_step(teacher, student, 3, torch.device("cpu"), 2, 32, naive, amp, autocast)()
        teacher_calls, student_calls = calls.count(False), calls.count(True)
        if naive:  # the reference's explicit attention in every block of both models
            assert calls == []
        else:  # the frozen teacher: SDPA in blocks 1..2 (block 3 gives logits); the student's blocks 1..2 by the rule
            assert teacher_calls == 2 and student_calls == (2 if unip.sdpa_for_training("cpu", amp) else 0)
        calls.clear()
    assert all(m.fused for m in student.modules() if isinstance(m, unip.Attention))  # the prototype is left alone


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_fine_tuning_step_attention_follows_sdpa_for_training(amp, monkeypatch):
    torch.manual_seed(0)
    seg = unip.Segmenter(unip.ViT(img_size=32, dim=48, depth=4, heads=3), 5)
    calls = count_sdpa(monkeypatch)
    bench.seg_step(seg, torch.device("cpu"), 32, 5, 2, amp, plumbing.precision(amp, "cpu")[2])()
    assert len(calls) == (4 if unip.sdpa_for_training("cpu", amp) else 0)  # the backbone's 4 blocks, as train_seg.py


def test_bf16_pretraining_step_keeps_logits_and_loss_fp32_and_follows_fp32():
    torch.manual_seed(0)
    teacher = unip.ViT(img_size=64, dim=96, depth=3, heads=4).eval().requires_grad_(False)
    student = unip.ViT(img_size=64, dim=64, depth=3, heads=2, last_heads=4)
    x = torch.randn(4, 3, 64, 64)
    out = {}
    for amp in ("none", "bf16"):
        unip.set_fused_attention(student, unip.sdpa_for_training("cpu", amp))  # as train_pretrain.py
        student.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=amp == "bf16"):
            with torch.no_grad():
                target = unip.AttentionLogits(teacher, 3)(x)
            logits = unip.AttentionLogits(student, 3)(x)
            loss = unip.distill_loss(logits, target)
        loss.backward()
        assert target.dtype == logits.dtype == loss.dtype == torch.float32
        out[amp] = loss.item(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    (l32, g32), (l16, g16) = out["none"], out["bf16"]
    assert abs(l16 - l32) < 1e-2 * l32 and set(g16) == set(g32)
    for n in g32:  # every gradient points the same way as in fp32
        assert cosine(g16[n], g32[n]) > 0.99, n


def test_bf16_segmentation_and_slide_inference_follow_fp32():
    torch.manual_seed(0)
    seg = unip.Segmenter(unip.ViT(img_size=64, dim=64, depth=2, heads=2), 5).eval()
    img = torch.randn(1, 3, 64, 96)  # two windows of 64, stride 43
    ref = unip.slide_inference(seg, img, 5, crop=64, stride=43)
    with torch.autocast("cpu", torch.bfloat16):
        low = unip.slide_inference(seg, img, 5, crop=64, stride=43)
    assert low.dtype == torch.float32 and bf16_rel_err(low, ref) < 3e-2
    assert (low.argmax(1) == ref.argmax(1)).float().mean() > 0.95
    one_by_one = unip.slide_inference(seg, img, 5, crop=64, stride=43, batch=1)  # windows batched or not: the same
    torch.testing.assert_close(one_by_one, ref, rtol=1e-5, atol=1e-5)


def test_frozen_teacher_stored_in_bf16_gives_the_same_logits_under_autocast():
    torch.manual_seed(0)
    teacher = unip.ViT(img_size=64, dim=96, depth=3, heads=4).eval().requires_grad_(False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        ref = teacher.attention_logits(x, 3)
        unip.autocast_weights_(teacher, torch.bfloat16, keep=[teacher.blocks[2].attn.qkv])
        low = teacher.attention_logits(x, 3)
    assert torch.equal(low, ref) and low.dtype == torch.float32  # autocast cast these weights the same way
    assert teacher.blocks[0].mlp.fc1.weight.dtype == teacher.patch_embed.proj.weight.dtype == torch.bfloat16
    assert teacher.blocks[2].attn.qkv.weight.dtype == torch.float32  # the distilled q/k: fp32


def test_ratios_are_taken_round_by_round():
    # the machine slows down for the last round: per round the fast path is 3x faster in two rounds of three,
    # while the medians of the two columns are equal and would say 1x
    naive, fast = [3.0, 3.0, 27.0], [1.0, 3.0, 9.0]
    assert bench.round_ratio(naive, fast) == 3.0 and statistics.median(naive) / statistics.median(fast) == 1.0
    assert bench.round_ratio(fast, fast) == 1.0


def test_memory_section_measures_both_paths_each_in_a_fresh_process(capsys):
    rows = bench.main(["--device", "cpu", "--only", "memory", "--seg-img", "32", "--seg-batch", "2", "--mem-models",
                       "vit_tiny", "--amp", "none", "--threads", "1"])
    assert [(r["section"], r["case"], r["path"], r["amp"]) for r in rows] == [
        ("memory", "vit_tiny UperNet 32px fwd+bwd", p, "none") for p in ("plain", "grad checkpoint")]
    plain, ckpt = rows
    seg = unip.Segmenter(unip.vit_tiny(img_size=32, layer_scale=1.0), 21)  # what train_seg.py fine-tunes
    assert plain["weights_gb"] == ckpt["weights_gb"] == sum(p.numel() * 4 for p in seg.parameters()) / 2**30
    assert plain["ms_per_step"] > 0 and ckpt["ms_per_step"] > 0
    if plain["mem_gb"] is not None:  # Linux: peak RSS above the built model (at this size mostly the gradients)
        assert plain["mem_gb"] > 0 and ckpt["mem_gb"] > 0 and plain["mem_saving_pct"] == 0
        assert math.isclose(ckpt["mem_saving_pct"], 100 * (1 - ckpt["mem_gb"] / plain["mem_gb"]))
    assert "| weights GB | saving % |" in capsys.readouterr().out


def test_pairs_choose_the_cases():
    rows = bench.main(["--device", "cpu", "--quick", "--threads", "1", "--only", "pretrain", "--img", "32", "--reps", "1",
                       "--amp", "none", "--pairs", "vit_tiny=vit_small@6"])
    assert {(r["case"], r["path"]) for r in rows} == {("vit_tiny <- vit_small@6", "fast"), ("vit_tiny <- vit_small@6", "naive")}
    with pytest.raises(SystemExit, match="student=teacher@layer"):
        bench.main(["--device", "cpu", "--only", "pretrain", "--pairs", "vit_tiny-vit_small@6"])
    with pytest.raises(SystemExit, match="unknown presets"):
        bench.main(["--device", "cpu", "--only", "pretrain", "--pairs", "vit_tiny=vit_huge@6"])
