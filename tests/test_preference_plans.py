"""Preference objectives under every data-parallel plan, with QLoRA, and across a kill.

One 2-process launch (tests/matrix_worker.py) runs every cell: dpo under ddp, zero2, zero3
and fsdp2 (LoRA), objective=reward under ddp, zero2 and fsdp2 (LoRA, the score head trained in full), dpo with method=full under zero3 (the reference log-probs computed once,
sharded over ranks), dpo with QLoRA under ddp, and kto and orpo under ddp (their
global-batch quantities, KTO's KL reference point and ORPO's NLL token count, are all-reduced),
kto also with method=full (the reference log-probs of every step's mismatched KL pairs
precomputed, sharded, and each rank reading its own positions of the global batch).
Each cell's per-step loss, grad norm and rewards/margins equal the single process's on
the same global batch (2 rows x 2 ranks vs 2 rows x 2 accumulation steps), with
method.dropout=0 (dropout masks are drawn per rank).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import (REPO, assert_resumed_exactly, kill_once_committed, launch, metrics, start,
                           summary)
from tests.matrix_worker import cell_dir, cell_overrides

pytestmark = pytest.mark.slow
PREF = REPO / "data/reverse_pref/train.jsonl"
KTO = REPO / "data/reverse_kto/train.jsonl"
STEPS = 3


FULL_ROWS = 64


def train_file(objective: str, method: str, tmp_path) -> Path:
    """The bundled training file, or for method=full its first FULL_ROWS rows: the reference
    pass covers every row of the file before training and 3 steps of 4 rows use 12 (on
    2000 rows it was most of the zero3:full cell and of its single-process run)."""
    data = KTO if objective == "kto" else PREF
    if method != "full":
        return data
    cut = tmp_path / f"{data.parent.name}-{FULL_ROWS}.jsonl"
    if not cut.exists():
        cut.write_text("".join(data.read_text().splitlines(keepends=True)[:FULL_ROWS]))
    return cut


def pref(objective: str, method: str, data: Path) -> list[str]:
    return [f"objective={objective}", f"data.train={data}", "train.save_every=1000", f"train.max_steps={STEPS}"] + (
        ["method.dropout=0"] if method != "full" else [])


CELLS = {  # cell -> the single-process reference it must equal
    **{f"{plan}:lora": ("dpo", "lora") for plan in ("ddp", "zero2", "zero3", "fsdp2")},
    "zero3:full": ("dpo", "full"),
    "ddp:qlora": ("dpo", "qlora"),
    "ddp:lora|kto": ("kto", "lora"),
    "ddp:full|kto": ("kto", "full"),
    "ddp:lora|orpo": ("orpo", "lora"),
    # objective=reward (issue 22): the sequence-classification model, its fresh score head
    # trained beside the adapter (PEFT modules_to_save), sharded by fsdp2 and zero2
    **{f"{plan}:lora|reward": ("reward", "lora") for plan in ("ddp", "zero2", "fsdp2")},
}


def cell_string(cell: str, tmp_path) -> str:
    head = cell.split("|")[0]
    objective, method = CELLS[cell]
    return "|".join([head, *pref(objective, method, train_file(objective, method, tmp_path))])


def reference_run(tiny_model, objective: str, method: str, run_dir, data: Path) -> list[dict]:
    """The same job on one process in this process: 2 rows x 2 accumulation steps."""
    from hydra import compose, initialize_config_dir

    from launch.config import finalize, register_resolvers
    from parallel import build_plan
    from trainers.loop import train

    register_resolvers()
    overrides = cell_overrides("none", method, tiny_model, PREF) + pref(objective, method, data)
    overrides = [o for o in overrides if not o.startswith(("launcher.nproc_per_node", "train.grad_accum"))]
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = finalize(compose("config", overrides=overrides + ["train.grad_accum=2"]), str(run_dir))
    train(cfg, build_plan)
    return [r for r in metrics(run_dir) if "loss" in r]


def test_dpo_kto_orpo_under_every_plan_equal_one_process(tmp_path, tiny_model):
    out = tmp_path / "runs"
    out.mkdir()
    cells = [cell_string(c, tmp_path) for c in CELLS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests" / "matrix_worker.py"), str(out), str(tiny_model), str(PREF), *cells],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads((out / "results.json").read_text())
    failed = {c: r for c, r in results.items() if r["status"] != "completed"}
    assert not failed, "\n\n".join(f"{c}: {r['error']}" for c, r in failed.items())
    refs = {}
    for cell, string in zip(CELLS, cells):
        key = CELLS[cell]
        if key not in refs:
            refs[key] = reference_run(tiny_model, *key, tmp_path / "ref-{}-{}".format(*key),
                                      train_file(*key, tmp_path))
        ref = {r["step"]: r for r in refs[key]}
        got = {r["step"]: r for r in metrics(out / cell_dir(string)) if "loss" in r}
        assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1)), cell
        for s in ref:
            for k, tol in (("loss", 1e-5), ("grad_norm", 1e-4), ("rewards/margins", 1e-4), ("logps/chosen", 1e-5),
                           ("kl", 1e-4), ("margin", 1e-4), ("accuracy", 1e-9)):
                if k in ref[s]:
                    assert abs(got[s][k] - ref[s][k]) <= tol * max(abs(ref[s][k]), 1e-2), (cell, s, k, got[s], ref[s])
        assert len({round(r["loss"], 6) for r in ref.values()}) == STEPS, (cell, "the policy did not move", ref)
        if key[0] == "kto":  # else the KL reference point, clamped at 0, never reached the loss
            assert any(r["kl"] > 0.01 for r in ref.values()), (cell, ref)
    print({c: r["seconds"] for c, r in results.items()})


def test_dpo_full_kill_and_relaunch_resumes_exactly(tmp_path, tiny_model):
    """method=full: the reference log-probs are computed before the checkpoint is loaded
    (from the initial weights) and kept in the run directory, where the relaunch finds them
    (it does not rewrite them)."""
    args = [f"model.path={tiny_model}", "objective=dpo", *first_rows("reverse_pref", tmp_path), "method=full",
            "train.max_steps=8", "train.micro_batch_size=4", "train.grad_accum=1", "train.save_every=3",
            "train.eval_every=1000", "data.metric_rows=4"]
    run, ref = killed_and_relaunched(tmp_path, args, ["*.npy"])
    got, want = summary(run), summary(ref)
    assert got["final_eval_preference_accuracy"] == want["final_eval_preference_accuracy"]
    assert last_eval(run, "eval_rewards/margins") == pytest.approx(last_eval(ref, "eval_rewards/margins"), rel=1e-6)


def test_kto_full_kill_and_relaunch_resumes_exactly(tmp_path, tiny_model):
    """kto with method=full also keeps the reference log-probs of the mismatched KL pairs of
    every step (`kl-*.npy`) and of each held-out row (`*.kl-*.npy`) in the run directory;
    the relaunch finds them too."""
    args = [f"model.path={tiny_model}", "objective=kto", *first_rows("reverse_kto", tmp_path), "method=full",
            "train.max_steps=8", "train.micro_batch_size=4", "train.grad_accum=1", "train.save_every=3",
            "train.eval_every=1000", "data.metric_rows=4"]
    run, ref = killed_and_relaunched(tmp_path, args, ["kl-*.npy", "*.kl-*.npy"])
    assert any(r.get("kl", 0) > 0.01 for r in metrics(ref)), "the KL reference point never reached the loss"
    for key in ("eval_kl", "eval_rewards/margins"):
        assert last_eval(run, key) == pytest.approx(last_eval(ref, key), rel=1e-6), key


def first_rows(name: str, tmp_path) -> list[str]:
    """data=NAME with its train and eval files cut to their first FULL_ROWS rows: with
    method=full the reference pass covers every row before training (8 steps of 4 use 32)."""
    out = [f"data={name}"]
    for split in ("train", "eval"):
        cut = tmp_path / f"{name}-{split}.jsonl"
        cut.write_text("".join((REPO / "data" / name / f"{split}.jsonl").read_text().splitlines(True)[:FULL_ROWS]))
        out.append(f"data.{split}={cut}")
    return out


def last_eval(run_dir, key: str) -> float:
    return [r for r in metrics(run_dir) if key in r][-1][key]


def killed_and_relaunched(tmp_path, args: list[str], stored: list[str]):
    """`args` run uninterrupted in this process (ref), and launched, killed after its first
    checkpoint and relaunched (run); the relaunch must end exactly like ref and leave the
    reference files (each pattern of `stored` matching some) of the first launch untouched."""
    from hydra import compose, initialize_config_dir

    from launch.config import finalize, register_resolvers
    from parallel import build_plan
    from trainers.loop import train

    register_resolvers()
    ref = tmp_path / "ref"
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        train(finalize(compose("config", overrides=args), str(ref)), build_plan)
    run = tmp_path / "run"
    proc = start(run, *args)
    assert kill_once_committed(proc, run) >= 3
    assert not (run / "summary.json").exists()
    files = {f: f.stat().st_mtime_ns for f in (run / "reference").glob("*.npy")}
    for pattern in stored:
        assert list((run / "reference").glob(pattern)), (pattern, sorted(files))
    launch(*args, f"hydra.run.dir={run}")
    assert {f: f.stat().st_mtime_ns for f in (run / "reference").glob("*.npy")} == files
    assert_resumed_exactly(run, ref, steps=8)
    return run, ref
