"""The sweep summary (launch/sweep.py) from the files a sweep leaves, in-process: which
point is best, which overrides vary, when the sweep is complete, and the markdown table.
(A real sweep that writes them is run on the SLURM cluster in tests/test_slurm_launcher.py.)"""
from __future__ import annotations

import json

from launch.sweep import markdown, refresh_sweep_summary


def make_sweep(root, points: dict[int, tuple[list[str], dict | None]]):
    """points: num -> (overrides, summary.json of its run, or None when it has none yet)."""
    manifest = {"sweep_dir": str(root), "launcher": "local", "points": []}
    for num, (overrides, summary) in points.items():
        run_dir = root / str(num)
        run_dir.mkdir(parents=True)
        if summary is not None:
            (run_dir / "summary.json").write_text(json.dumps(summary))
        manifest["points"].append({"num": num, "overrides": overrides, "run_dir": str(run_dir)})
    (root / "sweep.json").write_text(json.dumps(manifest))


def done(eval_loss, loss=0.5, status="completed", step=4):
    return {"status": status, "final_step": step, "final_eval_loss": eval_loss, "final_loss": loss}


def test_best_is_the_lowest_eval_loss_of_the_completed_points(tmp_path):
    make_sweep(tmp_path, {
        0: (["method.r=8", "optim.lr=1e-4", "train.max_steps=4"], done(1.25)),
        1: (["method.r=16", "optim.lr=1e-4", "train.max_steps=4"], done(0.75, loss=0.123456)),
        2: (["method.r=8", "optim.lr=2e-4", "train.max_steps=4"], done(0.5, status="failed", step=2)),  # lower, failed
        3: (["method.r=16", "optim.lr=2e-4", "train.max_steps=4"], done(1.0)),
    })
    data = refresh_sweep_summary(tmp_path)
    assert data["best"] == 1 and data["metric"] == "final_eval_loss" and data["complete"]
    assert data["varying"] == ["method.r", "optim.lr"]  # train.max_steps is the same everywhere
    assert [p["status"] for p in data["points"]] == ["completed", "completed", "failed", "completed"]
    assert data["points"][1]["params"] == {"method.r": "16", "optim.lr": "1e-4", "train.max_steps": "4"}
    assert json.loads((tmp_path / "sweep_summary.json").read_text()) == data
    md = (tmp_path / "sweep_summary.md").read_text()
    assert md == markdown(data)
    lines = md.splitlines()
    assert lines[0] == "# Sweep summary"
    assert "points: 4 (3 completed); best = lowest final eval loss" in md
    header = lines.index("| # | method.r | optim.lr | status | step | eval loss | train loss | best |")
    assert lines[header + 1] == "|---|---|---|---|---|---|---|---|"
    assert lines[header + 2 : header + 6] == [
        "| 0 | 8 | 1e-4 | completed | 4 | 1.2500 | 0.5000 |  |",
        "| 1 | 16 | 1e-4 | completed | 4 | 0.7500 | 0.1235 | **best** |",
        "| 2 | 8 | 2e-4 | failed | 2 | 0.5000 | 0.5000 |  |",
        "| 3 | 16 | 2e-4 | completed | 4 | 1.0000 | 0.5000 |  |",
    ]
    assert md.count("**best**") == 1
    assert f"Run dirs: 0=`{tmp_path / '0'}`, 1=`{tmp_path / '1'}`" in md


def test_an_unfinished_sweep_without_eval_ranks_by_train_loss(tmp_path):
    make_sweep(tmp_path, {
        0: (["optim.lr=1e-4", "+extra=a"], done(None, loss=0.9)),
        1: (["optim.lr=2e-4", "+extra=a"], done(None, loss=0.4)),
        2: (["optim.lr=3e-4", "+extra=a"], None),  # its job has not written anything yet
    })
    data = refresh_sweep_summary(tmp_path)
    assert data["metric"] == "final_loss" and data["best"] == 1 and not data["complete"]
    assert data["varying"] == ["optim.lr"] and data["points"][2]["status"] == "not started"
    md = markdown(data)
    assert "points: 3 (2 completed), still running; best = lowest final loss" in md
    assert "| 2 | 3e-4 | not started | - | - | - |  |" in md


def test_a_sweep_whose_points_all_share_their_overrides_lists_every_key(tmp_path):
    make_sweep(tmp_path, {0: (["optim.lr=1e-4"], done(1.0)), 1: (["optim.lr=1e-4"], done(2.0))})
    data = refresh_sweep_summary(tmp_path)
    assert data["varying"] == ["optim.lr"] and data["best"] == 0
    make_sweep(tmp_path / "none", {0: ([], done(None, status="failed"))})
    data = refresh_sweep_summary(tmp_path / "none")
    assert data["best"] is None and data["complete"] and "**best**" not in markdown(data)
