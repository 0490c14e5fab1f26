"""
Data for UNIP (Zhang et al., ICLR 2025): the InfMix pre-training mix, the infrared segmentation
datasets (SODA, MFNet-T, SCUT-Seg), the augmentations of the reference code, and a procedural
thermal street-scene dataset for CPU demos and tests.

Top to bottom: constants -> robust decoding -> transforms -> InfMix -> SegFolder and presets
-> SyntheticThermal -> colorize / save_samples.

Randomness: __getitem__(i) of every dataset builds rng = np.random.default_rng([seed, epoch, i])
and the transforms draw everything from it (never from the global numpy/torch/python RNGs), so an
item's augmentation depends on (seed, epoch, i) only: the same for any number of workers or any
order, and a run resumed mid-epoch sees exactly the items it would have seen.

Bad files: a file that cannot be decoded (truncated, empty, not an image) is skipped: the item is
replaced by the next decodable index, the dataset's `num_bad` grows by one for each new bad item,
and one warning names the path. With DataLoader workers each worker holds its own copy of the
dataset, so these counts live in the workers. Wrong *contents* (a label value that is not a class,
image/label size mismatch, a colour-coded label) are configuration errors and raise ValueError.
"""
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps

# ----------------------------------------------------------------------------- constants

PRETRAIN_MEAN, PRETRAIN_STD = 0.3801, 0.1871  # InfMix grey statistics on [0,1], all 3 channels (§4)
SEG_MEAN, SEG_STD = 96.9255, 47.8976          # infrared segmentation statistics on 0..255 grey (§5)
IMG_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')  # matched case-insensitively
IGNORE = 255                                  # label value that losses and metrics skip
# Per-channel RGB statistics on [0, 1] a teacher may have been trained with (analyze.py, train_pretrain.py
# --teacher-norm). The default, infmix, gives the teacher the student's input, as the authors' code does for every teacher.
TEACHER_NORMS = {"infmix": ((PRETRAIN_MEAN,) * 3, (PRETRAIN_STD,) * 3),
                 "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # OpenAI CLIP
                 "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}

# ----------------------------------------------------------------------------- robust decoding


def _open(path):
    """Decode a whole file now (PIL is lazy: only .load() notices a truncated file) and apply
    its EXIF orientation, as a viewer would."""
    with Image.open(path) as im:
        im.load()
        return ImageOps.exif_transpose(im)  # always a new, loaded image: safe after close


def stretch_to_uint8(a):
    """(H, W) 16-bit / 32-bit / float thermal -> (H, W) uint8.

    Rule: a per-image linear stretch that maps the 1st percentile to 0 and the 99th to 255,
    clipping the 1% tails. Radiometric frames keep a few hundred counts of contrast at
    absolute levels around 20000, which a plain cast would turn into a white frame. If the two
    percentiles coincide (a flat frame with a few outliers) the full min..max range is used; a
    truly flat frame carries no signal and becomes 0. Non-finite pixels become 0."""
    a = np.asarray(a, dtype=np.float64)
    finite = np.isfinite(a)
    v = a[finite]
    if v.size == 0:
        return np.zeros(a.shape, np.uint8)
    lo, hi = np.percentile(v, (1, 99))
    if hi <= lo:
        lo, hi = v.min(), v.max()
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    out = np.where(finite, (a - lo) * (255.0 / (hi - lo)), 0.0)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# --thermal-range LO,HI: one linear map for every frame, so that a cold scene stays darker than a hot one, which the
# per-image stretch undoes. Only 16-bit / 32-bit / float values pass through it; 8-bit files are read as they are.
THERMAL_RANGE_FLAG = "--thermal-range"


def parse_thermal_range(s):
    """--thermal-range value -> None (the per-image stretch: '' or 'stretch') or (lo, hi) floats, lo < hi.
    ValueError saying what is wrong otherwise."""
    s = str(s).strip()
    if s.lower() in ("", "stretch"):
        return None
    try:
        lo, hi = (float(v) for v in s.split(","))
    except ValueError:
        lo = hi = None
    if lo is None or not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"{THERMAL_RANGE_FLAG} {s!r}: expected LO,HI, two numbers with LO < HI (raw 16-bit or float "
                         f"values mapped to 0 and 255, e.g. 27000,33000), or 'stretch' (per-image stretch)")
    return lo, hi


def check_thermal_range(cfg):
    """plumbing.parse_config's check for a script config with a thermal_range field: a bad value is a usage error."""
    parse_thermal_range(cfg.thermal_range)


def range_to_uint8(a, lo, hi):
    """(H, W) 16-bit / 32-bit / float thermal -> (H, W) uint8 by one fixed linear map: lo -> 0, hi -> 255,
    values outside clipped, non-finite pixels 0. The same raw value gives the same grey in every frame."""
    a = np.asarray(a, dtype=np.float64)
    out = np.where(np.isfinite(a), (a - lo) * (255.0 / (hi - lo)), 0.0)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def to_uint8(a, thermal_range=None):
    """16-bit / 32-bit / float frame -> uint8: range_to_uint8 with thermal_range (lo, hi), else stretch_to_uint8."""
    return stretch_to_uint8(a) if thermal_range is None else range_to_uint8(a, *thermal_range)


def thermal_range_note(thermal_range):
    """The banner line that says how 16-bit / float frames become 8-bit grey."""
    if thermal_range is None:
        return (f"16-bit / float frames: per-image 1st-99th percentile stretch to 0..255 (default; "
                f"{THERMAL_RANGE_FLAG} LO,HI for one fixed mapping); 8-bit images are read as they are")
    lo, hi = thermal_range
    return (f"16-bit / float frames: raw {lo:g}..{hi:g} -> 0..255, clipped, the same for every frame "
            f"({THERMAL_RANGE_FLAG} {lo:g},{hi:g}); 8-bit images are read as they are")


# The 4-channel rule. MFNet's public RGB-T PNGs keep the thermal frame in the 4th ('alpha') channel of an RGBA
# file (channels 0-2: the visible frame, from another camera); an ordinary RGBA file keeps transparency there,
# nearly always constant (opaque). So, wherever an image is read: an RGBA file whose 4th channel varies is read as
# that channel (a thermal frame in MFNet's layout), one whose 4th channel is constant as the luma of its RGB.
# A varying 4th channel that looks like transparency (at least half its pixels at 0 or 255, or only two values)
# is still read as thermal, with a warning naming the file and the flag to set. channel='luma' (--channel luma)
# or a channel number (--channel 3) overrides the rule.
CHANNEL_FLAG = "--channel"   # the command-line flag that overrides the rule, named in warnings


def parse_channel(s):
    """--channel value -> load_grey's channel: 'auto' (or -1) -> None (the 4-channel rule), 'luma', or an int >= 0."""
    s = str(s).strip().lower()
    if s in ('auto', '-1', ''):
        return None
    if s == 'luma':
        return 'luma'
    if s.isdigit():
        return int(s)
    raise ValueError(f"{CHANNEL_FLAG} {s!r}: expected auto, luma or a channel number (MFNet's thermal channel: 3)")


def decode_grey(path, channel=None, thermal_range=None):
    """Any image file -> (img (H, W) uint8 grey, source), EXIF orientation applied on every path. `source` says
    what was read: 'grey', 'luma', 'thermal' (the varying 4th channel of an RGBA file), 'alpha' (luma of the RGB
    of an RGBA file with a constant 4th channel) or 'channel k'. Raises OSError naming the path if the file cannot
    be decoded, ValueError if `channel` names a channel the file does not have.

    channel None: 8-bit modes (L, RGB, P, CMYK, 1, LA, ...) through PIL's ITU-R 601 luma ('L'; alpha ignored),
    16-bit, 32-bit and float modes (I;16, I;16B, I, F) through to_uint8 (thermal_range (lo, hi): that fixed map,
    None: the per-image stretch), RGBA by the 4-channel rule above.
    channel 'luma': the luma whatever the 4th channel holds; channel k: channel k read raw (16-bit through to_uint8)."""
    if not (channel is None or channel == 'luma' or isinstance(channel, int) and channel >= 0):
        raise ValueError(f"channel must be None (the 4-channel rule), 'luma' or a channel number, got {channel!r}")
    try:
        im = _open(path)
        if not isinstance(channel, int) and im.mode.startswith(('I', 'F')):
            return to_uint8(np.asarray(im), thermal_range), 'grey'
        a = np.asarray(im) if im.mode == 'RGBA' or isinstance(channel, int) else None  # (H, W, C) raw
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError... on broken files
        raise OSError(f'cannot decode image {path}: {type(e).__name__}: {e}') from e
    if isinstance(channel, int):
        if a.ndim != 3 or a.shape[2] <= channel:
            raise ValueError(f'{path}: wanted channel {channel} ({CHANNEL_FLAG} {channel}), '
                             f'but the image has shape {a.shape}')
        c = np.ascontiguousarray(a[..., channel])
        if c.min() == c.max():
            warnings.warn(f'{path}: channel {channel} is constant ({c.flat[0]}), so the frame is flat: is this the '
                          f'channel you meant? ({CHANNEL_FLAG})', RuntimeWarning)
        return (c if c.dtype == np.uint8 else to_uint8(c, thermal_range)), f'channel {channel}'
    luma = lambda: np.array(im.convert('L'))  # RGBA -> L ignores alpha
    if a is None or channel == 'luma':
        return luma(), 'luma' if len(im.getbands()) >= 3 else 'grey'
    alpha = a[..., 3]
    if alpha.min() == alpha.max():  # plain alpha (opaque, or transparent everywhere): the RGB is the picture
        return luma(), 'alpha'
    counts = np.bincount(alpha.ravel(), minlength=256)
    if counts[0] + counts[255] >= alpha.size / 2 or np.count_nonzero(counts) <= 2:
        warnings.warn(f'{path}: the 4th channel varies, so it is read as a thermal frame (MFNet\'s RGB-T layout), but '
                      f'{(counts[0] + counts[255]) / alpha.size:.0%} of its pixels are 0 or 255, as in a transparency '
                      f'mask; if it is transparency, give {CHANNEL_FLAG} luma', RuntimeWarning)
    return np.ascontiguousarray(alpha), 'thermal'


def load_grey(path, channel=None, thermal_range=None):
    """Any image file -> (H, W) uint8 grey; see decode_grey (EXIF orientation, bit depths, the 4-channel rule)."""
    return decode_grey(path, channel, thermal_range)[0]


def load_channel(path, channel):
    """Channel `channel` of a multi-channel file as (H, W) uint8, read raw (EXIF orientation applied): MFNet's
    RGB-T PNGs keep the thermal frame in the 4th ('alpha') channel, which .convert() would drop or blend away."""
    return decode_grey(path, channel)[0]


def image_size(path):
    """(W, H) of an image as displayed (after its EXIF orientation), read from the header without decoding pixels.
    OSError naming the path if the header cannot be read."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            # the base class's getexif reads EXIF (and XMP) orientation from what the header gave; PNG's own would
            # decode the whole file to look for an eXIf chunk after the pixel data (PIL writes it before; a file
            # with it after is still caught, by SegFolder.load, when its item is read)
            orientation = Image.Image.getexif(im).get(0x0112, 1)
    except Exception as e:
        raise OSError(f'cannot read the header of {path}: {type(e).__name__}: {e}') from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # these four turn the frame by 90 degrees


def size_mismatches(images, labels):
    """[(i, message)] for the pairs images[i], labels[i] whose sizes differ, from the file headers (image_size).
    Files whose header cannot be read are passed over: training skips undecodable items anyway."""
    found = []
    for i, (ip, lp) in enumerate(zip(images, labels)):
        try:
            (iw, ih), (lw, lh) = image_size(ip), image_size(lp)
        except OSError:
            continue
        if (iw, ih) != (lw, lh):
            found.append((i, f'{lp} is {lw}x{lh} but {ip} is {iw}x{ih}'))
    return found


def load_label(path):
    """Label file -> (H, W) index map: uint8, or int64 for 16/32-bit label PNGs.

    Palette ('P') PNGs are read as their indices, never through the palette colours. A grey map
    saved as RGB (three equal channels) is accepted; a colour-coded label is refused (ValueError)
    because turning colours into classes needs a table that only the dataset can give."""
    try:
        im = _open(path)
        a = np.array(im)
    except Exception as e:
        raise OSError(f'cannot decode label {path}: {type(e).__name__}: {e}') from e
    if a.ndim == 3:
        if im.mode != 'LA' and not (a[..., 1:3] == a[..., :1]).all():
            raise ValueError(f'{path}: label is a colour image ({im.mode}); convert colours to class indices first')
        a = a[..., 0]
    if a.dtype == bool:  # mode '1'
        a = a.astype(np.uint8)
    return a if a.dtype == np.uint8 else a.astype(np.int64)


def parse_label_map(text):
    """--label-map '255:1,7:2' (train_seg.py, predict.py) -> a 256-entry table, identity elsewhere ('' -> None)."""
    if not text:
        return None
    try:
        pairs = [tuple(int(v) for v in pair.split(":")) for pair in text.split(",")]
        label_map = np.arange(256)
        for src, dst in pairs:
            if not (0 <= src <= 255 and 0 <= dst <= 255):
                raise ValueError
            label_map[src] = dst
    except (ValueError, IndexError):
        raise SystemExit(f"--label-map {text!r}: expected 'raw:class,...' in 0..255, e.g. '255:1'") from None
    return label_map


def _load_item(ds, i):
    """ds.load(i); if a file of item i cannot be decoded, the next decodable item (i+1, i+2, ...,
    wrapping). Bad items are remembered in ds.bad (so they are warned about and counted once) and
    a dataset whose every file is bad raises instead of looping forever."""
    n = len(ds)
    for k in range(n):
        j = (i + k) % n
        if j in ds.bad:
            continue
        try:
            return ds.load(j)
        except OSError as e:
            ds.bad.add(j)
            ds.num_bad += 1
            warnings.warn(f'skipping item {j}: {e}', RuntimeWarning)
    raise RuntimeError(f'{type(ds).__name__}: none of its {n} items can be decoded (see the warnings above)')


def _resize(a, size, resample):
    """(H, W) uint8 -> (h, w) uint8; size is PIL's (w, h)."""
    if size == (a.shape[1], a.shape[0]):
        return a
    return np.array(Image.fromarray(a).resize(size, resample))


def _to_tensor(img, mean, std):
    """(H, W) grey in the units of mean/std -> (3, H, W) float32, normalised. Three identical
    channels because every ViT here (and every teacher) has an RGB patch embedding."""
    x = (torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)) - mean) / std
    return x.unsqueeze(0).repeat(3, 1, 1)


def renormalise(x, norm):
    """Images (..., 3, H, W) normalised with the InfMix grey statistics -> the same images normalised with
    TEACHER_NORMS[norm]: the grey value on [0, 1] in each of the 3 channels, minus that channel's mean, over its std.
    'infmix' returns x itself."""
    if norm not in TEACHER_NORMS:
        raise ValueError(f"teacher input statistics must be one of {', '.join(TEACHER_NORMS)}, got {norm!r}")
    if norm == "infmix":
        return x
    mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(3, 1, 1) for v in TEACHER_NORMS[norm])
    return (x * PRETRAIN_STD + PRETRAIN_MEAN - mean) / std

# ----------------------------------------------------------------------------- transforms


class PretrainTransform:
    """§4: RandomResizedCrop(size, scale, ratio 3/4..4/3, bicubic) -> hflip 0.5 -> [0,1] ->
    normalise. The crop box is drawn the way torchvision draws it (10 tries, then a centre crop)."""

    def __init__(self, size=224, scale=(0.2, 1.0)):
        self.size, self.scale, self.ratio = size, scale, (3 / 4, 4 / 3)

    def box(self, H, W, rng):
        """(top, left, h, w) of the crop in an H x W image."""
        log_r = np.log(self.ratio)
        for _ in range(10):
            area = H * W * rng.uniform(*self.scale)
            r = np.exp(rng.uniform(*log_r))
            w, h = int(round(np.sqrt(area * r))), int(round(np.sqrt(area / r)))
            if 0 < w <= W and 0 < h <= H:
                return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w
        lo, hi = self.ratio  # fallback: the whole image, trimmed to the nearest allowed ratio, centred
        w, h = min(W, int(round(H * hi))), min(H, int(round(W / lo)))
        return (H - h) // 2, (W - w) // 2, h, w

    def __call__(self, img, label, rng):
        t, l, h, w = self.box(*img.shape, rng)
        # crop, then resize, as torchvision's resized_crop on PIL (one resize(box=...) call would let the
        # bicubic filter read pixels outside the box at the edges); PIL antialiases when shrinking
        x = np.array(Image.fromarray(img[t:t + h, l:l + w]).resize((self.size, self.size), Image.BICUBIC))
        if rng.random() < 0.5:
            x = x[:, ::-1]
        return _to_tensor(x / 255.0, PRETRAIN_MEAN, PRETRAIN_STD)  # (3, size, size)


def _crop_offset(label, crop, cat_max_ratio, ignore_index, rng):
    """mmseg RandomCrop: draw a box; while one class covers >= cat_max_ratio of the box's
    non-ignored pixels (or only one class is present), draw again, at most 10 times; the
    11th draw is kept unchecked. Returns (top, left)."""
    H, W = label.shape
    draw = lambda: (int(rng.integers(0, max(H - crop, 0) + 1)), int(rng.integers(0, max(W - crop, 0) + 1)))
    y, x = draw()
    if cat_max_ratio < 1:
        for _ in range(10):
            cnt = np.bincount(label[y:y + crop, x:x + crop].ravel(), minlength=256)
            cnt[ignore_index] = 0
            cnt = cnt[cnt > 0]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            y, x = draw()
    return y, x


def _photometric(img, rng):
    """mmseg PhotoMetricDistortion on grey: brightness +-32 (p 0.5), then contrast x0.5..1.5
    (p 0.5); saturation and hue do nothing to a grey image. Like mmseg, each step clips to
    0..255 and truncates to uint8."""
    if rng.integers(2):
        img = np.clip(img.astype(np.float32) + rng.uniform(-32, 32), 0, 255).astype(np.uint8)
    if rng.integers(2):
        img = np.clip(img.astype(np.float32) * rng.uniform(0.5, 1.5), 0, 255).astype(np.uint8)
    return img


class SegTrainTransform:
    """§5 training: keep-ratio rescale into scale x U(ratio) -> random crop (cat_max_ratio rule)
    -> flip -> photometric -> normalise -> pad to crop x crop (image 0 after normalising, label 255).
    Image resizing is PIL bilinear (antialiased when shrinking, where mmcv uses plain cv2), labels nearest
    at pixel centres (cv2's nearest takes floor(dst * scale): its labels sit up to half a source pixel
    up-left of the image; here they line up, and 0.2-1.7 % of border pixels differ)."""

    def __init__(self, crop=512, scale=(2048, 512), ratio=(0.5, 2.0), cat_max_ratio=0.75, flip=0.5,
                 photometric=True, ignore_index=255):
        self.crop, self.scale, self.ratio, self.cat_max_ratio = crop, scale, ratio, cat_max_ratio
        self.flip, self.photometric, self.ignore_index = flip, photometric, ignore_index

    def __call__(self, img, label, rng):
        # mmseg Resize(keep_ratio=True, ratio_range): long side <= scale[0]*r and short side <= scale[1]*r
        H, W = img.shape
        r = rng.uniform(*self.ratio)
        f = min(int(self.scale[0] * r) / max(H, W), int(self.scale[1] * r) / min(H, W))
        size = (int(W * f + 0.5), int(H * f + 0.5))
        img = _resize(img, size, Image.BILINEAR)
        label = _resize(np.asarray(label, dtype=np.uint8), size, Image.NEAREST)  # values <= 255 by construction
        c = self.crop
        y, x = _crop_offset(label, c, self.cat_max_ratio, self.ignore_index, rng)
        img, label = img[y:y + c, x:x + c], label[y:y + c, x:x + c]
        if rng.random() < self.flip:
            img, label = img[:, ::-1], label[:, ::-1]
        if self.photometric:
            img = _photometric(img, rng)
        h, w = img.shape
        out = torch.zeros(3, c, c)                                    # pad value 0 = the mean after normalising
        out[:, :h, :w] = _to_tensor(img, SEG_MEAN, SEG_STD)
        lab = torch.full((c, c), self.ignore_index, dtype=torch.int64)
        lab[:h, :w] = torch.from_numpy(label.astype(np.int64))
        return out, lab                                               # (3, c, c) float32, (c, c) int64


class SegEvalTransform:
    """§5 evaluation: the image's short side -> short_side keeping the ratio (PIL bilinear, which
    antialiases when shrinking, unlike the reference's cv2: a few grey levels apart above 512); the label
    stays at its original size, since predictions are resized back to it before scoring.
    short_side=None keeps the native size (just normalises)."""

    def __init__(self, short_side=512):
        self.short_side = short_side

    def __call__(self, img, label, rng=None):
        H, W = img.shape
        if self.short_side:
            f = self.short_side / min(H, W)
            img = _resize(img, (int(W * f + 0.5), int(H * f + 0.5)), Image.BILINEAR)
        lab = None if label is None else torch.from_numpy(np.asarray(label, dtype=np.int64))
        return _to_tensor(img, SEG_MEAN, SEG_STD), lab               # (3, h', w') float32, (H, W) int64

# ----------------------------------------------------------------------------- InfMix (pre-training)


def _images_in(folder, recursive=False):
    """Sorted paths of the image files in folder (and below it if recursive)."""
    if recursive:
        found = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
    else:
        found = [e.path for e in os.scandir(folder) if e.is_file()]
    return sorted(p for p in found if p.lower().endswith(IMG_EXTS))


def _need_dir(path, what):
    if not os.path.isdir(path):
        raise FileNotFoundError(f'{what} folder not found: {path}')


def _infrared_files(root):
    """root/<dataset>/thermal/* (other subfolders ignored, as in the reference); if no
    <dataset>/thermal/ exists, every image below root."""
    _need_dir(root, 'InfMix infrared')
    thermal = sorted(e.path for e in os.scandir(root) if os.path.isdir(os.path.join(e.path, 'thermal')))
    if thermal:
        return [p for d in thermal for p in _images_in(os.path.join(d, 'thermal'))]
    return _images_in(root, recursive=True)


def _imagenet_files(root, per_class):
    """root/<wnid>/*: the first per_class names of each class after sorting (the reference takes
    the first 200 in directory order, which differs between file systems)."""
    _need_dir(root, 'InfMix imagenet')
    classes = sorted(e.path for e in os.scandir(root) if e.is_dir())
    return [p for d in classes for p in _images_in(d)[:per_class]]


def _coco_files(root):
    """root/train2017/*, or the images directly in root."""
    _need_dir(root, 'InfMix coco')
    sub = os.path.join(root, 'train2017')
    return _images_in(sub if os.path.isdir(sub) else root)


class InfMix(torch.utils.data.Dataset):
    """§4 InfMix: infrared images + greyscale ImageNet (per_class per class) + greyscale COCO.
    Items are transform(grey (H, W) uint8, None, rng); default PretrainTransform(224).
    thermal_range: None (16-bit frames stretched per image) or (lo, hi), see decode_grey."""

    def __init__(self, infrared=None, imagenet=None, coco=None, per_class=200, transform=None, seed=0,
                 thermal_range=None):
        if not (infrared or imagenet or coco):
            raise ValueError('InfMix needs at least one of infrared=, imagenet=, coco=')
        found = {'infrared': _infrared_files(infrared) if infrared else [],
                 'imagenet': _imagenet_files(imagenet, per_class) if imagenet else [],
                 'coco': _coco_files(coco) if coco else []}
        for (source, files), root in zip(found.items(), (infrared, imagenet, coco)):
            if root and not files:
                raise FileNotFoundError(f'InfMix {source}: no images ({", ".join(IMG_EXTS)}) under {root}')
        self.files = [f for files in found.values() for f in files]
        self.counts = {source: len(files) for source, files in found.items()}
        self.transform = transform or PretrainTransform(224)
        self.seed, self.epoch, self.thermal_range = seed, 0, thermal_range
        self.bad, self.num_bad = set(), 0

    def summary(self):
        return f'InfMix: {len(self)} images = ' + ' + '.join(f'{n} {k}' for k, n in self.counts.items())

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.files)

    def load(self, i):
        return load_grey(self.files[i], thermal_range=self.thermal_range), None

    def __getitem__(self, i):
        i = range(len(self))[i]  # negative indices, and IndexError past the end
        rng = np.random.default_rng([self.seed, self.epoch, i])
        img, _ = _load_item(self, i)
        return self.transform(img, None, rng)

# ----------------------------------------------------------------------------- segmentation folders


def _voc_palette(n):
    """The PASCAL VOC colour map: bits 0, 1, 2 of class k go to R, G, B, from the top bit down."""
    spread = lambda k, c: sum(((k >> (3 * s + c)) & 1) << (7 - s) for s in range(8))
    return [(spread(k, 0), spread(k, 1), spread(k, 2)) for k in range(n)]


class SegFolder(torch.utils.data.Dataset):
    """Images in img_dir, index labels in label_dir with the same stem. The item list is the
    split file (one stem per line) or every *img_suffix file in img_dir, sorted.
    label_map: a 256-entry table applied to raw label values (e.g. Cityscapes ids -> classes);
    thermal_channel: None (the 4-channel rule of decode_grey), 'luma', or a channel read raw (MFNet RGB-T PNGs: 3);
    thermal_range: None (16-bit frames stretched per image) or (lo, hi) raw values -> 0..255 (decode_grey).
    classes may be omitted only with a label_map (then num_classes = largest mapped value + 1).
    Items are transform(img (H, W) uint8, label (H, W) int64, rng); default: native size, normalised."""
    ignore_index = IGNORE

    def __init__(self, img_dir, label_dir, split_file=None, img_suffix='.png', label_suffix='.png',
                 classes=None, palette=None, label_map=None, transform=None, seed=0, thermal_channel=None,
                 thermal_range=None):
        _need_dir(img_dir, 'image')
        _need_dir(label_dir, 'label')
        if split_file is not None:
            if not os.path.isfile(split_file):
                raise FileNotFoundError(f'split file not found: {split_file}')
            with open(split_file) as f:
                stems = [s.strip() for s in f if s.strip()]
            stems = [s[:-len(img_suffix)] if s.endswith(img_suffix) else s for s in stems]
        else:
            stems = sorted(f[:-len(img_suffix)] for f in os.listdir(img_dir) if f.endswith(img_suffix))
        if not stems:
            raise FileNotFoundError(f'no images listed in {split_file}' if split_file
                                    else f'no *{img_suffix} files in {img_dir}')
        self.stems = stems
        self.images = [os.path.join(img_dir, s + img_suffix) for s in stems]
        self.labels = [os.path.join(label_dir, s + label_suffix) for s in stems]
        missing = [p for p in self.images + self.labels if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f'{len(missing)} files of {split_file or img_dir} are missing, e.g. {missing[:3]}')
        if label_map is not None:
            label_map = np.asarray(label_map)
            if label_map.shape != (256,) or label_map.min() < 0 or label_map.max() > 255:
                raise ValueError(f'label_map must be 256 values in 0..255, got shape {label_map.shape}')
            label_map = label_map.astype(np.uint8)
        if classes is None:
            if label_map is None:
                raise ValueError(f'SegFolder({img_dir}): give classes=[...] (or a label_map to infer their number)')
            classes = [str(k) for k in range(int(label_map[label_map != IGNORE].max()) + 1)]
        self.classes, self.num_classes = list(classes), len(classes)
        self.palette = [tuple(int(v) for v in c) for c in palette] if palette else _voc_palette(self.num_classes)
        self.label_map, self.thermal_channel, self.thermal_range = label_map, thermal_channel, thermal_range
        self.transform = transform or SegEvalTransform(short_side=None)
        self.seed, self.epoch = seed, 0
        self.bad, self.num_bad = set(), 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.images)

    def name(self, i):
        return self.stems[i]

    def load(self, i):
        """(img (H, W) uint8, label (H, W) int64); OSError if a file cannot be decoded,
        ValueError if the label does not fit the image or the class list."""
        ip, lp = self.images[i], self.labels[i]
        img = load_grey(ip, self.thermal_channel, self.thermal_range)
        label = load_label(lp)
        if self.label_map is not None:
            if label.dtype != np.uint8:
                raise ValueError(f'{lp}: label_map needs 8-bit labels, got values up to {label.max()}')
            label = self.label_map[label]
        if label.shape != img.shape:
            raise ValueError(f'{lp}: label is {label.shape[1]}x{label.shape[0]} '
                             f'but image {ip} is {img.shape[1]}x{img.shape[0]}')
        values = np.flatnonzero(np.bincount(label.ravel())) if label.dtype == np.uint8 else np.unique(label)
        bad = values[(values >= self.num_classes) & (values != IGNORE)]
        if bad.size:
            raise ValueError(f'{lp}: label values {bad[:10].tolist()} are neither classes 0..{self.num_classes - 1} '
                             f'nor ignore {IGNORE} (missing or wrong label_map?)')
        return img, label.astype(np.int64)

    def label_counts(self):
        """Pixels of each label value 0..255 over every label file, after the label map: (256,) int64.
        Reads the labels only; files that cannot be decoded are passed over (training skips them)."""
        counts = np.zeros(256, np.int64)
        for p in self.labels:
            try:
                label = load_label(p)
            except (OSError, ValueError):
                continue
            if self.label_map is not None and label.dtype == np.uint8:
                label = self.label_map[label]
            counts += np.bincount(label[(label >= 0) & (label < 256)], minlength=256)
        return counts

    def size_mismatches(self):
        """[(i, message)] for the items whose image and label sizes differ, read from the file headers (EXIF
        orientation applied, no pixels decoded), so that a run can stop before training instead of at the item."""
        return size_mismatches(self.images, self.labels)

    def drop(self, indices):
        """Leave the items `indices` out of the dataset (e.g. the pairs size_mismatches found)."""
        out = set(indices)
        keep = [i for i in range(len(self)) if i not in out]
        self.stems, self.images, self.labels = ([v[i] for i in keep] for v in (self.stems, self.images, self.labels))
        self.bad = {keep.index(i) for i in self.bad if i in keep}

    def __getitem__(self, i):
        i = range(len(self))[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        img, label = _load_item(self, i)
        return self.transform(img, label, rng)


SODA_CLASSES = ('background', 'person', 'building', 'tree', 'road', 'pole', 'grass', 'door', 'table', 'chair',
                'car', 'bicycle', 'lamp', 'monitor', 'trafficCone', 'trash can', 'animal', 'fence', 'sky',
                'river', 'sidewalk')
MFNET_CLASSES = ('background', 'car', 'person', 'bike', 'curve', 'car_stop', 'guardrail', 'color_cone', 'bump')
MFNET_PALETTE = [(0, 0, 0), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 192), (128, 128, 0), (64, 64, 128),
                 (192, 128, 128), (192, 64, 0)]  # the official MFNet colours (util/util.py)
SCUT_CLASSES = ('background', 'road', 'person', 'rider', 'car', 'truck', 'fence', 'tree', 'bus', 'pole')
SCUT_IDS = (0, 7, 24, 25, 26, 27, 13, 21, 28, 17)  # Cityscapes id of each SCUT_CLASSES entry
SCUT_PALETTE = [(0, 0, 0), (128, 64, 128), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (190, 153, 153),
                (107, 142, 35), (0, 60, 100), (153, 153, 153)]  # Cityscapes colours of those ids


def _split_file(root, split, files):
    """root/<the list file of split>; ValueError for an unknown split, FileNotFoundError naming a missing list."""
    if split not in files:
        raise ValueError(f'split must be one of {list(files)}, got {split!r}')
    path = os.path.join(root, files[split])
    if not os.path.isfile(path):
        raise FileNotFoundError(f'split {split!r} needs the list file {path} (one image stem a line), '
                                f'which does not exist')
    return path


def soda(root, split='train', transform=None, **kw):
    """SODA: JPEGImages/*.jpg, SegmentationClassPNG/*.png, lists train_infrared.txt / test_infrared.txt.
    SODA has no official colours: the palette is the PASCAL VOC colour map."""
    split_file = _split_file(root, split, {'train': 'train_infrared.txt', 'test': 'test_infrared.txt'})
    kw = {'img_suffix': '.jpg', 'classes': SODA_CLASSES, **kw}
    return SegFolder(os.path.join(root, 'JPEGImages'), os.path.join(root, 'SegmentationClassPNG'), split_file,
                     transform=transform, **kw)


def mfnet(root, split='train', transform=None, **kw):
    """MFNet-T: thermal_imgs/*.png (or channel 3 of the public 4-channel images/*.png), labels/*.png,
    lists train.txt / val_test.txt (validation) / test.txt, and test_day.txt / test_night.txt (the test split's
    day and night frames, which RGB-T papers report separately)."""
    split_file = _split_file(root, split, {'train': 'train.txt', 'val': 'val_test.txt', 'test': 'test.txt',
                                           'test_day': 'test_day.txt', 'test_night': 'test_night.txt'})
    img_dir = os.path.join(root, 'thermal_imgs')
    if not os.path.isdir(img_dir):
        img_dir = os.path.join(root, 'images')
        kw.setdefault('thermal_channel', 3)
    kw = {'classes': MFNET_CLASSES, 'palette': MFNET_PALETTE, **kw}
    return SegFolder(img_dir, os.path.join(root, 'labels'), split_file, transform=transform, **kw)


def scut_label_form(label_paths):
    """Which form a copy of SCUT-Seg's labels holds: 'ids' (raw Cityscapes ids: 7 road, 24 person, ...) or
    'index' (classes 0..9, as the reference's code expects). Judged per file from its values (255 aside):
    any value 10..33 is a Cityscapes id no 0..9 map holds; otherwise any of 1-6, 8, 9 is a class index;
    a file with only 0 and 7 fits both (background + road, or background + tree) and decides nothing.
    ValueError, saying what was found, when the files disagree, hold values of neither form (> 33), or
    none of them decides. Files that cannot be decoded are passed over (training skips them too)."""
    found = {'ids': [], 'index': [], 'neither': [], 'either': []}
    for p in label_paths:
        try:
            v = set(np.unique(load_label(p)).tolist()) - {IGNORE}
        except (OSError, ValueError):
            continue
        kind = ('neither' if any(x > 33 or x < 0 for x in v) else 'ids' if any(x >= 10 for x in v)
                else 'index' if v - {0, 7} else 'either')
        found[kind].append((p, sorted(v)))
    eg = lambda kind: f'e.g. {found[kind][0][0]}: values {found[kind][0][1][:12]}'
    force = "force one with label_form='ids' or 'index' (train_seg.py --scut-labels)"
    if found['neither']:
        raise ValueError(f"SCUT-Seg labels: {len(found['neither'])} files hold values that are neither classes "
                         f"0..9 nor Cityscapes ids 0..33 ({eg('neither')}): are these the SCUT-Seg label maps?")
    if found['ids'] and found['index']:
        raise ValueError(f"SCUT-Seg labels are mixed: {len(found['ids'])} files hold raw Cityscapes ids "
                         f"({eg('ids')}) and {len(found['index'])} hold class indices 0..9 ({eg('index')}); "
                         f"convert them to one form, or {force}")
    if not (found['ids'] or found['index']):
        raise ValueError(f"SCUT-Seg labels: the {len(found['either'])} readable label files hold only 0, 7 and 255, "
                         f"which fits both raw Cityscapes ids (7 = road) and class indices (7 = tree): {force}")
    return 'ids' if found['ids'] else 'index'


def scut(root, split='train', transform=None, label_form='auto', **kw):
    """SCUT-Seg: images/*.jpg, labels/*.png, lists train.txt / val.txt. Labels come in two forms: raw
    Cityscapes ids ('ids': mapped to 0..9, other ids to 255) or class indices 0..9 ('index', what the
    reference's code reads). label_form='auto' tells them apart from the split's label files
    (scut_label_form); the dataset's `label_form` says which was used."""
    split_file = _split_file(root, split, {'train': 'train.txt', 'val': 'val.txt'})
    kw = {'img_suffix': '.jpg', 'classes': SCUT_CLASSES, 'palette': SCUT_PALETTE, **kw}
    ds = SegFolder(os.path.join(root, 'images'), os.path.join(root, 'labels'), split_file, transform=transform, **kw)
    if label_form == 'auto':
        label_form = scut_label_form(ds.labels)
    if label_form not in ('ids', 'index'):
        raise ValueError(f"label_form must be 'auto', 'ids' or 'index', got {label_form!r}")
    if label_form == 'ids':
        label_map = np.full(256, IGNORE, np.uint8)
        label_map[list(SCUT_IDS)] = np.arange(len(SCUT_IDS))
        ds.label_map = label_map
    ds.label_form = label_form
    return ds


SEG_PRESETS = {'soda': soda, 'mfnet': mfnet, 'scut': scut}

# ----------------------------------------------------------------------------- synthetic thermal street scenes

SYN_CLASSES = ('sky', 'road', 'sidewalk', 'building', 'vegetation', 'pole', 'person', 'car')
SYN_PALETTE = [(70, 130, 180), (128, 64, 128), (244, 35, 232), (70, 70, 70), (107, 142, 35), (153, 153, 153),
               (220, 20, 60), (0, 0, 142)]  # the Cityscapes colours of the same classes
SKY, ROAD, SIDEWALK, BUILDING, VEG, POLE, PERSON, CAR = range(8)
_COARSE_AMP = np.array([0.03, 0.04, 0.04, 0.05, 0.06, 0.02, 0.03, 0.04], np.float32)  # per class: slow drifts
_FINE_AMP = np.array([0.0, 0.02, 0.03, 0.02, 0.10, 0.0, 0.01, 0.01], np.float32)      # foliage is the rough one


def _noise(rng, H, W, cells):
    """(H, W) smooth noise: a grid of `cells` rows of normals, upsampled bicubically."""
    g = rng.standard_normal((cells, max(2, round(cells * W / H)))).astype(np.float32)
    return np.asarray(Image.fromarray(g).resize((W, H), Image.BICUBIC))


def _person(paint, rng, x, yf, h, t):
    """Upright pedestrian of height h with feet at (x, yf): warm head, cooler clothes, a stride."""
    U = rng.uniform
    w, s, cloth = 0.25 * h * U(0.85, 1.15), U(-0.12, 0.12) * h, t - U(0.05, 0.25)
    ys, yh = yf - 0.84 * h, yf - 0.47 * h                     # shoulder and hip rows
    for side in (-1, 1):                                       # legs, then arms
        paint('polygon', [(x + side * 0.35 * w, yh), (x + side * 0.02 * w, yh),
                          (x + side * s / 2 - 0.04 * h, yf), (x + side * s / 2 + 0.04 * h, yf)], PERSON, cloth - 0.03)
        a = side * U(0.0, 0.1) * h                             # arm swing
        paint('polygon', [(x + side * 0.5 * w, ys), (x + side * 0.36 * w, ys + 0.05 * h),
                          (x + side * 0.42 * w + a, ys + 0.38 * h), (x + side * 0.56 * w + a, ys + 0.36 * h)],
              PERSON, cloth)
    paint('polygon', [(x - w / 2, ys), (x + w / 2, ys), (x + 0.4 * w, yh), (x - 0.4 * w, yh)], PERSON, cloth)
    paint('ellipse', (x - 0.06 * h, yf - h, x + 0.06 * h, yf - 0.86 * h), PERSON, t + 0.05)


def _car(paint, rng, x, yf, h, t):
    """Car of height h, seen from behind or from the side: cold glass, warm tyres, a hot engine or exhaust."""
    U = rng.uniform
    glass, tyre = t - U(0.15, 0.3), t + U(0.05, 0.2)
    hot = t + U(0.1, 0.35) if rng.random() < 0.6 else t       # engine and exhaust of a car that was driven
    if rng.random() < 0.6:                                     # rear view
        w = h * U(1.25, 1.5)
        for side in (-1, 1):
            paint('rectangle', (x + side * 0.45 * w, yf - 0.2 * h, x + side * 0.28 * w, yf), CAR, tyre)
        paint('rectangle', (x - w / 2, yf - 0.7 * h, x + w / 2, yf - 0.12 * h), CAR, t)
        paint('polygon', [(x - 0.42 * w, yf - 0.7 * h), (x + 0.42 * w, yf - 0.7 * h),
                          (x + 0.33 * w, yf - h), (x - 0.33 * w, yf - h)], CAR, t - 0.03)
        paint('polygon', [(x - 0.36 * w, yf - 0.73 * h), (x + 0.36 * w, yf - 0.73 * h),
                          (x + 0.3 * w, yf - 0.95 * h), (x - 0.3 * w, yf - 0.95 * h)], CAR, glass)
        paint('ellipse', (x + 0.25 * w, yf - 0.2 * h, x + 0.33 * w, yf - 0.12 * h), CAR, hot + 0.1)
    else:                                                      # side view, front towards d
        w, d = h * U(2.6, 3.2), rng.choice((-1, 1))
        p = lambda fx, fy: (x + d * fx * w, yf - fy * h)
        paint('rectangle', (x - w / 2, yf - 0.62 * h, x + w / 2, yf - 0.14 * h), CAR, t)
        paint('polygon', [p(-0.32, 0.6), p(0.28, 0.6), p(0.14, 1), p(-0.24, 1)], CAR, t - 0.03)
        paint('polygon', [p(-0.27, 0.64), p(0.23, 0.64), p(0.12, 0.94), p(-0.2, 0.94)], CAR, glass)
        paint('polygon', [p(0.3, 0.62), p(0.5, 0.58), p(0.5, 0.3), p(0.3, 0.3)], CAR, hot)
        for fx in (-0.32, 0.32):
            paint('ellipse', (x + fx * w - 0.17 * h, yf - 0.34 * h, x + fx * w + 0.17 * h, yf), CAR, tyre)


def _pole(paint, rng, x, yf, h, t):
    """Street-light or sign pole: a thin shaft, sometimes an arm with a (warm at night) lamp."""
    pw = max(1.0, 0.012 * h)
    paint('rectangle', (x - pw / 2, yf - h, x + pw / 2, yf), POLE, t)
    if rng.random() < 0.5:
        d = rng.choice((-1, 1)) * 0.15 * h
        paint('rectangle', (min(x, x + d), yf - h, max(x, x + d), yf - h + pw), POLE, t)
        paint('ellipse', (x + d - 2 * pw, yf - h, x + d + 2 * pw, yf - h + 2 * pw), POLE, t + rng.uniform(0, 0.3))


def _tree(paint, rng, x, yf, r, t):
    """Tree with a crown of radius about r: a trunk and a clump of ellipses."""
    paint('rectangle', (x - 0.08 * r, yf - 2 * r, x + 0.08 * r, yf), VEG, t + 0.05)
    for _ in range(rng.integers(4, 8)):
        cx, cy, rr = x + rng.uniform(-0.6, 0.6) * r, yf + rng.uniform(-2.7, -1.7) * r, rng.uniform(0.4, 0.8) * r
        paint('ellipse', (cx - rr, cy - rr, cx + rr, cy + rr), VEG, t + rng.uniform(-0.05, 0.05))


def _render_street(rng, H, W):
    """One thermal street scene -> (img (H, W) uint8, label (H, W) uint8).

    Shapes are painted into a label image and a temperature image at once, far to near, so
    labels are exact and near objects occlude far ones. Temperatures (0 cold .. 1 hot) are drawn
    per scene from overlapping ranges (a sunlit road can be as warm as a person), then the
    camera model adds texture, blur, automatic gain, vignetting, noise and sometimes black-hot."""
    U = rng.uniform
    lab, tmp = Image.new('L', (W, H), SKY), Image.new('F', (W, H), 0.0)
    dl, dt = ImageDraw.Draw(lab), ImageDraw.Draw(tmp)

    def paint(shape, xy, cls, t):
        if shape != 'polygon':                                 # PIL wants boxes as (left, top, right, bottom)
            xy = (min(xy[0], xy[2]), min(xy[1], xy[3]), max(xy[0], xy[2]), max(xy[1], xy[3]))
        getattr(dl, shape)(xy, fill=cls)
        getattr(dt, shape)(xy, fill=float(t))

    night = rng.random() < 0.5
    t_road = U(0.2, 0.45) if night else U(0.45, 0.8)
    t_side, t_bld, t_veg, t_pole = t_road + U(-0.15, 0.1), U(0.25, 0.6), U(0.2, 0.5), U(0.2, 0.6)
    tmp.paste(U(0.0, 0.15), (0, 0, W, H))                      # sky: the coldest thing in view
    yh, vx = H * U(0.28, 0.55), W * U(0.25, 0.75)              # horizon row, vanishing-point column
    paint('rectangle', (0, yh, W, H), VEG, t_veg - 0.05)       # terrain beyond the sidewalks

    x = -U(0, 0.1) * W                                         # skyline of blocks, with gaps
    while x < W:
        bw = W * U(0.08, 0.3)
        if rng.random() < 0.75:
            top, base = yh - H * U(0.05, 0.4), yh + H * U(0.02, 0.08)
            paint('rectangle', (x, top, x + bw, base), BUILDING, t_bld + U(-0.1, 0.1))
        x += bw
    for _ in range(rng.integers(0, 5)):
        _tree(paint, rng, U(0, W), yh + H * U(0, 0.05), H * U(0.03, 0.1), t_veg)

    # road and sidewalks: trapezoids from the vanishing point to the bottom edge
    xb, wb, wf = vx + W * U(-0.3, 0.3), W * U(0.6, 1.6), W * U(0.0, 0.03)
    sl, sr = (W * U(0.15, 0.6) * (rng.random() < 0.85) for _ in range(2))   # sidewalk widths at the bottom, 0: none
    at = lambda x0, x1, y: x0 + (x1 - x0) * (y - yh) / (H - yh)            # x on a line from (x0, yh) to (x1, H)
    left, right = lambda y: at(vx - wf / 2, xb - wb / 2, y), lambda y: at(vx + wf / 2, xb + wb / 2, y)
    far = [(vx - wf / 2, yh), (vx + wf / 2, yh)]
    paint('polygon', far + [(xb + wb / 2 + sr, H), (xb - wb / 2 - sl, H)], SIDEWALK, t_side)
    paint('polygon', far + [(xb + wb / 2, H), (xb - wb / 2, H)], ROAD, t_road)
    if rng.random() < 0.7:                                     # dashed centre line, evenly spaced on the ground
        t_mark, phase = t_road + U(-0.1, 0.1), U(0, 2)
        for k in range(12):                                    # dash k spans distances d .. d+1, d = 1+2k+phase
            ya, yb = (yh + 0.9 * (H - yh) / (1 + 2 * k + phase + e) for e in (1, 0))  # row ~ 1 / distance
            xa, xc = at(vx, xb, ya), at(vx, xb, yb)
            wa, wc = (0.012 * W * (y - yh) / (H - yh) for y in (ya, yb))
            paint('polygon', [(xa - wa, ya), (xa + wa, ya), (xc + wc, yb), (xc - wc, yb)], ROAD, t_mark)

    # objects stand on the ground: a foot row y gives the perspective scale (y - yh); more far (small) ones
    ground = lambda n, dmax: [yh + (H - yh) * (0.04 + (dmax - 0.04) * rng.random() ** 1.5) for _ in range(n)]
    on_side = lambda y: (U(at(vx - wf / 2, xb - wb / 2 - sl, y) - 0.1 * (y - yh), left(y)) if rng.random() < 0.5
                         else U(right(y), at(vx + wf / 2, xb + wb / 2 + sr, y) + 0.1 * (y - yh)))
    objs = [(y, _car, U(left(y), right(y)), 1.15 * U(0.9, 1.15), U(0.3, 0.7)) for y in ground(rng.integers(0, 5), 0.8)]
    objs += [(y, _person, on_side(y) if rng.random() < 0.75 else U(left(y), right(y)), 1.4 * U(0.85, 1.15), U(0.6, 0.9))
             for y in ground(rng.integers(0, 7), 1.1)]
    objs += [(y, _pole, on_side(y), 4.5, t_pole) for y in ground(rng.integers(0, 4), 1.0)]
    objs += [(y, _tree, on_side(y), 0.9 * U(0.8, 1.2), t_veg) for y in ground(rng.integers(0, 3), 0.9)]
    for y, draw, x, k, t in sorted(objs, key=lambda o: o[0]):   # far to near
        if k * (y - yh) >= 4:
            draw(paint, rng, x, y, k * (y - yh), t)

    # shading: sky warms toward the horizon, the ground drifts with distance, windows, texture
    L, T = np.asarray(lab), np.array(tmp)                      # (H, W) uint8 classes, (H, W) float32 temperatures
    rows, cols = np.arange(H, dtype=np.float32)[:, None], np.arange(W, dtype=np.float32)[None, :]
    T += (L == SKY) * (0.15 * np.minimum(rows / yh, 1))
    T += ((L == ROAD) | (L == SIDEWALK)) * (U(-0.12, 0.12) * np.clip((rows - yh) / (H - yh), 0, 1.2))
    px, py = H * U(0.035, 0.06), H * U(0.05, 0.08)             # window grid, lit windows warm, dark ones cold glass
    lit = rng.random((int(H / py) + 1, int(W / px) + 1)) < U(0.05, 0.4)          # one draw per window
    lit = lit[(rows[:, 0] // py).astype(int)][:, (cols[0] // px).astype(int)]    # (H, W)
    win = ((rows % py) < 0.5 * py) & ((cols % px) < 0.55 * px)
    T += (L == BUILDING) * win * np.where(lit, 0.2, -0.08)
    T += _COARSE_AMP[L] * _noise(rng, H, W, 4) + _FINE_AMP[L] * _noise(rng, H, W, max(2, H // 6))

    # camera: optics blur every edge, automatic gain control stretches the scene's range, then a
    # random gain/offset, sometimes the black-hot palette, vignetting, temporal and column noise
    lo, hi = -0.3, 1.5                                         # 8 bits for PIL's blur: 0.007 a level, below the noise
    t8 = Image.fromarray(np.clip((T - lo) * (255 / (hi - lo)), 0, 255).astype(np.uint8))
    T = np.asarray(t8.filter(ImageFilter.GaussianBlur(U(0.5, 1.6))), np.float32)
    lo, hi = (float(v) for v in np.percentile(T[::4, ::4], (0.5, 99.5)))
    g = U(0.55, 0.95)
    x = U(0.02, 0.98 - g) + g * (T - lo) / max(hi - lo, 1.0)
    if rng.random() < 0.1:
        x = 1 - x
    x = x * (1 - U(0, 0.3) * (((rows - H / 2) / H) ** 2 + ((cols - W / 2) / W) ** 2))
    x += rng.standard_normal((H, W), dtype=np.float32) * U(0.005, 0.02)          # temporal noise
    x += rng.standard_normal(W, dtype=np.float32) * U(0, 0.01)                   # column fixed-pattern noise
    return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8), np.array(L)


class SyntheticThermal(torch.utils.data.Dataset):
    """Procedural thermal street scenes with exact labels, rendered on demand (a few ms each).
    Item i of a split is a pure function of (seed, split, i); 'train' and 'val' use disjoint
    seed streams. Items are transform(img, label, rng); default: native size, normalised."""
    classes, num_classes, palette, ignore_index = list(SYN_CLASSES), len(SYN_CLASSES), SYN_PALETTE, IGNORE

    def __init__(self, split='train', num_images=None, size=(256, 320), transform=None, seed=0):
        if split not in ('train', 'val'):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split, self.size, self.seed, self.epoch = split, tuple(size), seed, 0
        self.num_images = num_images or {'train': 2000, 'val': 200}[split]
        self.transform = transform or SegEvalTransform(short_side=None)
        self.bad, self.num_bad = set(), 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_images

    def name(self, i):
        return f'{self.split}_{i:05d}'

    def load(self, i):
        # a 4-word key with a fixed tag, so the scene stream never equals an augmentation stream [seed, epoch, i]
        rng = np.random.default_rng([self.seed, 0x5CE7E, ('train', 'val').index(self.split), i])
        img, label = _render_street(rng, *self.size)
        return img, label.astype(np.int64)

    def label_counts(self):
        """Pixels of each label value 0..255 over every scene of the split, (256,) int64, as SegFolder.label_counts
        (no augmentation). A scene's label exists only with its picture: both are rendered, a few ms each."""
        counts = np.zeros(256, np.int64)
        for i in range(len(self)):
            counts += np.bincount(self.load(i)[1].ravel(), minlength=256)
        return counts

    def __getitem__(self, i):
        i = range(len(self))[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        img, label = _load_item(self, i)
        return self.transform(img, label, rng)

# ----------------------------------------------------------------------------- looking at samples


def colorize(label, palette):
    """(H, W) class indices -> (H, W, 3) uint8 colours; 255 (ignore) and values without a colour -> black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:min(len(palette), IGNORE)] = palette[:IGNORE]
    label = np.asarray(label)
    return lut[np.where((label >= 0) & (label < 256), label, IGNORE)]


def save_samples(dataset, path, n=4, pred=None):
    """Grid PNG of the first n items, one row each: grey image | coloured label | coloured pred[k]
    (if given; any size, resized to the row). Rows are scaled to 256 px high. Returns path."""
    rows, row_h, gap = [], 256, 4
    for k in range(min(n, len(dataset))):
        img, label = _load_item(dataset, k)
        size = (max(1, round(img.shape[1] * row_h / img.shape[0])), row_h)
        panels = [np.repeat(_resize(img, size, Image.BILINEAR)[..., None], 3, axis=2)]
        for m in ([] if label is None else [label]) + ([] if pred is None else [np.asarray(pred[k])]):
            panels.append(np.array(Image.fromarray(colorize(m, dataset.palette)).resize(size, Image.NEAREST)))
        row = np.full((row_h, sum(p.shape[1] for p in panels) + gap * (len(panels) - 1), 3), 255, np.uint8)
        for j, p in enumerate(panels):
            x0 = j * (p.shape[1] + gap)
            row[:, x0:x0 + p.shape[1]] = p
        rows.append(row)
    W = max(r.shape[1] for r in rows)
    grid = np.full((len(rows) * (row_h + gap) - gap, W, 3), 255, np.uint8)
    for j, r in enumerate(rows):
        grid[j * (row_h + gap):j * (row_h + gap) + row_h, :r.shape[1]] = r
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
