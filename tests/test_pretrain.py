"""End-to-end tests of train_pretrain.py on tiny models and images (CPU)."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train_pretrain
import unip
from conftest import run_main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "vit_tiny", "--img-size", "32", "--synthetic-images", "32", "--batch-size", "4",
        "--effective-batch", "8", "--epochs", "4", "--warmup-epochs", "1", "--workers", "0", "--log-every", "1",
        "--teacher-arch", "vit_small", "--teacher-layer", "6"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A random ViT-S teacher saved the way MAE ships its weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "mae_vit_small.pth"
    torch.save({"model": unip.vit_small(img_size=32).state_dict()}, path)
    return str(path)


def run(args, out):
    train_pretrain.main(args + ["--out", str(out)])
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def weights(out):
    return unip.load_checkpoint(os.path.join(out, "ckpt.pt"))["model"]


def test_loss_goes_down_and_checkpoint_is_a_full_vit(teacher, tmp_path):
    rows = run(TINY + ["--teacher", teacher, "--steps", "12", "--lr", "2e-3", "--warmup-epochs", "0",
                       "--drop-path", "0"], tmp_path)
    assert len(rows) == 12 and {"step", "epoch", "loss", "lr", "img_per_s"} <= set(rows[0])
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.8 * first, (first, last)
    ck = unip.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ck["step"] == 12 and ck["config"]["teacher_layer"] == 6 and ck["config"]["last_heads"] == 6
    student = unip.vit_tiny(img_size=32)
    unip.load_pretrained(student, str(tmp_path / "ckpt.pt"), verbose=False)  # loads as a standard ViT
    assert set(ck["model"]) == set(student.state_dict())
    # weights that get no gradient by construction stay at their initial values; q/k of the last block learn
    fresh = unip.vit_tiny(img_size=32)
    assert torch.equal(ck["model"]["blocks.11.mlp.fc1.bias"], fresh.state_dict()["blocks.11.mlp.fc1.bias"])
    assert torch.equal(ck["model"]["norm.weight"], torch.ones(192))


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_every_precision_trains_and_saves_fp32(teacher, tmp_path, amp):
    # under autocast the frozen teacher is stored in the autocast dtype (autocast_weights_); the student and
    # its checkpoint stay fp32, and the loss is finite in each precision
    rows = run(TINY + ["--teacher", teacher, "--steps", "2", "--amp", amp], tmp_path)
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    ck = unip.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert {v.dtype for v in ck["model"].values()} == {torch.float32} and ck["config"]["amp"] == amp


def test_resume_mid_epoch_gives_identical_weights(teacher, tmp_path):
    args = TINY + ["--teacher", teacher]  # drop path 0.1: the random stream must be restored too
    run(args + ["--steps", "4"], tmp_path / "a")
    run(args + ["--steps", "2"], tmp_path / "b")
    assert unip.load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["step"] == 2
    run(args + ["--steps", "4", "--resume", "auto"], tmp_path / "b")  # 2 steps + resume + 2 steps
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_grad_checkpoint_reaches_the_same_weights(teacher, tmp_path, capsys):
    # drop path 0.1 in every student block: the recomputed blocks 1..11 must replay the same draws
    args = TINY + ["--teacher", teacher, "--steps", "2", "--amp", "none"]
    run(args + ["--grad-checkpoint"], tmp_path / "a")
    assert "= 8 | grad checkpoint | lr" in capsys.readouterr().out
    run(args, tmp_path / "b")
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)


def test_resume_reads_the_random_state_layout_of_older_checkpoints(teacher, tmp_path):
    # checkpoints written before plumbing.py (then common.py) kept {"torch": [per process], "cuda": [per process or none]}
    args = TINY + ["--teacher", teacher]  # drop path 0.1: the restored stream decides the result
    run(args + ["--steps", "4"], tmp_path / "a")
    run(args + ["--steps", "2"], tmp_path / "b")
    path = tmp_path / "b" / "ckpt.pt"
    ck = unip.load_checkpoint(str(path))
    assert ck["rng"]["ranks"][0]["cuda"] is None
    ck["rng"] = {"torch": [ck["rng"]["ranks"][0]["torch"]], "cuda": []}
    torch.save(ck, path)
    run(args + ["--steps", "4", "--resume", "auto"], tmp_path / "b")
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_keep_steps_writes_snapshots_of_the_same_schedule(teacher, tmp_path):
    # step2.pt of a 5-step run is the checkpoint a run stopped at step 2 writes (same schedule, same format)
    run(TINY + ["--teacher", teacher, "--steps", "5", "--keep-steps", "2,5"], tmp_path / "a")
    run(TINY + ["--teacher", teacher, "--steps", "2"], tmp_path / "b")
    assert sorted(f for f in os.listdir(tmp_path / "a") if f.endswith(".pt")) == ["ckpt.pt", "step2.pt", "step5.pt"]
    snap, short = (unip.load_checkpoint(str(p)) for p in (tmp_path / "a" / "step2.pt", tmp_path / "b" / "ckpt.pt"))
    assert set(snap) == set(short) and snap["step"] == 2 and snap["config"]["keep_steps"] == "2,5"
    assert not torch.equal(snap["model"]["blocks.11.attn.qkv.weight"], weights(tmp_path / "a")["blocks.11.attn.qkv.weight"])
    for k in short["model"]:
        assert torch.equal(snap["model"][k], short["model"][k]), k
    last = unip.load_checkpoint(str(tmp_path / "a" / "step5.pt"))
    assert last["step"] == 5 and all(torch.equal(last["model"][k], v) for k, v in weights(tmp_path / "a").items())
    unip.load_pretrained(unip.vit_tiny(img_size=32, last_heads=6), str(tmp_path / "a" / "step2.pt"), verbose=False)
    for bad in ("6", "0", "2,x"):
        with pytest.raises(ValueError, match="--keep-steps"):
            run(TINY + ["--teacher", teacher, "--steps", "5", "--keep-steps", bad], tmp_path / "c")


def test_teacher_layer_auto_uses_the_layer_it_prints(teacher, tmp_path, capsys):
    args = [a if a != "6" else "auto" for a in TINY]
    run(args + ["--teacher", teacher, "--steps", "1", "--nmi-images", "8"], tmp_path)
    out = capsys.readouterr().out
    chosen = int(re.search(r"distilling teacher layer (\d+)", out).group(1))
    marked = int(re.search(r"^\s*(\d+)\s+[\d.]+\s+\d+\s+\d+\s+\d+\s+<- distilled", out, re.M).group(1))
    assert chosen == marked
    assert unip.load_checkpoint(str(tmp_path / "ckpt.pt"))["config"]["teacher_layer"] == chosen
    assert len(re.findall(r"^\s*\d+\s+[\d.]+\s+\d+\s+\d+\s+\d+", out, re.M)) == 12  # one row per teacher layer


def test_thermal_range_reaches_the_infmix_frames(tmp_path):
    raw = np.tile(np.linspace(19000, 25000, 40), (30, 1)).astype(np.uint16)  # 16-bit radiometric
    (tmp_path / "ir").mkdir()
    Image.fromarray(raw).save(tmp_path / "ir" / "a.png")
    said = []
    cfg = train_pretrain.Config(infrared=str(tmp_path / "ir"), thermal_range="20000,24000")
    ds = train_pretrain.pretrain_dataset(cfg, said.append)
    assert np.array_equal(ds.load(0)[0], train_pretrain.data.range_to_uint8(raw, 20000, 24000))
    assert any("raw 20000..24000 -> 0..255" in line for line in said)


def test_corrupt_image_in_data_root_does_not_stop_the_run(teacher, tmp_path):
    root = tmp_path / "ir" / "setA" / "thermal"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(9):
        Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(root / f"{i:02d}.png")
    (root / "09.png").write_bytes(b"not an image at all")
    (root / "10.jpg").write_bytes(b"")
    rows = run(TINY + ["--teacher", teacher, "--infrared", str(tmp_path / "ir"), "--steps", "3",
                       "--epochs", "3"], tmp_path / "out")
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(teacher, tmp_path):
    out = tmp_path / "run"
    run(TINY + ["--teacher", teacher, "--steps", "2"], out)
    good = weights(out)
    sd = unip.load_checkpoint(teacher)["model"]
    sd["blocks.0.attn.qkv.weight"][:] = float("nan")
    bad = tmp_path / "nan_teacher.pth"
    torch.save({"model": sd}, bad)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        run(TINY + ["--teacher", str(bad), "--steps", "4", "--resume", "auto"], out)
    ck = unip.load_checkpoint(str(out / "ckpt.pt"))
    assert ck["step"] == 2
    assert all(torch.equal(good[k], ck["model"][k]) for k in good)


def test_wrong_teacher_arch_names_the_keys(teacher, tmp_path):
    args = [a if a != "vit_small" else "vit_base" for a in TINY]
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        run(args + ["--teacher", teacher, "--steps", "1"], tmp_path)


def test_script_help_and_smoke_run_in_subprocess(teacher, tmp_path):
    h = subprocess.run([sys.executable, "train_pretrain.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert h.returncode == 0 and "--teacher-layer" in h.stdout and "MAE-L 18" in h.stdout
    r = subprocess.run([sys.executable, "train_pretrain.py", *TINY, "--teacher", teacher, "--steps", "2",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.exists(tmp_path / "ckpt.pt")


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_processes_match_one_process_with_double_batch(teacher, tmp_path):
    common = TINY + ["--teacher", teacher, "--steps", "3", "--drop-path", "0",
                                                 "--accum-steps", "1", "--lr", "1e-3", "--warmup-epochs", "0", "--device", "cpu",
              "--amp", "none"]  # fp32: bf16 rounds the two reduction orders apart by more than the tolerance
    one = run_main("train_pretrain.py", *common, "--batch-size", "8", "--out", tmp_path / "one")  # in this process
    assert one.returncode == 0, one.stderr[-3000:]
    two = ["torchrun", "--nproc_per_node=2", "--master_port=29517", "train_pretrain.py", *common,
           "--batch-size", "4", "--out", str(tmp_path / "two")]
    r = subprocess.run(two, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert unip.load_checkpoint(str(tmp_path / "two" / "ckpt.pt"))["step"] == 3
    torch.manual_seed(0)  # the initial student: main() seeds, builds the teacher, then the student
    unip.vit_small(img_size=32)
    w0 = unip.vit_tiny(img_size=32, last_heads=6).state_dict()
    assert (w1["blocks.0.attn.qkv.weight"] - w0["blocks.0.attn.qkv.weight"]).abs().max() > 1e-3  # not vacuous
    for k in w1:
        a, b = w1[k], w2[k]
        if k.endswith("attn.qkv.bias"):  # the k bias shifts each softmax row by a constant: its gradient is
            a, b = a[torch.arange(len(a)) // 192 != 1], b[torch.arange(len(b)) // 192 != 1]  # float noise, which Adam amplifies
        assert torch.allclose(a, b, atol=5e-5), k
