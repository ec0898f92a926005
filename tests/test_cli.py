"""The command line: composed config, and bad input refused before any training.

What only Hydra's entry point does (`--cfg`, composition errors, the process's exit code)
runs as `python launch.py` subprocesses, which are cheap when they stop before the torch
import. Everything the launcher itself refuses is checked in-process (helpers.refused:
launch.main.main with the launcher replaced by a recorder), with one subprocess case
proving the same refusal reaches the real command line as exit code 2 and one paragraph."""
from __future__ import annotations

import json

import pytest

from tests.helpers import launch, launch_in_process, refused

GOOD = {"messages": [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]}
BAD = {
    "missing_field": ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}, "needs 'role' and 'content'"),
    "role_order": ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}, "out of order"),
    "empty_answer": ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}, "is empty"),
    "too_long": ({"messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}]}, "longer than data.max_seq_len"),
}


def test_cfg_job_prints_composed_config():
    proc = launch("--cfg", "job", "method=qlora", "method.r=8")
    assert "quantize: nf4" in proc.stdout and "r: 8" in proc.stdout and "max_steps:" in proc.stdout


def assert_refused(proc, run_dir, *needles):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # Hydra's own exit code for a config it cannot compose
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, out
    assert not (run_dir / "metrics.jsonl").exists(), "training started"


def test_bad_config_is_refused_by_hydra_without_traceback(tmp_path, tiny_model):
    proc = launch(f"model.path={tiny_model}", "train.nope=1", f"hydra.run.dir={tmp_path}", check=False)
    assert_refused(proc, tmp_path, "Key 'nope' is not in struct")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--cfg", "job", "optim=adamw9bit"],
         ["optim=adamw9bit", "config group `optim`", "adafactor, adamw, adamw8bit, lion", "Did you mean optim=adamw8bit?"]),
        (["-m", "optim=adamw,adamw9bit"], ["optim=adamw9bit", "Did you mean optim=adamw8bit?"]),
        (["parallel=zero4"], ["parallel=zero4", "zero3_offload", "Did you mean parallel=zero3?"]),
        (["data=nope"], ["data=nope", "conf/data/ holds", "reverse_pref"]),
        (["model=7b"], ["model=7b", "Did you mean model=8b?"]),  # the nearest size, not the nearest spelling (70b)
    ],
)
def test_a_mistyped_group_option_is_refused_before_hydra_composes_or_writes(tmp_path, args, needles):
    """One paragraph naming the option files of the group and the nearest one, exit code 2
    like every refusal; under -m before the sweep's first point runs."""
    run_dir, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    proc = launch(*args, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={sweep_dir}", check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert all(n in proc.stderr for n in needles), proc.stderr
    assert not run_dir.exists() and not sweep_dir.exists()


def test_launcher_refusal_reaches_the_command_line_as_exit_code_2(tmp_path, tiny_model):
    proc = launch(f"model.path={tiny_model}", "train.micro_batch_size=0", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.strip() == "error: train.micro_batch_size=0 must be a positive integer.", proc.stderr


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["data.train=/no/such/file.jsonl"], ["/no/such/file.jsonl", "does not exist"]),
        (["model.path=/no/such/model"], ["/no/such/model", "config.json"]),
        (["train.micro_batch_size=0"], ["train.micro_batch_size=0", "positive integer"]),
        (["data.on_bad_row=maybe"], ["data.on_bad_row='maybe'", "error, skip"]),
        (["optim.schedule=wavy"], ["optim.schedule='wavy'", "cosine"]),
    ],
)
def test_bad_config_is_refused_before_launch(tmp_path, tiny_model, overrides, needles):
    out = refused(tmp_path, f"model.path={tiny_model}", *overrides)
    for needle in needles:
        assert needle in out, out


def bad_rows_file(tmp_path, kind):
    data = tmp_path / "train.jsonl"
    lines = [json.dumps(GOOD).encode()] * 3
    if kind == "undecodable":
        lines.append(b'{"prompt": "\xc3\x28", "completion": "x"}')
    else:
        lines.append(json.dumps(BAD[kind][0]).encode())
    data.write_bytes(b"\n".join(lines + [json.dumps(GOOD).encode()]) + b"\n")
    return data


@pytest.mark.parametrize("kind", sorted(BAD) + ["undecodable"])
def test_bad_row_is_refused_with_file_and_row(tmp_path, tiny_model, kind):
    data = bad_rows_file(tmp_path, kind)
    extra = ["data.truncation=false"] if kind == "too_long" else []
    out = refused(tmp_path / "run", f"model.path={tiny_model}", f"data.train={data}", *extra)
    for needle in (f"{data}, row 4", BAD.get(kind, (None, "not valid UTF-8"))[1], "data.on_bad_row=skip"):
        assert needle in out, out


def test_skip_bad_rows_keeps_the_good_ones_counts_the_rest_and_launches(tmp_path, tiny_model):
    """data.on_bad_row=skip: the launcher reports what it dropped and hands the workers a
    token cache of the good rows only (what the workers train on; training from a cache is
    what every training test does)."""
    from trainers.data.token_cache import TokenStore

    data = tmp_path / "train.jsonl"
    rows = [GOOD] * 12 + [BAD["role_order"][0], BAD["empty_answer"][0]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = launch_in_process(
        tmp_path / "run", f"model.path={tiny_model}", f"data.train={data}", "data.on_bad_row=skip",
        "data.packing=false", "data.eval=null", "train.micro_batch_size=4", "train.grad_accum=2")
    out = proc.stderr
    assert proc.returncode == 0 and len(proc.calls) == 1, out
    assert "12/14 rows kept" in out and "role_order x1" in out and "empty_answer x1" in out, out
    cfg, config_path = proc.calls[0]
    assert config_path.exists()  # the config the workers load
    (train,) = cfg.data.prepared.train
    store = TokenStore(train.dir)
    assert len(store) == 12 and store.report().kept == 12


# Plan x method combinations each plan refuses before any worker starts (moved here from
# the plans' slow test modules: the refusal needs no launch).
PLAN_REFUSALS = {
    "zero2-offload_param": (["method.dropout=0", "parallel=zero2", "parallel.offload_param=true",
                             "launcher.nproc_per_node=2"],
                            ["parallel=zero2 with method=lora", "needs ZeRO stage 3", "parallel=zero3_offload"]),
    "fsdp2-full-nf4": (["method=full", "method.quantize=nf4", "parallel=fsdp2", "launcher.nproc_per_node=2"],
                       ["parallel=fsdp2 with method=full", "method=qlora", "parallel=ddp"]),
}


@pytest.mark.parametrize("case", sorted(PLAN_REFUSALS))
def test_refused_plan_combination_says_why_and_what_instead(tmp_path, tiny_model, case):
    overrides, needles = PLAN_REFUSALS[case]
    out = refused(tmp_path, f"model.path={tiny_model}", *overrides)
    for needle in needles:
        assert needle in out, out


def test_a_sweep_whose_every_point_is_refused_exits_2(tmp_path):
    """Nothing ran and nothing was submitted: the command says so and fails (it exited 0)."""
    proc = launch("-m", "method.r=8,16", "launcher=slurm", "dry_run=true", f"hydra.sweep.dir={tmp_path}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("error: parallel=none with method=lora: parallel=none runs one process, but 8") == 2
    assert "error: no point of the sweep ran: point(s) 0, 1 were refused (messages above)." in proc.stderr
