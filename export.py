"""
Export a train_seg.py checkpoint to ONNX, for ONNX Runtime, TensorRT or any runtime outside Python, and check the
file against PyTorch before trusting it.

    python export.py --checkpoint runs/seg/best.pt                          # -> runs/seg/best.onnx, random input
    python export.py --checkpoint best.pt --out udder.onnx --images frames/ # checked on real frames
    python predict.py --onnx runs/seg/best.onnx --images frames/ --out runs/pred   # masks through ONNX Runtime

Needs the optional packages of requirements-export.txt (onnx, onnxscript; onnxruntime for the check):
pip install -r requirements-export.txt. The exporter is the one torch ships (torch.onnx.export, dynamo=True).

The file holds the network from the normalised input to the logits, in fp32: input (B, C, S, S), the grey frame
normalised as in training, (grey - 96.9255) / 47.8976 on 0..255, the same values in each of the C = 3 channels;
output (B, K, S, S), the logits upsampled bilinearly to the input's size (argmax over K: the class). B is dynamic;
S is the checkpoint's crop, padded to a multiple of the patch (DINOv2: 14) as the sliding windows are. Everything
else a user needs is in the model's metadata_props (strings): the classes and palette (JSON), mean, std, channels,
the rule that turns a file into a grey frame, short side, crop, stride, patch, window, and prose for each step.
A whole frame is segmented as predict.py does: short side resized, windows of crop every stride pixels (the last
aligned to the border, centred zero padding up to the window), logits of overlapping windows averaged, resized to
the frame, argmax.

The check runs the written file with ONNX Runtime and the checkpoint with PyTorch (fp32) on the same input: the
first --check-images frames of --images, windowed as predict.py does, or random windows; it prints the largest
logit difference and the share of pixels whose class agrees, and fails (exit status 1, the file is kept) when
the difference exceeds --atol or the agreement falls below --min-agree.
"""
import json
import logging
import os
import time
import traceback
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import plumbing
import data
import predict
import unip


@dataclass
class Config:
    checkpoint: str = ""        # train_seg.py checkpoint (best.pt or ckpt.pt)
    out: str = ""               # .onnx file to write (default: the checkpoint's path ending in .onnx)
    images: str = ""            # frames to check on (folder, image or .txt list; default: random windows)
    check_images: int = 8       # check on at most this many of --images (sorted by path)
    channel: str = "auto"       # how --images are read, as predict.py: auto (4-channel rule) | luma | N
    opset: int = 0              # ONNX opset (0: the exporter's default; 18 or newer)
    atol: float = 1e-4          # largest logit difference allowed between ONNX Runtime and PyTorch (fp32)
    min_agree: float = 99.99    # smallest share of pixels, in percent, whose class must agree
    check: bool = True          # run the check (--no-check: write the file only; onnxruntime not needed)


class Logits(nn.Module):
    """The network the file holds: normalised windows (B, C, S, S) -> logits (B, K, S, S) at the window's size. The
    head's stride-4 (linear probes: stride-16) logits upsampled as slide_inference does, so that a user can take the
    argmax directly; slide_inference's own upsampling of a same-size map is then an exact copy."""

    def __init__(self, seg):
        super().__init__()
        self.seg = seg

    def forward(self, x):
        return F.interpolate(self.seg(x)[0], size=x.shape[-2:], mode="bilinear", align_corners=False)


def need(modules):
    """Import the optional packages; a missing one ends with the pip command that installs it."""
    missing = []
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise SystemExit(f"error: export.py needs the optional package{'s' * (len(missing) > 1)} {', '.join(missing)}: "
                         f"pip install {' '.join(missing)} (or pip install -r requirements-export.txt)")


def read_train_seg(path):
    """The checkpoint's Segmenter (fp32, CPU, eval), or a one-line refusal naming the file and what to do."""
    ck = unip.load_checkpoint(path)  # missing or damaged file: FileNotFoundError / CheckpointError, one line
    if not isinstance(ck, dict) or "segmenter" not in ck:
        raise SystemExit(f"error: {path} is not a train_seg.py checkpoint (it has no 'segmenter' entry; a pre-trained "
                         "backbone has none): export.py exports a fine-tuned or probed segmenter, so first run "
                         f"python train_seg.py --init {path} ... and export its best.pt")
    return unip.load_segmenter(ck)


def metadata(seg, checkpoint, window, channels):
    """metadata_props of the file: what predict.py --onnx reads back and what a user outside Python needs."""
    cfg = seg.config
    return {
        "format": predict.ONNX_FORMAT,
        "source": os.path.basename(checkpoint),
        "exporter": f"export.py, torch {torch.__version__}",
        "model": str(cfg.get("model", "")),
        "mode": seg.mode,
        "dataset": str(cfg.get("dataset", "")),
        "classes": json.dumps(list(seg.classes)),
        "palette": json.dumps([list(c) for c in seg.palette]),
        "input": f"(B, {channels}, {window}, {window}) float32: a grey frame normalised with mean and std, the same "
                 "values in every channel",
        "mean": repr(data.SEG_MEAN),
        "std": repr(data.SEG_STD),
        "normalisation": "x = (grey - mean) / std, grey on 0..255",
        "channels": str(channels),
        "channel": str(cfg.get("channel", "auto")),
        "thermal_range": str(cfg.get("thermal_range", "")),
        "channel_rule": "a file -> one grey frame (0..255): 8-bit grey or RGB -> ITU-R 601 luma; 16-bit and float "
                        "frames -> linearly LO -> 0, HI -> 255, clipped, when 'thermal_range' is 'LO,HI', else the "
                        "1st..99th percentile of each frame stretched to 0..255; RGBA -> its 4th channel when that "
                        "varies (MFNet's thermal frame), else the luma of its RGB; EXIF orientation applied. "
                        "'channel' is the training run's --channel (auto: this rule)",
        "short_side": str(seg.short_side),
        "crop": str(seg.crop),
        "stride": str(seg.stride),
        "patch": str(seg.backbone.patch_size),
        "window": str(window),
        "sliding_window": "resize the frame (bilinear) so that its short side is short_side; windows of crop x crop "
                          "every stride pixels, the last one aligned to the border; a window whose sides are not "
                          "multiples of patch is zero-padded (centred) to window x window and its logits cropped "
                          "back; average the logits where windows overlap; resize them (bilinear) to the frame",
        "output": "(B, K, window, window) float32 logits at the input's size, K = len(classes); the argmax over K "
                  "is the class index, palette[k] its RGB colour",
    }


def to_onnx(seg, window, opset=0):
    """Logits(seg) through torch's exporter (torch.export, then ONNX): an ONNXProgram with input 'input'
    (B, C, S, S), B dynamic, and output 'logits'. With S fixed every shape but the batch is a constant, so the
    model's shape-dependent Python (patch grid, position-table resampling for DINOv2 presets or a crop that is no
    multiple of the patch) is traced once, as operations on constants, and no data-dependent shape remains."""
    net = Logits(seg).eval()
    channels = seg.backbone.patch_embed.proj.in_channels
    example = torch.randn(2, channels, window, window)  # batch 2, so that the batch is not specialised to 1
    batch = torch.export.Dim("batch", min=1, max=4096)
    kwargs = dict(dynamo=True, input_names=["input"], output_names=["logits"], dynamic_shapes=({0: batch},),
                  external_data=False, verbose=False, **({"opset_version": opset} if opset else {}))
    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed" and progress lines
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            return torch.onnx.export(net, (example,), **kwargs)
    finally:
        quiet.setLevel(level)


def save(program, path, meta):
    """The program with `meta` as metadata_props, written atomically. Weights of more than 1.5 GB (ViT-L) go beside
    the file, in PATH.data, which must stay next to it: one protobuf file cannot exceed 2 GB."""
    program.model.metadata_props.update(meta)
    size = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    if size > 1.5e9:
        program.save(path, external_data=True)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    program.save(tmp, external_data=False)
    os.replace(tmp, path)


@torch.no_grad()
def compare(seg, onnx_seg, paths=(), channel=None, n_random=3):
    """PyTorch (fp32) against ONNX Runtime on the same input: (largest |logit difference|, pixels whose argmax
    agrees, pixels, what ran). Frames are read, resized and windowed as predict.py does (the argmax at the frame's
    size); without paths, n_random random windows of the file's size."""
    diff, same, total = 0.0, 0, 0
    if not paths:
        x = torch.randn(n_random, onnx_seg.channels, onnx_seg.window, onnx_seg.window,
                        generator=torch.Generator().manual_seed(0))
        a, b = Logits(seg)(x), onnx_seg(x)[0]
        same = (a.argmax(1) == b.argmax(1)).sum().item()
        return (a - b).abs().max().item(), same, a.argmax(1).numel(), f"{n_random} random windows"
    to_input = data.SegEvalTransform(seg.short_side)
    thermal = data.parse_thermal_range(seg.config.get("thermal_range", ""))  # as the model was trained
    for path in paths:
        img, _, _ = predict.read_frame(path, channel, rgbt=False, thermal_range=thermal)
        x, _ = to_input(img, None)
        a = unip.slide_inference(seg, x[None], seg.num_classes, seg.crop, seg.stride)
        b = unip.slide_inference(onnx_seg, x[None], seg.num_classes, seg.crop, seg.stride, patch=onnx_seg.patch)
        diff = max(diff, (a - b).abs().max().item())
        ma, mb = (F.interpolate(t, size=img.shape, mode="bilinear", align_corners=False).argmax(1) for t in (a, b))
        same, total = same + (ma == mb).sum().item(), total + ma.numel()
    return diff, same, total, f"{len(paths)} frames"


def check(seg, onnx_seg, out, checkpoint, paths, channel, atol, min_agree):
    """compare(), printed; a difference above `atol` or an agreement below `min_agree` (%) ends the run."""
    diff, same, total, what = compare(seg, onnx_seg, paths, channel)
    agree = 100.0 * same / total
    ok = diff <= atol and agree >= min_agree
    print(f"check on {what} (ONNX Runtime against PyTorch, fp32): largest logit difference {diff:.2e} (limit "
          f"{atol:g}); classes agree on {agree:.4f}% of {total:,} pixels, {total - same:,} differ (limit "
          f"{min_agree:g}%): " + ("passed" if ok else "FAILED"))
    if not ok:
        raise SystemExit(f"error: {out} does not compute what {checkpoint} computes (largest logit difference "
                         f"{diff:.2e}, limit {atol:g}; classes agree on {agree:.4f}%, limit {min_agree:g}%): the file "
                         "is kept for inspection, but do not deploy it; report this with your torch, onnxscript and "
                         "onnxruntime versions")
    return diff, agree


def main(argv=None):
    # ------------------------------------------------------------------ config and packages
    cfg = plumbing.parse_config(Config, argv, __doc__)
    if not cfg.checkpoint:
        raise SystemExit("give --checkpoint (a train_seg.py checkpoint)")
    out = cfg.out or os.path.splitext(cfg.checkpoint)[0] + ".onnx"
    need(["onnx", "onnxscript"] + (["onnxruntime"] if cfg.check else []))
    paths = predict.image_paths(cfg.images)[0][:cfg.check_images] if cfg.images and cfg.check else []
    channel = data.parse_channel(cfg.channel)

    # ------------------------------------------------------------------ model
    seg = read_train_seg(cfg.checkpoint)
    patch = seg.backbone.patch_size
    window = seg.crop + -seg.crop % patch  # slide_inference pads windows to a multiple of the patch
    channels = seg.backbone.patch_embed.proj.in_channels
    print(f"{cfg.checkpoint}: {seg.config.get('model')} {seg.mode}, {seg.num_classes} classes ({', '.join(seg.classes)}) "
          f"| window {window} (crop {seg.crop}, patch {patch}), stride {seg.stride}, short side {seg.short_side} "
          f"| torch {torch.__version__}")

    # ------------------------------------------------------------------ export
    t0 = time.time()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    try:
        program = to_onnx(seg, window, cfg.opset)
    except Exception as e:
        log = out + ".error.txt"
        with open(log, "w") as f:
            f.write(traceback.format_exc())
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SystemExit(f"error: torch {torch.__version__} could not export {cfg.checkpoint} to ONNX "
                         f"({type(e).__name__}: {first}); the full trace is in {log}. Install the newest torch and "
                         "onnxscript (pip install -U torch onnxscript) and export again; if it still fails, report the "
                         "trace") from None
    save(program, out, metadata(seg, cfg.checkpoint, window, channels))
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB, opset {program.model.opset_imports.get('', '?')}, "
          f"input (B, {channels}, {window}, {window}), output (B, {seg.num_classes}, {window}, {window})) "
          f"in {time.time() - t0:.0f} s")

    # ------------------------------------------------------------------ check
    if cfg.check:
        check(seg, predict.OnnxSegmenter(out), out, cfg.checkpoint, paths, channel, cfg.atol, cfg.min_agree)


if __name__ == "__main__":
    plumbing.run(main)  # a missing or damaged checkpoint, an unreadable image: one line, no traceback
