"""tools/gpu_check.py: the whole run at tiny sizes on the CPU (every part passes, the JSON holds what the README table
needs), and its checks failing where they should: a wrong attention kernel, logits left in bf16, a resumed run
that differs, a part that fails or runs out of time."""
import contextlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import gpu_check
import unip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ["numerics", "pretrain", "seg", "predict", "bench", "profile", "compile"]


def test_tiny_run_on_the_cpu_passes_every_part(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out),
                        "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert {"ok", "device", "torch", "cuda", "cudnn", "commit", "elapsed_s", "config", "parts", "bench"} <= set(res)
    assert res["ok"] is True and res["config"]["tiny"] is True
    assert [p["name"] for p in res["parts"]] == PARTS
    assert all(p["status"] == "PASS" and p["seconds"] >= 0 for p in res["parts"]), res["parts"]
    parts = {p["name"]: p for p in res["parts"]}

    checks = {c["name"]: c for c in parts["numerics"]["checks"]}
    assert all(c["status"] in ("PASS", "SKIP") for c in checks.values())
    # the checks that must run on any device: the explicit-path reference, the fp32 logits, the loss, the steps
    for name in ["sdpa math fp32 N=17 head_dim=16", "attention_logits bf16 (vit_small@6)", "attention_logits fp16 (vit_small@6)",
                 "distill_loss bf16", "distill_loss fp16"] + \
                [f"pretrain step {a} (vit_tiny <- vit_small@6)" for a in ("fp32", "bf16", "fp16")] + \
                [f"seg step {a} (vit_tiny 64px)" for a in ("fp32", "bf16", "fp16")]:
        assert checks[name]["status"] == "PASS", (name, checks[name])
    assert checks["sdpa efficient fp32 N=17 head_dim=16"]["status"] == "SKIP"  # no such CPU kernel: refused, noted
    assert "refused" in checks["sdpa efficient fp32 N=17 head_dim=16"]["detail"]

    assert "bit for bit" in parts["pretrain"]["detail"]  # the resumed run ends on the uninterrupted run's weights
    assert "from the pre-trained student" in parts["seg"]["detail"] and "SyncBatchNorm off" in parts["seg"]["detail"]
    rows = res["bench"]
    assert {(r["section"], r["path"], bool(r.get("compiled"))) for r in rows} >= {
        ("pretrain", "fast", False), ("pretrain", "naive", False), ("seg", "fast", False), ("slide", "fast", False),
        ("pretrain", "fast", True)}
    compiled = [r for r in rows if r.get("compiled")]
    assert all(r["x_eager"] > 0 for r in compiled)
    assert all(row["img_per_s"] > 0 and row["batch"] >= 1 for row in rows)
    for name in ["summary.md", "numerics.json", "profile.txt", "pretrain.log", "seg.log", "predict.log", "bench.log",
                 "bench_compile.log", "pretrain_full.jsonl", "pretrain_resumed.jsonl", "seg.jsonl"]:
        assert (out / name).exists(), name
    assert "aten::" in (out / "profile.txt").read_text()
    assert "| part | status |" in r.stdout and "ALL PASSED" in r.stdout


def test_help_lists_the_flags():
    h = subprocess.run([sys.executable, "tools/gpu_check.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert h.returncode == 0 and "--compile-pairs" in h.stdout and "--tiny" in h.stdout and "--budget" in h.stdout


def test_sdpa_check_fails_for_a_wrong_kernel(monkeypatch):
    cpu = torch.device("cpu")
    assert gpu_check.check_sdpa(cpu, 48, 3, 2, 17, "fp32", "default")[0] == "PASS"
    sdpa = F.scaled_dot_product_attention
    # a kernel with a slightly wrong softmax scale: still attention, but not the same numbers
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v: sdpa(q, k, v, scale=1.02 * q.shape[-1] ** -0.5))
    status, detail = gpu_check.check_sdpa(cpu, 48, 3, 2, 17, "fp32", "default")
    assert status == "FAIL" and "over the bound" in detail


def test_sdpa_check_skips_what_training_runs_explicitly():
    # CPU bf16 training runs the explicit product (sdpa_for_training): no SDPA kernel there to hold to it
    status, detail = gpu_check.check_sdpa(torch.device("cpu"), 48, 3, 2, 17, "bf16", "default")
    assert status == "SKIP" and "sdpa_for_training" in detail
    assert gpu_check.check_sdpa(torch.device("cpu"), 48, 3, 2, 17, "fp16", "math")[0] == "PASS"


@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_pretrain_step_sets_attention_as_train_pretrain(amp):
    step = gpu_check.PretrainStep(torch.device("cpu"), "vit_micro", 2, "vit_micro", 32, 2, amp)
    fused = lambda model: {m.fused for m in model.modules() if isinstance(m, unip.Attention)}
    assert fused(step.student) == {amp == "fp32"}  # the trained student: explicit only for CPU bf16
    assert fused(step.teacher_fn) == {True}  # the frozen teacher: SDPA
    assert isinstance(step.teacher_fn, unip.AttentionLogits) and step.teacher_fn.layer == 2


def test_logits_check_fails_when_autocast_reaches_the_logits(monkeypatch):
    cpu = torch.device("cpu")
    assert gpu_check.check_logits(cpu, "vit_small", 32, 6, 2, "bf16")[0] == "PASS"
    monkeypatch.setattr(unip, "fp32", lambda device_type: contextlib.nullcontext())  # autocast left on in logits
    assert gpu_check.check_logits(cpu, "vit_small", 32, 6, 2, "bf16")[0] == "FAIL"


def test_weight_diff_tells_equal_from_different():
    a = {"w": torch.ones(3), "b": torch.zeros(2)}
    assert gpu_check.weight_diff(a, {k: v.clone() for k, v in a.items()}) == (True, 0.0)
    bitwise, diff = gpu_check.weight_diff(a, {"w": torch.tensor([1.0, 1.0, 1.0 + 2 ** -20]), "b": torch.zeros(2)})
    assert not bitwise and diff == pytest.approx(2 ** -20)
    with pytest.raises(gpu_check.PartFailed, match="different keys"):
        gpu_check.weight_diff(a, {"w": torch.ones(3)})


def test_a_failing_part_is_reported_and_the_next_still_runs(tmp_path):
    # predict without a seg checkpoint fails; profile then gets no time (budget 3 s): both reported, no exception
    ok = gpu_check.main(["--device", "cpu", "--tiny", "--parts", "predict,profile", "--budget", "3",
                         "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert ok is False and res["ok"] is False
    assert [(p["name"], p["status"]) for p in res["parts"]] == [("predict", "FAIL"), ("profile", "FAIL")]
    assert "no train_seg.py checkpoint" in res["parts"][0]["detail"] and "out of time" in res["parts"][1]["detail"]


def test_a_command_over_its_time_is_killed(tmp_path):
    cfg = gpu_check.Config(out=str(tmp_path), budget=60)
    run = gpu_check.Runner(cfg, dict(os.environ))
    run.min_left = 1  # less than this left: the command is not started at all
    run.limit = time.time() + 2
    t = time.time()
    rc, text = run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], "sleep.log")
    assert rc == "timeout" and "started" in text and time.time() - t < 30
