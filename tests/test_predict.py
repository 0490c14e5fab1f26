"""Tests of predict.py and unip.load_segmenter: a train_seg.py checkpoint turned back into a model, and masks and
overlays for a folder of unlabelled images decoded as in training (8-bit, 16-bit, EXIF, MFNet's 4 channels).
CPU only, a few seconds after one 1-step train_seg.py run. UNIP_SAMPLE_DATA=/path/to/shared/data adds real frames."""
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import predict  # noqa: E402
import unip  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """best.pt of a 1-step train_seg.py run on the synthetic scenes (vit_tiny, 64 px crops, 8 classes)."""
    out = tmp_path_factory.mktemp("seg")
    cmd = [sys.executable, str(ROOT / "train_seg.py"), "--out", str(out), "--steps", "1", "--crop", "64",
           "--batch-size", "2", "--eval-images", "1", "--workers", "0", "--num-samples", "0"]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return out / "best.pt"


def expected_mask(seg, img):
    """What train_seg.py's evaluation predicts for a (H, W) uint8 frame."""
    x, _ = data.SegEvalTransform(seg.short_side)(img, None)
    logits = unip.slide_inference(seg, x[None], seg.num_classes, seg.crop, seg.stride)
    return F.interpolate(logits, size=img.shape, mode="bilinear", align_corners=False).argmax(1)[0].numpy()


def frame(h=48, w=80, seed=0):
    rng = np.random.default_rng(seed)
    return (np.linspace(0, 200, w)[None] + rng.normal(0, 20, (h, w))).clip(0, 255).astype(np.uint8)


def test_load_segmenter_rebuilds_the_trained_model(ckpt):
    seg = unip.load_segmenter(ckpt)
    ck = unip.load_checkpoint(ckpt)
    assert not seg.training and seg.num_classes == 8 and seg.classes == list(data.SYN_CLASSES)
    assert seg.palette == [tuple(c) for c in data.SYN_PALETTE] and (seg.crop, seg.stride, seg.short_side) == (64, 42, 64)
    assert seg.config["model"] == "vit_tiny" and seg.layers == (12,) * 4
    assert all(torch.equal(v, ck["model"][k]) for k, v in seg.state_dict().items())
    assert "backbone.blocks.0.gamma_1" in ck["model"]  # layer scale: rebuilt from the checkpoint, not from defaults
    assert unip.load_segmenter(ck).num_classes == 8  # a loaded dict works too
    with pytest.raises(ValueError, match="not a checkpoint of train_seg.py"):
        unip.load_segmenter({"model": unip.vit_tiny(img_size=32).state_dict()})


def test_predict_a_folder(ckpt, tmp_path, capsys):
    src, out = tmp_path / "frames", tmp_path / "out"
    (src / "night").mkdir(parents=True)
    grey = frame()
    Image.fromarray(grey).save(src / "a.png")
    # a 16-bit radiometric frame: decoded by the training rule (default: 1st..99th percentile stretch), not cast
    Image.fromarray((grey.astype(np.int32) * 3 + 20000).astype(np.uint16)).save(src / "night" / "b16.png")
    # a JPEG whose EXIF says "rotate 90": the mask has the size of the image as displayed (80 x 48 -> 48 x 80)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(frame(seed=1)).save(src / "rotated.jpg", exif=exif, quality=95)
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    (src / "notes.txt").write_text("not an image")
    predict.main(["--checkpoint", str(ckpt), "--images", str(src), "--out", str(out), "--amp", "none"])
    log = capsys.readouterr()
    assert "wrote 3 masks and overlays" in log.out and "skipped 1 files" in log.out and "broken.png" in log.out
    assert "amp none (--amp)" in log.out and "predict" in log.err  # the precision, the progress bar

    seg = unip.load_segmenter(ckpt)
    with torch.no_grad():
        for name, path in (("a", src / "a.png"), ("night/b16", src / "night" / "b16.png"), ("rotated", src / "rotated.jpg")):
            mask = np.array(Image.open(out / "masks" / f"{name}.png"))
            img = data.load_grey(path)
            assert mask.dtype == np.uint8 and mask.shape == img.shape and mask.max() < 8
            assert np.array_equal(mask, expected_mask(seg, img)), name
            overlay = np.array(Image.open(out / "overlays" / f"{name}.png"))
            assert overlay.shape == img.shape + (3,)
    assert np.array(Image.open(out / "masks" / "rotated.png")).shape == (80, 48)
    assert np.array_equal(data.load_grey(src / "night" / "b16.png"), data.stretch_to_uint8(np.array(Image.open(src / "night" / "b16.png"))))
    meta = json.loads((out / "classes.json").read_text())
    assert meta["classes"] == list(data.SYN_CLASSES) and meta["palette"][7] == [0, 0, 142]


@pytest.fixture(scope="module")
def ckpt16(tmp_path_factory):
    """best.pt of a 1-step train_seg.py run on 16-bit radiometric frames read with --thermal-range 20000,24000."""
    root, rng = tmp_path_factory.mktemp("radiometric"), np.random.default_rng(0)
    for d in ("images", "labels"):
        (root / d).mkdir()
    for k in range(3):
        lab = np.zeros((48, 64), np.uint8)
        lab[8 + 4 * k:30, 10:40 + 4 * k] = 1
        raw = (20000 + 2000.0 * lab + rng.normal(0, 300, lab.shape)).astype(np.uint16)
        Image.fromarray(raw).save(root / "images" / f"f{k}.png")
        Image.fromarray(lab).save(root / "labels" / f"f{k}.png")
    out = root / "run"
    cmd = [sys.executable, str(ROOT / "train_seg.py"), "--out", str(out), "--steps", "1", "--crop", "64",
           "--batch-size", "2", "--eval-images", "1", "--workers", "0", "--num-samples", "0", "--dataset", "folder",
           "--data-root", str(root), "--classes", "background,warm", "--thermal-range", "20000,24000"]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "16-bit / float frames: raw 20000..24000 -> 0..255" in p.stdout
    return out / "best.pt"


def test_predict_maps_16bit_frames_as_the_training_run_did(ckpt16, tmp_path, capsys):
    assert unip.load_checkpoint(ckpt16)["config"]["thermal_range"] == "20000,24000"
    src = tmp_path / "in"
    src.mkdir()
    raw = np.tile(np.linspace(18000, 26000, 80), (48, 1)).astype(np.uint16)  # runs past both ends of the range
    Image.fromarray(raw).save(src / "r16.png")
    Image.fromarray(frame()).save(src / "g8.png")
    seg = unip.load_segmenter(ckpt16)

    def check(out, grey16):  # masks as evaluation predicts them; overlays: background pixels show the grey seen
        for name, grey in (("r16", grey16), ("g8", frame())):
            mask = np.array(Image.open(out / "masks" / f"{name}.png"))
            with torch.no_grad():
                assert np.array_equal(mask, expected_mask(seg, grey)), name
            overlay = np.array(Image.open(out / "overlays" / f"{name}.png"))
            assert (mask == 0).any() and np.array_equal(overlay[mask == 0][:, 0], grey[mask == 0]), name

    fixed, stretched = data.range_to_uint8(raw, 20000, 24000), data.stretch_to_uint8(raw)
    assert not np.array_equal(fixed, stretched)
    predict.main(["--checkpoint", str(ckpt16), "--images", str(src), "--out", str(tmp_path / "a"), "--amp", "none"])
    log = capsys.readouterr().out
    assert "16-bit / float frames: raw 20000..24000 -> 0..255, clipped" in log and "[the training run's mapping]" in log
    check(tmp_path / "a", fixed)
    # --thermal-range given: it wins, and the output says so (8-bit images: the same as before)
    for flag, grey, said in (("stretch", stretched, "per-image 1st-99th percentile stretch"),
                             ("0,65535", data.range_to_uint8(raw, 0, 65535), "raw 0..65535 -> 0..255")):
        predict.main(["--checkpoint", str(ckpt16), "--images", str(src), "--out", str(tmp_path / flag), "--amp", "none",
                      "--thermal-range", flag])
        log = capsys.readouterr().out
        assert said in log and "[given by --thermal-range; training used 20000,24000]" in log
        check(tmp_path / flag, grey)
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", str(ckpt16), "--images", str(src), "--thermal-range", "24000,20000"])
    assert e.value.code == 2 and "--thermal-range '24000,20000': expected LO,HI" in capsys.readouterr().err


def test_overlay_blends_class_colours_and_leaves_black_classes_grey(ckpt, tmp_path):
    Image.fromarray(frame()).save(tmp_path / "a.png")
    predict.main(["--checkpoint", str(ckpt), "--images", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
                  "--alpha", "0.5", "--amp", "none"])
    mask = np.array(Image.open(tmp_path / "o" / "masks" / "a.png"))
    overlay = np.array(Image.open(tmp_path / "o" / "overlays" / "a.png")).astype(np.float32)
    colour = data.colorize(mask, data.SYN_PALETTE).astype(np.float32)  # synthetic classes: no black colour
    want = 0.5 * frame()[..., None] + 0.5 * colour
    assert np.abs(overlay - want).max() <= 1


def test_mfnet_model_reads_the_thermal_channel_of_4_channel_pngs(ckpt, tmp_path):
    ck = unip.load_checkpoint(ckpt)
    ck["config"]["dataset"] = "mfnet"  # as if trained on MFNet
    unip.save_checkpoint(ck, tmp_path / "mfnet.pt")
    thermal = frame(seed=2)
    rgbt = np.dstack([np.full_like(thermal, 200), 255 - thermal, thermal // 2, thermal])  # thermal = channel 3
    (tmp_path / "in").mkdir()
    Image.fromarray(rgbt, "RGBA").save(tmp_path / "in" / "00001D.png")
    Image.fromarray(thermal).save(tmp_path / "in" / "00001D_thermal.png")
    predict.main(["--checkpoint", str(tmp_path / "mfnet.pt"), "--images", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                  "--amp", "none"])
    a, b = (np.array(Image.open(tmp_path / "o" / "masks" / n)) for n in ("00001D.png", "00001D_thermal.png"))
    assert np.array_equal(a, b)  # the 4-channel frame was read as its thermal channel, not converted to grey
    seg = unip.load_segmenter(tmp_path / "mfnet.pt")
    with torch.no_grad():
        assert np.array_equal(a, expected_mask(seg, thermal))


def test_predict_user_errors_are_one_line(ckpt, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(ckpt), "--images", str(tmp_path / "none")]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "error: --images" in p.stderr


@pytest.mark.skipif(not os.environ.get("UNIP_SAMPLE_DATA"), reason="set UNIP_SAMPLE_DATA to the shared data folder")
def test_predict_real_frames_of_both_kinds(ckpt, tmp_path):
    root = Path(os.environ["UNIP_SAMPLE_DATA"])
    files = [root / "buffalo_udder_thermal_seg" / "images" / sorted(os.listdir(root / "buffalo_udder_thermal_seg" / "images"))[0],
             root / "roadscene_flir_ir" / "cropinfrared" / sorted(os.listdir(root / "roadscene_flir_ir" / "cropinfrared"))[0]]
    (tmp_path / "list.txt").write_text("\n".join(map(str, files)) + "\n")
    predict.main(["--checkpoint", str(ckpt), "--images", str(tmp_path / "list.txt"), "--out", str(tmp_path / "o")])
    masks = sorted((tmp_path / "o" / "masks").rglob("*.png"))
    assert len(masks) == 2
    for f in files:
        name = os.path.relpath(f, root).rsplit(".", 1)[0] + ".png"
        assert np.array(Image.open(tmp_path / "o" / "masks" / name)).shape == data.load_grey(f).shape
