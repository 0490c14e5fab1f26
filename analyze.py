"""
analyze.py: the attention patterns of any ViT and the layer UNIP would distil (UNIP §3.1).

For every layer and head: the NMI between query and key positions of the attention map
(unip.nmi, CLS dropped), mean and spread over N images; every head classed local / hybrid /
global from its mean; the recommended layer is the one whose mean NMI is closest to --target,
searched after the model's NMI peak (--layer-rule after-peak, the default: the hybrid layers the
paper distils come after the early local ones) or over all layers (--layer-rule closest).

    python analyze.py --checkpoint mae_pretrain_vit_large.pth --arch vit_large --num-images 256
    python analyze.py --checkpoint a.pth,b.pth --arch vit_large,vit_small --images DIR
    python analyze.py --checkpoint none --arch vit_base            # random-weights baseline
    python analyze.py --checkpoint dinov2_vits14_pretrain.pth --arch dinov2_vits14 --images DIR

Images: --images DIR (every image below it), InfMix roots (--infrared / --imagenet / --coco),
or by default the synthetic thermal scenes of data.py; N evenly spaced over the sorted files.
Eval preprocessing: shorter side resized to --img-size (bicubic), centre crop, grey -> 3
channels, InfMix normalisation (the student's input, which UNIP feeds every teacher; --teacher-norm
clip | imagenet normalises the 3 grey channels with those RGB statistics instead). NMI is measured at
the token grid distillation uses: --img-size is the student's crop and --student-patch its patch (16);
a teacher with another patch sees the crop resized as train_pretrain.py shows it (224 px -> 14x14
tokens -> 196 px for DINOv2's patch 14), so the recommended layer is the one train_pretrain.py
--teacher-layer auto picks. --student-patch 0: the model's own grid.
Outputs in --out (several models: one sub-folder each, plus
summary.json and nmi_compare.png):
    nmi.json        per layer and head: mean and std NMI, pattern; the recommended layer
    nmi_layers.png  NMI per layer: heads as faint dots, layer mean bold, hybrid band shaded
    attention.png   a few heads of a few layers, for two query patches in a few images
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import plumbing
import data
import unip


@dataclass
class Config:
    checkpoint: list = field(default_factory=lambda: ["none"])  # checkpoint(s): repeat the flag or comma-separate to compare; 'none' = random init
    arch: list = field(default_factory=lambda: ["vit_large"])  # preset per checkpoint (one for all, or one each): vit_tiny/small/base/large, dinov2_vits14, ...
    last_heads: int = 0  # head count of the last block (a UNIP student's: its teacher's, e.g. 16); 0 = the preset's
    num_images: int = 256  # images the statistics are averaged over (a few hundred: the layer means settle)
    images: str = ""  # folder of images (searched recursively); empty: synthetic thermal scenes
    infrared: str = ""  # InfMix infrared root (<dataset>/thermal/*), instead of --images
    imagenet: str = ""  # InfMix ImageNet train root (200 per class)
    coco: str = ""  # InfMix COCO root
    thermal_range: str = ""  # LO,HI: 16-bit / float frames mapped linearly LO -> 0, HI -> 255, clipped, the same for every frame ('': a per-image 1st-99th percentile stretch); 8-bit images are unaffected
    out: str = "runs/analyze"  # output folder
    target: float = 0.09  # NMI of the layer to distil (UNIP: 0.09; stable for 0.06-0.12)
    layer_rule: str = "after-peak"  # where to look for it: after-peak (layers after the NMI peak) | closest (all layers)
    thresholds: tuple = unip.PATTERN_THRESHOLDS  # global < low <= hybrid <= high < local
    layers: tuple = ()  # layers in attention.png; empty: a quarter of the depth, the recommended one, the last
    heads_shown: int = 4  # heads per layer in attention.png, from most local to most global
    pictures: int = 2  # images in attention.png (two query patches each)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # NMI statistics in auto | bf16 | fp16 | none; auto: bf16 on GPUs of compute capability 8.0+ (older: fp16) and on CPUs with AMX or AVX512-BF16, else none (env UNIP_AMP overrides auto)
    batch_size: int = 32  # images per forward pass
    workers: int = 4  # DataLoader worker processes
    img_size: int = 224  # square crop side: the student's crop (the pos_embed is resampled if it differs)
    student_patch: int = 16  # patch of the student to distil into: the teacher sees the crop at the student's grid x its patch, as in train_pretrain.py; 0 = the model's own grid at --img-size
    teacher_norm: str = "infmix"  # input statistics: infmix (the student's input, the default) | clip | imagenet (grey -> 3 channels, RGB mean/std)
    seed: int = 0  # random init of 'none' checkpoints, synthetic scenes


def parse_config(argv=None) -> Config:
    # lists repeat or take comma lists (--checkpoint a.pth,b.pth); tuples take their values after one flag
    return plumbing.parse_config(Config, argv, __doc__, check=data.check_thermal_range)


# -----------------------------------------------------------------------------
# images and measurement


def centre_square(a, size, resample):
    """(H, W) uint8 array -> (size, size): shorter side resized to `size`, centre cropped."""
    H, W = a.shape
    w, h = max(size, round(W * size / min(H, W))), max(size, round(H * size / min(H, W)))
    l, t = (w - size) // 2, (h - size) // 2
    return np.array(Image.fromarray(a).resize((w, h), resample).crop((l, t, l + size, t + size)))


class EvalTransform:
    """Deterministic: centre square, [0, 1], InfMix normalisation, 3 identical channels;
    then another input normalisation for the teacher if `norm` names one (data.TEACHER_NORMS)."""

    def __init__(self, size, norm="infmix"):
        self.size, self.norm = size, norm

    def __call__(self, img, label=None, rng=None):  # (H, W) uint8 -> (3, size, size)
        x = torch.from_numpy(centre_square(img, self.size, Image.BICUBIC).astype(np.float32) / 255)
        return data.renormalise(((x - data.PRETRAIN_MEAN) / data.PRETRAIN_STD).expand(3, -1, -1).contiguous(), self.norm)


class ImageFolder(torch.utils.data.Dataset):
    def __init__(self, root, transform, thermal_range=None):
        self.files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                            if f.lower().endswith(data.IMG_EXTS))
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(data.IMG_EXTS)}) under {root}")
        self.transform, self.thermal_range = transform, thermal_range

    def __len__(self):
        return len(self.files)

    def load(self, i):
        return data.load_grey(self.files[i], thermal_range=self.thermal_range), None

    def __getitem__(self, i):
        return self.transform(self.load(i)[0])


@torch.no_grad()
def measure_nmi(model, batches, device, progress=False, size=None):
    """NMI of every head of every layer over all images in `batches` (tensors (B, 3, H, W)), each resized
    to `size` on the device first when given (the teacher's view of the student's crop, train_pretrain.py's).
    Returns (mean, std): one (H,) tensor per layer, index 0 = layer 1 (the last block may have
    another head count); std is the spread over images. One batched pass per batch in eval mode:
    each (B, H, N, N) map is reduced to (B, H) as soon as it exists."""
    was_training, s1, s2, n = model.training, None, None, 0
    model.eval()
    for x in tqdm(batches, disable=not progress, unit="batch", desc="NMI"):
        x = x.to(device, non_blocking=True)
        x = unip.resize_for(x, size) if size else x
        maps = model.attention_maps(x, reduce=unip.nmi)  # {layer: (B, H)}
        v = [maps[i].double() for i in sorted(maps)]
        s1 = [t.sum(0) + (0 if s1 is None else s1[i]) for i, t in enumerate(v)]  # sums stay on device: no sync
        s2 = [(t * t).sum(0) + (0 if s2 is None else s2[i]) for i, t in enumerate(v)]
        n += x.shape[0]
    model.train(was_training)
    if n == 0:
        raise ValueError("measure_nmi: no images")
    mean = [a / n for a in s1]
    std = [(b / n - m * m).clamp_min(0).sqrt() for b, m in zip(s2, mean)]
    return [m.float().cpu() for m in mean], [s.float().cpu() for s in std]


def query_patches(img, label, patch, warm=(data.PERSON, data.CAR)):
    """Two query patches (row, col) in a square crop. 'object': the centre of the largest person
    or car when a label is known; else 'hot spot': the patch that most outshines its 5x5 surroundings;
    'background': the flattest patch (least 3x3 variation) at least a quarter of the grid away
    from it (and free of objects when a label is known)."""
    g = img.shape[0] // patch
    cells = lambda a: a[: g * patch, : g * patch].reshape(g, patch, g, patch).mean((1, 3))

    def box(a, k, mode="edge"):  # mean over the k x k neighbourhood of each patch
        p = np.pad(a, k // 2, mode=mode)
        return sum(p[i:i + g, j:j + g] for i in range(k) for j in range(k)) / k ** 2

    bright = cells(img.astype(np.float32) / 255)
    obj = cells(np.isin(label, warm).astype(np.float32)) if label is not None else np.zeros_like(bright)
    score = obj + box(obj, 3, "constant") if obj.any() else bright - box(bright, 5)
    if g >= 6:  # not on the border: half-seen objects make poor examples
        score[[0, -1]] = score[:, [0, -1]] = -np.inf
    w = np.unravel_index(np.argmax(score), (g, g))
    r, c = np.indices((g, g))
    far = np.maximum(abs(r - w[0]), abs(c - w[1])) >= max(1, g // 4)
    flat = box(bright ** 2, 3) - box(bright, 3) ** 2 + 1e-3 * bright  # local variance (cooler wins a tie)
    b = np.unravel_index(np.argmin(np.where(far & (obj == 0), flat, np.inf)), (g, g))
    return [("object" if obj.any() else "hot spot", tuple(map(int, w))), ("background", tuple(map(int, b)))]


# -----------------------------------------------------------------------------
# pictures (PIL only)

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]
HEAT = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66),
                 (245, 125, 21), (250, 193, 39), (252, 255, 164)], np.float32)  # inferno-like


def font(size):
    try:
        return ImageFont.load_default(size=size)  # scalable with Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def text(d, xy, s, f, anchor="lt", fill=(0, 0, 0)):
    """Text placed by a two-letter anchor (l/m/r, t/m/b) computed from its box (any font)."""
    x0, y0, x1, y1 = d.textbbox((0, 0), s, font=f)
    x = xy[0] - x0 - {"l": 0, "m": (x1 - x0) / 2, "r": x1 - x0}[anchor[0]]
    y = xy[1] - y0 - {"t": 0, "m": (y1 - y0) / 2, "b": y1 - y0}[anchor[1]]
    d.text((x, y), s, font=f, fill=fill)


def dashed(d, p, q, fill, width=1, dash=6):
    n = max(1, int(math.dist(p, q) / dash))
    at = lambda t: (p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1]))
    for i in range(0, n, 2):
        d.line([at(i / n), at(min(i + 1, n) / n)], fill=fill, width=width)


def draw_curves(models, thresholds, target, path, title):
    """NMI per layer of one or more models in one plot. models: dicts with 'name', 'heads' (per
    layer, per head mean NMI), 'layers' (layer means), 'recommended_layer'."""
    W, H, L, R, T, B = 1060, 560, 80, 300, 50, 60  # canvas and margins (legend on the right)
    im = Image.new("RGB", (W, H), "white")
    d, f, fs, grey, band = ImageDraw.Draw(im), font(15), font(13), (100, 100, 100), (222, 242, 222)
    depth = max(len(m["layers"]) for m in models)
    vmax = max([v for m in models for hs in m["heads"] for v in hs] + [thresholds[1], target]) * 1.08
    step = 0.02 if vmax <= 0.15 else 0.05 if vmax <= 0.4 else 0.1
    ymax = step * math.ceil(vmax / step)
    X = lambda layer: L + (layer - 0.5) / depth * (W - L - R)
    Y = lambda v: H - B - v / ymax * (H - T - B)
    x0, x1 = X(0.5), X(depth + 0.5)
    d.rectangle([x0, Y(thresholds[1]), x1, Y(thresholds[0])], fill=band)  # hybrid band
    for i in range(round(ymax / step) + 1):  # y grid and tick labels
        d.line([x0, Y(i * step), x1, Y(i * step)], fill=(232, 232, 232))
        text(d, (x0 - 6, Y(i * step)), f"{i * step:.2f}", fs, "rm")
    dashed(d, (x0, Y(target)), (x1, Y(target)), grey)
    for layer in range(1, depth + 1):
        d.line([X(layer), Y(0), X(layer), Y(0) + 5], fill="black")
        if layer % math.ceil(depth / 24) == 0 or layer == 1:
            text(d, (X(layer), Y(0) + 8), str(layer), fs, "mt")
    d.rectangle([x0, Y(ymax), x1, Y(0)], outline="black")
    text(d, ((x0 + x1) / 2, H - 8), "layer", f, "mb")
    lab = Image.new("L", (60, 22), 255)
    text(ImageDraw.Draw(lab), (30, 11), "NMI", f, "mm", fill=0)
    im.paste(lab.rotate(90, expand=True), (6, int((T + H - B) / 2) - 30))
    text(d, (x0, 14), title, font(17))
    for name, v in (("local", (ymax + thresholds[1]) / 2), ("hybrid", sum(thresholds) / 2), ("global", thresholds[0] / 2)):
        text(d, (x1 + 6, Y(v)), name, fs, "lm", fill=grey)
    for k, m in enumerate(models):  # per-head dots (faint, spread a little sideways) under all lines
        faint = tuple(int(0.35 * v + 0.65 * 255) for v in COLOURS[k % len(COLOURS)])
        for layer, hs in enumerate(m["heads"], start=1):
            for h, v in enumerate(hs):
                x = X(layer) + (h / max(1, len(hs) - 1) - 0.5) * 0.5 * (X(2) - X(1))
                d.ellipse([x - 2.5, Y(v) - 2.5, x + 2.5, Y(v) + 2.5], fill=faint)
    lx, ly = x1 + 80, T + 4  # legend
    for k, m in enumerate(models):  # layer means bold; the layer to distil ringed
        c, pts, r = COLOURS[k % len(COLOURS)], [(X(i + 1), Y(v)) for i, v in enumerate(m["layers"])], m["recommended_layer"]
        d.line(pts, fill=c, width=3)
        for x, y in pts:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=c)
        x, y = pts[r - 1]
        dashed(d, (x, Y(0)), (x, y + 9), c, width=2)
        d.ellipse([x - 9, y - 9, x + 9, y + 9], outline=c, width=3)
        text(d, (x, y - 12 - 16 * k), f"L{r}", f, "mb", fill=c)
        d.line([lx, ly + 9, lx + 30, ly + 9], fill=c, width=3)
        text(d, (lx + 36, ly + 9), f"{m['name'][:22]} (L{r})", fs, "lm")
        ly += 22
    d.ellipse([lx + 11, ly + 13, lx + 18, ly + 20], fill=(170, 170, 170))
    d.rectangle([lx, ly + 36, lx + 30, ly + 48], fill=band)
    dashed(d, (lx, ly + 64), (lx + 30, ly + 64), grey)
    d.ellipse([lx + 6, ly + 78, lx + 24, ly + 96], outline=grey, width=3)
    for dy, s in ((17, "one head (mean over images)"), (42, f"hybrid band {thresholds[0]:g}-{thresholds[1]:g}"),
                  (64, f"target {target:g}"), (87, "layer to distil (closest to"), (105, "target, by --layer-rule)")):
        text(d, (lx + 36, ly + dy), s, fs, "lm")
    im.save(path)


def overlay(grey, att, tile, query):
    """grey (S, S) uint8, att (g, g) or None, query (row, col, g) -> (tile, tile) RGB: attention
    (scaled to its max) as a heat map over the image, more opaque where high; query patch boxed."""
    out = np.asarray(Image.fromarray(grey).convert("RGB").resize((tile, tile), Image.BILINEAR), np.float32)
    if att is not None:
        a = np.asarray(Image.fromarray((att / max(att.max(), 1e-12)).astype(np.float32)).resize((tile, tile), Image.NEAREST))
        heat = np.stack([np.interp(a, np.linspace(0, 1, len(HEAT)), HEAT[:, i]) for i in range(3)], -1)
        out = out + (heat - out) * (0.25 + 0.7 * a)[..., None]
    im = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    r, c, s = query[0], query[1], tile / query[2]
    ImageDraw.Draw(im).rectangle([c * s, r * s, (c + 1) * s - 1, (r + 1) * s - 1], outline=(0, 255, 255), width=2)
    return im


def draw_attention(rows, columns, path, title, tile=128):
    """rows: (caption, grey crop, (r, c, g) query, {column: (g, g) map}); columns: (key, caption
    lines). First column: the image with the query boxed; then one heat map per column."""
    gap, left, top = 4, 118, 74
    W, H = left + (len(columns) + 1) * (tile + gap), top + len(rows) * (tile + gap)
    im = Image.new("RGB", (W, H), "white")
    d, f = ImageDraw.Draw(im), font(13)
    text(d, (8, 8), title, font(15))
    text(d, (left + tile / 2, top - 6), "image + query", f, "mb")
    for j, (key, lines) in enumerate(columns, start=1):
        for k, line in enumerate(reversed(lines)):
            text(d, (left + j * (tile + gap) + tile / 2, top - 6 - 16 * k), line, f, "mb")
    for i, (caption, grey, q, maps) in enumerate(rows):
        y = top + i * (tile + gap)
        for k, line in enumerate(caption):
            text(d, (8, y + tile / 2 + (k - (len(caption) - 1) / 2) * 17), line, f, "lm")
        im.paste(overlay(grey, None, tile, q), (left, y))
        for j, (key, _) in enumerate(columns, start=1):
            im.paste(overlay(grey, maps[key], tile, q), (left + j * (tile + gap), y))
    im.save(path)


# -----------------------------------------------------------------------------


def model_names(ckpts, archs):
    """One name per model for its folder and legend: the checkpoint's stem, made unique by arch and position."""
    stems = [os.path.splitext(os.path.basename(c))[0] if c.lower() not in ("none", "random") else "random" for c in ckpts]
    return [s if stems.count(s) == 1 else f"{s}_{a}_{i + 1}" for i, (s, a) in enumerate(zip(stems, archs))]


def image_source(cfg, tf):
    """The dataset to measure on (a folder, InfMix roots, or synthetic scenes) and a line saying what it is."""
    thermal = data.parse_thermal_range(cfg.thermal_range)
    if cfg.images:
        ds = ImageFolder(cfg.images, tf, thermal)
        return ds, f"{len(ds)} images under {cfg.images}"
    if cfg.infrared or cfg.imagenet or cfg.coco:
        ds = data.InfMix(cfg.infrared or None, cfg.imagenet or None, cfg.coco or None, transform=tf, seed=cfg.seed,
                         thermal_range=thermal)
        return ds, ds.summary()
    ds = data.SyntheticThermal("val", num_images=cfg.num_images, transform=tf, seed=cfg.seed)
    return ds, f"{len(ds)} synthetic thermal scenes (seed {cfg.seed})"


def print_layers(res):
    """The per-layer table of one model: mean NMI, spread, pattern counts, one letter per head."""
    rec, layer_mean, closest = res["recommended_layer"], res["layers"], res["closest_layer"]
    print("layer   NMI   std*  local hybrid global  heads (L local, h hybrid, g global)")
    for i, (v, ps) in enumerate(zip(layer_mean, res["patterns"])):
        c = res["counts"][i]
        mark = "  <- recommended" if i + 1 == rec else ""
        print(f"{i + 1:5d}  {v:.3f}  {res['layers_std'][i]:.3f}  {c['local']:5d} {c['hybrid']:6d} {c['global']:6d}  "
              f"{''.join({'local': 'L', 'hybrid': 'h', 'global': 'g'}[p] for p in ps)}{mark}")
    print(f"(* std over images, averaged over heads)\nrecommended layer to distil: {res['reason']}")
    if closest != rec:
        print(f"  (the plain rule, --layer-rule closest, would pick layer {closest} ({layer_mean[closest - 1]:.3f}))")
    if res["warning"]:
        print(f"WARNING: {res['warning']}")
    random = res["checkpoint"].lower() in ("none", "random")
    print(f"  {res['train_pretrain']}" if not random else "  (random weights: a baseline, not a teacher)")


def attention_figure(model, pics, x_pics, idx, mean, patterns, shown, view, grid, heads_shown, img_size, device):
    """attention.png's columns (a few heads of each shown layer, most local to most global) and rows (two query
    patches per picture, with each column's attention map of that query)."""
    with torch.no_grad():
        xp = x_pics.to(device)
        maps = model.attention_maps(unip.resize_for(xp, view) if view != img_size else xp,
                                    layers=shown)  # {layer: (P, H, N, N)}
    g, columns, rows = grid, [], []
    for l in shown:
        order = torch.argsort(mean[l - 1], descending=True).tolist()  # most local first
        for h in [order[k] for k in sorted(set(np.linspace(0, len(order) - 1, heads_shown).round().astype(int)))]:
            columns.append(((l, h), [f"layer {l}, head {h + 1}", f"{mean[l - 1][h]:.3f} {patterns[l - 1][h]}"]))
    for p, (img, lab) in enumerate(pics):
        for what, (r, c) in query_patches(img, lab, img_size // g):  # patches of the crop, g x g
            att = {(l, h): maps[l][p, h, 1 + r * g + c, 1:].float().cpu().reshape(g, g).numpy()
                   for (l, h), _ in columns}  # CLS key dropped, as in the NMI
            rows.append(([f"image {idx[p]}", what], img, (r, c, g), att))
    return rows, columns


def write_summary(results, cfg, n_images, source):
    """Several models: their curves in one plot, and summary.json with each one's layer to distil."""
    draw_curves(results, cfg.thresholds, cfg.target, os.path.join(cfg.out, "nmi_compare.png"),
                f"NMI per layer ({n_images} images)")
    summary = dict(target=cfg.target, thresholds=list(cfg.thresholds), num_images=n_images, images=source,
                   models=[{k: r[k] for k in ("name", "checkpoint", "arch", "recommended_layer", "layers")}
                           | {"json": os.path.join(r["name"], "nmi.json")} for r in results])
    with open(os.path.join(cfg.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print("\nlayer to distil: " + ", ".join(f"{r['name']} {r['recommended_layer']}" for r in results))
    print(f"wrote {cfg.out}/summary.json, nmi_compare.png")


# -----------------------------------------------------------------------------


def main(argv=None):
    # config
    cfg = parse_config(argv)
    print(json.dumps(asdict(cfg), indent=1))
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    amp, amp_why, autocast = plumbing.precision(cfg.amp, device)  # as train_pretrain.py --teacher-layer auto measures
    print(f"device {device} | amp {amp} ({amp_why})")
    ckpts, archs = cfg.checkpoint, cfg.arch * len(cfg.checkpoint) if len(cfg.arch) == 1 else cfg.arch
    if len(archs) != len(ckpts) or any(a not in unip.PRESETS for a in archs):
        raise SystemExit(f"--arch: one for all or one per checkpoint, from {sorted(unip.PRESETS)}; got {cfg.arch}")
    if cfg.teacher_norm not in data.TEACHER_NORMS:
        raise SystemExit(f"--teacher-norm: one of {', '.join(data.TEACHER_NORMS)}; got {cfg.teacher_norm!r}")
    if len(cfg.thresholds) != 2 or not cfg.thresholds[0] <= cfg.thresholds[1]:
        raise SystemExit(f"--thresholds wants two values, low <= high; got {cfg.thresholds}")
    names = model_names(ckpts, archs)

    # data: N images, evenly spaced over the sorted list; the first few also go into the pictures
    tf = EvalTransform(cfg.img_size, cfg.teacher_norm)
    ds, source = image_source(cfg, tf)
    idx = np.unique(np.linspace(0, len(ds) - 1, min(cfg.num_images, len(ds))).round().astype(int)).tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=cfg.batch_size,
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda")
    print(f"data: {source}; using {len(idx)}")
    if cfg.images or cfg.infrared or cfg.imagenet or cfg.coco:  # files, not the 8-bit synthetic scenes
        print(data.thermal_range_note(data.parse_thermal_range(cfg.thermal_range)))
    pics = []  # (grey crop, label crop or None) as the model sees them
    for i in idx[: cfg.pictures]:
        img, label = ds.load(i)
        lab = None if label is None else centre_square(np.asarray(label, np.uint8), cfg.img_size, Image.NEAREST)
        pics.append((centre_square(img, cfg.img_size, Image.BICUBIC), lab))
    x_pics = torch.stack([tf(img) for img, _ in pics]) if pics else None

    results = []
    for name, ckpt, arch in zip(names, ckpts, archs):
        out = cfg.out if len(ckpts) == 1 else os.path.join(cfg.out, name)
        os.makedirs(out, exist_ok=True)
        # model
        torch.manual_seed(cfg.seed)  # a random-init baseline is reproducible
        model = unip.PRESETS[arch](img_size=cfg.img_size, last_heads=cfg.last_heads or None)
        if ckpt.lower() not in ("none", "random"):
            unip.load_pretrained(model, ckpt)
        model.eval().to(device)
        # the token grid of distillation: the student's crop, seen by this model at grid x its patch
        if cfg.student_patch:
            view, grid = unip.teacher_view(cfg.img_size, cfg.student_patch, model.patch_size)
            print(f"{name}: measured at the student's grid, {grid}x{grid} tokens of {cfg.img_size} px crops (patch "
                  f"{cfg.student_patch})" + (f"; patch {model.patch_size}: the crops resized to {view} px, as "
                                             "train_pretrain.py shows them" if view != cfg.img_size else ""))
        else:
            view = unip.patch_multiple(cfg.img_size, model.patch_size, f"--img-size (with --student-patch 0, {arch}'s)")
            grid = view // model.patch_size

        # NMI statistics
        t0 = time.time()
        with autocast():
            mean, std = measure_nmi(model, loader, device, progress=True, size=view if view != cfg.img_size else None)
        seconds = time.time() - t0
        layer_mean = [m.mean().item() for m in mean]
        patterns = [unip.classify_heads(m, cfg.thresholds) for m in mean]
        rec, why, warning = unip.layer_choice(layer_mean, cfg.target, cfg.layer_rule, cfg.thresholds)
        flags = f"python train_pretrain.py --teacher {ckpt} --teacher-arch {arch} --teacher-layer {rec}" + (
            f" --teacher-norm {cfg.teacher_norm}" if cfg.teacher_norm != "infmix" else "")
        res = dict(name=name, checkpoint=ckpt, arch=arch, num_images=len(idx), images=source, img_size=cfg.img_size,
                   student_patch=cfg.student_patch, view_size=view, grid=grid,
                   teacher_norm=cfg.teacher_norm,
                   thresholds=list(cfg.thresholds), target=cfg.target, recommended_layer=rec,
                   layer_rule=cfg.layer_rule, reason=why, warning=warning,
                   closest_layer=unip.choose_layer(layer_mean, cfg.target, "closest"),
                   layers=layer_mean, layers_std=[s.mean().item() for s in std],
                   heads=[m.tolist() for m in mean], heads_std=[s.tolist() for s in std], patterns=patterns,
                   counts=[{p: ps.count(p) for p in ("local", "hybrid", "global")} for ps in patterns],
                   train_pretrain=flags, seconds=round(seconds, 2))
        print(f"\n{name} ({arch}, {ckpt}): {len(idx)} images in {seconds:.1f} s ({len(idx) / seconds:.1f} img/s)")
        print_layers(res)

        # pictures: the NMI curve, and attention of a few heads for two query patches per image
        with open(os.path.join(out, "nmi.json"), "w") as fh:
            json.dump(res, fh, indent=1)
        draw_curves([res], cfg.thresholds, cfg.target, os.path.join(out, "nmi_layers.png"),
                    f"NMI per layer: {name} ({arch}, {len(idx)} images)")
        results.append(res)
        if not pics:
            continue
        depth = len(model.blocks)
        shown = sorted({l for l in cfg.layers if 1 <= l <= depth} or {max(1, round(depth / 4)), rec, depth})
        rows, columns = attention_figure(model, pics, x_pics, idx, mean, patterns, shown, view, grid,
                                         cfg.heads_shown, cfg.img_size, device)
        draw_attention(rows, columns, os.path.join(out, "attention.png"),
                       f"{name}: attention of the boxed query patch (each map scaled to its max); "
                       f"column header: layer, head, mean NMI, pattern")
        print(f"wrote {out}/nmi.json, nmi_layers.png, attention.png")

    if len(results) > 1:  # side-by-side comparison
        write_summary(results, cfg, len(idx), source)


if __name__ == "__main__":
    plumbing.run(main)
