"""Tests of the segmentation side: unip.py §7 (LL-FPN, UperNet, probes, layer decay, sliding window, mIoU,
head initialisation) and train_seg.py (schedule, loss, the reference's defaults, 2-step runs of every mode,
--init, resume, torchrun, srun without torchrun (SLURM's variables, host lists), SCUT-Seg label forms, fp16,
labels that cannot teach a class, damaged checkpoints, a real folder set). CPU only.
UNIP_SAMPLE_DATA=/path/to/shared/data enables the tests on real thermal images."""
import json
import math
import os
import shutil
import socket
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
import plumbing  # noqa: E402
import data  # noqa: E402
import train_seg  # noqa: E402
import unip  # noqa: E402
from conftest import run_main  # noqa: E402

# tiny runs: vit_tiny at 64 px (4x4 patches), batch 2, one evaluation image
SMALL = ["--crop", "64", "--batch-size", "2", "--eval-images", "1", "--workers", "0", "--log-every", "1"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args, ok=True, cmd=None):
    """train_seg.py with these arguments: in this process (conftest.run_main), or as the command `cmd` (torchrun,
    another script) -> returncode, stdout, stderr."""
    if cmd is None:
        p = run_main("train_seg.py", *args)
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        p = subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def rows(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def tiny_seg(mode="finetune", img=64, **kw):
    return unip.Segmenter(unip.vit_tiny(img_size=img), num_classes=5, mode=mode, **kw)


# ----------------------------------------------------------------------------- pyramid and heads


@pytest.mark.parametrize("preset,dim", [("vit_tiny", 192), ("vit_small", 384), ("vit_base", 768)])
def test_llfpn_strides_and_channels_on_last_block(preset, dim):
    vit = unip.PRESETS[preset](img_size=64).eval()
    x = torch.randn(2, 3, 64, 96)
    last = vit.features(x, [12])[0]  # (B, D, 4, 6): stride 16
    with torch.no_grad():  # the last block's output, patch tokens, no final norm
        t = vit.prepare_tokens(x)
        for blk in vit.blocks:
            t = blk(t)
        assert torch.allclose(last, t[:, 1:].transpose(1, 2).reshape(2, dim, 4, 6), atol=1e-5)
        pyr = unip.LLFPN(dim).eval()([last] * 4)
    assert [tuple(p.shape) for p in pyr] == [(2, dim, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    assert torch.equal(pyr[2], last)  # stride 16 is the map itself
    assert torch.equal(pyr[3], F.max_pool2d(last, 2))


def test_segmenter_pyramid_layers():
    assert tiny_seg().layers == (12,) * 4  # LL-FPN: the last block, four times
    assert tiny_seg(layers=(4, 6, 8, 12)).layers == (4, 6, 8, 12)  # multi-layer baseline
    assert tiny_seg("linear").layers == (4, 6, 8, 12)
    assert tiny_seg("layer-linear").layers == (12,)
    with pytest.raises(ValueError, match="out of range"):
        tiny_seg("layer-linear", layers=(13,))


def test_uperhead_and_aux_shapes_and_upsampling_to_the_label():
    seg = tiny_seg()
    x, y = torch.randn(2, 3, 64, 96), torch.randint(0, 5, (2, 64, 96))
    out, aux = seg.train()(x)
    assert out.shape == (2, 5, 16, 24) and aux.shape == (2, 5, 4, 6)  # stride 4 and stride 16
    assert seg.head.classifier.in_channels == 192 and seg.aux_head.classifier.in_channels == 256  # channels = D, 256
    assert [p[0].output_size for p in seg.head.ppm] == [1, 2, 3, 6]
    up = F.interpolate(out, size=y.shape[-2:], mode="bilinear", align_corners=False)
    assert up.shape == (2, 5, 64, 96)
    assert torch.allclose(unip.seg_loss(out, y), F.cross_entropy(up, y))
    out, aux = seg.eval()(x)
    assert aux is None and out.shape == (2, 5, 16, 24)


def test_seg_loss_ignores_255_and_averages_over_all_pixels():
    logits = torch.randn(1, 3, 4, 4)
    y = torch.randint(0, 3, (1, 8, 8))
    y[0, :4] = 255
    full = F.cross_entropy(F.interpolate(logits, (8, 8), mode="bilinear"), y, ignore_index=255, reduction="none")
    assert torch.allclose(unip.seg_loss(logits, y), full.sum() / 64)  # mmseg 0.11: ignored pixels count 0
    assert unip.seg_loss(logits, torch.full((1, 8, 8), 255)).item() == 0.0  # not NaN


def test_weighted_seg_loss_is_the_mean_of_per_pixel_weighted_losses():
    torch.manual_seed(0)
    logits, w = torch.randn(2, 3, 4, 4), torch.tensor([0.5, 2.0, 1.5])
    y = torch.randint(0, 3, (2, 8, 8))
    y[0, :3] = 255
    logp = F.log_softmax(F.interpolate(logits, (8, 8), mode="bilinear"), 1)  # (2, 3, 8, 8)
    naive = 0.0
    for b in range(2):
        for i in range(8):
            for j in range(8):
                c = int(y[b, i, j])
                naive += 0.0 if c == 255 else -w[c] * logp[b, c, i, j]  # ignored pixels add 0 but still count
    assert torch.allclose(unip.seg_loss(logits, y, weight=w), naive / 128)   # mmseg 0.11: over all pixels
    assert torch.allclose(unip.seg_loss(logits, y, weight=torch.ones(3)), unip.seg_loss(logits, y))
    assert unip.seg_loss(logits, torch.full((2, 8, 8), 255), weight=w).item() == 0.0  # all ignored: 0, not NaN


def test_enet_class_weights_on_a_hand_made_label_set(tmp_path, capsys):
    labs = [np.zeros((4, 5), np.uint8), np.zeros((4, 5), np.uint8)]
    labs[0][:2] = 1          # 10 pixels of class 1
    labs[1][0, :4] = 2       # 4 of class 2
    labs[1][3] = 255         # 5 ignored; class 3: none
    fake_folder(tmp_path, labs)
    ds = data.SegFolder(tmp_path / "images", tmp_path / "labels", classes=["bg", "one", "two", "none"])
    p = np.array([21, 10, 4, 0]) / 35  # of the 35 labelled pixels
    want = [1 / math.log(1.02 + v) for v in p]
    assert np.allclose(train_seg.enet_weights(ds.label_counts()[:4]), want)
    cfg = train_seg.parse_config(["--dataset", "folder", "--classes", "bg,one,two,none", "--class-weight", "auto"])
    w = train_seg.loss_weights(cfg, ds, None, None, print)
    assert w.dtype == torch.float32 and np.allclose(w.numpy(), want) and math.isclose(w[3].item(), 1 / math.log(1.02), rel_tol=1e-6)
    out = capsys.readouterr().out
    assert "counting the labels of 2 training images" in out and "  none  50.4983     0.00% of the pixels" in out
    assert train_seg.loss_weights(train_seg.parse_config(["--dataset", "folder", "--classes", "4"]), ds, None, None,
                                  print) is None  # default: plain cross-entropy
    cfg = train_seg.parse_config(["--dataset", "folder", "--classes", "4", "--class-weight", "1,2,0,3.5"])
    assert train_seg.loss_weights(cfg, ds, None, None, print).tolist() == [1, 2, 0, 3.5]
    # the synthetic scenes are counted the same way: their rendered labels, no augmentation
    syn = data.SyntheticThermal("train", num_images=2, size=(32, 40))
    assert np.array_equal(syn.label_counts(), sum(np.bincount(syn.load(i)[1].ravel(), minlength=256) for i in range(2)))


def test_class_weight_usage_errors(capsys):
    for argv, msg in (
            (["--class-weight", "1,2"], "2 weights given, but the dataset has 8 classes (sky, road, sidewalk, building, "
                                        "vegetation, pole, person, car): give 8 comma-separated weights"),
            (["--dataset", "mfnet", "--class-weight", "1,2,3"], "has 9 classes (background, car, person, bike, curve"),
            (["--dataset", "folder", "--classes", "bg,udder", "--class-weight", "1,2,3"], "has 2 classes (bg, udder)"),
            (["--class-weight", "one,two"], "expected auto, or one weight >= 0 per class"),
            (["--class-weight", "1,-1,1,1,1,1,1,1"], "expected auto, or one weight >= 0 per class"),
            (["--thermal-range", "24000,20000"], "--thermal-range '24000,20000': expected LO,HI")):
        with pytest.raises(SystemExit) as e:
            train_seg.parse_config(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "usage: " in err and msg in err, err


def test_poly_schedule_with_warmup():
    base, T, W = 1e-4, 100, 10
    lr = [train_seg.poly_lr(s, base, T, W) for s in range(T + 1)]
    assert math.isclose(lr[0], base * 1e-6)
    for s in range(T + 1):  # mmseg: poly (power 1) times the linear warm-up factor
        k = (1 - s / W) * (1 - 1e-6) if s < W else 0.0
        assert math.isclose(lr[s], base * (1 - s / T) * (1 - k), rel_tol=1e-12, abs_tol=1e-20)
    assert math.isclose(lr[W], base * 0.9) and lr[T] == 0.0
    assert all(a > b for a, b in zip(lr[W:], lr[W + 1:]))


def test_param_groups_match_the_recipe():
    seg = tiny_seg()
    seg.backbone.pos_embed.requires_grad_(True)  # trained when fine-tuning, as train_seg.py does
    groups = unip.param_groups(seg, weight_decay=0.05, layer_decay=0.85)
    scale, wd = {}, {}
    for g in groups:
        for n in g["names"]:
            assert n not in scale, f"{n} in two groups"
            scale[n], wd[n] = g["lr_scale"], g["weight_decay"]
    trainable = {n for n, p in seg.named_parameters() if p.requires_grad}
    assert set(scale) == trainable and not any(n.startswith("backbone.norm.") for n in scale)
    for n in ("backbone.patch_embed.proj.weight", "backbone.cls_token", "backbone.pos_embed"):
        assert math.isclose(scale[n], 0.85 ** 13)  # embeddings: 0.85^(depth+1)
    assert math.isclose(scale["backbone.blocks.0.attn.qkv.weight"], 0.85 ** 12)
    assert math.isclose(scale["backbone.blocks.11.mlp.fc1.weight"], 0.85)  # last block
    for n in ("pyramid.fpn1.0.weight", "head.classifier.weight", "aux_head.conv.0.weight"):
        assert scale[n] == 1.0  # heads
    for n, p in seg.named_parameters():
        if n in wd:
            no_wd = p.ndim == 1 or n.endswith(".bias")
            assert wd[n] == (0.0 if no_wd else 0.05), n
    # the reference's layer-decay constructor tests the unprefixed names 'pos_embed' / 'cls_token' against
    # 'backbone.pos_embed' / 'backbone.cls_token', so in effect it decays them: as here
    assert wd["backbone.pos_embed"] == wd["backbone.cls_token"] == 0.05
    assert wd["backbone.blocks.3.attn.qkv.weight"] == 0.05 and wd["backbone.blocks.3.norm1.weight"] == 0.0


def test_heads_initialised_as_mmseg():
    # mmseg 0.11: ConvModule convs kaiming-normal (fan_out, relu), decode heads' conv_seg N(0, 0.01), bias 0
    seg = unip.Segmenter(unip.vit_small(img_size=64), num_classes=5)
    for conv in (seg.head.fpn[0][0], seg.head.fuse[0], seg.head.lateral[1][0], seg.aux_head.conv[0]):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert abs(conv.weight.std().item() / math.sqrt(2 / fan_out) - 1) < 0.05 and conv.bias is None
    for cls in (seg.head.classifier, seg.aux_head.classifier, tiny_seg("linear").head):
        assert abs(cls.weight.std().item() - 0.01) < 0.002 and abs(cls.weight.mean().item()) < 0.002
        assert not cls.bias.any()


# ----------------------------------------------------------------------------- evaluation


def test_miou_on_a_hand_made_case():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 3]])
    conf = unip.confusion_matrix(pred, label, num_classes=4)
    expect = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 1], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(conf, expect)  # rows = truth, columns = prediction; the 255 pixel is skipped
    iou = unip.iou_from_confusion(conf)
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FP 1, FN 1 -> 1/2; class 2: 1/(1+0+1); class 3: 0/1
    assert torch.allclose(iou, torch.tensor([1 / 3, 1 / 2, 1 / 2, 0.0], dtype=torch.float64))
    assert math.isclose(unip.mean_iou(conf), (1 / 3 + 1 / 2 + 1 / 2 + 0) / 4)
    conf5 = unip.confusion_matrix(pred, label, num_classes=5)  # class 4 in neither: NaN, left out of the mean
    assert math.isnan(unip.iou_from_confusion(conf5)[4].item())
    assert math.isclose(unip.mean_iou(conf5), unip.mean_iou(conf))


def test_class_accuracy_and_macc_on_a_hand_made_case(tmp_path, capsys):
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 3]])
    conf = unip.confusion_matrix(pred, label, num_classes=4)  # [[1,1,0,0],[0,2,0,1],[1,0,1,0],[0,0,0,0]]
    acc = unip.acc_from_confusion(conf)
    # recall: class 0 1 of 2 truth pixels, class 1 2 of 3, class 2 1 of 2; class 3 has no truth pixel: NaN, left out
    assert torch.allclose(acc[:3], torch.tensor([1 / 2, 2 / 3, 1 / 2], dtype=torch.float64)) and math.isnan(acc[3])
    # train_seg.py's report: table, log row, per_image.json, (mIoU, mAcc)
    val = type("Val", (), {"classes": ["a", "b", "c", "d"], "name": lambda self, i: f"img{i}"})()
    per_image = [(0, conf.diag().tolist(), (conf.sum(0) + conf.sum(1) - conf.diag()).tolist(), conf.sum(1).tolist())]
    miou, macc = train_seg.report(conf, [], per_image, val, 7, 0, str(tmp_path), True)
    assert math.isclose(macc, 100 * (1 / 2 + 2 / 3 + 1 / 2) / 3) and math.isclose(miou, 100 * unip.mean_iou(conf))
    table = capsys.readouterr().out
    assert "IoU    Acc" in table and "  b            50.00  66.67" in table and "  d             0.00      -" in table
    assert "  mIoU / mAcc  33.33  55.56\n  pixel acc    57.14" in table
    row = rows(tmp_path)[-1]
    assert math.isclose(row["macc"], macc) and row["class_acc"]["d"] is None and math.isclose(row["class_acc"]["b"], 200 / 3)
    assert math.isclose(row["acc"], 100 * 4 / 7, rel_tol=1e-6)  # pixel accuracy, as before
    img = json.loads((tmp_path / "per_image.json").read_text())["images"]["img0"]
    assert img["gt"] == [2, 3, 2, 0] and img["acc"][3] is None and math.isclose(img["acc"][1], 200 / 3)


def test_slide_inference_single_window_equals_whole_image():
    seg = tiny_seg().eval()
    for H, W in [(64, 64), (48, 64)]:
        img = torch.randn(1, 3, H, W)
        whole = F.interpolate(seg(img)[0], size=(H, W), mode="bilinear", align_corners=False)
        assert torch.allclose(unip.slide_inference(seg, img, 5, crop=64, stride=43), whole, atol=1e-5)


@pytest.mark.parametrize("H,W,crop,stride", [(100, 77, 32, 21), (131, 70, 64, 43), (33, 97, 32, 31), (20, 50, 32, 21)])
def test_slide_inference_covers_every_pixel_at_odd_sizes(H, W, crop, stride):
    img = torch.randn(2, 3, H, W)
    calls = []

    def identity(x):  # logits = the window itself: the average of the windows must give back the image
        calls.extend([tuple(x.shape[-2:])] * (x.shape[0] // 2))  # one entry per window (2 images each, batched)
        return x, None

    out = unip.slide_inference(identity, img, 3, crop=crop, stride=stride)
    assert torch.allclose(out, img, atol=1e-6)  # every pixel covered (else NaN) and every window in place
    ones = unip.slide_inference(lambda x: (torch.ones(x.shape[0], 4, x.shape[2] // 4, x.shape[3] // 4), None),
                                img, 4, crop=crop, stride=stride)
    assert torch.isfinite(ones).all() and torch.allclose(ones, torch.ones_like(ones))
    ch, cw = min(crop, H), min(crop, W)
    n = lambda L, c: max(L - c + stride - 1, 0) // stride + 1
    assert len(calls) == n(H, ch) * n(W, cw) and set(calls) == {(ch, cw)}


@pytest.mark.parametrize("mode", ["linear", "layer-linear"])
def test_linear_probe_leaves_the_backbone_unchanged(mode):
    seg = tiny_seg(mode)
    before = {k: v.clone() for k, v in seg.backbone.state_dict().items()}
    head0 = seg.head.weight.detach().clone()
    opt = torch.optim.AdamW(unip.param_groups(seg, 0.05, 1.0), lr=1e-2)
    assert all(g["lr_scale"] == 1.0 for g in opt.param_groups)
    seg.train()
    assert not seg.backbone.training  # frozen backbone: no stochastic depth
    for _ in range(3):
        out, aux = seg(torch.randn(2, 3, 64, 64))
        loss = unip.seg_loss(out, torch.randint(0, 5, (2, 64, 64)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert aux is None and out.shape == (2, 5, 4, 4)  # stride 16
    assert all(torch.equal(before[k], v) for k, v in seg.backbone.state_dict().items())
    assert not torch.equal(head0, seg.head.weight)


def test_grad_checkpoint_fine_tuning_step_gives_the_same_loss_gradients_and_statistics():
    # drop path 0.3 (backbone) and Dropout2d (heads) draw from the global RNG; BatchNorm sits outside the
    # checkpointed blocks, so its running statistics are updated once per forward either way
    torch.manual_seed(0)
    seg = unip.Segmenter(unip.vit_tiny(img_size=64, drop_path=0.3, drop_path_schedule="linear", layer_scale=1.0), 5)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    seg.train()
    state0 = {k: v.clone() for k, v in seg.state_dict().items()}
    runs = []
    for ckpt in (False, True):
        seg.load_state_dict(state0)
        seg.zero_grad(set_to_none=True)
        seg.backbone.grad_checkpoint = ckpt
        torch.manual_seed(1)
        out, aux = seg(x)
        loss = unip.seg_loss(out, y) + 0.4 * unip.seg_loss(aux, y)
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in seg.named_parameters() if p.grad is not None},
                     {k: v.clone() for k, v in seg.state_dict().items() if "running" in k}))
    (l0, g0, bn0), (l1, g1, bn1) = runs
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    assert set(g0) == set(g1) and "backbone.blocks.0.attn.qkv.weight" in g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
    for k in bn0:
        assert torch.equal(bn0[k], bn1[k]), k


# ----------------------------------------------------------------------------- train_seg.py runs


def test_config_cli():
    cfg = train_seg.parse_config(["--batch-size", "3", "--keep-distilled-heads", "--label-map", "255:1"])
    assert cfg.batch_size == 3 and cfg.keep_distilled_heads and cfg.label_map == "255:1" and cfg.lr == 1e-4
    assert train_seg.parse_config([]) == train_seg.Config()


def test_reference_defaults_and_the_vit_large_recipe():
    d = train_seg.Config()  # every reference config: init_values=1. (layer scale); evaluation every 800 / 700
    assert d.layer_scale == 1.0 and d.eval_every == -1 and train_seg.EVAL_EVERY == {"soda": 800, "mfnet": 700, "scut": 800}
    assert (d.drop_path, d.layer_decay, d.pyramid, d.batch_size) == (0.1, 0.85, "ll", 0)
    # ViT-L: drop path 0.2, layer decay 0.65, out_indices [7, 11, 15, 23], samples_per_gpu 2 ...
    cfg = train_seg.parse_config(["--model", "vit_large"])
    assert (cfg.drop_path, cfg.layer_decay, cfg.pyramid, cfg.batch_size) == (0.2, 0.65, "multi", 2)
    assert unip.multi_layers(24) == (8, 12, 16, 24)
    # ... unless a flag says otherwise (abbreviated flags included)
    cfg = train_seg.parse_config(["--model", "vit_large", "--drop-path", "0.1", "--layer-dec", "0.85", "--pyramid", "ll"])
    assert (cfg.drop_path, cfg.layer_decay, cfg.pyramid, cfg.batch_size) == (0.1, 0.85, "ll", 2)
    assert train_seg.parse_config(["--model", "vit_small"]).drop_path == 0.1


def test_check_labels_refuses_0_255_masks_and_warns_about_absent_classes():
    counts = np.zeros(256, np.int64)
    counts[0], counts[255] = 95, 5  # binary masks read without --label-map: the foreground is all "ignore"
    with pytest.raises(SystemExit, match=r"only the values 0 and 255.*udder never learnt.*--label-map 255:1"):
        train_seg.check_labels(counts, ["background", "udder"], 60)
    counts[1], counts[255] = 5, 0
    assert train_seg.check_labels(counts, ["background", "udder"], 60) is None
    counts[7] = 1  # a value that is no class: refused before training, not in a loader worker
    with pytest.raises(SystemExit, match=r"values \[7\] that are neither classes 0\.\.1 nor the ignore value"):
        train_seg.check_labels(counts, ["background", "udder"], 60)
    counts[7] = 0
    warning = train_seg.check_labels(counts, ["background", "udder", "tail"], 60)
    assert warning.startswith("WARNING: 1 of 3 classes never occur in the 60 training label files: tail.")
    assert "0: 95.0%, 1: 5.0%" in warning and "--label-map" in warning


def test_evaluation_runs_sdpa_and_gives_training_back_its_attention_path():
    # a CPU bf16 fine-tuning trains with the explicit softmax; evaluation (no gradients) runs SDPA, then restores
    val = data.SyntheticThermal("val", num_images=3, transform=data.SegEvalTransform(short_side=64), seed=0)
    seg = unip.Segmenter(unip.vit_tiny(img_size=64), val.num_classes, "finetune")
    unip.set_fused_attention(seg, False)
    seen = []
    for blk in seg.backbone.blocks:
        blk.attn.register_forward_pre_hook(lambda m, a: seen.append(m.fused))
    rt = plumbing.Runtime(ddp=False, rank=0, local_rank=0, world=1, device=torch.device("cpu"), master=True)
    conf, samples, per_image = train_seg.evaluate(seg, val, 2, 64, 42, lambda: torch.autocast("cpu", enabled=False),
                                                  rt, num_samples=1)
    assert seen and all(seen)
    assert seg.training and not any(blk.attn.fused for blk in seg.backbone.blocks)
    # every labelled pixel of the 2 images, at the label's own size, counted once
    labelled = sum(int((torch.as_tensor(val.load(i)[1]) != 255).sum()) for i in range(2))
    assert conf.shape == (val.num_classes,) * 2 and int(conf.sum()) == labelled
    assert [i for i, _ in samples] == [0] and samples[0][1].shape == val.load(0)[1].shape
    # per image: intersections, unions and ground-truth pixels that add up to the summed confusion's
    assert [r[0] for r in per_image] == [0, 1]
    inter, union = torch.tensor([r[1] for r in per_image]).sum(0), torch.tensor([r[2] for r in per_image])
    assert torch.equal(inter, conf.diag())
    assert torch.equal(union.sum(0), conf.sum(0) + conf.sum(1) - conf.diag())  # pixel counts add up over images
    assert torch.equal(torch.tensor([r[3] for r in per_image]).sum(0), conf.sum(1))


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory):
    """A train_pretrain.py-style checkpoint: a vit_tiny student at 32 px with a 16-head last block."""
    torch.manual_seed(1)
    vit = unip.vit_tiny(img_size=32, last_heads=16)
    path = tmp_path_factory.mktemp("init") / "student.pt"
    unip.save_checkpoint({"model": vit.state_dict(), "optimizer": {}, "epoch": 99,
                          "config": {"model": "vit_tiny", "last_heads": 16, "img_size": 32}}, path)
    return path, vit.state_dict()


def test_finetune_from_init_with_distilled_heads_and_layer_scale(tmp_path, pretrain_ckpt):
    path, sd = pretrain_ckpt
    p = run("--out", tmp_path, "--steps", 2, *SMALL, "--workers", 1, "--init", path, "--keep-distilled-heads",
            "--layer-scale", 1.0)
    n = len(sd)
    assert f"loaded {n} tensors from {path} (pos_embed 2x2 -> 4x4)" in p.stdout  # every backbone key
    assert "kept at init: blocks.N.gamma_1, blocks.N.gamma_2" in p.stdout and "last block 16 heads" in p.stdout
    ck = unip.load_checkpoint(tmp_path / "ckpt.pt")
    assert ck["step"] == 2 and ck["config"]["mode"] == "finetune" and "backbone.blocks.0.gamma_1" in ck["model"]
    assert ck["model"]["backbone.pos_embed"].shape == (1, 17, 192)
    assert any("miou" in r and set(r["iou"]) == set(ck["classes"]) for r in rows(tmp_path))
    assert (tmp_path / "best.pt").exists() and list(tmp_path.glob("pred_*.png"))
    p = run("--out", tmp_path, *SMALL, "--layer-scale", 1.0, "--keep-distilled-heads", "--init", path,
            "--resume", tmp_path / "best.pt", "--eval-only")
    assert "mIoU" in p.stdout and sum("miou" in r for r in rows(tmp_path)) == 2
    p = run("--out", tmp_path, *SMALL, "--resume", tmp_path / "best.pt", "--eval-only", ok=False)
    assert p.returncode != 0 and "16 heads in the last block, this model 3" in p.stderr  # a silent mismatch otherwise


@pytest.mark.parametrize("mode,extra,head_in", [("linear", [], 4 * 192), ("layer-linear", ["--layer", 6], 192)])
def test_linear_runs_keep_the_pretrained_backbone(tmp_path, pretrain_ckpt, mode, extra, head_in):
    path, sd = pretrain_ckpt
    p = run("--out", tmp_path, "--steps", 2, *SMALL, "--init", path, "--mode", mode, *extra)
    assert "last block 3 heads" in p.stdout  # default: the distilled block re-split into the preset's heads
    ck = unip.load_checkpoint(tmp_path / "ckpt.pt")
    assert ck["model"]["head.weight"].shape == (8, head_in, 1, 1)
    for k, v in sd.items():
        want = unip.resample_pos_embed(v, (4, 4)) if k == "pos_embed" else v
        assert torch.equal(ck["model"]["backbone." + k], want), k
    assert any("miou" in r for r in rows(tmp_path))


def test_resume_continues_exactly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # drop_path 0.1 and Dropout2d draw from the global RNG: it must be restored; the multi-layer pyramid here
    args = ["--iters", 4, "--pyramid", "multi", *SMALL]
    run("--out", a, "--steps", 2, *args)
    assert unip.load_checkpoint(a / "ckpt.pt")["step"] == 2
    # a diverging continuation (lr 1e38: NaN by step 4) raises and names the last good checkpoint, left as it was
    p = run("--out", tmp_path / "nan", "--resume", a / "ckpt.pt", "--lr", 1e38, *args, ok=False)
    assert "FloatingPointError: non-finite loss at step" in p.stderr and f"last good checkpoint: {a / 'ckpt.pt'}" in p.stderr
    assert not (tmp_path / "nan" / "ckpt.pt").exists() and unip.load_checkpoint(a / "ckpt.pt")["step"] == 2
    # a checkpoint of another architecture: the settings that differ are named, no traceback
    p = run("--out", tmp_path / "x", "--resume", a / "ckpt.pt", "--eval-only", "--layer-scale", 0, *args, ok=False)
    assert "does not fit this model" in p.stderr and "written with --layer-scale 1.0" in p.stderr
    assert "Traceback" not in p.stderr
    p = run("--out", a, "--resume", "auto", *args)
    assert "resumed from" in p.stdout and "finetune on blocks (4, 6, 8, 12)" in p.stdout
    run("--out", b, *args)
    wa, wb = unip.load_checkpoint(a / "ckpt.pt"), unip.load_checkpoint(b / "ckpt.pt")
    assert wa["step"] == wb["step"] == 4
    for k in wb["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
    assert [r["loss"] for r in rows(a) if "loss" in r] == [r["loss"] for r in rows(b) if "loss" in r]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def srun(cmd, ntasks, **extra):
    """What `srun --ntasks=N python ...` starts: N processes, each told its rank by SLURM's variables
    only (no RANK). -> their (return code, stdout + stderr); all are killed when one fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", SLURM_NTASKS=str(ntasks), MASTER_PORT=str(free_port()), **extra)
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(ntasks)]
    try:
        return [(p.returncode, out) for p in procs for out, _ in [p.communicate(timeout=300)]]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_resume_keeps_the_counted_class_weights(tmp_path):
    args = ["--iters", 3, "--train-images", 4, *SMALL]
    p = run("--out", tmp_path, "--steps", 1, "--class-weight", "auto", *args)
    assert "class weights of the loss (auto: ENet's 1 / ln(1.02 + p)" in p.stdout and "counting the labels of 4" in p.stdout
    ck = unip.load_checkpoint(tmp_path / "ckpt.pt")
    assert ck["config"]["class_weight"] == "auto" and ck["class_weight"].shape == (8,) and ck["class_weight"].min() > 1
    # weights only the checkpoint holds: a resumed run that counted again could not find them
    ck["class_weight"] = torch.arange(1.0, 9.0)
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        unip.save_checkpoint(ck, tmp_path / d / "ckpt.pt")
    p = run("--out", tmp_path / "a", "--resume", "auto", "--steps", 2, "--class-weight", "auto", *args)
    assert "auto, from the resumed checkpoint (not counted again)" in p.stdout and "counting" not in p.stdout
    assert torch.equal(unip.load_checkpoint(tmp_path / "a" / "ckpt.pt")["class_weight"], torch.arange(1.0, 9.0))
    # the loss used them: the same step with the same weights given by hand has the same loss
    p = run("--out", tmp_path / "b", "--resume", "auto", "--steps", 2, "--class-weight", "1,2,3,4,5,6,7,8", *args)
    assert "note: " in p.stdout and "was trained with --class-weight auto, this run goes on with 1,2,3,4,5,6,7,8" in p.stdout
    loss = lambda d: [r["loss"] for r in rows(tmp_path / d) if "loss" in r]
    assert len(loss("a")) == 1 and loss("a") == loss("b")


def test_mfnet_day_split_16bit_frames_with_a_fixed_range_and_auto_weights(tmp_path):
    root, out, rng = tmp_path / "mfnet", tmp_path / "run", np.random.default_rng(0)
    for d in ("thermal_imgs", "labels"):
        (root / d).mkdir(parents=True)
    frames = {}
    for k, stem in enumerate(["00001D", "00002N", "00003D", "00004N", "00005D"]):
        lab = blobs([1, 2], k=k)
        frames[stem] = (20000 + 800 * lab.astype(np.float32) + rng.normal(0, 100, lab.shape)).astype(np.uint16)
        Image.fromarray(frames[stem]).save(root / "thermal_imgs" / f"{stem}.png")  # 16-bit radiometric
        Image.fromarray(lab).save(root / "labels" / f"{stem}.png")
    (root / "train.txt").write_text("00001D\n00002N\n00004N\n00005D\n")
    (root / "test_day.txt").write_text("00003D\n")
    args = ["--out", out, *SMALL, "--dataset", "mfnet", "--data-root", root, "--thermal-range", "19000,23000"]
    p = run(*args, "--steps", 1, "--val-split", "test_day", "--class-weight", "auto")
    assert "16-bit / float frames: raw 19000..23000 -> 0..255, clipped, the same for every frame" in p.stdout
    assert "class weights of the loss (auto" in p.stdout and "counting" not in p.stdout  # the label check's count
    ck = unip.load_checkpoint(out / "ckpt.pt")
    assert ck["config"]["thermal_range"] == "19000,23000" and ck["class_weight"].shape == (9,)
    ev = [r for r in rows(out) if "miou" in r][-1]
    assert set(ev["class_acc"]) == set(data.MFNET_CLASSES) and 0 <= ev["macc"] <= 100
    assert ev["class_acc"]["bump"] is None  # no ground-truth pixel: left out of mAcc
    assert list(json.loads((out / "per_image.json").read_text())["images"]) == ["00003D"]
    # evaluation decoded the test_day frame with the fixed range: the grey panel of its picture
    panel = np.array(Image.open(out / "pred_00003D.png"))[:, :64, 0]
    assert np.array_equal(panel, data.range_to_uint8(frames["00003D"], 19000, 23000))
    p = run(*args, "--val-split", "test_night", ok=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert f"split 'test_night' needs the list file {root / 'test_night.txt'}" in p.stderr


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_torchrun_two_processes_gloo_and_srun_without_torchrun_agree(tmp_path):
    torchrun = [shutil.which("torchrun"), "--standalone", "--nproc_per_node=2", str(ROOT / "train_seg.py")]
    # 2 images per process; rank 1 has no evaluation image (1 image over 2 ranks): its share of the sum is 0
    args = ["--steps", 2, "--device", "cpu", *SMALL]
    run("--out", tmp_path / "torchrun", *args, cmd=torchrun)
    ck = unip.load_checkpoint(tmp_path / "torchrun" / "ckpt.pt")
    assert ck["step"] == 2 and len(ck["rng"]["ranks"]) == 2
    assert any("miou" in r for r in rows(tmp_path / "torchrun"))
    # srun alone: rank 0's address from the host list, as on a cluster
    tasks = srun([sys.executable, "train_seg.py", "--out", str(tmp_path / "srun"), *map(str, args)], 2,
                 SLURM_JOB_NODELIST="localhost")
    assert [rc for rc, _ in tasks] == [0, 0], tasks[0][1][-3000:] + tasks[1][1][-3000:]
    assert "world 2" in tasks[0][1]
    ck2 = unip.load_checkpoint(tmp_path / "srun" / "ckpt.pt")
    assert ck2["step"] == 2 and ck2["model"].keys() == ck["model"].keys()
    for k in ck["model"]:
        assert torch.equal(ck["model"][k], ck2["model"][k]), k
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("img_per_s", "ms_per_step")} for r in rs]
    assert strip(rows(tmp_path / "srun")) == strip(rows(tmp_path / "torchrun"))


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu-a[1-2],gpu-b3", ["gpu-a1", "gpu-a2", "gpu-b3"]),
    ("n1,n2", ["n1", "n2"]),
    ("node[8-10]", ["node8", "node9", "node10"]),  # the padding is the width of the range's start
    ("rack[1-2]-n[01-02],x", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02", "x"]),
    ("localhost", ["localhost"])])
def test_slurm_host_list(nodelist, hosts):
    assert plumbing.slurm_hosts(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-", "node[a-c]", "", "a,,b", "node[]"])
def test_slurm_host_list_refuses_what_it_cannot_read(nodelist):
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        plumbing.slurm_hosts(nodelist)


def test_slurm_env_maps_srun_tasks_and_leaves_torchrun_and_single_tasks_alone():
    task = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert plumbing.slurm_env(task) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                                        "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}
    given = plumbing.slurm_env({**task, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "41000"})
    assert (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("10.0.0.5", "41000")  # the environment wins
    assert plumbing.slurm_env({**task, "RANK": "3", "LOCAL_RANK": "3"}) == {}  # torchrun inside an allocation
    assert plumbing.slurm_env({**task, "SLURM_NTASKS": "1"}) == {}  # a one-task job
    assert plumbing.slurm_env({k: v for k, v in task.items() if k != "SLURM_PROCID"}) == {}  # a salloc shell
    for env in ({**task, "SLURM_JOB_NODELIST": ""}, {k: v for k, v in task.items() if k != "SLURM_JOB_NODELIST"}):
        with pytest.raises(SystemExit, match="MASTER_ADDR nor SLURM_JOB_NODELIST"):
            plumbing.slurm_env(env)


def test_setup_distributed_under_srun_takes_nccl_and_the_local_gpu(monkeypatch):
    calls = []
    task = {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "SLURM_JOB_NODELIST": "node[01-02]"}
    monkeypatch.setattr(plumbing.dist, "init_process_group", lambda backend: calls.append((backend, dict(os.environ))))
    monkeypatch.setattr(plumbing.dist, "get_rank", lambda: int(os.environ["RANK"]))
    monkeypatch.setattr(plumbing.dist, "get_world_size", lambda: int(os.environ["WORLD_SIZE"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    for visible, index in ((8, 3), (1, 0)):  # all the node's GPUs visible; one bound to the task (--gpus-per-task=1)
        monkeypatch.setattr(os, "environ", dict(task))  # what srun sets: SLURM's variables only
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        rt = plumbing.setup_distributed("auto")
        assert (rt.ddp, rt.rank, rt.world, rt.local_rank, rt.device, rt.master) == \
            (True, 11, 16, index, torch.device("cuda", index), False)
        (backend, env), dev = calls[-2:]
        assert backend == "nccl" and dev == rt.device
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node01", "29500")
    monkeypatch.setattr(os, "environ", {**task, "SLURM_NTASKS": "1"})
    assert plumbing.setup_distributed("cpu") == plumbing.Runtime(False, 0, 0, 1, torch.device("cpu"), True)


# ----------------------------------------------------------------------------- accumulation and checkpointing


def test_train_step_sums_micro_batch_gradients_into_the_mean_loss_gradient():
    # a linear probe has no BatchNorm or dropout: 2 micro-batches of 2 are one batch of 4, loss and gradient
    seg = tiny_seg("linear").train()
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 5, (4, 64, 64))
    opt = torch.optim.SGD(unip.param_groups(seg, 0.0, 1.0), lr=0.0)  # lr 0: the weights stay, the gradients show
    runs = []
    for bs, accum in ((4, 1), (2, 2)):
        batches = iter([(x[i:i + bs], y[i:i + bs]) for i in range(0, 4, bs)])
        loss = train_seg.train_step(seg, opt, torch.amp.GradScaler("cpu", enabled=False), batches, 0.0, 0.4,
                                    lambda: torch.autocast("cpu", enabled=False), accum, False, 16, torch.device("cpu"))
        assert next(batches, None) is None  # every micro-batch was used
        runs.append((loss, seg.head.weight.grad.clone(), seg.head.bias.grad.clone()))
    (l4, gw4, gb4), (l2, gw2, gb2) = runs
    torch.testing.assert_close(l2, l4, rtol=1e-6, atol=0)
    torch.testing.assert_close(gw2, gw4, rtol=1e-5, atol=1e-9)  # each micro-loss / 2: not twice the gradient
    torch.testing.assert_close(gb2, gb4, rtol=1e-5, atol=1e-9)


# linear probe, fp32: no BatchNorm statistics or dropout differ between micro-batches and one batch
PROBE = ["--crop", "64", "--eval-images", "1", "--workers", "0", "--log-every", "1", "--mode", "linear",
         "--amp", "none", "--iters", "3", "--lr", "1e-3", "--train-images", "12"]


@pytest.fixture(scope="module")
def probe_batch_4(tmp_path_factory):
    """The head after 3 linear-probe steps of one batch of 4 in one process, and the losses logged."""
    out = tmp_path_factory.mktemp("probe4")
    run("--out", out, *PROBE, "--batch-size", 4)
    return unip.load_checkpoint(out / "ckpt.pt"), [r["loss"] for r in rows(out) if "loss" in r]


def assert_same_probe(out, ref):
    ck, ref_losses = unip.load_checkpoint(out / "ckpt.pt"), ref[1]
    assert ck["step"] == ref[0]["step"] == 3
    assert ck["model"]["head.bias"].abs().max() > 1e-3  # not vacuous: from 0, three Adam steps (lr 1e-3 falling)
    for k in ("head.weight", "head.bias"):  # fp32 sums in another order: ~1e-9 apart
        torch.testing.assert_close(ck["model"][k], ref[0]["model"][k], rtol=0, atol=1e-7, msg=k)
    np.testing.assert_allclose([r["loss"] for r in rows(out) if "loss" in r], ref_losses, rtol=1e-6)
    return ck


def test_accumulation_matches_one_big_batch(tmp_path, probe_batch_4):
    p = run("--out", tmp_path, *PROBE, "--batch-size", 2, "--accum-steps", 2)
    assert "batch 2 x accum 2 x world 1 = 4" in p.stdout
    ck = assert_same_probe(tmp_path, probe_batch_4)
    # a linear probe decays the head's bias too (the reference's plain AdamW, no parameter-wise rules)
    assert [g["weight_decay"] for g in ck["optimizer"]["param_groups"]] == [0.05]
    assert ck["config"]["accum_steps"] == 2 and ck["epoch"] == 1  # 12 images, 4 per step: 3 steps an epoch
    assert [r["epoch"] for r in rows(tmp_path) if "loss" in r] == [0.3333, 0.6667, 1.0]
    p = run("--out", tmp_path / "bad", *PROBE, "--accum-steps", 0, ok=False)
    assert p.returncode != 0 and "--accum-steps 0" in p.stderr and "Traceback" not in p.stderr
    p = run("--out", tmp_path / "few", *PROBE, "--batch-size", 4, "--accum-steps", 4, ok=False)
    assert "12 training images cannot fill one step of 4 x 4" in p.stderr


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_torchrun_two_processes_with_accumulation_match_one_big_batch(tmp_path, probe_batch_4):
    # 2 processes x 1 image x 2 micro-steps (no_sync on the first) = the same 4 images per step
    torchrun = [shutil.which("torchrun"), "--standalone", "--nproc_per_node=2", str(ROOT / "train_seg.py")]
    p = run("--out", tmp_path, *PROBE, "--batch-size", 1, "--accum-steps", 2, "--device", "cpu", cmd=torchrun)
    assert "batch 1 x accum 2 x world 2 = 4" in p.stdout
    assert_same_probe(tmp_path, probe_batch_4)


def test_resume_mid_epoch_with_accumulation_continues_exactly(tmp_path):
    # 12 images, 2 x 2 per step: 3 steps an epoch; stopped after step 2 (mid-epoch), resumed across the epoch's end.
    # Drop path and Dropout2d draw from the restored RNG; the data resumes 2 x 2 x 2 = 8 images into the epoch.
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--iters", 5, *SMALL, "--accum-steps", 2, "--train-images", 12]
    run("--out", a, "--steps", 2, *args)
    assert unip.load_checkpoint(a / "ckpt.pt")["step"] == 2
    run("--out", a, "--resume", "auto", *args)
    run("--out", b, *args)
    wa, wb = unip.load_checkpoint(a / "ckpt.pt"), unip.load_checkpoint(b / "ckpt.pt")
    assert wa["step"] == wb["step"] == 5
    for k in wb["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
    assert [r["loss"] for r in rows(a) if "loss" in r] == [r["loss"] for r in rows(b) if "loss" in r]


def test_grad_checkpoint_run_reaches_the_same_weights(tmp_path):
    # fine-tuning with drop path 0.1 and Dropout2d, fp32: the recomputed blocks replay the same random draws
    args = ["--steps", 2, "--iters", 4, "--amp", "none", *SMALL]
    p = run("--out", tmp_path / "ckpt", "--grad-checkpoint", *args)
    assert "| grad checkpoint |" in p.stdout
    run("--out", tmp_path / "plain", *args)
    wa, wb = (unip.load_checkpoint(tmp_path / d / "ckpt.pt") for d in ("ckpt", "plain"))
    assert wa["config"]["grad_checkpoint"] and not wb["config"]["grad_checkpoint"]
    for k in wb["model"]:
        torch.testing.assert_close(wa["model"][k], wb["model"][k], rtol=0, atol=1e-6, msg=k)


def test_clear_errors(tmp_path):
    p = run("--out", tmp_path, "--dataset", "soda", "--data-root", tmp_path / "nowhere", ok=False)
    assert p.returncode != 0 and str(tmp_path / "nowhere") in p.stderr
    bad = tmp_path / "small.pt"
    unip.save_checkpoint({"model": unip.vit_small(img_size=32).state_dict()}, bad)
    p = run("--out", tmp_path, *SMALL, "--init", bad, ok=False)
    assert p.returncode != 0 and "wrong shape" in p.stderr and "patch_embed.proj.weight" in p.stderr
    assert "--label-map" in run("--help").stdout


class _Unsafe:  # a class that weights_only=True refuses to unpickle
    pass


def test_damaged_checkpoint_is_told_apart_from_an_unsafe_one(tmp_path, pretrain_ckpt):
    path, _ = pretrain_ckpt
    whole = path.read_bytes()
    for n in (0, 100, len(whole) // 2, len(whole) - 10):  # an interrupted copy or download
        cut = tmp_path / f"cut{n}.pt"
        cut.write_bytes(whole[:n])
        with pytest.raises(unip.CheckpointError, match=r"damaged or incomplete \(" + f"{n:,}" + r" bytes") as e:
            unip.load_checkpoint(cut)
        assert "previous checkpoint" in str(e.value) and "weights_only" not in str(e.value)
    torch.save({"model": {}, "extra": _Unsafe()}, tmp_path / "unsafe.pt")
    with pytest.raises(unip.CheckpointError, match=r"holds a [\w.]*_Unsafe object.*weights_only=False") as e:
        unip.load_checkpoint(tmp_path / "unsafe.pt")
    assert "damaged or incomplete" not in str(e.value)
    # the scripts: one line, no traceback, a non-zero exit
    for flag in ("--init", "--resume"):
        p = run("--out", tmp_path / "run", *SMALL, flag, tmp_path / f"cut{len(whole) // 2}.pt", ok=False)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip().startswith("error: ") and "damaged or incomplete" in p.stderr


@pytest.mark.parametrize("script,args", [
    ("analyze.py", ["--arch", "vit_tiny", "--num-images", "2", "--checkpoint"]),
    ("train_pretrain.py", ["--teacher-arch", "vit_tiny", "--model", "vit_tiny", "--batch-size", "2",
                           "--effective-batch", "2", "--workers", "0", "--teacher"]),
    ("predict.py", ["--checkpoint"])])
def test_other_scripts_report_a_damaged_checkpoint_in_one_line(tmp_path, pretrain_ckpt, script, args):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(pretrain_ckpt[0].read_bytes()[:5000])
    for k in range(4):
        Image.fromarray(np.full((32, 32), 60 * k, np.uint8)).save(tmp_path / f"{k}.png")
    extra = {"train_pretrain.py": ["--infrared", tmp_path], "predict.py": ["--images", tmp_path]}.get(script, [])
    # analyze.py as a real process (its only one); the others have theirs elsewhere and run in this process
    p = (run("--out", tmp_path / "out", *args, cut, *extra, cmd=[sys.executable, str(ROOT / script)], ok=False)
         if script == "analyze.py" else run_main(script, "--out", tmp_path / "out", *args, cut, *extra))
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert f"error: {cut} is damaged or incomplete (5,000 bytes" in p.stderr


def fake_folder(root, labels, stems=None, suffix=".png"):
    """Grey images with their label maps (uint8 arrays) in root/images and root/labels."""
    stems = stems or [f"f{k}" for k in range(len(labels))]
    for d in ("images", "labels"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, lab in zip(stems, labels):
        img = (lab.astype(np.float32) * 9 + rng.normal(100, 20, lab.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / (stem + suffix))
        Image.fromarray(lab.astype(np.uint8)).save(root / "labels" / (stem + ".png"))
    return stems


def blobs(values, size=64, k=0):
    """(size, size) label: background 0 and a square of each value."""
    lab = np.zeros((size, size), np.uint8)
    for j, v in enumerate(values):
        y, x = (8 + 20 * j + 3 * k) % (size - 16), (4 + 24 * j + 5 * k) % (size - 16)
        lab[y:y + 16, x:x + 16] = v
    return lab


def test_binary_masks_without_label_map_are_refused(tmp_path):
    fake_folder(tmp_path, [blobs([255], k=k) for k in range(4)])
    args = ["--out", tmp_path / "run", *SMALL, "--dataset", "folder", "--data-root", tmp_path, "--classes", "background,udder"]
    p = run(*args, ok=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "only the values 0 and 255" in p.stderr and "--label-map 255:1" in p.stderr
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_scut_index_labels_in_fp16_with_the_reference_defaults(tmp_path):
    # a SCUT-Seg copy in the reference's form (classes 0..9: road 1, person 2, tree 7), read as such, not as
    # Cityscapes ids (which would turn person into ignore and tree into road); fp16 autocast + loss scaler
    root = tmp_path / "scut"
    stems = fake_folder(root, [blobs([1, 2, 7], k=k) for k in range(4)], suffix=".jpg")
    (root / "train.txt").write_text("\n".join(stems[:3]) + "\n")
    (root / "val.txt").write_text(stems[3] + "\n")
    out = tmp_path / "run"
    p = run("--out", out, "--steps", 2, *SMALL, "--dataset", "scut", "--data-root", root, "--amp", "fp16")
    assert "SCUT-Seg labels: class indices 0..9 (detected)" in p.stdout
    assert "WARNING: 6 of 10 classes never occur in the 3 training label files: rider, car, truck, fence, bus, pole." in p.stdout
    assert "amp fp16" in p.stdout and "evaluation every 800 steps and at the end" in p.stdout
    assert "layer scale 1 (trainable)" in p.stdout
    ck = unip.load_checkpoint(out / "ckpt.pt")
    assert ck["scaler"]["scale"] > 1 and ck["config"]["amp"] == "fp16"  # the loss scaler was on
    assert "backbone.blocks.11.gamma_2" in ck["model"]
    iou = [r for r in rows(out) if "miou" in r][-1]["iou"]
    assert iou["tree"] is not None and iou["person"] is not None  # present in the validation label, not ignored
    arch = ck["segmenter"]
    assert arch["classes"][7] == "tree" and arch["palette"][7] == [107, 142, 35] and arch["crop"] == 64


@pytest.mark.skipif(not os.environ.get("UNIP_SAMPLE_DATA"), reason="set UNIP_SAMPLE_DATA to the shared data folder")
def test_folder_dataset_on_real_thermal_masks(tmp_path):
    root = Path(os.environ["UNIP_SAMPLE_DATA"]) / "buffalo_udder_thermal_seg"
    p = run("--out", tmp_path, *SMALL, "--dataset", "folder", "--data-root", root, "--classes", "background,udder",
            ok=False)  # the 0/255 masks without --label-map: every udder pixel would be ignored
    assert p.returncode != 0 and "--label-map 255:1" in p.stderr and "Traceback" not in p.stderr
    run("--out", tmp_path, "--steps", 2, *SMALL, "--eval-images", 2, "--dataset", "folder", "--data-root", root,
        "--classes", "background,udder", "--label-map", "255:1")
    ev = [r for r in rows(tmp_path) if "miou" in r]
    assert ev and set(ev[-1]["iou"]) == {"background", "udder"} and 0 <= ev[-1]["miou"] <= 100
    assert len(list(tmp_path.glob("pred_*.png"))) == 2


# ----------------------------------------------------------------------------- UperNet width (--head-channels)


def test_head_channels_default_is_the_backbone_dim_and_a_given_width_is_built():
    seg = tiny_seg()
    assert seg.head.classifier.in_channels == 192 and seg.head.fuse[0].in_channels == 4 * 192
    assert seg.aux_head.conv[0].out_channels == 256
    torch.manual_seed(0)
    ref = tiny_seg()
    torch.manual_seed(0)
    same = tiny_seg(head_channels=None)  # None: today's model, parameter for parameter
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), same.state_dict().values()))
    seg = tiny_seg(head_channels=32)
    convs = [m for m in seg.head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {c.out_channels for c in convs if c is not seg.head.classifier} == {32}
    assert seg.head.classifier.in_channels == 32 and seg.head.lateral[0][0].in_channels == 192
    assert seg.aux_head.conv[0].out_channels == 256  # the FCN auxiliary head keeps its width
    out, aux = seg.train()(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 5, 16, 24) and aux.shape == (2, 5, 4, 6)
    for bad in (dict(mode="linear", head_channels=32), dict(head_channels=0)):
        with pytest.raises(ValueError, match="head_channels"):
            tiny_seg(**bad)
    with pytest.raises(SystemExit):
        train_seg.parse_config(["--mode", "linear", "--head-channels", "32"])


def head_run(*flags):
    """The config, Segmenter and checkpoint of a finetune run with these flags (at SMALL's 64 px, 5 classes), the
    checkpoint holding what train_seg.py's save() writes for inference: weights, config, 'segmenter'."""
    cfg = train_seg.parse_config([*flags, *SMALL])
    seg = unip.Segmenter(unip.vit_tiny(img_size=64, layer_scale=cfg.layer_scale), 5,
                         head_channels=cfg.head_channels or None).eval()
    arch = train_seg.inference_arch(cfg, seg, 64, 42, [str(k) for k in range(5)], [(k, k, k) for k in range(5)])
    ck = {"model": seg.state_dict(), "config": train_seg.asdict(cfg), "segmenter": arch, "step": 0,
          "last_heads": seg.backbone.blocks[-1].attn.heads}
    return cfg, seg, ck


def test_head_channels_are_stored_in_checkpoints_and_rebuilt(tmp_path):
    _, seg, ck = head_run("--head-channels", "32")
    unip.save_checkpoint(ck, tmp_path / "c.pt")
    back = unip.load_segmenter(tmp_path / "c.pt")
    assert back.head.classifier.in_channels == 32 and unip.load_checkpoint(tmp_path / "c.pt")["segmenter"]["head_channels"] == 32
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(seg(x)[0], back(x)[0])
    # resuming it into a model of the default width names the setting that differs
    cfg, seg, _ = head_run()
    with pytest.raises(SystemExit, match="does not fit this model.*written with --head-channels 32"):
        train_seg.resume_from(tmp_path / "c.pt", seg, None, None, cfg, None)


def test_checkpoint_without_head_channels_loads_with_the_backbone_width():
    _, seg, ck = head_run()
    assert ck["segmenter"]["head_channels"] == 192  # a default run records D
    del ck["segmenter"]["head_channels"], ck["config"]["head_channels"]  # as written before the option existed
    back = unip.load_segmenter(ck)
    assert back.head.classifier.in_channels == 192
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(seg(x)[0], back(x)[0])
