"""demo.py end to end at a tiny size: the four real stages (teacher, analysis, NMI-HAD, fine-tuning and
probing; the teacher as a subprocess, the others in this process to save their start-up), the report and
results.json agree with the runs' own logs, and a second call runs nothing (every stage is found done) and
reports the same numbers."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import demo  # noqa: E402
from conftest import run_main  # noqa: E402

TINY = ["--size", 32, "--teacher-arch", "vit_micro", "--teacher-iters", 2, "--distill-steps", 2, "--finetune-iters", 2,
        "--label-budget", 8, "--analyse-images", 2, "--val-images", 2, "--amp", "none"]


def test_demo_runs_every_stage_and_resumes_without_rerunning(tmp_path, capsys, monkeypatch):
    real, started = subprocess.run, []

    def stage_run(cmd, check, cwd):  # the first stage as a real process; the others in this one, to save start-ups
        started.append(os.path.basename(cmd[1]))
        if len(started) == 1:
            return real(cmd, check=check, cwd=cwd)
        p = run_main(*cmd[1:])
        if p.returncode:
            raise subprocess.CalledProcessError(p.returncode, cmd, p.stdout, p.stderr)

    monkeypatch.setattr(demo.subprocess, "run", stage_run)
    out = tmp_path / "demo"
    demo.main(["--out", str(out), *map(str, TINY)])
    first = capsys.readouterr().out
    res = json.load(open(out / "results.json"))
    layer = json.load(open(out / "analyze" / "nmi.json"))["recommended_layer"]
    assert res["layer"] == layer and 1 <= layer <= 6  # vit_micro: 6 blocks
    for row, mode in [(r, m) for r in ("scratch", "rule") for m in demo.MODES]:
        folder = out / f"{mode}_{row}_s0"
        assert (folder / "done").exists()
        assert res["runs"][f"{row}/{mode}"] == [demo.final_miou(folder)]  # the table's number is the run's
    assert (out / f"student_l{layer}_s0" / "ckpt.pt").exists()
    for m in demo.MODES:
        assert res["minus_scratch"][m] == [res["runs"][f"rule/{m}"][0] - res["runs"][f"scratch/{m}"][0]]
    assert "mIoU (%) on 2 validation scenes" in (out / "results.md").read_text()
    assert "7 stages run now" in first and len(res["seconds"]) == 7
    assert started == ["train_seg.py", "analyze.py", "train_pretrain.py"] + ["train_seg.py"] * 4

    demo.main(["--out", str(out), *map(str, TINY)])
    second = capsys.readouterr().out
    assert second.count("(already done:") == 7 and "0 stages run now" in second
    again = json.load(open(out / "results.json"))
    assert again["runs"] == res["runs"] and again["seconds"] == res["seconds"]
