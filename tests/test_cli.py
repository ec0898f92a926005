"""The command line: composed config, and bad input refused before any training."""
from __future__ import annotations

import json

import pytest

from tests.helpers import FAST, launch

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
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, out
    assert not (run_dir / "metrics.jsonl").exists(), "training started"


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["model=nope"], ["Could not find 'model/nope'", "70b"]),
        (["method=nope"], ["Could not find 'method/nope'", "qlora"]),
        (["train.nope=1"], ["Key 'nope' is not in struct"]),
        (["data.train=/no/such/file.jsonl"], ["/no/such/file.jsonl", "does not exist"]),
        (["model.path=/no/such/model"], ["/no/such/model", "config.json"]),
        (["train.micro_batch_size=0"], ["train.micro_batch_size=0", "positive integer"]),
        (["data.on_bad_row=maybe"], ["data.on_bad_row='maybe'", "error, skip"]),
        (["optim.schedule=wavy"], ["optim.schedule='wavy'", "cosine"]),
    ],
)
def test_bad_config_is_refused_without_traceback(tmp_path, tiny_model, overrides, needles):
    proc = launch(f"model.path={tiny_model}", *overrides, f"hydra.run.dir={tmp_path}", check=False)
    assert_refused(proc, tmp_path, *needles)


@pytest.mark.parametrize("kind", sorted(BAD) + ["undecodable"])
def test_bad_row_is_refused_with_file_and_row(tmp_path, tiny_model, kind):
    data = tmp_path / "train.jsonl"
    lines = [json.dumps(GOOD).encode()] * 3
    if kind == "undecodable":
        lines.append(b'{"prompt": "\xc3\x28", "completion": "x"}')
    else:
        lines.append(json.dumps(BAD[kind][0]).encode())
    data.write_bytes(b"\n".join(lines + [json.dumps(GOOD).encode()]) + b"\n")
    run_dir = tmp_path / "run"
    extra = ["data.truncation=false"] if kind == "too_long" else []
    proc = launch(f"model.path={tiny_model}", f"data.train={data}", f"hydra.run.dir={run_dir}", *extra, check=False)
    assert_refused(proc, run_dir, f"{data}, row 4", BAD.get(kind, (None, "not valid UTF-8"))[1], "data.on_bad_row=skip")


def test_skip_bad_rows_trains_and_counts(tmp_path, tiny_model):
    data = tmp_path / "train.jsonl"
    rows = [GOOD] * 12 + [BAD["role_order"][0], BAD["empty_answer"][0]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = launch(
        f"model.path={tiny_model}", f"data.train={data}", "data.on_bad_row=skip", "data.packing=false",
        "data.eval=null", *FAST, "train.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert "12/14 rows kept" in proc.stderr and "role_order x1" in proc.stderr and "empty_answer x1" in proc.stderr
    assert (tmp_path / "run" / "summary.json").exists()
