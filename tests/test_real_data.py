"""Statistics of tools/real_data.py, the real-data experiment: Student-t quantiles, paired differences to scratch with a 95%
t-interval (checked on fixed numbers against a hand computation), and the experiment's bookkeeping (rows, layer
choice, distillation runs per fine-tuning seed, length curve) with the three scripts replaced by stand-ins that
write what the real scripts write, so no model is trained."""
import json
import math
import os
import subprocess
import sys
from xml.etree import ElementTree

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import demo  # noqa: E402
import real_data  # noqa: E402
import plot_budgets  # noqa: E402
import val_subsets  # noqa: E402
import plumbing  # noqa: E402


@pytest.mark.parametrize("df, t", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)])
def test_t_quantile_matches_the_printed_table(df, t):
    assert real_data.t_quantile(0.975, df) == pytest.approx(t, abs=5e-4)


def test_t_cdf_against_closed_forms_and_the_normal_limit():
    for t in (-30.0, -2.5, -0.3, 0.0, 0.7, 4.303, 50.0):
        assert real_data.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert real_data.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
        normal = 0.5 * (1 + math.erf(t / math.sqrt(2)))
        assert real_data.t_cdf(t, 1e6) == pytest.approx(normal, abs=1e-6)
    assert real_data.t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)
    assert real_data.t_quantile(0.025, 4) == pytest.approx(-real_data.t_quantile(0.975, 4), abs=1e-12)
    for p in (0.6, 0.9, 0.995):  # the quantile inverts the distribution function
        assert real_data.t_cdf(real_data.t_quantile(p, 3), 3) == pytest.approx(p, abs=1e-10)
    with pytest.raises(ValueError, match="0 < p < 1"):
        real_data.t_quantile(1.0, 3)


def test_paired_ci_three_seeds_by_hand():
    # differences 2.4, 3.5, 0.8; mean 6.7 / 3 = 67/30; squared deviations (1/6)^2 + (19/15)^2 + (43/30)^2
    # = 3.68667, over n - 1 = 2: variance 553/300; half width t(0.975; 2) sqrt(553/300 / 3) = 4.30265 x 0.78386
    c = real_data.paired_ci([71.8, 72.0, 70.9], [69.4, 68.5, 70.1])
    assert c["n"] == 3 and c["diffs"] == pytest.approx([2.4, 3.5, 0.8])
    assert c["mean"] == pytest.approx(67 / 30) and c["sd"] == pytest.approx(math.sqrt(553 / 300))
    half = 4.30265273 * math.sqrt(553 / 900)
    assert (c["low"], c["high"]) == pytest.approx((67 / 30 - half, 67 / 30 + half), abs=1e-6)
    assert (c["low"], c["high"]) == pytest.approx((-1.13937, 5.60603), abs=1e-4)
    assert c["excludes_zero"] is False
    assert real_data.ci_text(c) == "+2.2 [-1.1, +5.6]"


def test_paired_ci_five_seeds_excludes_zero_and_matches_numpy():
    a, b = [70, 71, 72, 73, 74], [68, 69.5, 69, 71, 72]  # differences 2, 1.5, 3, 2, 2: mean 2.1, variance 0.3
    c = real_data.paired_ci(a, b)
    half = 2.77644511 * math.sqrt(0.3 / 5)
    assert (c["mean"], c["low"], c["high"]) == pytest.approx((2.1, 2.1 - half, 2.1 + half), abs=1e-6)
    d = np.subtract(a, b)
    assert c["sd"] == pytest.approx(d.std(ddof=1)) and c["excludes_zero"] is True
    neg = real_data.paired_ci(b, a)  # the other way round: the same interval, mirrored, still excluding zero
    assert (neg["low"], neg["high"]) == pytest.approx((-c["high"], -c["low"])) and neg["excludes_zero"] is True


def test_paired_ci_one_seed_and_bad_input():
    c = real_data.paired_ci([70.0], [68.0])
    assert c["mean"] == 2.0 and c["low"] is None and c["excludes_zero"] is None
    assert "no interval" in real_data.ci_text(c)
    with pytest.raises(ValueError, match="equally long"):
        real_data.paired_ci([1.0, 2.0], [1.0])


def test_rows_flag_is_checked():
    base = ["--teacher", "t.pth", "--unlabelled", "u", "--labelled", "l"]
    cfg = parse(base + ["--rows", "scratch,control,last"])
    assert cfg.rows == "scratch,peak,last" and cfg.size == 224 and cfg.distill_steps == 600
    assert cfg.finetune_iters == 250 and cfg.distill_seeds == cfg.teacher_seeds == cfg.seeds == 1
    for bad in (["--rows", "scratch,bogus"], ["--rows", "rule,rule"], ["--curve-steps", "150,x"],
                ["--curve-steps", "0,10"], ["--seeds", "0"]):
        with pytest.raises(SystemExit):
            parse(base + bad)
    with pytest.raises(SystemExit):  # the teacher row needs a pre-trained teacher
        parse(["--rows", "scratch,teacher"])


def parse(argv):
    return plumbing.parse_config(real_data.Config, argv, check=real_data.check_config)


# ------------------------------------------------------------------ the experiment's bookkeeping
LAYER_MEANS = [0.10, 0.44, 0.40, 0.30, 0.25, 0.20, 0.18, 0.16, 0.15, 0.14, 0.13, 0.05]  # closest: 1, after peak: 11
GAIN = [("curve_l11/step", None), ("student_l11_", 3.0), ("student_l2_", 1.0), ("student_l12_", 2.0),
        ("student_l1_", 5.0), ("teacher", 10.0)]  # mIoU over scratch by backbone (curve: 0.25 per step)


def fake_scripts(calls, monkeypatch, recommended=11):
    """Stand-ins for analyze.py / train_pretrain.py / train_seg.py that write the files demo.py reads; the
    mIoU of a train_seg.py run is a fixed function of its backbone and seed, so the tables can be checked."""
    real_run = subprocess.run

    def run(cmd, **kw):
        script = os.path.basename(str(cmd[1])) if len(cmd) > 1 else ""
        if script not in ("analyze.py", "train_pretrain.py", "train_seg.py"):
            return real_run(cmd, **kw)  # git
        args = [str(a) for a in cmd[2:]]
        flag = lambda name: args[args.index(name) + 1] if name in args else None
        calls.append((script, args))
        os.makedirs(flag("--out"), exist_ok=True)
        if script == "analyze.py":
            json.dump({"layers": LAYER_MEANS, "recommended_layer": recommended, "reason": "the fake's choice",
                       "warning": None, "target": 0.09, "layer_rule": "after-peak"},
                      open(os.path.join(flag("--out"), "nmi.json"), "w"))
        elif script == "train_pretrain.py":
            for s in (flag("--keep-steps") or "").split(","):
                if s:
                    open(os.path.join(flag("--out"), f"step{s}.pt"), "w").close()
        else:
            init, seed = flag("--init") or "", int(flag("--seed"))
            key, gain = next(((k, g) for k, g in GAIN if k in init), ("", 0.0))
            if key.startswith("curve"):
                gain = 0.25 * int(init.rsplit("step", 1)[1].split(".")[0])
            miou = 60.0 + gain + seed * 0.5 + (0.2 * seed * seed if key == "student_l11_" else 0.0)
            miou -= 5.0 if flag("--mode") == "linear" else 0.0
            with open(os.path.join(flag("--out"), "log.jsonl"), "w") as f:
                f.write(json.dumps({"step": 1, "miou": miou}) + "\n")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(demo.subprocess, "run", run)


def folders(tmp_path):
    lab, unl = tmp_path / "lab", tmp_path / "unl"
    for d in (lab / "images", lab / "labels", unl):
        d.mkdir(parents=True)
    img = Image.fromarray(np.zeros((8, 8), np.uint8))
    for i in range(8):
        img.save(lab / "images" / f"{i}.png")
        img.save(lab / "labels" / f"{i}.png")
    for i in range(70):  # 70 frames: 2 steps of 32 per epoch
        img.save(unl / f"{i}.png")
    (tmp_path / "teacher.pth").write_bytes(b"")
    return ["--teacher", str(tmp_path / "teacher.pth"), "--unlabelled", str(unl), "--labelled", str(lab)]


def test_real_mode_rows_seeds_statistics_and_curve(tmp_path, monkeypatch):
    calls = []
    fake_scripts(calls, monkeypatch)
    out = tmp_path / "out"
    argv = ["--out", str(out), *folders(tmp_path), "--rows", "scratch,rule,peak,closest,last,teacher",
            "--seeds", "3", "--distill-seeds", "2", "--teacher-seeds", "2", "--distill-steps", "4",
            "--curve-steps", "2,6"]
    real_data.main(argv)
    res = json.load(open(out / "results.json"))
    assert res["layers"] == {"rule": 11, "peak": 2, "closest": 1, "last": 12}
    distils = [a for s, a in calls if s == "train_pretrain.py"]
    flag = lambda args, name: args[args.index(name) + 1]
    # 4 layers x 2 distillation seeds (4 steps: 2 epochs of 2), then the curve: layer 11, seed 0, 6 steps, snapshots
    assert len(distils) == 9 and flag(distils[0], "--epochs") == "2" and flag(distils[0], "--steps") == "4"
    assert flag(distils[-1], "--keep-steps") == "2,6" and flag(distils[-1], "--steps") == "6"
    assert flag(distils[-1], "--teacher-layer") == "11" and flag(distils[-1], "--seed") == "0"
    segs = [a for s, a in calls if s == "train_seg.py"]
    inits = {os.path.basename(flag(a, "--out")): flag(a, "--init") if "--init" in a else "" for a in segs}
    assert len(segs) == 2 * (3 * 5 + 2 + 2)  # 5 student rows x 3 seeds, teacher x 2, curve x 2; two modes each
    assert inits["finetune_rule_s2"].endswith("student_l11_s0/ckpt.pt")  # seed 2 -> distillation run 2 mod 2 = 0
    assert inits["linear_peak_s1"].endswith("student_l2_s1/ckpt.pt") and inits["finetune_scratch_s1"] == ""
    assert inits["finetune_curve6_s0"].endswith("curve_l11/step6.pt")
    assert "finetune_teacher_s2" not in inits and inits["finetune_teacher_s1"].endswith("teacher.pth")
    # rule 63, 63.7, 64.8 against scratch 60, 60.5, 61: differences 3, 3.2, 3.8; mean 10/3, squared deviations
    # (1/3)^2 + (2/15)^2 + (7/15)^2 = 78/225, variance 39/225, standard error sqrt(13/225)
    c = res["minus_scratch"]["rule/finetune"]
    assert c["diffs"] == pytest.approx([3.0, 3.2, 3.8]) and c["excludes_zero"] is True
    half = 4.30265273 * math.sqrt(13) / 15
    assert (c["low"], c["high"]) == pytest.approx((10 / 3 - half, 10 / 3 + half), abs=1e-6)
    assert res["between_layers"]["rule/last/linear"]["diffs"] == pytest.approx([1.0, 1.2, 1.8])
    assert res["between_layers"]["rule/closest/finetune"]["diffs"] == pytest.approx([-2.0, -1.8, -1.2])
    assert res["curve"]["miou"] == {"2": {"finetune": 60.5, "linear": 55.5}, "6": {"finetune": 61.5, "linear": 56.5}}
    md = open(out / "results.md").read()
    assert "distillation run s mod 2" in md and "not annealed" in md and "hybrid - global" in md
    assert "| UNIP vit_tiny <- layer 1 (closest to 0.09 over all layers, NMI 0.100) | 65.5 +- 0.5 | 65.0, 65.5, 66.0 | " \
           "+5.0 [+5.0, +5.0] | yes |" in md
    assert "| 6 | 61.5 | 56.5 |" in md and "command: python tools/real_data.py --out" in md

    # a second call skips every stage and still reports each stage's time
    calls.clear()
    real_data.main(argv)
    res2 = json.load(open(out / "results.json"))
    assert calls == [] and res2["runs"] == res["runs"] and res2["seconds"].keys() == res["seconds"].keys()


def test_a_row_on_the_rules_layer_is_not_run_twice(tmp_path, monkeypatch):
    calls = []
    fake_scripts(calls, monkeypatch, recommended=1)  # the rule picks layer 1, as 'closest' does
    out = tmp_path / "out"
    real_data.main(["--out", str(out), *folders(tmp_path), "--rows", "scratch,rule,closest", "--seeds", "2",
               "--distill-seeds", "1", "--distill-steps", "2"])
    res = json.load(open(out / "results.json"))
    assert res["rows"] == ["scratch", "rule"] and res["same_as"] == {"closest": "rule"}
    assert len([a for s, a in calls if s == "train_pretrain.py"]) == 1
    md = open(out / "results.md").read()
    assert "row 'closest' (layer 1) is the same layer as row 'rule'" in md
    assert "each seed re-runs fine-tuning only" in md and "Between layers" not in md


def test_a_curve_as_long_as_the_rows_reuses_the_rules_first_distillation(tmp_path, monkeypatch):
    calls = []
    fake_scripts(calls, monkeypatch)
    out = tmp_path / "out"
    argv = ["--out", str(out), *folders(tmp_path), "--rows", "scratch,rule", "--seeds", "2", "--distill-seeds", "1",
            "--distill-steps", "4", "--curve-steps", "4,2"]
    real_data.main(argv)
    distils = [a for s, a in calls if s == "train_pretrain.py"]
    assert len(distils) == 1 and distils[0][distils[0].index("--keep-steps") + 1] == "2,4"
    segs = [os.path.basename(a[a.index("--out") + 1]) for s, a in calls if s == "train_seg.py"]
    assert sorted(segs) == sorted([f"{m}_{r}_s{s}" for m in ("finetune", "linear") for r in ("scratch", "rule")
                                   for s in (0, 1)] + ["finetune_curve2_s0", "linear_curve2_s0"])
    res = json.load(open(out / "results.json"))
    assert res["curve"]["miou"]["4"] == {"finetune": res["runs"]["rule/finetune"][0],
                                         "linear": res["runs"]["rule/linear"][0]}
    assert res["curve"]["folder"].endswith("student_l11_s0")
    # the rows' run distilled without snapshots cannot give a curve: a clear error, not a silent re-use
    for f in (out / "student_l11_s0").glob("step*.pt"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no snapshots for steps \\[2, 4\\]"):
        real_data.main(argv)


def split_folders(tmp_path, n_train=12, n_val=5):
    """A labelled set whose splits sit in their own folders ({train,val}/{images,masks}), and unlabelled frames that
    include the validation images (which must never reach NMI-HAD)."""
    root, unl = tmp_path / "set", tmp_path / "unl"
    img = Image.fromarray(np.zeros((8, 8), np.uint8))
    for split, n in (("train", n_train), ("val", n_val)):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
            for i in range(n):
                img.save(root / split / sub / f"{split}{i:02d}.png")
    unl.mkdir()
    for i in range(64):
        img.save(unl / f"{i}.png")
    return ["--labelled", str(root), "--img-dir", "train/images", "--label-dir", "train/masks",
            "--val-img-dir", "val/images", "--val-label-dir", "val/masks",
            "--unlabelled", f"{unl},{root / 'val' / 'images'},{root / 'train' / 'images'}"]


def test_two_teachers_two_budgets_split_folders(tmp_path, monkeypatch):
    calls = []
    fake_scripts(calls, monkeypatch)
    monkeypatch.setitem(globals(), "GAIN", [("student_clip_l11_", 3.0), ("student_dino_l11_", 3.0),
                                            ("student_clip_l2_", 1.0), ("student_clip_l12_", 2.0)])
    (tmp_path / "a.pth").write_bytes(b"")
    (tmp_path / "b.pth").write_bytes(b"")
    out = tmp_path / "out"
    argv = ["--out", str(out), *split_folders(tmp_path), "--teacher", f"{tmp_path / 'a.pth'},{tmp_path / 'b.pth'}",
            "--teacher-arch", "clip_vitb16,dinov2_vits14", "--teacher-name", "clip,dino",
            "--rows", "scratch,clip:rule,clip:peak,clip:last,dino:rule,dino:teacher", "--budgets", "4,10",
            "--teacher-budgets", "10", "--teacher-seeds", "1", "--seeds", "2", "--distill-steps", "2",
            "--finetune-iters", "3", "--min-passes", "4"]
    real_data.main(argv)
    # the budgets: nested draws from the training folder, written once; the validation list is the val folder
    split = lambda n: (out / "split" / n).read_text().split()
    b4, b10, val = split("train_b4.txt"), split("train_b10.txt"), split("val.txt")
    assert len(b4) == 4 and len(b10) == 10 and set(b4) <= set(b10) and all(s.startswith("train") for s in b10)
    assert val == [f"val{i:02d}" for i in range(5)]
    # NMI-HAD never sees a validation frame: 64 + 12 training frames linked, the 5 validation frames left out
    linked = os.listdir(out / "unlabelled")
    assert len(linked) == 76 and not any("val" in f for f in linked)
    flag = lambda args, name: args[args.index(name) + 1]
    distils = [a for s, a in calls if s == "train_pretrain.py"]
    assert sorted((flag(a, "--teacher-arch"), flag(a, "--teacher-layer"), os.path.basename(flag(a, "--out")))
                  for a in distils) == [("clip_vitb16", "11", "student_clip_l11_s0"),
                                        ("clip_vitb16", "11", "student_clip_l11_s1"),
                                        ("clip_vitb16", "12", "student_clip_l12_s0"),
                                        ("clip_vitb16", "12", "student_clip_l12_s1"),
                                        ("clip_vitb16", "2", "student_clip_l2_s0"),
                                        ("clip_vitb16", "2", "student_clip_l2_s1"),
                                        ("dinov2_vits14", "11", "student_dino_l11_s0"),
                                        ("dinov2_vits14", "11", "student_dino_l11_s1")]
    segs = {os.path.basename(flag(a, "--out")): a for s, a in calls if s == "train_seg.py"}
    # 5 student rows x 2 budgets x 2 seeds, the teacher at budget 10 with one seed; two modes each
    assert len(segs) == 2 * (5 * 2 * 2 + 1)
    a = segs["finetune_clip_rule_b4_s1"]
    assert flag(a, "--train-split").endswith("train_b4.txt") and flag(a, "--val-img-dir") == "val/images"
    assert flag(a, "--init").endswith("student_clip_l11_s1/ckpt.pt") and flag(a, "--iters") == "3"
    assert flag(segs["linear_scratch_b10_s0"], "--iters") == "5"  # 4 passes over 10 frames at batch 8
    assert flag(segs["finetune_dino_teacher_b10_s0"], "--model") == "dinov2_vits14"
    res = json.load(open(out / "results.json"))
    assert res["layers"] == {"clip:rule": 11, "clip:peak": 2, "clip:last": 12, "dino:rule": 11}
    assert res["budgets"] == {"4": 4, "10": 10} and res["iters"] == {"4": 3, "10": 5}
    # the fake's mIoU: 60 + gain + 0.5 seed (- 5 probed); both teachers' layer 11 gain 3: rule - rule = 0
    assert res["runs"]["clip:rule/finetune/b4"] == pytest.approx([63.0, 63.5])
    assert res["runs"]["clip:peak/linear/b10"] == pytest.approx([56.0, 56.5])
    assert res["minus_scratch"]["clip:rule/finetune/b10"]["diffs"] == pytest.approx([3.0, 3.0])
    assert res["between_layers"]["clip:rule/clip:last/linear/b4"]["diffs"] == pytest.approx([1.0, 1.0])
    assert res["between_layers"]["clip:rule/dino:rule/finetune/b10"]["diffs"] == pytest.approx([0.0, 0.0])
    d = res["run_details"]["finetune_clip_rule_b4_s1"]
    assert d["budget"] == 4 and d["seed"] == 1 and d["checkpoint"].endswith("finetune_clip_rule_b4_s1/ckpt.pt")
    md = open(out / "results.md").read()
    assert "4 labelled frames" in md and "clip rule - dino rule" in md and "the teacher dinov2_vits14 itself" in md
    # the figure: one point per row, mode and budget (the teacher only at 10), its tooltip the table's numbers
    plot_budgets.main([str(out / "results.json"), str(tmp_path / "fig.svg")])
    svg = ElementTree.parse(tmp_path / "fig.svg").getroot()
    titles = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}title")]
    assert len(titles) == 2 * (5 * 2 + 1)
    assert f"{res['labels']['clip:rule']}: 63.2 +- 0.4 (2 seeds)" in titles
    assert f"{res['labels']['dino:teacher']}: 60.0 +- 0.0 (1 seed)" in titles


def test_config_errors_name_the_flag(capsys):
    base = ["--teacher", "a.pth,b.pth", "--unlabelled", "u", "--labelled", "l", "--teacher-arch", "vit_base,vit_large"]
    assert parse(base).rows == "scratch,vit_base:rule,vit_base:peak,vit_base:teacher,vit_large:rule,vit_large:peak," \
                               "vit_large:teacher"
    for bad, msg in ((["--teacher-arch", "vit_base"], "one preset per teacher"),
                     (["--rows", "scratch,x:rule"], "kinds"), (["--budgets", "4,4"], "distinct positive"),
                     (["--budgets", "4", "--teacher-budgets", "8"], "one of --budgets"),
                     (["--val-img-dir", "v"], "go together")):
        with pytest.raises(SystemExit):
            parse(base + bad)
        assert msg in capsys.readouterr().err


def test_val_subsets_pools_pixels_and_pairs_seeds(tmp_path, capsys):
    """val_subsets re-scores saved runs: mIoU from pixels summed over the frames (not the mean of per-frame IoU),
    differences paired by seed, and a subset of every frame reproduces the full set with no spread."""
    rng = np.random.default_rng(3)
    details = {}
    for row in ("scratch", "a:rule"):
        for seed in (0, 1, 2):
            folder = tmp_path / f"finetune_{row.replace(':', '_')}_s{seed}"
            folder.mkdir()
            union = rng.integers(50, 100, (6, 2))
            union[0, 1] = 0  # a frame with no pixel of class 1 in label or prediction
            inter = (union * rng.uniform(0.3, 1.0, (6, 2))).astype(int)
            images = {f"f{i}": {"iou": [0, 0], "intersection": inter[i].tolist(), "union": union[i].tolist()}
                      for i in range(6)}
            json.dump({"step": 1, "classes": ["bg", "x"], "images": images}, open(folder / "per_image.json", "w"))
            details[folder.name] = {"row": row, "mode": "finetune", "budget": 4, "seed": seed,
                                    "checkpoint": str(folder / "ckpt.pt")}
    path = tmp_path / "results.json"
    json.dump({"run_details": details, "rows": ["scratch", "a:rule"]}, open(path, "w"))
    runs, names = val_subsets.load_counts(json.load(open(path)))
    assert names == [f"f{i}" for i in range(6)] and len(runs[("a:rule", "finetune", 4)]) == 3
    inter, union = runs[("scratch", "finetune", 4)][1]
    by_hand = 100 * (inter[:, 0].sum() / union[:, 0].sum() + inter[:, 1].sum() / union[:, 1].sum()) / 2
    assert val_subsets.miou(inter, union, None)[0] == pytest.approx(by_hand)
    assert val_subsets.miou(inter, union, np.array([[0]]))[0] == pytest.approx(100 * inter[0, 0] / union[0, 0])
    full = [val_subsets.miou(*runs[("a:rule", "finetune", 4)][s], None)[0]
            - val_subsets.miou(*runs[("scratch", "finetune", 4)][s], None)[0] for s in range(3)]
    val_subsets.main([str(path), "--frames", "6,2", "--draws", "50"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| a:rule - scratch")]
    assert len(lines) == 2
    cells = [c.strip() for c in lines[0].split("|")]
    assert cells[4].startswith(f"{np.mean(full):+.1f} [") and cells[5] == "6" and cells[6] == "0.0"
    assert float(lines[1].split("|")[6]) > 0  # 2-frame subsets spread
    os.remove(tmp_path / "finetune_scratch_s1" / "per_image.json")
    with pytest.raises(SystemExit, match="finetune_scratch_s1.*missing"):
        val_subsets.load_counts(json.load(open(path)))
