"""
Segment new, unlabelled infrared images with a train_seg.py checkpoint: one index mask and one colour overlay
per image, computed exactly as train_seg.py evaluates (short side resized, sliding windows at the training
crop, logits resized back to the image, argmax).

    python predict.py --checkpoint runs/seg/best.pt --images frames/ --out runs/predict
    python predict.py --checkpoint best.pt --images list.txt      # a text file of image paths, one a line
    python predict.py --onnx best.onnx --images frames/           # an export.py file, run by ONNX Runtime

Writes OUT/masks/<name>.png (mode L: the class index of every pixel, at the image's size as displayed),
OUT/overlays/<name>.png (the grey frame with class colours blended in; classes coloured black, e.g. background,
stay grey) and OUT/classes.json (index -> name and colour). <name> is the path below the image folder with its
ending replaced by .png; two images that would share a name (a.jpg and a.png) are refused before anything is
written. Images are decoded as in training (data.decode_grey): 16-bit / float frames mapped to 8 bits as the training
run mapped them (its --thermal-range, stored in the checkpoint; --thermal-range here overrides it), EXIF
orientation applied, and the 4-channel rule: an RGBA file whose 4th channel varies is read as that channel (the
thermal frame of MFNet's RGB-T PNGs), one whose 4th channel is constant (plain alpha) as the luma of its RGB;
--channel luma or --channel N overrides it. A model trained on MFNet given an RGBA file without a thermal 4th
channel warns, naming the file. A file that cannot be decoded is skipped; the end line counts the images written,
skipped and warned about, and names the last two.
With --labels DIR the masks are scored against ground truth: the label of each image is DIR/<name> with its ending
replaced by --label-suffix, read as train_seg.py reads labels (raw values through --label-map, by default the training
run's; 255 ignored). Missing labels are named before anything is predicted; a label of another size than its image or
with values that are no class stops the run, naming the file. At the end a table gives each class's IoU and accuracy
(recall) and mIoU, mAcc and aAcc (pixel accuracy), as train_seg.py evaluates, and OUT/metrics.json holds them with the
confusion matrix (rows: ground truth, columns: prediction).

    python predict.py --checkpoint best.pt --images val/images --labels val/labels --out runs/val_pred

With --onnx the network is an export.py file run by ONNX Runtime (pip install onnxruntime); classes, palette,
short side, windows and stride come from the file's metadata, and everything else is the same.
In your own code: seg = unip.load_segmenter(path) gives the same model (see unip.load_segmenter).
"""
import contextlib
import json
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import plumbing
import data
import unip


@dataclass
class Config:
    checkpoint: str = ""        # train_seg.py checkpoint (best.pt or ckpt.pt)
    onnx: str = ""              # instead of --checkpoint: an export.py .onnx file, run by ONNX Runtime
    images: str = ""            # image folder (searched recursively), one image file, or a .txt list of image paths
    out: str = "runs/predict"   # output folder: masks/, overlays/, classes.json
    channel: str = "auto"       # auto (4-channel rule: varying 4th channel = thermal, constant = alpha) | luma | N (raw)
    thermal_range: str = ""     # LO,HI: 16-bit / float frames mapped linearly LO -> 0, HI -> 255, clipped | stretch (per-image 1st-99th percentile) ('': the training run's mapping); 8-bit images are unaffected
    labels: str = ""            # label folder: score the masks against DIR/<name without ending><--label-suffix> (IoU, Acc, OUT/metrics.json)
    label_suffix: str = ".png"  # ending of the label files in --labels
    label_map: str = ""         # raw label value -> class, e.g. '255:1' for 0/255 masks; other values kept ('': the --label-map of a --dataset folder training run)
    alpha: float = 0.5          # opacity of the class colours in the overlays
    amp: str = "auto"           # auto | bf16 | fp16 | none (auto as in training: unip.resolve_amp)
    device: str = "auto"        # auto | cpu | cuda | cuda:N


def image_paths(source):
    """(paths, root): the images of a folder (recursively, sorted), of a .txt list, or one file; names of the
    outputs are the paths relative to root."""
    if os.path.isdir(source):
        found = (os.path.join(d, f) for d, _, fs in os.walk(source) for f in fs)
        paths, root = sorted(p for p in found if p.lower().endswith(data.IMG_EXTS)), source
    elif source.lower().endswith(".txt") and os.path.isfile(source):
        with open(source) as f:
            paths = [line.strip() for line in f if line.strip()]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images listed in {source} do not exist, e.g. {missing[:3]}")
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else ""
    elif os.path.isfile(source):
        paths, root = [source], os.path.dirname(source)
    else:
        raise FileNotFoundError(f"--images {source!r}: no such folder, image or .txt list")
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(data.IMG_EXTS)}) in {source}")
    return paths, root


def output_names(paths, root):
    """The mask / overlay name of each image: its path below root, ending replaced by .png. ValueError naming both
    files of every pair that would get one name (a.jpg and a.png), so that nothing is overwritten in silence."""
    names, first, clashes = [], {}, []
    for p in paths:
        name = os.path.splitext(os.path.relpath(os.path.abspath(p), os.path.abspath(root)))[0] + ".png"
        if name in first:
            clashes.append(f"{first[name]} and {p} (both -> {name})")
        first.setdefault(name, p)
        names.append(name)
    if clashes:
        raise ValueError(f"{len(clashes)} pairs of images would write the same mask and overlay: {'; '.join(clashes)}. "
                         "Rename or move one image of each pair (outputs are named <image name without ending>.png)")
    return names


def label_files(names, folder, suffix):
    """The label of each image: folder/<its mask name without ending><suffix>. FileNotFoundError naming the first
    few missing files and their count, so that a run stops before anything is predicted."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--labels {folder!r}: no such folder")
    labels = [os.path.join(folder, os.path.splitext(n)[0] + suffix) for n in names]
    missing = [p for p in labels if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(labels)} images have no label file in {folder} "
                                f"(<name without ending>{suffix}), e.g. {', '.join(missing[:3])}")
    return labels


def read_label(path, shape, label_map, num_classes):
    """(H, W) int64 classes of a label file read as train_seg.py reads it (data.load_label, then label_map, a
    256-entry table or None). ValueError naming the file if it cannot be decoded, is not `shape`, or holds values
    that are neither classes 0..num_classes-1 nor the ignore value."""
    try:
        label = data.load_label(path)
    except OSError as e:
        raise ValueError(str(e)) from None
    if label_map is not None:
        if label.dtype != np.uint8:
            raise ValueError(f"{path}: --label-map needs 8-bit labels, got values up to {label.max()}")
        label = label_map[label]
    if label.shape != shape:
        raise ValueError(f"{path}: label is {label.shape[1]}x{label.shape[0]} but its image is {shape[1]}x{shape[0]}")
    values = np.unique(label)
    bad = values[((values >= num_classes) & (values != data.IGNORE)) | (values < 0)]
    if bad.size:
        raise ValueError(f"{path}: label values {bad[:10].tolist()} are neither classes 0..{num_classes - 1} "
                         f"nor ignore {data.IGNORE} (missing or wrong --label-map?)")
    return label.astype(np.int64)


def scores(conf, classes):
    """(table, metrics) of a (K, K) confusion matrix (rows: ground truth, columns: prediction), as train_seg.py
    reports evaluation: IoU and accuracy (recall) per class in %, NaN (shown '-', null in JSON) for a class in
    neither prediction nor label (IoU) or without label pixels (Acc), left out of mIoU and mAcc; aAcc: pixels right
    over labelled pixels."""
    iou, acc = unip.iou_from_confusion(conf) * 100, unip.acc_from_confusion(conf) * 100
    miou, macc = torch.nanmean(iou).item(), torch.nanmean(acc).item()
    aacc = (conf.diag().sum() / conf.sum()).item() * 100 if conf.sum() else float("nan")
    w = max(len(c) for c in list(classes) + ["mIoU / mAcc"])
    cell = lambda v: "     -" if v != v else f"{v:6.2f}"
    table = (f"per class (%)\n  {'':<{w}}    IoU    Acc\n"
             + "".join(f"  {c:<{w}} {cell(v)} {cell(a)}\n" for c, v, a in zip(classes, iou.tolist(), acc.tolist()))
             + f"  {'mIoU / mAcc':<{w}} {cell(miou)} {cell(macc)}\n  {'aAcc':<{w}} {cell(aacc)}")
    finite = lambda v: None if v != v else v
    metrics = {"classes": list(classes), "iou": [finite(v) for v in iou.tolist()],
               "acc": [finite(v) for v in acc.tolist()], "miou": finite(miou), "macc": finite(macc),
               "aacc": finite(aacc), "confusion": conf.tolist()}
    return table, metrics


def read_frame(path, channel, rgbt, thermal_range=None):
    """(H, W) uint8 decoded as in training, what was read (data.decode_grey), and the warnings about it.
    rgbt: the model was trained on MFNet's thermal frames (channel 3 of its RGBA PNGs); thermal_range: (lo, hi) of
    16-bit / float frames, or None (per-image stretch)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img, source = data.decode_grey(path, channel, thermal_range)
    notes = [str(w.message) for w in caught]
    if rgbt and source == "alpha":  # an RGBA file whose 4th channel is flat: no thermal frame to read
        notes.append(f"{path}: this model was trained on MFNet's thermal frames, but the 4th channel of this RGBA "
                     "file is constant (plain alpha, no thermal frame): predicting from the luma of its RGB instead; "
                     "give the thermal frames, or --channel luma if the RGB is what you mean")
    return img, source, notes


# What export.py writes into every .onnx file (metadata_props, all strings) and --onnx reads back: this marker, the
# classes and palette as JSON, the numbers below as decimals, and prose for a reader outside Python (see export.py).
ONNX_FORMAT = "unip-segmenter-1"
ONNX_NUMBERS = ("short_side", "crop", "stride", "patch", "window", "channels")


class OnnxSegmenter:
    """An export.py .onnx file run by ONNX Runtime on the CPU, shaped as unip.slide_inference and main() use a
    unip.load_segmenter model: called on normalised windows (B, C, S, S) it returns ((B, K, S, S) logits, None).
    classes, palette, crop, stride, short_side, patch, mode and config come from the file's metadata."""

    def __init__(self, path, threads=0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise SystemExit("error: --onnx needs ONNX Runtime: pip install onnxruntime "
                             "(or pip install -r requirements-export.txt)") from None
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX file not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one thread per physical core
        opts.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise SystemExit(f"error: {path} cannot be read as an ONNX model ({str(e).strip().splitlines()[0][:200]}); "
                             "write it again with python export.py --checkpoint CKPT") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            if meta.get("format") != ONNX_FORMAT:
                raise KeyError("format")
            self.classes, self.palette = json.loads(meta["classes"]), [tuple(c) for c in json.loads(meta["palette"])]
            self.short_side, self.crop, self.stride, self.patch, self.window, self.channels = (
                int(meta[k]) for k in ONNX_NUMBERS)
            self.mode, self.config = meta["mode"], {"model": meta["model"], "dataset": meta["dataset"],
                                                    "thermal_range": meta.get("thermal_range", "")}
        except (KeyError, ValueError, TypeError) as e:
            why = ("it has no metadata_props" if not meta else
                   f"its metadata_props 'format' is {meta.get('format')!r}, not {ONNX_FORMAT!r}" if e.args == ("format",)
                   else f"its metadata_props lack a readable {e}")
            raise SystemExit(f"error: {path} does not carry this project's metadata ({why}), so its classes, input "
                             "normalisation and windows are unknown: export the train_seg.py checkpoint with "
                             "python export.py --checkpoint CKPT") from None
        self.path, self.meta, self.num_classes = path, meta, len(self.classes)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x):  # (B, C, S, S) normalised -> ((B, K, S, S) logits, None), as Segmenter.forward in eval
        if tuple(x.shape[1:]) != (self.channels, self.window, self.window):
            raise ValueError(f"{self.path} takes windows ({self.channels}, {self.window}, {self.window}), got "
                             f"{tuple(x.shape[1:])}: images whose short side is resized below the crop "
                             f"({self.short_side} < {self.crop}) need the PyTorch path (--checkpoint)")
        out = self.session.run(None, {self.input: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out), None


def main(argv=None):
    # ------------------------------------------------------------------ config and setup
    cfg = plumbing.parse_config(Config, argv, __doc__, check=data.check_thermal_range)
    if not (cfg.checkpoint or cfg.onnx) or not cfg.images:
        raise SystemExit("give --checkpoint (a train_seg.py checkpoint) or --onnx (an export.py file), and --images "
                         "(a folder, an image or a .txt list)")
    if cfg.checkpoint and cfg.onnx:
        raise SystemExit("give --checkpoint or --onnx, not both")
    model_file = cfg.onnx or cfg.checkpoint
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.onnx:  # ONNX Runtime on the CPU in fp32: the PyTorch device and precision play no part
        device, (amp, amp_why, autocast) = torch.device("cpu"), ("none", "ONNX Runtime, fp32", contextlib.nullcontext)
    else:
        amp, amp_why, autocast = plumbing.precision(cfg.amp, device)  # on CUDA also TF32, as train_seg.py evaluates

    # ------------------------------------------------------------------ images and model
    paths, root = image_paths(cfg.images)
    names = output_names(paths, root)
    labels = label_files(names, cfg.labels, cfg.label_suffix) if cfg.labels else [None] * len(paths)
    if cfg.labels:  # sizes from the headers (as displayed): every mismatch named before anything is predicted
        wrong = data.size_mismatches(paths, labels)
        if wrong:
            raise ValueError(f"{len(wrong)} labels differ in size from their images: "
                             + "; ".join(m for _, m in wrong[:3]) + ("; ..." if len(wrong) > 3 else ""))
    channel = data.parse_channel(cfg.channel)
    seg = OnnxSegmenter(cfg.onnx) if cfg.onnx else unip.load_segmenter(cfg.checkpoint, device)
    rgbt = seg.config.get("dataset") == "mfnet"  # trained on thermal frames (MFNet's are channel 3 of its RGBA PNGs)
    trained = seg.config.get("thermal_range", "")  # the training run's mapping of 16-bit frames ('': stretch)
    thermal = data.parse_thermal_range(cfg.thermal_range or trained)
    to_input = data.SegEvalTransform(short_side=seg.short_side)
    # the training run's label map where training applied it (--dataset folder); --label-map here overrides it
    trained_map = seg.config.get("label_map", "") if seg.config.get("dataset") == "folder" else ""
    label_map = data.parse_label_map(cfg.label_map or trained_map)
    print(f"{model_file}: {seg.config.get('model')} {seg.mode}, {seg.num_classes} classes "
          f"({', '.join(seg.classes)}) | {len(paths)} images | short side {seg.short_side}, windows {seg.crop} "
          f"stride {seg.stride} | device {device} | amp {amp} ({amp_why})")
    print(data.thermal_range_note(thermal) + (f" [given by --thermal-range; training used {trained or 'stretch'}]"
                                              if cfg.thermal_range else " [the training run's mapping]"))
    if cfg.labels:
        print(f"scoring against {cfg.labels}/<name>{cfg.label_suffix}, label map "
              + (f"{cfg.label_map} [given by --label-map]" if cfg.label_map else
                 f"{trained_map} [the training run's]" if trained_map else "none") + f", {data.IGNORE} ignored")
    for sub in ("masks", "overlays"):
        os.makedirs(os.path.join(cfg.out, sub), exist_ok=True)
    with open(os.path.join(cfg.out, "classes.json"), "w") as f:
        json.dump({"onnx" if cfg.onnx else "checkpoint": model_file, "classes": seg.classes, "palette": seg.palette}, f,
                  indent=1)

    # ------------------------------------------------------------------ loop
    skipped, warned, sources = [], [], {}
    conf = torch.zeros(seg.num_classes, seg.num_classes, dtype=torch.int64)  # rows: label, columns: prediction
    for path, name, label_path in zip(tqdm(paths, desc="predict", dynamic_ncols=True), names, labels):
        try:
            img, source, notes = read_frame(path, channel, rgbt, thermal)
        except (OSError, ValueError) as e:
            skipped.append(path)
            tqdm.write(f"skipping {path}: {e}")
            continue
        sources[source] = sources.get(source, 0) + 1
        if notes:
            warned.append(path)
            for note in notes:
                tqdm.write(f"warning: {note}")
        label = read_label(label_path, img.shape, label_map, seg.num_classes) if label_path else None  # checked first
        x, _ = to_input(img, None)  # (3, h', w'), short side resized, normalised
        with torch.no_grad(), autocast():  # (1, K, h', w'), fp32
            logits = unip.slide_inference(seg, x[None].to(device), seg.num_classes, seg.crop, seg.stride,
                                          patch=getattr(seg, "patch", None))  # None: the backbone's
        pred = F.interpolate(logits.float(), size=img.shape, mode="bilinear", align_corners=False).argmax(1)
        pred = pred[0].to(torch.uint8).cpu().numpy()  # (H, W) class indices at the image's size
        if label_path:
            conf += unip.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), seg.num_classes)

        colour = data.colorize(pred, seg.palette)  # (H, W, 3)
        grey = np.repeat(img[..., None], 3, 2).astype(np.float32)
        tint = colour.any(-1, keepdims=True) * cfg.alpha  # black classes (background) stay grey
        overlay = (grey * (1 - tint) + colour * tint + 0.5).astype(np.uint8)
        for sub, arr in (("masks", pred), ("overlays", overlay)):
            dst = os.path.join(cfg.out, sub, name)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            Image.fromarray(arr).save(dst)

    done = len(paths) - len(skipped)
    read_as = {"grey": "grey", "luma": "luma of RGB", "alpha": "luma of RGB (constant 4th channel: alpha)",
               "thermal": "4th channel (thermal, by the 4-channel rule)"}
    if sources:
        print("images read as: " + ", ".join(f"{n} {read_as.get(s, s)}" for s, n in sorted(sources.items())))
    print(f"wrote {done} masks and overlays to {cfg.out}/masks, {cfg.out}/overlays"
          + f"; skipped {len(skipped)} files" + (f" that could not be read: {', '.join(skipped)}" if skipped else "")
          + f"; warned about {len(warned)} files" + (f" (see the warnings above): {', '.join(warned)}" if warned else ""))
    if not done:
        raise SystemExit("error: none of the images could be decoded")
    if cfg.labels:  # the images predicted; skipped ones are left out
        table, metrics = scores(conf, seg.classes)
        print(f"scores of the {done} masks against {cfg.labels}: {table}")
        dst = os.path.join(cfg.out, "metrics.json")
        with open(dst + ".tmp", "w") as f:
            json.dump({"images": done, **metrics}, f, indent=1)
        os.replace(dst + ".tmp", dst)
        print(f"wrote {dst}")


if __name__ == "__main__":
    plumbing.run(main)  # a missing file, a damaged checkpoint: one line, no traceback
