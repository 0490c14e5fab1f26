"""
ONNX Runtime against PyTorch eager on this machine, side by side in one run. For each backbone a segmenter as
train_seg.py fine-tunes it (LL-FPN + UperNet; random weights: the speed does not depend on them) is exported with
export.py's code, then both run in fp32 with the same number of threads:
  window: one crop x crop window, batch 1, normalised input -> logits at the window's size;
  frame:  one W x H frame segmented as predict.py does it: short side resized to the crop, sliding windows
          (crop, stride 2/3 crop), logits averaged and resized to the frame, argmax.
The cases alternate within each round, so that load from other processes slows both alike; the table gives
the median of the rounds and the median of the per-round ratios. Prints a Markdown table for docs/speed.md.

    python tools/bench_onnx.py                                  # ViT-T and ViT-S, crop 512, a 640x480 frame
    python tools/bench_onnx.py --models vit_tiny --crop 224 --rounds 3
"""
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plumbing  # noqa: E402
import data  # noqa: E402
import export  # noqa: E402
import predict  # noqa: E402
import unip  # noqa: E402


@dataclass
class Config:
    models: list = field(default_factory=lambda: ["vit_tiny", "vit_small"])  # backbone presets, one row pair each
    crop: int = 512             # the fine-tuning crop: the window size, and the short side frames are resized to
    frame: tuple = (640, 480)   # width and height of the frame segmented by sliding windows
    classes: int = 9            # classes of the head (MFNet's 9)
    rounds: int = 7             # timed rounds after one warm-up round
    threads: int = 0            # threads of both runtimes (0: torch's default, usually the cores)


def cpu_line():
    """The CPU model, its core count and whether it has bf16 / AMX units (from /proc/cpuinfo on Linux)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    units = [u for u, flag in (("AVX512-BF16", "avx512_bf16"), ("AMX-BF16", "amx_bf16")) if flag in flags]
    return f"{name}, {os.cpu_count()} cores, " + (" and ".join(units) if units else "no bf16 matrix units")


def median_ms(times):
    return 1000 * statistics.median(times)


@torch.no_grad()
def main(argv=None):
    cfg = plumbing.parse_config(Config, argv, __doc__)
    export.need(["onnx", "onnxscript", "onnxruntime"])
    import onnxruntime as ort
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()
    print(f"{cpu_line()} | torch {torch.__version__} eager and onnxruntime {ort.__version__}, {threads} "
          f"thread{'s' * (threads > 1)} each | fp32 | load average at start {os.getloadavg()[0]:.2f}")

    W, H = cfg.frame
    grey = (np.linspace(0, 255, W)[None] * np.linspace(0.3, 1, H)[:, None]).astype(np.uint8)  # content does not matter
    x_frame, _ = data.SegEvalTransform(cfg.crop)(grey, None)  # (3, crop, crop * W / H)
    stride = cfg.crop * 2 // 3
    rows, tmp = [], tempfile.TemporaryDirectory(prefix="bench_onnx_")
    for name in cfg.models:
        torch.manual_seed(0)
        backbone = unip.PRESETS[name](img_size=cfg.crop, layer_scale=1.0)
        seg = unip.Segmenter(backbone, cfg.classes).eval()
        seg.classes, seg.palette = [f"class{k}" for k in range(cfg.classes)], [(0, 0, 0)] * cfg.classes
        seg.crop, seg.stride, seg.short_side, seg.config = cfg.crop, stride, cfg.crop, {"model": name}
        window = cfg.crop + -cfg.crop % backbone.patch_size
        path = os.path.join(tmp.name, f"{name}.onnx")
        t0 = time.time()
        export.save(export.to_onnx(seg, window), path, export.metadata(seg, f"{name} (random)", window, 3))
        took = time.time() - t0
        onnx_seg = predict.OnnxSegmenter(path, threads=threads)
        net = export.Logits(seg)
        x_win = torch.randn(1, 3, window, window)
        n_win = len(unip_windows(x_frame.shape[-2:], cfg.crop, stride))

        def frame_mask(model, patch):  # what predict.py does after reading and normalising the frame
            logits = unip.slide_inference(model, x_frame[None], cfg.classes, cfg.crop, stride, patch=patch)
            return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False).argmax(1)

        cases = {("window", "torch"): lambda: net(x_win), ("window", "onnx"): lambda: onnx_seg(x_win),
                 ("frame", "torch"): lambda: frame_mask(seg, None),
                 ("frame", "onnx"): lambda: frame_mask(onnx_seg, onnx_seg.patch)}
        times = {k: [] for k in cases}
        for r in range(cfg.rounds + 1):  # round 0 warms up
            for k, fn in cases.items():
                t = time.perf_counter()
                fn()
                if r:
                    times[k].append(time.perf_counter() - t)
        for what, label in (("window", f"one {window}x{window} window, batch 1"),
                            ("frame", f"a {W}x{H} frame, {n_win} windows of {cfg.crop} (stride {stride})")):
            t_pt, t_ox = times[(what, "torch")], times[(what, "onnx")]
            ratio = statistics.median(a / b for a, b in zip(t_pt, t_ox))
            rows.append(f"| {name} | {label} | {median_ms(t_pt):.0f} | {median_ms(t_ox):.0f} | {ratio:.2f} |")
        print(f"{name}: exported in {took:.0f} s, {os.path.getsize(path) / 1e6:.0f} MB")
    tmp.cleanup()
    print(f"load average at end {os.getloadavg()[0]:.2f}; medians of {cfg.rounds} rounds\n")
    print("| backbone | input | PyTorch eager (ms) | ONNX Runtime (ms) | PyTorch ÷ ONNX Runtime |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


def unip_windows(size, crop, stride):
    """The sliding windows' top-left corners, as unip.slide_inference places them."""
    H, W = size
    ch, cw = min(crop, H), min(crop, W)
    ny, nx = max(H - ch + stride - 1, 0) // stride + 1, max(W - cw + stride - 1, 0) // stride + 1
    return [(min(iy * stride, H - ch), min(ix * stride, W - cw)) for iy in range(ny) for ix in range(nx)]


if __name__ == "__main__":
    plumbing.run(main)
