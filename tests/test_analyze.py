"""Tests of analyze.py: known attention patterns are measured and classified right, the layer to
distil is the right one, and the CLI writes its JSON and pictures (run through subprocess)."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import analyze
import unip
from conftest import run_main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -----------------------------------------------------------------------------
# a ViT whose attention is known
#
# With zero patch-embedding weights the tokens are the sin-cos positions x_q, whatever the image,
# and with zero attn.proj and mlp.fc2 every block is the identity on the residual stream, so every
# layer sees the same tokens. What q and k see is z_q = LayerNorm(x_q) = (x_q - mu_q) / sigma_q.
# On a g x g grid, w . x_q spans exactly the additive functions a(row) + b(col) (sin and cos of
# the column and of the row in separate channels; 7 of them on 4 x 4), and mu_q is one of them;
# so the logits q . k a head can have are (1 / sigma_q sigma_k) times a bilinear form in additive
# functions. -alpha d^2 = -alpha ((r-r')^2 + (c-c')^2) is one (in 1, r, r^2, c, c^2), and so is
# a key preference s(r') + t(c'). sigma_q = sqrt(1/2 - mu_q^2) (sum x^2 = D/2) varies by a few
# percent over the grid: LayerNorm turns it into a per-query temperature and a per-key weight.
# So each head gets logits T = f_q f_k A (f = mean(sigma) / sigma) with A local / hybrid / global,
# solved for exactly: with Z the (n, D) normalised tokens and Z+ its pseudo-inverse, Z Z+ T Z+^T Z^T
# = T for such a T, so q = Z+^T z and k = T Z+^T z / scale give it (n = 16 <= head_dim rows each).
# Global heads are built the other way round: q weights zero and a q bias, so q is the same
# vector for every query and every row of the map is the same softmax(s) over keys.
# A zero CLS token is normalised to 0: its key logit is 0 (the NMI and the pictures drop it).


def grid_rc(g):  # (g*g, 2) row, column of each patch
    return torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).reshape(-1, 2).double()


def blob(g, at):  # additive key preference peaking on the 2x2 patches from `at`: rows + columns
    rc = grid_rc(g)
    return sum(((rc[:, i] >= at[i]) & (rc[:, i] <= at[i] + 1)).double() for i in (0, 1))


def head_logits(model, spec):
    """Logits (n, n) over the patch tokens of a head built from `spec`: ('local', alpha):
    -alpha d^2; ('hybrid', alpha, beta): -alpha d^2 + beta on an object in the bottom-right
    corner; ('global', beta, at): beta on an object at `at`, the same for every query;
    ('uniform',): zeros. Then LayerNorm's factors f_q f_k (see above; f_k only for 'global')."""
    g = math.isqrt(model.pos_embed.shape[1] - 1)
    rc, n = grid_rc(g), g * g
    d2 = torch.cdist(rc, rc) ** 2
    kind, p = spec[0], spec[1:]
    A = {"local": lambda: -p[0] * d2, "hybrid": lambda: -p[0] * d2 + p[1] * blob(g, (g - 2, g - 2))[None],
         "global": lambda: p[0] * blob(g, p[1])[None].expand(n, n),
         "uniform": lambda: torch.zeros(n, n, dtype=torch.float64)}[kind]()
    sigma = (model.pos_embed[0, 1:].double().var(-1, unbiased=False) + 1e-6).sqrt()
    f = sigma.mean() / sigma
    fq = torch.ones_like(f) if kind == "global" else f  # a global head's q is a bias: no LayerNorm on it
    return fq[:, None] * A * f[None]


def design(model, plan):
    """Set `model`'s weights so that head h of layer l (from 1) has logits head_logits(model, plan[l-1][h])."""
    n, D = model.pos_embed.shape[1] - 1, model.dim
    # (n, D): what every block's q/k projections see (all norm1 are the initial LayerNorm)
    z = torch.nn.functional.layer_norm(model.pos_embed[0, 1:].double(), (D,), eps=1e-6)
    zp = torch.linalg.pinv(z, rtol=1e-5)  # (D, n); z has rank 7 on a 4x4 grid
    proj = z @ zp  # projector onto the functions of position that a linear map of z can give
    with torch.no_grad():
        for p in (model.patch_embed.proj.weight, model.patch_embed.proj.bias, model.cls_token):
            p.zero_()
        for layer, heads in enumerate(plan):
            blk = model.blocks[layer]
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
            a, hd = blk.attn, blk.attn.head_dim
            wq, wk, bq = torch.zeros(D, D), torch.zeros(D, D), torch.zeros(D)
            for h, spec in enumerate(heads):
                T = head_logits(model, spec)
                keys_only = spec[0] == "global"  # its queries do not go through z
                assert torch.allclose((T if keys_only else proj @ T) @ proj, T, atol=1e-5)  # a head can have T
                if keys_only:  # q = e_0 for every token, k_0 = s_k / scale
                    bq[h * hd] = 1.0
                    wk[h * hd] = (zp @ T[0] / a.scale).float()  # every row of T is the same
                else:  # q = Z+^T z, k = T Z+^T z / scale: q . k scale = z^T Z+ T Z+^T z' = T on the patches
                    wq[h * hd:h * hd + n] = zp.T.float()
                    wk[h * hd:h * hd + n] = (T @ zp.T / a.scale).float()
            a.qkv.weight[:2 * D] = torch.cat([wq, wk])
            a.qkv.bias[:2 * D] = torch.cat([bq, torch.zeros(D)])
    return model


def nmi_reference(T):
    """NMI of the map softmax(T) (n, n), straight from the formula in unip.py §4, in numpy."""
    A = torch.softmax(T, -1).numpy()
    n = A.shape[0]
    p = A / n
    pk = p.sum(0)
    mi = (p * np.log(p / (pk[None] / n))).sum()
    hk = -(pk * np.log(pk)).sum()
    return mi / np.sqrt(np.log(n) * hk)


SMALL_PLAN = [  # ViT(img_size=64, dim=48, depth=3, heads=3): 4x4 patches
    [("local", 1.0), ("local", 1.5), ("local", 2.0)],  # NMI about 0.40, 0.53, 0.63
    [("global", 4.0, (0, 0)), ("global", 4.0, (2, 2)), ("global", 6.0, (1, 2))],  # 0
    [("hybrid", 0.4, 4.0), ("hybrid", 0.35, 3.0), ("hybrid", 0.4, 3.0)],  # 0.081, 0.081, 0.101
]

TINY_PLAN = [[spec] * 3 for spec in [  # vit_tiny (12 layers, 3 heads) at 64 px
    ("local", 2.0), ("local", 1.0), ("local", 0.5),
    ("hybrid", 0.5, 5.0), ("hybrid", 0.4, 4.0), ("hybrid", 0.35, 4.0),  # 0.107, 0.085 (closest to 0.09), 0.068
    ("global", 4.0, (0, 0)), ("global", 4.0, (2, 1)), ("global", 3.0, (1, 2)),
    None, ("uniform",), ("local", 4.0)]]
TINY_PLAN[9] = [("local", 1.0), ("hybrid", 0.4, 4.0), ("global", 4.0, (2, 2))]  # one layer, three patterns


def expected(model, plan):  # per layer, per head NMI of the designed maps
    return [[float(nmi_reference(head_logits(model, s))) for s in heads] for heads in plan]


def images(n=6, size=64):
    return torch.randn(n, 3, size, size)


# -----------------------------------------------------------------------------
# measurement and classification


def test_designed_attention_is_what_was_asked_for():
    model = design(unip.ViT(img_size=64, dim=48, depth=3, heads=3), SMALL_PLAN).eval()
    maps = model.attention_maps(images(2))
    for layer, heads in enumerate(SMALL_PLAN, start=1):
        a = maps[layer][..., 1:, 1:]
        a = a / a.sum(-1, keepdim=True)  # CLS dropped and rows renormalised, as the NMI does
        for h, spec in enumerate(heads):
            want = torch.softmax(head_logits(model, spec), -1).float()
            assert torch.allclose(a[:, h], want.expand_as(a[:, h]), atol=2e-4), (layer, h)


def test_measure_nmi_classifies_local_global_hybrid_and_chooses_the_hybrid_layer():
    model = design(unip.ViT(img_size=64, dim=48, depth=3, heads=3), SMALL_PLAN)
    mean, std = analyze.measure_nmi(model, images(6).split(4), "cpu")
    want = expected(model, SMALL_PLAN)
    assert [m.shape for m in mean] == [(3,)] * 3 and [s.shape for s in std] == [(3,)] * 3
    for m, w in zip(mean, want):
        assert torch.allclose(m, torch.tensor(w), atol=2e-3), (m, w)
    assert max(s.max().item() for s in std) < 1e-4  # the tokens do not depend on the image
    patterns = [unip.classify_heads(m) for m in mean]
    assert patterns == [["local"] * 3, ["global"] * 3, ["hybrid"] * 3]
    layer_means = [m.mean().item() for m in mean]
    assert unip.choose_layer(layer_means, 0.09) == 3
    assert unip.choose_layer(layer_means, 0.5, "closest") == 1 and unip.choose_layer(layer_means, 0.0) == 2
    assert unip.choose_layer(layer_means, 0.5) == 3  # after the peak (layer 1, local) only


def test_measure_nmi_equals_per_image_nmi_for_any_batching():
    model = unip.ViT(img_size=64, dim=48, depth=3, heads=3)
    x = images(5)
    per_image = unip.layer_nmi(model.eval(), x)  # (L, B, H)
    model.train()
    for bs in (1, 2, 5):
        mean, std = analyze.measure_nmi(model, x.split(bs), "cpu")
        assert torch.allclose(torch.stack(mean), per_image.mean(1), atol=1e-6)
        assert torch.allclose(torch.stack(std), per_image.std(1, unbiased=False), atol=1e-5)
    assert model.training  # measured in eval mode, handed back as it came


def test_measure_nmi_last_block_with_other_head_count():
    model = unip.ViT(img_size=64, dim=48, depth=3, heads=3, last_heads=6)  # a UNIP student's layout
    mean, _ = analyze.measure_nmi(model, [images(2)], "cpu")
    assert [m.shape[0] for m in mean] == [3, 3, 6]


# -----------------------------------------------------------------------------
# preprocessing, query points, config


def test_eval_transform_is_a_deterministic_centre_crop():
    img = np.zeros((100, 200), np.uint8)
    img[:, 50:150] = 255  # the centre square is white, the sides black
    x = analyze.EvalTransform(32)(img)
    assert x.shape == (3, 32, 32) and torch.equal(x, analyze.EvalTransform(32)(img))
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    white = (1 - analyze.data.PRETRAIN_MEAN) / analyze.data.PRETRAIN_STD
    assert torch.allclose(x[:, :, 2:-2], torch.full_like(x[:, :, 2:-2], white), atol=1e-3)
    assert analyze.centre_square(np.zeros((50, 30), np.uint8), 16, Image.NEAREST).shape == (16, 16)


def test_query_patches_object_and_background():
    rng = np.random.default_rng(0)
    img = (100 + rng.integers(-40, 40, (128, 128))).astype(np.uint8)  # textured ground, 8x8 patches of 16
    img[:40] = 10  # flat cold sky: rows 0-1 and part of row 2
    img[80:112, 80:112] = 250  # a hot object on patches (5..6, 5..6)
    (what, hot), (_, bg) = analyze.query_patches(img, None, 16)
    assert what == "hot spot" and 5 <= hot[0] <= 6 and 5 <= hot[1] <= 6
    assert bg[0] <= 1  # the flat sky, not the textured ground
    label = np.zeros((128, 128), np.int64)
    label[48:112, 16:48] = analyze.data.PERSON  # a person (4x2 patches) where the image is not the brightest
    label[20:28, 100:108] = analyze.data.CAR  # a small car
    (what, obj), (_, bg) = analyze.query_patches(img, label, 16)
    assert what == "object" and 3 <= obj[0] <= 6 and 1 <= obj[1] <= 2
    assert label[bg[0] * 16:(bg[0] + 1) * 16, bg[1] * 16:(bg[1] + 1) * 16].max() == 0 and bg[0] <= 1


def test_parse_config_lists_commas_and_tuples():
    cfg = analyze.parse_config(["--checkpoint", "a.pth,b.pth", "--checkpoint", "c.pth", "--arch", "vit_large",
                                "--thresholds", "0.05", "0.1", "--layers", "3", "5"])
    assert cfg.checkpoint == ["a.pth", "b.pth", "c.pth"] and cfg.arch == ["vit_large"]
    assert cfg.thresholds == (0.05, 0.1) and cfg.layers == (3, 5)
    cfg = analyze.parse_config([])
    assert cfg.checkpoint == ["none"] and cfg.thresholds == (0.06, 0.12) and cfg.layers == () and cfg.img_size == 224


def test_thermal_range_reaches_the_analysed_frames(tmp_path, capsys):
    raw = np.tile(np.linspace(19000, 25000, 40), (30, 1)).astype(np.uint16)  # 16-bit radiometric
    (tmp_path / "ir").mkdir()
    Image.fromarray(raw).save(tmp_path / "ir" / "a.png")
    tf = analyze.EvalTransform(32)
    for argv, want in ((["--thermal-range", "20000,24000"], analyze.data.range_to_uint8(raw, 20000, 24000)),
                       ([], analyze.data.stretch_to_uint8(raw))):
        ds, _ = analyze.image_source(analyze.parse_config(["--images", str(tmp_path / "ir"), *argv]), tf)
        assert np.array_equal(ds.load(0)[0], want)
    with pytest.raises(SystemExit) as e:
        analyze.parse_config(["--thermal-range", "20000"])
    assert e.value.code == 2 and "expected LO,HI" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# pictures


def test_curve_and_attention_pictures_are_drawn(tmp_path):
    models = [dict(name="a", heads=[[0.3, 0.2], [0.1, 0.05], [0.0, 0.01]], layers=[0.25, 0.075, 0.005], recommended_layer=2),
              dict(name="b", heads=[[0.5] * 3] * 5, layers=[0.5] * 5, recommended_layer=5)]
    analyze.draw_curves(models, (0.06, 0.12), 0.09, tmp_path / "c.png", "title")
    im = np.asarray(Image.open(tmp_path / "c.png").convert("RGB")).astype(float)
    assert im.shape == (560, 1060, 3) and im.std() > 20
    assert (np.abs(im - [31, 119, 180]).sum(-1) < 30).sum() > 200  # model a's line is there
    grey = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    att = np.zeros((2, 2))
    att[0, 1] = 1
    rows = [(["image 0", "warm object"], grey, (0, 1, 2), {"k": att}), (["image 0", "background"], grey, (1, 0, 2), {"k": att})]
    analyze.draw_attention(rows, [("k", ["layer 1, head 1", "0.1 hybrid"])], tmp_path / "a.png", "t", tile=64)
    im = np.asarray(Image.open(tmp_path / "a.png").convert("RGB")).astype(float)
    assert im.shape == (74 + 2 * 68, 118 + 2 * 68, 3) and im.std() > 20
    tile = im[74:74 + 64, 118 + 68:118 + 68 + 64]
    assert tile[5:27, 37:59].mean() > tile[37:59, 5:27].mean() + 40  # attended patch is bright


# -----------------------------------------------------------------------------
# the command line, end to end


def run_cli(*args):
    r = run_main("analyze.py", "--device", "cpu", "--workers", "0", *args)  # in this process
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def png(path):
    im = np.asarray(Image.open(path).convert("RGB")).astype(float)
    assert im.std() > 20, f"{path} looks blank"
    return im.shape[1], im.shape[0]


@pytest.fixture(scope="module")
def designed_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "designed_tiny.pth"
    torch.manual_seed(0)
    model = design(unip.vit_tiny(img_size=64), TINY_PLAN)
    unip.save_checkpoint({"model": model.state_dict(), "epoch": 3}, path)
    return path


def test_cli_known_answer_on_synthetic_data(designed_ckpt, tmp_path):
    out = run_cli("--checkpoint", str(designed_ckpt), "--arch", "vit_tiny", "--img-size", "64",
                  "--num-images", "4", "--batch-size", "3", "--out", str(tmp_path))
    res = json.loads((tmp_path / "nmi.json").read_text())
    want = expected(unip.vit_tiny(img_size=64), TINY_PLAN)
    assert res["recommended_layer"] == 5 and "--teacher-layer 5" in out and "--teacher-arch vit_tiny" in out
    assert res["train_pretrain"] == f"python train_pretrain.py --teacher {designed_ckpt} --teacher-arch vit_tiny --teacher-layer 5"
    assert np.array(res["heads"]).shape == (12, 3) and np.array(res["heads_std"]).shape == (12, 3)
    assert np.array(res["patterns"]).shape == (12, 3) and len(res["layers"]) == 12
    assert np.allclose(res["heads"], want, atol=3e-3)
    assert np.allclose(res["layers"], np.mean(want, 1), atol=3e-3)
    kinds = [[{"uniform": "global"}.get(s[0], s[0]) for s in heads] for heads in TINY_PLAN]
    assert res["patterns"] == kinds
    assert res["counts"][9] == {"local": 1, "hybrid": 1, "global": 1}
    assert (res["thresholds"], res["target"], res["num_images"], res["arch"]) == ([0.06, 0.12], 0.09, 4, "vit_tiny")
    assert res["checkpoint"] == str(designed_ckpt)
    assert png(tmp_path / "nmi_layers.png") == (1060, 560)
    # default layers 3, 5 (recommended), 12; three heads each; 2 images x 2 queries
    assert png(tmp_path / "attention.png") == (118 + 10 * 132, 74 + 4 * 132)
    # layer 12 is sharply local (NMI 0.9): in its first column (the 8th tile) each row's heat
    # sits on the boxed query patch and nowhere else
    im = np.asarray(Image.open(tmp_path / "attention.png").convert("RGB")).astype(int)
    for row in range(4):
        tile = im[74 + row * 132:74 + row * 132 + 128, 118 + 7 * 132:118 + 7 * 132 + 128]
        cyan = (tile[..., 0] < 60) & (tile[..., 1] > 200) & (tile[..., 2] > 200)
        ys, xs = np.nonzero(cyan)
        r, c = ys.min() // 32, xs.min() // 32  # the query box (4x4 grid, 32 px cells)
        yellow = np.minimum(tile[..., 0], tile[..., 1]) - tile[..., 2]  # 0 on grey, ~84 on the hottest heat
        cell = [[yellow[i * 32 + 4:i * 32 + 28, j * 32 + 4:j * 32 + 28].mean() for j in range(4)] for i in range(4)]
        assert cell[r][c] > 60, (row, cell)
        assert sorted(v for i, vs in enumerate(cell) for j, v in enumerate(vs) if (i, j) != (r, c))[-1] < 20, (row, cell)


def test_cli_compares_two_checkpoints_on_an_image_folder(designed_ckpt, tmp_path):
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(48, 80), (90, 60), (64, 64)]):
        a = (rng.random((h, w)) * 80).astype(np.uint8)
        a[h // 3: h // 2, w // 3: w // 2] = 240
        Image.fromarray(a).save(folder / f"im{i}.{'png' if i % 2 else 'jpg'}")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "rgb.bmp")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "cmp"
    run_cli("--checkpoint", f"{designed_ckpt},none", "--arch", "vit_tiny", "--img-size", "64", "--num-images", "8",
            "--images", str(tmp_path / "imgs"), "--out", str(out), "--layers", "2", "5", "--heads-shown", "2")
    summary = json.loads((out / "summary.json").read_text())
    names = [m["name"] for m in summary["models"]]
    assert names == ["designed_tiny", "random"] and summary["num_images"] == 4
    for m in summary["models"]:
        res = json.loads((out / m["json"]).read_text())
        assert res["num_images"] == 4 and len(res["layers"]) == 12 and res["name"] == m["name"]
        assert png(out / m["name"] / "attention.png") == (118 + 5 * 132, 74 + 4 * 132)  # 2 layers x 2 heads
        png(out / m["name"] / "nmi_layers.png")
    assert summary["models"][0]["recommended_layer"] == 5
    assert png(out / "nmi_compare.png") == (1060, 560)


@pytest.mark.skipif(not os.environ.get("UNIP_SAMPLE_DATA"), reason="set UNIP_SAMPLE_DATA to the sample data folder")
def test_cli_on_real_infrared_frames(tmp_path):
    folder = os.path.join(os.environ["UNIP_SAMPLE_DATA"], "roadscene_flir_ir")
    run_cli("--checkpoint", "none", "--arch", "vit_tiny", "--img-size", "112", "--num-images", "4", "--images", folder,
            "--out", str(tmp_path), "--pictures", "1")
    res = json.loads((tmp_path / "nmi.json").read_text())
    assert res["num_images"] == 4 and len(res["heads"]) == 12 and 1 <= res["recommended_layer"] <= 12
    assert all(0 <= v <= 1 for hs in res["heads"] for v in hs)
    assert png(tmp_path / "attention.png")[1] == 74 + 2 * 132
