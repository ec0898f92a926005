"""scripts/gpu_check.py (`make gpu-check`) on a machine without GPUs: it says so in one line
and exits 0; its own logic, rehearsed on CPU (gloo, fp32, 2 processes): a plan-parity row,
the precision and backend rows read from what the workers recorded, the rows that need
CUDA skipped with their reason, and the table and exit code."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "gpu_check.py"
sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402


def run_script(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_without_gpus_it_says_so_in_one_line_and_exits_0(tmp_path):
    proc = run_script("--work", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no GPU visible" in lines[0] and "--rehearse-on-cpu" in lines[0], proc.stdout
    assert not (tmp_path / "runs").exists()  # nothing launched


def test_table_and_exit_code():
    rows = [gpu_check.Row("precision=auto", "bfloat16", "bfloat16 on NVIDIA H100", "PASS"),
            gpu_check.Row("optim=paged_adamw8bit vs adamw", "losses within 0.05 rel.", "not in this checkout", "SKIP")]
    text = gpu_check.table(rows)
    head, rule, *body = text.splitlines()
    assert head.split(" | ")[0].strip() == "check" and [c.strip() for c in head.split("|")][1:] == [
        "expected", "measured", "verdict"]
    assert len({len(line) for line in (head, rule, *body)}) == 1  # one aligned table
    assert [line.split("|")[-1].strip() for line in body] == ["PASS", "SKIP"]
    assert gpu_check.exit_code(rows) == 0  # a skipped row is not a mismatch
    assert gpu_check.exit_code([*rows, gpu_check.Row("fsdp2 x8 vs 1 device", "", "", "FAIL")]) == 1


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu-check")
    proc = run_script("--rehearse-on-cpu", "--steps", "3", "--work", str(work),
                      "--checks", "precision", "backend", "ddp", "qlora", "paged_adamw8bit", "memory")
    return work, proc


def _rows(out: str) -> dict[str, list[str]]:
    """check -> [expected, measured, verdict] from the printed table."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if len(cells) == 4 and cells[0] != "check":
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_rehearsal_runs_a_plan_parity_row_and_skips_what_needs_cuda(rehearsal):
    work, proc = rehearsal
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    assert list(rows) == ["precision=auto", "backend (ddp, 2 ranks)", "ddp x2 vs 1 device", "qlora CUDA vs CPU (bf16)",
                          "optim=paged_adamw8bit vs adamw", "memory vs estimate"], proc.stdout
    assert rows["precision=auto"][0] == "float32" and rows["precision=auto"][1].startswith("float32 on cpu")
    assert rows["backend (ddp, 2 ranks)"][1:] == ["gloo,gloo", "PASS"]
    expected, measured, verdict = rows["ddp x2 vs 1 device"]
    assert expected == "losses within 1e-05 rel." and verdict == "PASS" and "over 3 steps" in measured
    assert rows["qlora CUDA vs CPU (bf16)"][2] == "SKIP" and "needs CUDA" in rows["qlora CUDA vs CPU (bf16)"][1]
    paged = rows["optim=paged_adamw8bit vs adamw"]
    assert paged[2] == "SKIP" and paged[1] in ("not in this checkout", "needs CUDA (bitsandbytes' paged optimizers)")
    assert rows["memory vs estimate"][1:] == ["needs CUDA (torch.cuda.max_memory_allocated)", "SKIP"]
    assert "all checks passed (3 skipped)" in proc.stdout


@pytest.mark.slow
def test_rehearsal_workers_record_device_precision_and_backend(rehearsal):
    """trainers/metrics/device.py: one record per rank, what the script reads."""
    work, _ = rehearsal
    ddp = gpu_check.Run("ddp", work / "runs" / "ddp", 0, work / "ddp.log")
    records = ddp.devices()
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["device"] == "cpu" and r["backend"] == "gloo" and r["compute_dtype"] == "float32"
               and r["cuda_max_memory_allocated"] is None for r in records)
    (ref,) = gpu_check.Run("ref", work / "runs" / "ref", 0, work / "ref.log").devices()
    assert ref["world_size"] == 1 and ref["backend"] is None


@pytest.mark.slow
def test_a_mismatch_fails_the_row(rehearsal, tmp_path):
    """The ddp run's recorded losses moved by 1e-4 (ten times the fp32 tolerance) at one
    step: the parity row fails; a run that failed fails its memory row."""
    import json

    work, _ = rehearsal
    ref = gpu_check.Run("ref", work / "runs" / "ref", 0, work / "ref.log")
    records = [json.loads(x) for x in (work / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    for r in records:
        if r.get("step") == 2 and "loss" in r:
            r["loss"] *= 1 + 1e-4
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    moved = gpu_check.Run("ddp", tmp_path, 0, tmp_path / "ddp.log")
    measured, ok = gpu_check.parity(moved, ref, gpu_check.PARITY_FP32, "the single device")
    assert not ok and measured.startswith("max rel. loss diff 1.0e-04"), measured
    failed = gpu_check.Run("zero3", work / "runs" / "missing", 1, work / "zero3.log")
    row = gpu_check.memory_row(failed)
    assert row.verdict == "FAIL" and "run failed (exit 1)" in row.measured
    assert gpu_check.exit_code([row]) == 1


@pytest.mark.slow
def test_memory_row_compares_the_estimate_with_the_recorded_cuda_peak(rehearsal, tmp_path):
    """The memory row's arithmetic on a real run's config: a recorded CUDA peak equal to the
    estimate's tensor bytes passes; half of it (ratio 2) and twice it (0.5) fail."""
    import json
    import shutil

    work, _ = rehearsal
    shutil.copytree(work / "runs" / "ref", tmp_path / "ref")
    run = gpu_check.Run("ref", tmp_path / "ref", 0, tmp_path / "ref.log")
    est = gpu_check.estimated_tensor_bytes(run)
    assert est > 0
    record = tmp_path / "ref" / "device" / "rank-0.json"
    verdicts = []
    for peak in (est, est / 2, est * 2):
        record.write_text(json.dumps({**json.loads(record.read_text()), "cuda_max_memory_allocated": peak}))
        row = gpu_check.memory_row(run)
        verdicts.append(row.verdict)
    assert verdicts == ["PASS", "FAIL", "FAIL"] and row.check == "memory none x1 lora", row
    assert row.measured.endswith("= 0.50")

