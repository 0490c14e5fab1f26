"""Tests of export.py and predict.py --onnx: a train_seg.py checkpoint written as ONNX, run by ONNX Runtime against
PyTorch (logits and masks), its metadata read back, and the one-line refusals. CPU, about 30 s: one 1-step
train_seg.py run (vit_micro, 64 px) and one export, shared by the module, plus one tiny export of a DINOv2-shaped
linear probe. Skipped without onnx, onnxscript and onnxruntime (pip install -r requirements-export.txt).
UNIP_SAMPLE_DATA=/path/to/shared/data adds real frames."""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import export  # noqa: E402
import predict  # noqa: E402
import unip  # noqa: E402
from conftest import run_main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """best.pt of a 1-step train_seg.py run on the synthetic scenes (vit_micro, 64 px crops, 8 classes)."""
    out = tmp_path_factory.mktemp("seg")
    cmd = [sys.executable, str(ROOT / "train_seg.py"), "--out", str(out), "--model", "vit_micro", "--steps", "1",
           "--crop", "64", "--batch-size", "2", "--eval-images", "1", "--workers", "0", "--num-samples", "0"]
    p = run_main(*cmd[1:])  # in this process: no second start of Python and torch
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return out / "best.pt"


@pytest.fixture(scope="module")
def exported(ckpt):
    """(the .onnx file export.py wrote next to the checkpoint, its printed lines)."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        export.main(["--checkpoint", str(ckpt)])
    return ckpt.with_suffix(".onnx"), log.getvalue()


def frame(h=48, w=80, seed=0):
    rng = np.random.default_rng(seed)
    return (np.linspace(0, 200, w)[None] + rng.normal(0, 20, (h, w))).clip(0, 255).astype(np.uint8)


def test_export_computes_the_checkpoints_logits_at_any_batch(ckpt, exported):
    path, log = exported
    assert "check on 3 random windows" in log and log.rstrip().endswith("passed")
    seg = unip.load_segmenter(ckpt)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, out.name) == ("input", "logits") and inp.shape[1:] == [3, 64, 64]
    assert isinstance(inp.shape[0], str)  # the batch is a named, dynamic dimension
    with torch.no_grad():
        for b in (1, 5):
            x = torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(b))
            want = export.Logits(seg)(x).numpy()
            got = sess.run(None, {"input": x.numpy()})[0]
            assert got.shape == (b, 8, 64, 64) and np.abs(got - want).max() <= 1e-4
            # the head's stride-4 logits, upsampled: slide_inference's PyTorch path computes the same
            assert torch.equal(F.interpolate(seg(x)[0], size=(64, 64), mode="bilinear", align_corners=False),
                               torch.from_numpy(want))


def test_metadata_round_trip(ckpt, exported):
    path, _ = exported
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["format"] == predict.ONNX_FORMAT and meta["source"] == "best.pt"
    assert json.loads(meta["classes"]) == list(data.SYN_CLASSES)
    assert json.loads(meta["palette"]) == [list(c) for c in data.SYN_PALETTE]
    assert (float(meta["mean"]), float(meta["std"])) == (data.SEG_MEAN, data.SEG_STD)
    assert {k: meta[k] for k in predict.ONNX_NUMBERS} == {"short_side": "64", "crop": "64", "stride": "42",
                                                          "patch": "16", "window": "64", "channels": "3"}
    assert [meta[k] for k in ("model", "mode", "dataset", "channel", "thermal_range")] == [
        "vit_micro", "finetune", "synthetic", "auto", ""]
    assert all(meta[k] for k in ("input", "normalisation", "channel_rule", "sliding_window", "output"))
    seg, onnx_seg = unip.load_segmenter(ckpt), predict.OnnxSegmenter(str(path))
    for name in ("classes", "palette", "crop", "stride", "short_side", "num_classes", "mode"):
        assert getattr(onnx_seg, name) == getattr(seg, name), name
    assert onnx_seg.patch == seg.backbone.patch_size and onnx_seg.config["model"] == seg.config["model"]


def test_predict_onnx_writes_the_masks_of_the_pytorch_path(ckpt, exported, tmp_path, capsys):
    src = tmp_path / "frames"
    (src / "night").mkdir(parents=True)
    Image.fromarray(frame()).save(src / "a.png")
    Image.fromarray((frame(seed=1).astype(np.int32) * 3 + 20000).astype(np.uint16)).save(src / "night" / "b16.png")
    Image.fromarray(frame(96, 200, seed=2)).save(src / "wide.png")  # 3 windows after resizing to 64 x 133
    predict.main(["--checkpoint", str(ckpt), "--images", str(src), "--out", str(tmp_path / "pt"), "--amp", "none"])
    predict.main(["--onnx", str(exported[0]), "--images", str(src), "--out", str(tmp_path / "ox")])
    log = capsys.readouterr().out
    assert "amp none (ONNX Runtime, fp32)" in log and log.count("wrote 3 masks and overlays") == 2
    for name in ("a", "night/b16", "wide"):
        for sub in ("masks", "overlays"):
            a, b = (np.array(Image.open(tmp_path / run / sub / f"{name}.png")) for run in ("pt", "ox"))
            assert np.array_equal(a, b), (name, sub)
    pt, ox = (json.loads((tmp_path / run / "classes.json").read_text()) for run in ("pt", "ox"))
    assert ox["onnx"] == str(exported[0]) and (ox["classes"], ox["palette"]) == (pt["classes"], pt["palette"])


def test_the_file_carries_the_training_mapping_of_16bit_frames(ckpt, exported, tmp_path, capsys):
    seg = unip.load_segmenter(ckpt)
    seg.config["thermal_range"] = "20000,24000"  # what a run with --thermal-range 20000,24000 stores
    assert export.metadata(seg, "best.pt", 64, 3)["thermal_range"] == "20000,24000"
    model = onnx.load(str(exported[0]))
    next(p for p in model.metadata_props if p.key == "thermal_range").value = "20000,24000"
    onnx.save(model, str(tmp_path / "tr.onnx"))
    src = tmp_path / "frames"
    src.mkdir()
    Image.fromarray(np.tile(np.linspace(18000, 26000, 80), (48, 1)).astype(np.uint16)).save(src / "r16.png")
    predict.main(["--onnx", str(tmp_path / "tr.onnx"), "--images", str(src), "--out", str(tmp_path / "ox")])
    assert "raw 20000..24000 -> 0..255, clipped" in capsys.readouterr().out
    predict.main(["--checkpoint", str(ckpt), "--images", str(src), "--out", str(tmp_path / "pt"), "--amp", "none",
                  "--thermal-range", "20000,24000"])
    a, b = (np.array(Image.open(tmp_path / run / "overlays" / "r16.png")) for run in ("pt", "ox"))
    assert np.array_equal(a, b)


def test_dinov2_shaped_linear_probe_with_padded_windows(tmp_path):
    """A linear probe on a patch-14 backbone with register tokens and DINOv2's per-forward position resampling, at a
    crop (40) that is no multiple of the patch: the file takes the padded 42 x 42 window, and slide_inference pads and
    crops around ONNX Runtime as it does around PyTorch."""
    torch.manual_seed(0)
    vit = unip.ViT(56, patch_size=14, dim=32, depth=2, heads=2, num_registers=4, pos_interp="dinov2", layer_scale=1e-5)
    seg = unip.Segmenter(vit, 3, "linear", layers=(1, 2)).eval()
    seg.classes, seg.palette, seg.crop, seg.stride, seg.short_side = ["a", "b", "c"], [(0, 0, 0)] * 3, 40, 27, 40
    seg.config = {"model": "tiny", "dataset": "folder"}
    path = str(tmp_path / "probe.onnx")
    export.save(export.to_onnx(seg, 42), path, export.metadata(seg, "probe.pt", 42, 3))
    onnx_seg = predict.OnnxSegmenter(path)
    assert (onnx_seg.window, onnx_seg.patch, onnx_seg.mode) == (42, 14, "linear")
    diff, agree = export.check(seg, onnx_seg, path, "probe.pt", [], None, 1e-4, 99.99)  # random 42 x 42 windows
    x, _ = data.SegEvalTransform(40)(frame(50, 90), None)  # 40 x 72: two windows, each padded 40 -> 42
    with torch.no_grad():
        a = unip.slide_inference(seg, x[None], 3, 40, 27)
        b = unip.slide_inference(onnx_seg, x[None], 3, 40, 27, patch=onnx_seg.patch)
    assert a.shape == (1, 3, 40, 72) and (a - b).abs().max() <= 1e-4


def test_a_narrow_head_is_rebuilt_at_its_width(tmp_path):
    """A checkpoint of a run with --head-channels 16, as train_seg.py records it: export.py rebuilds that width."""
    import train_seg
    cfg = train_seg.parse_config(["--model", "vit_micro", "--crop", "32", "--head-channels", "16"])
    seg = unip.Segmenter(unip.vit_micro(img_size=32, layer_scale=cfg.layer_scale), 3, head_channels=16).eval()
    arch = train_seg.inference_arch(cfg, seg, 32, 21, ["a", "b", "c"], [(0, 0, 0)] * 3)
    unip.save_checkpoint({"model": seg.state_dict(), "config": train_seg.asdict(cfg), "segmenter": arch},
                         tmp_path / "narrow.pt")
    back = export.read_train_seg(tmp_path / "narrow.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert back.head.fuse[0].out_channels == 16 and torch.equal(export.Logits(back)(x), export.Logits(seg)(x))


def test_a_failed_check_ends_the_run(ckpt, exported):
    class Off(predict.OnnxSegmenter):  # the exported file, with every logit 1e-3 off
        def __call__(self, x):
            return super().__call__(x)[0] + 1e-3, None

    seg, off = unip.load_segmenter(ckpt), Off(str(exported[0]))
    with pytest.raises(SystemExit, match=r"does not compute what .*best.pt computes \(largest logit difference 1.0"):
        export.check(seg, off, str(exported[0]), str(ckpt), [], None, 1e-4, 99.99)


def test_user_errors_are_one_line(ckpt, exported, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as done:  # the help text is built from the Config comments
        export.main(["--help"])
    assert done.value.code == 0 and "--min-agree" in capsys.readouterr().out

    # not a train_seg.py checkpoint: through the command line, one line and no traceback
    backbone = tmp_path / "backbone.pt"
    torch.save({"model": unip.vit_micro(img_size=32).state_dict()}, backbone)
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), "--checkpoint", str(backbone)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert f"error: {backbone} is not a train_seg.py checkpoint" in p.stderr and "train_seg.py --init" in p.stderr

    # an export that this torch cannot do: named, with the trace kept beside the output
    def cannot(*a, **k):
        raise RuntimeError("Unsupported: aten::something\nmore lines")
    with monkeypatch.context() as m:
        m.setattr(torch.onnx, "export", cannot)
        with pytest.raises(SystemExit, match=rf"could not export {ckpt} to ONNX \(RuntimeError: Unsupported: "
                                             r"aten::something\).*pip install -U torch onnxscript"):
            export.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "x.onnx")])
    assert "more lines" in (tmp_path / "x.onnx.error.txt").read_text()

    # the optional packages missing: the pip command
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnxscript", None)
        with pytest.raises(SystemExit, match=r"needs the optional package onnxscript: pip install onnxscript "
                                             r"\(or pip install -r requirements-export.txt\)"):
            export.main(["--checkpoint", str(ckpt)])

    # an ONNX file without the project's metadata, and a file that is no ONNX model at all
    model = onnx.load(str(exported[0]))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    Image.fromarray(frame()).save(tmp_path / "a.png")
    rest = ["--images", str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=rf"{bare} does not carry this project's metadata.*python export.py --checkpoint"):
        predict.main(["--onnx", str(bare)] + rest)
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(SystemExit, match=r"text.onnx cannot be read as an ONNX model"):
        predict.main(["--onnx", str(tmp_path / "text.onnx")] + rest)


@pytest.mark.skipif(not os.environ.get("UNIP_SAMPLE_DATA"), reason="set UNIP_SAMPLE_DATA to the shared data folder")
def test_real_frames_through_onnx_runtime(ckpt, exported, tmp_path):
    """A grey thermal frame, an 8-bit road frame and an MFNet RGB-T PNG (thermal in its 4th channel): the check passes
    on them, and predict.py --onnx writes the PyTorch path's masks. A pixel may differ only where the two best
    classes' logits tie within the tolerance (the 1-step model's logits are small and close)."""
    root = Path(os.environ["UNIP_SAMPLE_DATA"])
    first = lambda d: root / d / sorted(os.listdir(root / d))[0]
    files = [first("buffalo_udder_thermal_seg/images"), first("msrs_ir_test20/ir"), first("mfnet_rgbt_samples/images")]
    (tmp_path / "list.txt").write_text("\n".join(map(str, files)) + "\n")
    seg, onnx_seg = unip.load_segmenter(ckpt), predict.OnnxSegmenter(str(exported[0]))
    diff, agree = export.check(seg, onnx_seg, str(exported[0]), str(ckpt), files, None, 1e-4, 99.99)
    for run, flag in (("pt", ["--checkpoint", str(ckpt), "--amp", "none"]), ("ox", ["--onnx", str(exported[0])])):
        predict.main(flag + ["--images", str(tmp_path / "list.txt"), "--out", str(tmp_path / run)])
    for f in files:
        name = os.path.relpath(f, root).rsplit(".", 1)[0] + ".png"
        a, b = (np.array(Image.open(tmp_path / run / "masks" / name)) for run in ("pt", "ox"))
        img = data.load_grey(f)
        assert a.shape == img.shape
        differ = a != b
        if differ.any():
            x, _ = data.SegEvalTransform(seg.short_side)(img, None)
            with torch.no_grad():
                logits = unip.slide_inference(seg, x[None], seg.num_classes, seg.crop, seg.stride)
            top2 = F.interpolate(logits, size=img.shape, mode="bilinear", align_corners=False)[0].topk(2, 0).values
            assert (top2[0] - top2[1])[torch.from_numpy(differ)].max() <= 1e-4, name
        assert differ.mean() <= 1e-4, name
