"""Tests of predict.py and unip.load_segmenter: a train_seg.py checkpoint turned back into a model, and masks and
overlays for a folder of unlabelled images decoded as in training (8-bit, 16-bit, EXIF, MFNet's 4 channels).
CPU only, a few seconds after one 1-step train_seg.py run. UNIP_SAMPLE_DATA=/path/to/shared/data adds real frames."""
import json
import os
import re
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
from conftest import run_main  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """best.pt of a 1-step train_seg.py run on the synthetic scenes (vit_tiny, 64 px crops, 8 classes)."""
    out = tmp_path_factory.mktemp("seg")
    cmd = [sys.executable, str(ROOT / "train_seg.py"), "--out", str(out), "--steps", "1", "--crop", "64",
           "--batch-size", "2", "--eval-images", "1", "--workers", "0", "--num-samples", "0"]
    p = run_main(*cmd[1:])  # in this process: no second start of Python and torch
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
    assert ck["segmenter"]["head_channels"] == seg.head.classifier.in_channels == 192  # the UperNet's width: D
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
    p = run_main(*cmd[1:])  # in this process: no second start of Python and torch
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


@pytest.fixture(scope="module")
def scene(ckpt, tmp_path_factory):
    """(frames folder, {name: mask predict.py wrote}): a.png, b.jpg, night/c.png and an undecodable broken.png."""
    root = tmp_path_factory.mktemp("scored")
    src = root / "in"
    (src / "night").mkdir(parents=True)
    Image.fromarray(frame(seed=3)).save(src / "a.png")
    Image.fromarray(frame(seed=4)).save(src / "b.jpg", quality=95)
    Image.fromarray(frame(40, 56, seed=5)).save(src / "night" / "c.png")
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    predict.main(["--checkpoint", str(ckpt), "--images", str(src), "--out", str(root / "first"), "--amp", "none"])
    return src, {n: np.array(Image.open(root / "first" / "masks" / f"{n}.png")) for n in ("a", "b", "night/c")}


def write_labels(folder, labels, suffix=".png"):
    """Save {name: (H, W) uint8} as folder/<name><suffix>; broken.png gets a label too (it is skipped all the same)."""
    for name, lab in {**labels, "broken": np.zeros((4, 4), np.uint8)}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(lab).save(folder / f"{name}{suffix}")
    return folder


def scored(ckpt, src, labels, out, *flags):
    """Run predict.py with --labels; metrics.json and the masks it wrote."""
    predict.main(["--checkpoint", str(ckpt), "--images", str(src), "--out", str(out), "--amp", "none",
                  "--labels", str(labels), *flags])
    masks = {n: np.array(Image.open(out / "masks" / f"{n}.png")) for n in ("a", "b", "night/c")}
    return json.loads((out / "metrics.json").read_text()), masks


def nan_none(values):
    return np.array([np.nan if v is None else v for v in values], np.float64)


def test_labels_equal_to_the_masks_score_100(ckpt, scene, tmp_path, capsys):
    src, first = scene
    labels = write_labels(tmp_path / "gt", first, suffix="_gt.png")  # a.png -> a_gt.png: --label-suffix
    m, masks = scored(ckpt, src, labels, tmp_path / "out", "--label-suffix", "_gt.png")
    log = capsys.readouterr().out
    assert all(np.array_equal(masks[n], first[n]) for n in first)
    K = 8
    want = sum(np.bincount(v.ravel().astype(np.int64) * (K + 1), minlength=K * K).reshape(K, K) for v in first.values())
    assert m["images"] == 3 and m["classes"] == list(data.SYN_CLASSES)  # broken.png skipped and left out
    assert np.array_equal(np.array(m["confusion"]), want)
    assert m["miou"] == m["macc"] == m["aacc"] == 100
    present = want.diagonal() > 0
    assert [v is None for v in m["iou"]] == [v is None for v in m["acc"]] == list(~present)
    assert all(v == 100 for v in nan_none(m["iou"])[present]) and all(v == 100 for v in nan_none(m["acc"])[present])
    assert "skipped 1 files" in log and "mIoU / mAcc" in log and "aAcc" in log and " 100.00 100.00" in log
    assert (" -      -" in log) == (not present.all())  # classes in neither prediction nor label
    assert "label map none" in log


def test_scores_match_the_formulas_by_hand(ckpt, scene, tmp_path):
    src, first = scene
    b, c = first["b"].copy(), first["night/c"].copy()
    b[5:20, 10:50] = (b[5:20, 10:50] + 1) % 8  # wrong where the model said something else
    b[30:, :20] = 255  # ignored
    c[:, :28] = 3
    given = {"a": np.zeros_like(first["a"]), "b": b, "night/c": c}
    m, masks = scored(ckpt, src, write_labels(tmp_path / "gt", given), tmp_path / "out")
    iou, acc, tp_all = [], [], 0
    for k in range(8):  # per class, straight from the pixels
        tp = fp = fn = 0
        for n, lab in given.items():
            pred, keep = masks[n], lab != 255
            tp += np.sum((pred == k) & (lab == k) & keep)
            fp += np.sum((pred == k) & (lab != k) & keep)
            fn += np.sum((pred != k) & (lab == k) & keep)
        iou.append(100 * tp / (tp + fp + fn) if tp + fp + fn else np.nan)
        acc.append(100 * tp / (tp + fn) if tp + fn else np.nan)
        tp_all += tp
    n_all = sum(np.sum(lab != 255) for lab in given.values())
    np.testing.assert_allclose(nan_none(m["iou"]), iou, rtol=1e-12)
    np.testing.assert_allclose(nan_none(m["acc"]), acc, rtol=1e-12)
    assert not np.allclose(iou, acc, equal_nan=True)  # a wrong formula for one of them would show
    assert m["miou"] == pytest.approx(np.nanmean(iou)) and m["macc"] == pytest.approx(np.nanmean(acc))
    assert m["aacc"] == pytest.approx(100 * tp_all / n_all) and np.sum(m["confusion"]) == n_all


def test_label_errors_name_the_file(ckpt, scene, tmp_path):
    src, first = scene
    out = tmp_path / "out"
    gt = write_labels(tmp_path / "gt", {"a": first["a"]})  # b and night/c have none
    with pytest.raises(FileNotFoundError, match=r"2 of 4 images have no label file") as e:
        predict.main(["--checkpoint", str(ckpt), "--images", str(src), "--out", str(out), "--labels", str(gt)])
    assert str(gt / "b.png") in str(e.value) and str(gt / "night" / "c.png") in str(e.value)
    assert not out.exists()  # refused before anything was predicted

    gt = write_labels(tmp_path / "gt2", {**first, "b": np.zeros((10, 12), np.uint8)})
    with pytest.raises(ValueError, match=re.escape(f"{gt / 'b.png'} is 12x10 but {src / 'b.jpg'} is 80x48")):
        predict.main(["--checkpoint", str(ckpt), "--images", str(src), "--out", str(out), "--labels", str(gt)])
    assert not out.exists()
    with pytest.raises(ValueError, match=re.escape(f"{gt / 'b.png'}: label is 12x10 but its image is 80x48")):
        predict.read_label(gt / "b.png", (48, 80), None, 8)  # the check at the item, after decoding

    c = first["night/c"].copy()
    c[0, :3] = 200
    gt = write_labels(tmp_path / "gt3", {**first, "night/c": c})
    with pytest.raises(ValueError, match=re.escape(f"{gt / 'night' / 'c.png'}: label values [200] are neither "
                                                   "classes 0..7 nor ignore 255")):
        predict.main(["--checkpoint", str(ckpt), "--images", str(src), "--out", str(out), "--labels", str(gt)])
    assert not (out / "metrics.json").exists()


def test_label_map_for_binary_masks(ckpt, scene, tmp_path, capsys):
    src, first = scene
    raw = {n: np.where(np.arange(v.shape[1]) < 30, 255, 0).astype(np.uint8)[None].repeat(v.shape[0], 0)
           for n, v in first.items()}  # 0/255 masks: the left 30 columns are the foreground
    gt = write_labels(tmp_path / "gt", raw)
    n_fg, n_all = sum(v.shape[0] * 30 for v in raw.values()), sum(v.size for v in raw.values())

    def confusion(masks, fg):  # fg: class of the 255 pixels, or None (ignored)
        conf = np.zeros((8, 8), np.int64)
        for n, r in raw.items():
            lab = np.where(r == 255, 255 if fg is None else fg, 0).ravel()
            keep = lab != 255
            np.add.at(conf, (lab[keep], masks[n].ravel()[keep]), 1)
        return conf

    m, masks = scored(ckpt, src, gt, tmp_path / "mapped", "--label-map", "255:1")
    assert np.array_equal(m["confusion"], confusion(masks, 1)) and np.sum(m["confusion"][1]) == n_fg
    assert "label map 255:1 [given by --label-map]" in capsys.readouterr().out
    m, masks = scored(ckpt, src, gt, tmp_path / "plain")  # without the map 255 is the ignore value
    assert np.array_equal(m["confusion"], confusion(masks, None)) and np.sum(m["confusion"]) == n_all - n_fg
    # a model trained on a folder with --label-map 255:1 scores with it unless --label-map says otherwise
    ck = unip.load_checkpoint(ckpt)
    ck["config"].update(dataset="folder", label_map="255:1")
    unip.save_checkpoint(ck, tmp_path / "folder.pt")
    m, masks = scored(tmp_path / "folder.pt", src, gt, tmp_path / "trained")
    assert np.array_equal(m["confusion"], confusion(masks, 1))
    assert "label map 255:1 [the training run's]" in capsys.readouterr().out
    m, masks = scored(tmp_path / "folder.pt", src, gt, tmp_path / "override", "--label-map", "255:2")
    assert np.array_equal(m["confusion"], confusion(masks, 2))
    with pytest.raises(SystemExit, match="--label-map '255:300': expected 'raw:class,...' in 0..255"):
        scored(ckpt, src, gt, tmp_path / "bad", "--label-map", "255:300")


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
