"""Tests of the inputs users actually have: the 4-channel rule (MFNet's RGB-T PNGs vs plain alpha), EXIF orientation
on every decoding path, image/label size checks from the file headers before any training (train_seg.py, tools/real_data.py),
predict.py's output names and end counts. Small files made in each test, CPU only; UNIP_SAMPLE_DATA=/path/to/shared/data
adds the two real MFNet frames."""
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import real_data  # noqa: E402
import predict  # noqa: E402
import unip  # noqa: E402
from conftest import run_main  # noqa: E402

ORIENTATION = 0x0112  # EXIF tag; 6 = "rotate 90 degrees clockwise to display", 8 = counter-clockwise, 3 = 180


pytestmark = pytest.mark.usefixtures("one_thread")


def frame(h=24, w=40, seed=0):
    """(h, w) uint8 with structure in both directions, so any rotation or flip shows."""
    rng = np.random.default_rng(seed)
    return (np.linspace(10, 200, w)[None] + np.linspace(0, 40, h)[:, None] + rng.normal(0, 8, (h, w))).clip(0, 255).astype(np.uint8)


def rgbt(thermal, alpha=None, seed=1):
    """(h, w, 4) RGBA: random visible RGB and, in channel 3, the thermal frame (or a given alpha)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, thermal.shape + (3,), dtype=np.uint8)
    return np.dstack([rgb, thermal if alpha is None else alpha])


def luma_601(rgb):
    """ITU-R 601 luma as PIL computes it, written out: 16-bit fixed point weights, rounded."""
    r, g, b = (rgb[..., k].astype(np.int64) for k in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def save(path, arr, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(path, **kw)
    return path


def decode(path, channel=None):
    """decode_grey plus the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img, source = data.decode_grey(path, channel)
    return img, source, [str(w.message) for w in caught]

# ----------------------------------------------------------------------------- the 4-channel rule


def test_varying_fourth_channel_is_the_thermal_frame(tmp_path):
    t = frame()
    p = save(tmp_path / "01234N.png", rgbt(t))
    img, source, notes = decode(p)
    assert source == "thermal" and np.array_equal(img, t) and not notes
    assert np.array_equal(data.load_grey(p), t)  # every path that reads images goes through the same rule
    save(tmp_path / "labels" / "01234N.png", np.zeros_like(t))
    ds = data.SegFolder(tmp_path, tmp_path / "labels", classes=["a"], transform=lambda i, l, r: (i, l))
    assert np.array_equal(ds[0][0], t)
    # the rule can be overridden: the luma of the visible RGB, or one channel raw
    rgb = np.asarray(Image.open(p))[..., :3]
    img, source, _ = decode(p, "luma")
    assert source == "luma" and np.array_equal(img, luma_601(rgb))
    assert np.array_equal(data.load_grey(p, 1), rgb[..., 1]) and np.array_equal(data.load_channel(p, 3), t)


def test_constant_fourth_channel_is_plain_alpha(tmp_path):
    t = frame()
    for a in (255, 0, 17):  # opaque, fully transparent, any flat value
        p = save(tmp_path / f"a{a}.png", rgbt(t, np.full_like(t, a)))
        rgb = np.asarray(Image.open(p))[..., :3]
        img, source, notes = decode(p)
        assert source == "alpha" and not notes and np.array_equal(img, luma_601(rgb)), a
        # bit-identical to the same picture saved without alpha
        assert np.array_equal(img, data.load_grey(save(tmp_path / f"rgb{a}.png", rgb)))
    # forcing the constant channel warns: the frame would be flat
    img, source, notes = decode(tmp_path / "a255.png", 3)
    assert (img == 255).all() and source == "channel 3"
    assert len(notes) == 1 and "a255.png" in notes[0] and "constant (255)" in notes[0] and "--channel" in notes[0]


def test_transparency_like_fourth_channel_warns_naming_the_file_and_flag(tmp_path):
    t = frame()
    cut = np.zeros_like(t)
    cut[4:20, 8:30] = 255  # a cut-out mask: only 0 and 255
    p = save(tmp_path / "sticker.png", rgbt(t, cut))
    img, source, notes = decode(p)
    assert source == "thermal" and np.array_equal(img, cut)  # the documented rule still decides ...
    assert len(notes) == 1 and str(p) in notes[0] and "--channel luma" in notes[0] and "100%" in notes[0]  # ... aloud
    img, source, notes = decode(p, "luma")  # the flag named in the warning: the RGB, no warning
    assert source == "luma" and not notes and np.array_equal(img, luma_601(np.asarray(Image.open(p))[..., :3]))
    soft = cut.copy()
    soft[4:20, 8:12] = np.arange(4, dtype=np.uint8) * 60  # anti-aliased edge: more than 2 values, mostly 0/255
    assert len(decode(save(tmp_path / "soft.png", rgbt(t, soft)))[2]) == 1


def test_one_and_three_channel_inputs_unchanged(tmp_path):
    g, rng = frame(), np.random.default_rng(3)
    rgb = rng.integers(0, 256, g.shape + (3,), dtype=np.uint8)
    assert decode(save(tmp_path / "g.png", g))[:2][1] == "grey" and np.array_equal(data.load_grey(tmp_path / "g.png"), g)
    img, source, notes = decode(save(tmp_path / "c.png", rgb))
    assert source == "luma" and not notes and np.array_equal(img, luma_601(rgb))
    # 'luma' changes nothing for them, 16-bit still goes through the stretch, CMYK (4 channels, not RGBA) through luma
    assert np.array_equal(data.load_grey(tmp_path / "g.png", "luma"), g)
    p16 = save(tmp_path / "r16.png", (g.astype(np.uint16) * 50 + 20000))
    assert np.array_equal(data.load_grey(p16, "luma"), data.stretch_to_uint8(np.asarray(Image.open(p16))))
    assert decode(save(tmp_path / "k.jpg", Image.new("CMYK", (12, 10), (0, 0, 0, 40))))[1] == "luma"


def test_channel_flag_values():
    assert [data.parse_channel(s) for s in ("auto", "-1", "luma", "LUMA", "3", 0)] == [None, None, "luma", "luma", 3, 0]
    for bad in ("thermal", "-2", "3.0"):
        with pytest.raises(ValueError, match="--channel"):
            data.parse_channel(bad)
    with pytest.raises(ValueError, match="channel must be"):
        data.decode_grey("x.png", "thermal")


def test_missing_channel_names_the_file_and_flag(tmp_path):
    p = save(tmp_path / "g.png", frame())
    with pytest.raises(ValueError, match=r"g\.png: wanted channel 3 \(--channel 3\)"):
        data.load_grey(p, 3)

# ----------------------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation,rotate", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_on_every_decoding_path(tmp_path, orientation, rotate):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    t = frame()
    shown = lambda a: np.rot90(a, rotate)  # what a viewer displays; np.rot90 k=-1 turns clockwise
    p = save(tmp_path / "rgbt.png", rgbt(t), exif=exif)  # lossless, so every pixel can be compared
    raw = np.asarray(Image.open(p))
    assert raw.shape[:2] == t.shape  # the stored frame is not turned
    assert np.array_equal(data.load_grey(p), shown(t))                         # the 4-channel rule
    assert np.array_equal(data.load_channel(p, 3), shown(t))                   # one channel raw
    assert np.array_equal(data.load_grey(p, "luma"), shown(luma_601(raw[..., :3])))
    assert np.array_equal(data.load_grey(save(tmp_path / "g.png", t, exif=exif)), shown(t))
    assert np.array_equal(data.load_label(save(tmp_path / "l.png", t // 40, exif=exif)), shown(t // 40))
    j = save(tmp_path / "g.jpg", t, exif=exif, quality=95)  # JPEG: compare with its own decoded pixels
    assert np.array_equal(data.load_grey(j), shown(np.asarray(Image.open(j))))
    c = save(tmp_path / "c.jpg", np.dstack([t, 255 - t, t // 2]), exif=exif, quality=95)
    assert np.array_equal(data.load_channel(c, 1), shown(np.asarray(Image.open(c))[..., 1]))
    H, W = shown(t).shape
    assert data.image_size(p) == data.image_size(j) == (W, H)                   # the header says the displayed size

# ----------------------------------------------------------------------------- sizes from the headers


def test_image_size_reads_only_the_header(tmp_path):
    p = save(tmp_path / "a.png", frame(48, 64))
    cut = tmp_path / "cut.png"
    cut.write_bytes(p.read_bytes()[:100])  # header intact, pixels missing: decoding fails, the header still reads
    with pytest.raises(OSError, match="cannot decode"):
        data.load_grey(cut)
    assert data.image_size(cut) == (64, 48)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(OSError, match="junk.png"):
        data.image_size(tmp_path / "junk.png")


def labelled(root, sizes, label_sizes=None, exif=None):
    """root/images/fK.png and root/labels/fK.png: image K of sizes[K] (h, w), its label of label_sizes[K]."""
    for k, (h, w) in enumerate(sizes):
        save(root / "images" / f"f{k}.png", frame(h, w, seed=k), **({"exif": exif} if exif else {}))
        lh, lw = (label_sizes or sizes)[k]
        save(root / "labels" / f"f{k}.png", (np.arange(lh * lw).reshape(lh, lw) % 2).astype(np.uint8))


def test_size_mismatches_named_all_at_once_and_dropped(tmp_path):
    labelled(tmp_path, [(40, 48)] * 5, [(40, 48), (20, 24), (40, 48), (48, 40), (40, 48)])
    ds = data.SegFolder(tmp_path / "images", tmp_path / "labels", classes=["a", "b"])
    found = ds.size_mismatches()
    assert [i for i, _ in found] == [1, 3]
    assert "f1.png is 24x20 but" in found[0][1] and str(tmp_path / "images" / "f1.png") in found[0][1]
    with pytest.raises(ValueError, match="label is 24x20"):  # what the loader would have said at that item
        ds.load(1)
    ds.drop([i for i, _ in found])
    assert ds.stems == ["f0", "f2", "f4"] and not ds.size_mismatches() and len(ds) == 3
    assert ds.name(2) == "f4" and np.array_equal(ds.load(2)[0], frame(40, 48, seed=4)) and ds[2][0].shape == (3, 40, 48)


def test_exif_turned_image_matches_its_label_as_displayed(tmp_path):
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # stored 40 x 24 (w x h), displayed 24 x 40
    labelled(tmp_path / "ok", [(24, 40)], [(40, 24)], exif=exif)
    ds = data.SegFolder(tmp_path / "ok" / "images", tmp_path / "ok" / "labels", classes=["a", "b"])
    assert not ds.size_mismatches() and ds.load(0)[0].shape == (40, 24)
    labelled(tmp_path / "bad", [(24, 40)], [(24, 40)], exif=exif)  # the label drawn on the stored, unturned frame
    ds = data.SegFolder(tmp_path / "bad" / "images", tmp_path / "bad" / "labels", classes=["a", "b"])
    assert [m for _, m in ds.size_mismatches()] == [f"{ds.labels[0]} is 40x24 but {ds.images[0]} is 24x40"]


def run_seg(*args):
    cmd = [sys.executable, str(ROOT / "train_seg.py"), "--crop", "32", "--batch-size", "2", "--eval-images", "1",
           "--workers", "0", "--log-every", "1", "--num-samples", "0", *map(str, args)]
    return run_main(*cmd[1:])  # in this process: no second start of Python and torch


def test_train_seg_stops_before_training_on_mismatched_pairs(tmp_path):
    root, out = tmp_path / "set", tmp_path / "run"
    labelled(root, [(40, 48)] * 6, [(40, 48), (20, 24), (40, 48), (40, 48), (41, 48), (40, 48)])
    common = ["--dataset", "folder", "--data-root", root, "--classes", "a,b", "--out", out]
    p = run_seg(*common, "--steps", 1)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "2 image/label pairs differ in size" in p.stderr and "--skip-mismatched" in p.stderr
    assert "f1.png is 24x20" in p.stderr and "f4.png is 48x41" in p.stderr  # both named, each once
    assert p.stderr.count("f1.png is 24x20") == 1
    assert not (out / "ckpt.pt").exists() and not (out / "log.jsonl").exists()
    p = run_seg(*common, "--steps", 1, "--skip-mismatched")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "--skip-mismatched: left out 2 training pairs whose sizes differ (4 left)" in p.stdout
    assert "left out 2 validation pairs" in p.stdout and (out / "ckpt.pt").exists()


def test_real_data_checks_the_labelled_pairs_before_its_first_stage(tmp_path):
    root = tmp_path / "set"
    labelled(root, [(40, 48)] * 3, [(40, 48), (40, 48), (48, 40)])
    (tmp_path / "frames").mkdir()
    out = tmp_path / "demo"
    with pytest.raises(SystemExit, match=r"1 image/label pairs differ in size: .*f2\.png is 40x48 but"):
        real_data.main(["--teacher", str(tmp_path / "teacher.pth"), "--unlabelled", str(tmp_path / "frames"),
                   "--labelled", str(root), "--out", str(out)])
    assert os.listdir(out) == []  # no split written, no stage run

# ----------------------------------------------------------------------------- predict.py


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """best.pt of a 1-step train_seg.py run on the synthetic scenes, and the same model marked as MFNet-trained."""
    out = tmp_path_factory.mktemp("seg")
    p = run_seg("--out", out, "--steps", 1)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    ck = unip.load_checkpoint(out / "best.pt")
    ck["config"]["dataset"] = "mfnet"
    unip.save_checkpoint(ck, out / "mfnet.pt")
    return out / "best.pt", out / "mfnet.pt"


def predict_run(ckpt, images, out, *extra):
    predict.main(["--checkpoint", str(ckpt), "--images", str(images), "--out", str(out), "--amp", "none", *extra])


def test_predict_refuses_colliding_names_before_writing(ckpts, tmp_path, capsys):
    src = tmp_path / "in"
    save(src / "a.jpg", frame())
    save(src / "a.png", frame(seed=1))
    save(src / "sub" / "a.png", frame(seed=2))  # another folder: another name, no clash
    with pytest.raises(ValueError, match=r"1 pairs .*a\.jpg and .*in/a\.png \(both -> a\.png\)"):
        predict_run(ckpts[0], src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    assert predict.output_names([str(src / "a.png"), str(src / "sub" / "a.png")], str(src)) == ["a.png", "sub/a.png"]


def test_predict_counts_written_skipped_and_warned(ckpts, tmp_path, capsys):
    src, t = tmp_path / "in", frame()
    save(src / "grey.png", t)
    save(src / "rgbt.png", rgbt(t))                               # thermal in channel 4: read as thermal
    save(src / "rgba.png", rgbt(t, np.full_like(t, 255)))        # plain alpha: the luma of the RGB
    cut = np.zeros_like(t)
    cut[4:20, 8:30] = 255
    save(src / "sticker.png", rgbt(t, cut))                       # ambiguous: warned
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    predict_run(ckpts[0], src, tmp_path / "o")
    log = capsys.readouterr().out
    assert "wrote 4 masks and overlays" in log
    assert f"skipped 1 files that could not be read: {src / 'broken.png'}" in log
    assert f"warned about 1 files (see the warnings above): {src / 'sticker.png'}" in log
    assert "images read as: 1 luma of RGB (constant 4th channel: alpha), 1 grey, 2 4th channel (thermal" in log
    masks = {n: np.array(Image.open(tmp_path / "o" / "masks" / f"{n}.png")) for n in ("grey", "rgbt")}
    assert np.array_equal(masks["grey"], masks["rgbt"])  # the RGB-T file predicted from its thermal frame


def test_mfnet_model_warns_on_rgba_without_thermal_and_luma_opts_out(ckpts, tmp_path, capsys):
    src, t = tmp_path / "in", frame()
    save(src / "thermal.png", t)
    save(src / "visible.png", rgbt(t, np.full_like(t, 255)))
    save(src / "rgbt.png", rgbt(t))
    predict_run(ckpts[1], src, tmp_path / "o")
    log = capsys.readouterr().out
    assert f"warning: {src / 'visible.png'}: this model was trained on MFNet's thermal frames" in log
    assert "predicting from the luma of its RGB" in log and "warned about 1 files" in log
    masks = {n: np.array(Image.open(tmp_path / "o" / "masks" / f"{n}.png")) for n in ("thermal", "visible", "rgbt")}
    assert np.array_equal(masks["thermal"], masks["rgbt"])
    # --channel luma: the RGB on purpose (no warning); --channel -1 is still 'auto'
    predict_run(ckpts[1], src / "rgbt.png", tmp_path / "l", "--channel", "luma")
    log = capsys.readouterr().out
    assert "warned about 0 files" in log and "1 luma of RGB" in log
    lum = np.array(Image.open(tmp_path / "l" / "masks" / "rgbt.png"))
    predict_run(ckpts[0], save(tmp_path / "luma" / "rgbt.png", luma_601(rgbt(t)[..., :3])), tmp_path / "l2")
    assert np.array_equal(lum, np.array(Image.open(tmp_path / "l2" / "masks" / "rgbt.png")))
    predict_run(ckpts[1], src / "rgbt.png", tmp_path / "a", "--channel", "-1")
    assert "1 4th channel (thermal" in capsys.readouterr().out

# ----------------------------------------------------------------------------- the shared MFNet frames


@pytest.mark.skipif(not os.environ.get("UNIP_SAMPLE_DATA"), reason="set UNIP_SAMPLE_DATA to the shared data folder")
def test_real_mfnet_frames_follow_the_thermal_rule(ckpts, tmp_path, capsys):
    src = Path(os.environ["UNIP_SAMPLE_DATA"]) / "mfnet_rgbt_samples" / "images"
    for stem in ("01234N", "01477D"):
        p = src / f"{stem}.png"
        raw = np.asarray(Image.open(p))  # (480, 640, 4): RGB + thermal
        img, source, notes = decode(p)
        assert source == "thermal" and not notes and np.array_equal(img, raw[..., 3])
        luma = data.load_grey(p, "luma")
        r = np.corrcoef(luma.ravel().astype(np.float64), raw[..., 3].ravel().astype(np.float64))[0, 1]
        assert abs(r) < 0.5, r  # the visible frame's luma is another image (0.18 and -0.35 on these two frames)
        assert data.image_size(p) == (640, 480)
        # the same frame with its thermal channel replaced by plain alpha: read as the RGB's luma
        flat = save(tmp_path / "in" / f"{stem}_rgb.png", np.dstack([raw[..., :3], np.full(raw.shape[:2], 255, np.uint8)]))
        img, source, notes = decode(flat)
        assert source == "alpha" and not notes and np.array_equal(img, luma)
        os.symlink(p, tmp_path / "in" / f"{stem}.png")
    predict_run(ckpts[1], tmp_path / "in", tmp_path / "o")  # an MFNet model: the two real frames, the two flat ones
    log = capsys.readouterr().out
    assert "wrote 4 masks" in log and "2 4th channel (thermal" in log and "warned about 2 files" in log
    assert all(f"warning: {tmp_path / 'in' / s}_rgb.png: this model was trained on MFNet" in log for s in ("01234N", "01477D"))
