"""Tests for data.py, on the CPU, in a few seconds. Tests on real thermal files run when
UNIP_SAMPLE_DATA names the sample folder (e.g. UNIP_SAMPLE_DATA=/work/shared/data) and skip otherwise."""
import os
import random
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402



def save(path, arr=None, size=(24, 16), **kw):
    """Write an image file (arr: numpy array or PIL image; default a grey gradient) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr is None:
        arr = np.tile(np.linspace(0, 255, size[0], dtype=np.uint8), (size[1], 1))
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    im.save(path, **kw)
    return path


def raw(img, label, rng):
    return img, label


def sample_dir():
    d = os.environ.get('UNIP_SAMPLE_DATA')
    if not d:
        pytest.skip('set UNIP_SAMPLE_DATA to the folder of real thermal samples')
    return d

# ----------------------------------------------------------------------------- InfMix


def test_infmix_layout_counts_and_order(tmp_path):
    ir, inet, coco = tmp_path / 'ir', tmp_path / 'imagenet', tmp_path / 'coco'
    for name in ('b.png', 'a.jpg', 'c.JPEG'):
        save(ir / 'dsB' / 'thermal' / name)
    save(ir / 'dsA' / 'thermal' / 'z.bmp')
    save(ir / 'dsA' / 'rgb' / 'ignored.png')               # not a thermal/ folder
    (ir / 'dsA' / 'thermal' / 'notes.txt').write_text('not an image')
    for wnid, k in (('n02', 5), ('n01', 2)):
        for j in reversed(range(k)):
            save(inet / wnid / f'{j}.JPEG')
    for j in (1, 0):
        save(coco / 'train2017' / f'{j:012d}.jpg')
    ds = data.InfMix(ir, inet, coco, per_class=3, transform=raw)
    assert ds.counts == {'infrared': 4, 'imagenet': 5, 'coco': 2}
    assert [os.path.relpath(f, tmp_path) for f in ds.files] == [
        'ir/dsA/thermal/z.bmp', 'ir/dsB/thermal/a.jpg', 'ir/dsB/thermal/b.png', 'ir/dsB/thermal/c.JPEG',
        'imagenet/n01/0.JPEG', 'imagenet/n01/1.JPEG',
        'imagenet/n02/0.JPEG', 'imagenet/n02/1.JPEG', 'imagenet/n02/2.JPEG',
        'coco/train2017/000000000000.jpg', 'coco/train2017/000000000001.jpg']
    assert '4 infrared' in ds.summary() and '5 imagenet' in ds.summary() and '2 coco' in ds.summary()
    img, label = ds[0]
    assert img.dtype == np.uint8 and img.ndim == 2 and label is None


def test_infmix_plain_folder_and_flat_coco(tmp_path):
    save(tmp_path / 'ir' / 'x.png')
    save(tmp_path / 'ir' / 'deeper' / 'y.tif')
    save(tmp_path / 'coco' / 'c.jpg')                       # a COCO root that holds images directly
    ds = data.InfMix(infrared=str(tmp_path / 'ir'), coco=str(tmp_path / 'coco'))
    assert ds.counts == {'infrared': 2, 'imagenet': 0, 'coco': 1}
    assert ds[0].shape == (3, 224, 224) and ds[0].dtype == torch.float32


def test_infmix_missing_or_empty_root(tmp_path):
    missing = tmp_path / 'nowhere'
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        data.InfMix(infrared=missing)
    (tmp_path / 'empty' / 'sub').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'empty'))):
        data.InfMix(imagenet=tmp_path / 'empty')
    with pytest.raises(ValueError):
        data.InfMix()


def test_grey_three_channels_and_normalisation(tmp_path):
    save(tmp_path / 'c' / 'rgb.png', np.full((30, 40, 3), (200, 100, 50), np.uint8))
    x = data.InfMix(coco=tmp_path / 'c')[0]
    grey = round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)    # ITU-R 601 luma = 124
    assert x.shape == (3, 224, 224)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    torch.testing.assert_close(x, torch.full_like(x, (grey / 255 - 0.3801) / 0.1871))
    img = np.random.default_rng(0).integers(0, 256, (50, 60), dtype=np.uint8)
    y, label = data.SegEvalTransform(short_side=None)(img, np.zeros((50, 60)), None)
    torch.testing.assert_close(y[2] * data.SEG_STD + data.SEG_MEAN, torch.from_numpy(img).float(), atol=1e-4, rtol=0)


def test_random_resized_crop_box_ranges():
    t, rng = data.PretrainTransform(224), np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = t.box(100, 150, rng)
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 150
        assert 0.2 * 15000 * 0.9 <= h * w <= 15000 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_random_resized_crop_resizes_the_crop_alone():
    # torchvision's resized_crop on PIL: crop(), then a bicubic resize of the crop (nothing outside the box)
    t, img = data.PretrainTransform(32), np.random.default_rng(1).integers(0, 256, (90, 120), dtype=np.uint8)
    rng_box, rng = np.random.default_rng(5), np.random.default_rng(5)
    top, left, h, w = t.box(90, 120, rng_box)
    flip = rng_box.random() < 0.5
    x = t(img, None, rng)
    ref = np.asarray(Image.fromarray(img).crop((left, top, left + w, top + h)).resize((32, 32), Image.BICUBIC))
    ref = ref[:, ::-1] if flip else ref
    want = (torch.from_numpy(ref / 255.0).float() - data.PRETRAIN_MEAN) / data.PRETRAIN_STD
    torch.testing.assert_close(x, want.expand(3, 32, 32), rtol=0, atol=1e-6)
    one_call = np.asarray(Image.fromarray(img).resize((32, 32), Image.BICUBIC, box=(left, top, left + w, top + h)))
    assert (one_call != np.asarray(Image.fromarray(img[top:top + h, left:left + w]).resize((32, 32), Image.BICUBIC))).any()


# ----------------------------------------------------------------------------- robust decoding


def test_high_bit_depth_keeps_contrast(tmp_path):
    ramp = np.tile(np.linspace(20000, 21000, 200), (50, 1))
    p16 = save(tmp_path / 'r16.png', ramp.astype(np.uint16))
    assert Image.open(p16).mode == 'I;16'
    assert np.asarray(Image.open(p16).convert('L')).min() == 255   # the naive cast is a white frame
    for p in (p16, save(tmp_path / 'r16b.tif', ramp.astype('>u2')),
              save(tmp_path / 'f.tif', (290 + ramp / 1000).astype(np.float32)),
              save(tmp_path / 'i.tif', ramp.astype(np.int32))):
        g = data.load_grey(p)
        assert g.dtype == np.uint8 and g.shape == (50, 200), p
        assert g.min() == 0 and g.max() == 255 and np.all(np.diff(g[0].astype(int)) >= 0), p
        assert len(np.unique(g)) > 150, p                          # a wide 8-bit range, not a few levels
    assert (data.load_grey(save(tmp_path / 'flat.png', np.full((8, 8), 21000, np.uint16))) == 0).all()


def test_fixed_thermal_range_is_one_map_for_every_frame(tmp_path):
    lo, hi = 20000, 24000
    a = np.array([[19000, 20000, 22000, 24000, 30000]], np.uint16)
    assert data.range_to_uint8(a, lo, hi).tolist() == [[0, 0, 128, 255, 255]]  # LO -> 0, HI -> 255, clipped outside
    f = np.array([[np.nan, -np.inf, 20.5, 21.0]], np.float32)
    assert data.range_to_uint8(f, 20.0, 21.0).tolist() == [[0, 0, 128, 255]]   # float frames; non-finite -> 0
    # a cold and a hot frame share the value 21000: one grey with the fixed map, two with the per-image stretch
    cold = np.tile(np.linspace(20000, 21000, 64), (8, 1)).astype(np.uint16)
    hot = np.tile(np.linspace(20500, 24000, 64), (8, 1)).astype(np.uint16)
    pc, ph = save(tmp_path / 'cold.png', cold), save(tmp_path / 'hot.png', hot)
    at = lambda img, frame: img[frame == 21000]
    fixed = [data.load_grey(p, thermal_range=(lo, hi)) for p in (pc, ph)]
    assert set(at(fixed[0], cold)) == set(at(fixed[1], hot)) == {64}            # (21000 - 20000) / 4000 * 255
    stretched = [data.load_grey(p) for p in (pc, ph)]
    assert at(stretched[0], cold).min() > 200 and at(stretched[1], hot).max() < 60  # the stretch: hot, then cold
    assert np.array_equal(fixed[1], data.range_to_uint8(hot, lo, hi))
    # float TIFFs and raw channels take the same map; 8-bit files are read as they are
    assert np.array_equal(data.load_grey(save(tmp_path / 'f.tif', cold.astype(np.float32)), thermal_range=(lo, hi)),
                          fixed[0])
    g8 = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    assert np.array_equal(data.load_grey(save(tmp_path / 'g8.png', g8), thermal_range=(lo, hi)), g8)
    assert data.decode_grey(pc, thermal_range=(lo, hi))[1] == 'grey'


def test_parse_thermal_range():
    assert data.parse_thermal_range('') is None and data.parse_thermal_range('Stretch') is None
    assert data.parse_thermal_range('20000,24000') == (20000.0, 24000.0)
    assert data.parse_thermal_range(' -5.5, 1e3 ') == (-5.5, 1000.0)
    for bad in ('24000,20000', '3,3', '20000', '1,2,3', 'a,b', '1,inf', '1;2'):
        with pytest.raises(ValueError, match=r'--thermal-range .*expected LO,HI, two numbers with LO < HI'):
            data.parse_thermal_range(bad)
    assert 'per-image 1st-99th percentile stretch' in data.thermal_range_note(None)
    assert 'raw 20000..24000 -> 0..255, clipped' in data.thermal_range_note((20000.0, 24000.0))


def test_16bit_frames_through_the_datasets_with_a_fixed_range(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(19000, 25000, (16, 24)).astype(np.uint16) for _ in range(2)]
    lab = np.zeros((16, 24), np.uint8)
    lab[4:12, 6:18] = 1
    for k, f in enumerate(frames):
        save(tmp_path / 'images' / f'f{k}.png', f)
        save(tmp_path / 'labels' / f'f{k}.png', lab)
    assert Image.open(tmp_path / 'images' / 'f0.png').mode == 'I;16'
    ds = data.SegFolder(tmp_path / 'images', tmp_path / 'labels', classes=['bg', 'warm'], transform=raw,
                        thermal_range=(20000, 24000))
    default = data.SegFolder(tmp_path / 'images', tmp_path / 'labels', classes=['bg', 'warm'], transform=raw)
    for k, f in enumerate(frames):
        img, label = ds[k]
        assert np.array_equal(img, data.range_to_uint8(f, 20000, 24000)) and np.array_equal(label, lab)
        assert np.array_equal(default[k][0], data.stretch_to_uint8(f))
    mix = data.InfMix(infrared=tmp_path / 'images', transform=raw, thermal_range=(20000, 24000))
    assert np.array_equal(mix[1][0], data.range_to_uint8(frames[1], 20000, 24000))


def test_other_modes_and_exif(tmp_path):
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 120, 0                             # fully transparent: alpha is ignored
    assert (data.load_grey(save(tmp_path / 'a.png', rgba)) == 120).all()
    pal = Image.new('P', (12, 10), 3)                                # index 3 -> grey 90 through the palette
    pal.putpalette([0] * 9 + [90] * 3)
    assert (data.load_grey(save(tmp_path / 'p.png', pal)) == 90).all()
    assert (data.load_grey(save(tmp_path / 'c.jpg', Image.new('CMYK', (12, 10), (0, 0, 0, 0)))) >= 250).all()
    assert set(np.unique(data.load_grey(save(tmp_path / 'b.png', Image.new('1', (12, 10), 1))))) == {255}
    assert (data.load_grey(save(tmp_path / 'la.png', Image.new('LA', (12, 10), (77, 0)))) == 77).all()
    exif = Image.Exif()
    exif[0x0112] = 6                                                 # "rotate 90 degrees to display"
    g = data.load_grey(save(tmp_path / 'rot.jpg', size=(40, 20), exif=exif))
    assert g.shape == (40, 20)


def test_bad_files_skipped_and_counted(tmp_path):
    d = tmp_path / 'ir'
    save(d / 'a.png', np.full((8, 8), 10, np.uint8))
    jpg = save(d / 'b_trunc.jpg', np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    jpg.write_bytes(jpg.read_bytes()[:len(jpg.read_bytes()) // 2])   # Image.open() alone still succeeds
    (d / 'c_garbage.png').write_bytes(b'this is not a png' * 10)
    (d / 'd_empty.jpg').write_bytes(b'')
    save(d / 'e.png', np.full((8, 8), 20, np.uint8))
    ds = data.InfMix(infrared=d, transform=raw)
    with pytest.warns(RuntimeWarning) as record:
        items = [ds[i][0] for i in range(len(ds))]
    assert ds.num_bad == 3 and len(record) == 3
    for name in ('b_trunc.jpg', 'c_garbage.png', 'd_empty.jpg'):
        assert any(name in str(w.message) for w in record)
    assert [int(x[0, 0]) for x in items] == [10, 20, 20, 20, 20]     # bad items replaced by the next good one
    ds[1]                                                            # known bad: no second warning, no recount
    assert ds.num_bad == 3
    for name in ('a.png', 'e.png'):
        (d / name).write_bytes(b'')
    with pytest.raises(RuntimeError, match='none of its 5 items'), pytest.warns(RuntimeWarning):
        data.InfMix(infrared=d)[0]

# ----------------------------------------------------------------------------- segmentation folders


def seg_tree(root, img_dir, label_dir, stems, img_suffix, labels, img=None):
    for s, lab in zip(stems, labels):
        save(root / img_dir / (s + img_suffix), img if img is not None else np.full(lab.shape, 100, np.uint8))
        save(root / label_dir / (s + '.png'), lab)


def test_soda_preset(tmp_path):
    lab = np.zeros((16, 24), np.uint8)
    lab[:, 12:], lab[0, 0] = 20, 255
    seg_tree(tmp_path, 'JPEGImages', 'SegmentationClassPNG', ['s1', 's2', 's3'], '.jpg', [lab] * 3)
    p = Image.fromarray(lab, 'L').convert('P')                       # a palette PNG must be read as indices
    p.putpalette([255 - v for v in range(256) for _ in range(3)])
    p.save(tmp_path / 'SegmentationClassPNG' / 's3.png')
    (tmp_path / 'train_infrared.txt').write_text('s1\ns3\n\n')
    (tmp_path / 'test_infrared.txt').write_text('s2\n')
    ds = data.soda(tmp_path, 'train', transform=raw)
    assert len(ds) == 2 and [ds.name(i) for i in range(2)] == ['s1', 's3']
    assert ds.num_classes == 21 and ds.classes[15] == 'trash can' and ds.classes[20] == 'sidewalk'
    assert len(ds.palette) == 21 and len(set(ds.palette)) == 21
    for i in range(2):
        img, label = ds[i]
        assert img.shape == label.shape == (16, 24) and label.dtype == np.int64
        assert np.array_equal(label, lab)
    assert len(data.SEG_PRESETS['soda'](tmp_path, 'test')) == 1
    with pytest.raises(ValueError, match='split'):
        data.soda(tmp_path, 'val')


def test_mfnet_preset_four_channel_png(tmp_path):
    rgbt = np.zeros((16, 24, 4), np.uint8)
    rgbt[..., :3] = 200
    rgbt[..., 3] = np.arange(24, dtype=np.uint8) * 10                # thermal lives in the "alpha" channel
    lab = np.tile(np.arange(9, dtype=np.uint8), (16, 3))[:, :24]
    seg_tree(tmp_path, 'images', 'labels', ['00001D', '00002N'], '.png', [lab] * 2, img=rgbt)
    for split, name in (('train', 'train.txt'), ('val', 'val_test.txt'), ('test', 'test.txt')):
        (tmp_path / name).write_text('00001D\n' if split == 'train' else '00002N\n')
    ds = data.mfnet(tmp_path, 'train', transform=raw)
    img, label = ds[0]
    assert np.array_equal(img, rgbt[..., 3]) and np.array_equal(label, lab)
    assert ds.classes == ['background', 'car', 'person', 'bike', 'curve', 'car_stop', 'guardrail', 'color_cone', 'bump']
    assert ds.palette[1] == (64, 0, 128) and ds.name(0) == '00001D'
    assert data.mfnet(tmp_path, 'val').name(0) == '00002N' and len(data.mfnet(tmp_path, 'test')) == 1
    save(tmp_path / 'thermal_imgs' / '00001D.png', np.full((16, 24), 33, np.uint8))  # pre-extracted wins
    assert (data.mfnet(tmp_path, 'train', transform=raw)[0][0] == 33).all()


def test_mfnet_day_and_night_test_splits(tmp_path):
    lab = np.zeros((16, 24), np.uint8)
    seg_tree(tmp_path, 'thermal_imgs', 'labels', ['00001D', '00002N', '00003D'], '.png', [lab] * 3)
    (tmp_path / 'test_day.txt').write_text('00001D\n00003D\n')
    ds = data.mfnet(tmp_path, 'test_day')
    assert [ds.name(i) for i in range(len(ds))] == ['00001D', '00003D']
    with pytest.raises(FileNotFoundError, match=r"split 'test_night' needs the list file .*test_night\.txt"):
        data.mfnet(tmp_path, 'test_night')
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'val', 'test', 'test_day', 'test_night'\]"):
        data.mfnet(tmp_path, 'night')


def test_scut_preset_maps_cityscapes_ids(tmp_path):
    ids = np.array([0, 7, 24, 25, 26, 27, 13, 21, 28, 17, 33, 255], np.uint8)
    lab = np.repeat(ids[None], 4, 0)
    seg_tree(tmp_path, 'images', 'labels', ['a', 'b'], '.jpg', [lab] * 2)
    (tmp_path / 'train.txt').write_text('a\n')
    (tmp_path / 'val.txt').write_text('b\n')
    ds = data.scut(tmp_path, 'val', transform=raw)
    assert ds.name(0) == 'b' and ds.num_classes == 10 and ds.label_form == 'ids'
    assert ds[0][1][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 255, 255]


def scut_tree(root, labels):
    """A made-up SCUT-Seg copy: images/, labels/, train.txt listing every stem."""
    stems = [f's{k}' for k in range(len(labels))]
    seg_tree(root, 'images', 'labels', stems, '.jpg', [np.asarray(lab, np.uint8).reshape(2, -1) for lab in labels])
    (root / 'train.txt').write_text('\n'.join(stems) + '\n')
    return root


def test_scut_label_forms_are_detected(tmp_path):
    # the reference's form: classes 0..9 already; "tree" is 7, which the Cityscapes-id table would make "road"
    ds = data.scut(scut_tree(tmp_path / 'index', [[0, 7, 1, 2], [0, 9, 255, 7], [0, 0, 7, 7]]), transform=raw)
    assert ds.label_form == 'index' and ds[0][1].ravel().tolist() == [0, 7, 1, 2] and ds[1][1].max() == 255
    # raw Cityscapes ids (the third file, only 0 and 7, fits both forms and decides nothing)
    ds = data.scut(scut_tree(tmp_path / 'ids', [[0, 7, 24, 26], [21, 17, 33, 255], [0, 0, 7, 7]]), transform=raw)
    assert ds.label_form == 'ids' and ds[0][1].ravel().tolist() == [0, 1, 2, 4] and ds[1][1].ravel().tolist() == [7, 9, 255, 255]
    assert data.scut_label_form(ds.labels) == 'ids'


def test_scut_mixed_or_unclear_labels_are_refused(tmp_path):
    mixed = scut_tree(tmp_path / 'mixed', [[0, 7, 24, 26], [0, 1, 2, 9], [0, 3, 7, 7]])
    with pytest.raises(ValueError, match=r'mixed: 1 files hold raw Cityscapes ids .*s0\.png.*\[0, 7, 24, 26\].* 2 hold '
                                         r'class indices 0\.\.9 .*s1\.png.*--scut-labels'):
        data.scut(mixed)
    assert data.scut(mixed, label_form='index', transform=raw)[1][1].ravel().tolist() == [0, 1, 2, 9]  # forced
    unclear = scut_tree(tmp_path / 'unclear', [[0, 7, 7, 255], [0, 0, 0, 7]])
    with pytest.raises(ValueError, match=r'2 readable label files hold only 0, 7 and 255.*label_form'):
        data.scut(unclear)
    assert data.scut(unclear, label_form='ids', transform=raw)[0][1].ravel().tolist() == [0, 1, 1, 255]
    assert data.scut(unclear, label_form='index', transform=raw)[0][1].ravel().tolist() == [0, 7, 7, 255]
    with pytest.raises(ValueError, match=r'neither classes 0\.\.9 nor Cityscapes ids .*values \[0, 128\]'):
        data.scut(scut_tree(tmp_path / 'other', [[0, 128, 0, 0], [0, 7, 24, 24]]))
    with pytest.raises(ValueError, match='label_form'):
        data.scut(mixed, label_form='cityscapes')


def test_label_counts_after_the_label_map(tmp_path):
    seg_tree(tmp_path, 'img', 'lab', ['a', 'b'], '.png', [np.array([[0, 0, 255, 255]], np.uint8)] * 2)
    lut = np.arange(256)
    lut[255] = 1
    counts = data.SegFolder(tmp_path / 'img', tmp_path / 'lab', classes=['bg', 'fg'], label_map=lut).label_counts()
    assert counts.shape == (256,) and counts[0] == 4 and counts[1] == 4 and counts.sum() == 8
    raw_counts = data.SegFolder(tmp_path / 'img', tmp_path / 'lab', classes=['bg', 'fg']).label_counts()
    assert raw_counts[0] == 4 and raw_counts[255] == 4 and raw_counts[1] == 0


def test_label_errors_name_the_file(tmp_path):
    lab = np.zeros((16, 24), np.uint8)
    lab[3, 3] = 30
    seg_tree(tmp_path, 'thermal_imgs', 'labels', ['x'], '.png', [lab])
    (tmp_path / 'train.txt').write_text('x\n')
    with pytest.raises(ValueError, match=r'labels/x\.png.*\[30\]'):
        data.mfnet(tmp_path)[0]
    save(tmp_path / 'labels' / 'x.png', np.zeros((10, 24), np.uint8))
    with pytest.raises(ValueError, match=r'labels/x\.png.*24x10'):
        data.mfnet(tmp_path)[0]
    save(tmp_path / 'labels' / 'x.png', np.zeros((16, 24, 3), np.uint8) + np.uint8([255, 0, 0]))
    with pytest.raises(ValueError, match=r'labels/x\.png.*colour'):
        data.mfnet(tmp_path)[0]
    (tmp_path / 'train.txt').write_text('x\nmissing\n')
    with pytest.raises(FileNotFoundError, match='missing.png'):
        data.mfnet(tmp_path)


def test_undecodable_label_is_skipped(tmp_path):
    lab = np.zeros((16, 24), np.uint8)
    seg_tree(tmp_path, 'img', 'lab', ['a', 'b', 'c'], '.png', [lab, lab + 1, lab])
    (tmp_path / 'lab' / 'a.png').write_bytes(b'\x89PNG broken')
    ds = data.SegFolder(tmp_path / 'img', tmp_path / 'lab', classes=['x', 'y'], transform=raw)
    with pytest.warns(RuntimeWarning, match='a.png'):
        assert (ds[0][1] == 1).all()                                 # replaced by item 1
    assert ds.num_bad == 1

# ----------------------------------------------------------------------------- segmentation transforms


def test_crop_respects_cat_max_ratio():
    # class 1 fills columns 100..199 of a 100x300 map; a 100x100 crop at column x is dominated
    # (> 75% one class) unless |x - 100| is in (25, 75): about half of the possible crops
    lab = np.zeros((100, 300), np.int64)
    lab[:, 100:200] = 1
    img = np.zeros((100, 300), np.uint8)

    def good_crops(cat_max_ratio):
        t = data.SegTrainTransform(crop=100, scale=(300, 100), ratio=(1, 1), cat_max_ratio=cat_max_ratio,
                                   flip=0, photometric=False)
        fracs = [t(img, lab, np.random.default_rng(s))[1].float().mean().item() for s in range(50)]
        return sum(0.25 < f < 0.75 for f in fracs)
    assert good_crops(0.75) >= 48 and good_crops(1.0) <= 35


def test_train_transform_rescale_and_padding():
    img = np.random.default_rng(0).integers(0, 256, (60, 80), dtype=np.uint8)
    t = data.SegTrainTransform(crop=128, scale=(80, 60), ratio=(1, 1), flip=0, photometric=False)
    x, y = t(img, np.zeros((60, 80), np.int64), np.random.default_rng(0))
    assert x.shape == (3, 128, 128) and x.dtype == torch.float32 and y.shape == (128, 128) and y.dtype == torch.int64
    assert (y[:60, :80] == 0).all() and (y[60:] == 255).all() and (y[:, 80:] == 255).all()
    assert (x[:, 60:] == 0).all() and (x[:, :, 80:] == 0).all()
    torch.testing.assert_close(x[0, :60, :80], (torch.from_numpy(img).float() - data.SEG_MEAN) / data.SEG_STD)
    # keep-ratio rescale: a 480x640 image fits into (2048, 512) x 1 as 512x683
    t = data.SegTrainTransform(crop=1024, ratio=(1, 1), photometric=False)
    _, y = t(np.zeros((480, 640), np.uint8), np.zeros((480, 640), np.int64), np.random.default_rng(0))
    assert (y != 255).sum(0).max() == 512 and (y != 255).sum(1).max() == 683


def test_eval_transform_keeps_label_size():
    x, y = data.SegEvalTransform(128)(np.zeros((480, 640), np.uint8), np.ones((480, 640), np.uint8))
    assert x.shape == (3, 128, 171) and y.shape == (480, 640) and y.dtype == torch.int64

# ----------------------------------------------------------------------------- synthetic scenes, determinism


def test_synthetic_deterministic_and_complete():
    a, b = data.SyntheticThermal('train', size=(96, 128)), data.SyntheticThermal('train', size=(96, 128))
    img, lab = a.load(3)
    assert img.shape == lab.shape == (96, 128) and img.dtype == np.uint8 and lab.dtype == np.int64
    assert all(np.array_equal(u, v) for u, v in zip(a.load(3), a.load(3)))
    assert all(np.array_equal(u, v) for u, v in zip(a.load(3), b.load(3)))
    val = data.SyntheticThermal('val', size=(96, 128))
    assert not np.array_equal(a.load(3)[0], val.load(3)[0])
    assert not np.array_equal(a.load(3)[0], data.SyntheticThermal('train', size=(96, 128), seed=1).load(3)[0])
    seen = set()
    for i in range(30):
        seen |= set(np.unique(a.load(i)[1]).tolist())
    assert seen == set(range(a.num_classes)) and len(a.classes) == len(a.palette) == 8
    assert len(a) == 2000 and len(val) == 200 and a.name(7) == 'train_00007'


def test_synthetic_not_solvable_by_intensity():
    # the best map from grey level to class over 20 scenes must be far from perfect
    ds, hist = data.SyntheticThermal('val', size=(96, 128)), np.zeros((256, 8))
    for i in range(20):
        img, lab = ds.load(i)
        np.add.at(hist, (img.ravel(), lab.ravel()), 1)
    assert hist.max(1).sum() / hist.sum() < 0.6


def test_same_epoch_and_index_give_same_augmentation():
    t = data.SegTrainTransform(crop=64, scale=(256, 64))
    a, b = (data.SyntheticThermal(size=(96, 128), transform=t) for _ in range(2))
    a.set_epoch(2)
    b.set_epoch(2)
    b[1], b[9]                                                       # other items first: order must not matter
    state = np.random.get_state(), torch.get_rng_state(), random.getstate()
    np.random.seed(123), torch.manual_seed(123), random.seed(123)    # global RNGs must play no part
    x, y = a[5]
    np.random.set_state(state[0]), torch.set_rng_state(state[1]), random.setstate(state[2])
    x2, y2 = b[5]
    assert torch.equal(x, x2) and torch.equal(y, y2)
    b.set_epoch(3)
    assert not torch.equal(x, b[5][0])
    p = data.PretrainTransform(32)
    img = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
    assert torch.equal(p(img, None, np.random.default_rng([0, 1, 2])), p(img, None, np.random.default_rng([0, 1, 2])))

# ----------------------------------------------------------------------------- looking at samples, import


def test_colorize_and_save_samples(tmp_path):
    c = data.colorize(np.array([[0, 1, 255, 7]]), [(10, 20, 30), (40, 50, 60)])
    assert c.tolist() == [[[10, 20, 30], [40, 50, 60], [0, 0, 0], [0, 0, 0]]]
    ds = data.SyntheticThermal('val', size=(64, 80))
    pred = np.zeros((2, 32, 40), np.int64)                          # any size: resized to the row
    out = data.save_samples(ds, str(tmp_path / 'sub' / 'grid.png'), n=2, pred=pred)
    im = Image.open(out)
    assert im.mode == 'RGB' and im.size == (3 * 320 + 2 * 4, 2 * 256 + 4)


def test_import_leaves_pil_alone():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False

# ----------------------------------------------------------------------------- real thermal files


def test_real_roadscene_as_infmix():
    root = os.path.join(sample_dir(), 'roadscene_flir_ir')
    ds = data.InfMix(infrared=root, transform=raw)
    assert ds.counts['infrared'] == 277                              # 221 cropinfrared jpg + 56 infrared png
    shapes = {ds[i][0].shape for i in range(len(ds))}
    assert ds.num_bad == 0 and (512, 640) in shapes and len(shapes) > 100
    x = data.InfMix(infrared=root)[0]
    assert x.shape == (3, 224, 224) and torch.isfinite(x).all()


def test_real_mfnet_four_channel_pngs(tmp_path):
    src = os.path.join(sample_dir(), 'mfnet_rgbt_samples', 'images')
    (tmp_path / 'images').mkdir()
    for stem in ('01234N', '01477D'):
        os.symlink(os.path.join(src, stem + '.png'), tmp_path / 'images' / (stem + '.png'))
        save(tmp_path / 'labels' / (stem + '.png'), np.zeros((480, 640), np.uint8))
    (tmp_path / 'train.txt').write_text('01234N\n01477D\n')
    ds = data.mfnet(tmp_path, 'train', transform=raw)
    ranges = [(int(img.min()), int(img.max())) for img, _ in (ds[0], ds[1])]
    assert ranges == [(8, 243), (4, 245)]                            # thermal ranges given by the sample README
    p = tmp_path / 'images' / '01234N.png'                           # every path reads the thermal channel now
    assert np.array_equal(ds[0][0], data.load_grey(p)) and not np.array_equal(ds[0][0], data.load_grey(p, 'luma'))


def test_real_buffalo_labels_with_label_map():
    root = os.path.join(sample_dir(), 'buffalo_udder_thermal_seg')
    lut = np.arange(256)
    lut[255] = 1
    ds = data.SegFolder(os.path.join(root, 'images'), os.path.join(root, 'labels'), classes=['background', 'udder'],
                        label_map=lut, transform=raw)
    assert len(ds) == 60
    fg = []
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.shape == label.shape == (480, 640) and set(np.unique(label)) <= {0, 1}
        fg.append(label.mean())
    assert 0.006 < min(fg) and max(fg) < 0.192 and ds.num_bad == 0
    ds.transform = data.SegTrainTransform(crop=128, scale=(512, 128))
    x, y = ds[0]
    assert x.shape == (3, 128, 128) and set(y.unique().tolist()) <= {0, 1, 255}


def test_real_massmind_colour_label_is_refused():
    root = os.path.join(sample_dir(), 'massmind_lwir_seg', 'labels_semantic_colored')
    path = os.path.join(root, sorted(os.listdir(root))[0])
    with pytest.raises(ValueError, match=re.escape(path)):
        data.load_label(path)
