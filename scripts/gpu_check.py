"""`make gpu-check`: on one machine with GPUs, run what the CPU test suite cannot, the way a
user would (`python launch.py ...`, one subprocess per run), and print one table.

    python scripts/gpu_check.py [--checks NAME ...] [--steps 10] [--work /tmp/gpu_check]
    python scripts/gpu_check.py --rehearse-on-cpu [--checks ddp]   # the same logic on CPU, gloo, fp32

Nothing in this project had run on a GPU when this was written: every GPU-only path (bf16
autocast, NCCL, bitsandbytes' CUDA kernels, paged optimizers, the CUDA memory estimate,
generation on CUDA) is a claim until a run confirms it. Each row is a check, what the
project says it should see, what the run recorded (RUN_DIR/device/rank-N.json written by
trainers/metrics/device.py, metrics.jsonl, summary.json) and a verdict; any FAIL exits 1.
Expected figures and why those tolerances: docs/gpu-check.md.

Without a GPU (and without --rehearse-on-cpu) it says so in one line and exits 0.
--rehearse-on-cpu runs the same checks with 2 CPU processes where GPUs would be (gloo, fp32,
the fp32 parity tolerance), skipping the rows that need CUDA with the reason, so the
script's own logic is tested here (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MiB = 2**20
PLANS = ("ddp", "zero1", "zero2", "zero3", "zero3_offload", "fsdp2", "pipeline")
PAGED = ("paged_adamw8bit", "paged_adamw32bit")
CHECKS = ("precision", "backend", *PLANS, "qlora", *PAGED, "grpo", "memory")

# Tolerances (docs/gpu-check.md says why). Relative, per step, over the first --steps losses.
PARITY_FP32 = 1e-5      # the CPU test suite's own bound for every plan (measured ~1e-7)
PARITY_BF16 = 2e-2      # bf16 keeps 8 mantissa bits (2^-8 = 3.9e-3 per rounding); a few roundings
PAGED_8BIT = 5e-2       # 8-bit optimizer state (blockwise quantized moments) against torch's AdamW
MEMORY_RATIO = (0.80, 1.25)  # estimate / torch.cuda.max_memory_allocated of the largest rank


@dataclass
class Row:
    check: str
    expected: str
    measured: str
    verdict: str  # PASS | FAIL | SKIP


def table(rows: list[Row]) -> str:
    head = Row("check", "expected", "measured", "verdict")
    widths = [max(len(getattr(r, f)) for r in [head, *rows]) for f in ("check", "expected", "measured", "verdict")]
    line = lambda r: " | ".join(v.ljust(w) for v, w in zip((r.check, r.expected, r.measured, r.verdict), widths))
    return "\n".join([line(head), "-+-".join("-" * w for w in widths), *map(line, rows)])


def exit_code(rows: list[Row]) -> int:
    """1 on any mismatch; skipped rows (with their reason) are not mismatches."""
    return 1 if any(r.verdict == "FAIL" for r in rows) else 0


def gpu_count() -> int:
    """Visible GPUs, without creating a CUDA context in this process (the runs need the memory)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ------------------------------------------------------------------------------- runs
@dataclass
class Run:
    name: str
    dir: Path
    code: int
    log: Path

    @property
    def ok(self) -> bool:
        return self.code == 0

    def failure(self) -> str:
        return f"run failed (exit {self.code}): {self.log}"

    def devices(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.dir / "device").glob("rank-*.json"))]


class Runner:
    """Each configuration runs once (`python launch.py ...` in its own process); the rows
    that need it share it."""

    def __init__(self, work: Path, env: dict, timeout: float):
        self.work, self.env, self.timeout = work, env, timeout
        self.done: dict[str, Run] = {}

    def __call__(self, name: str, overrides: list[str], env: dict | None = None) -> Run:
        if name not in self.done:
            run_dir, log = self.work / "runs" / name, self.work / f"{name}.log"
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"gpu-check: {name}: python launch.py {' '.join(overrides)}", flush=True)
            with open(log, "w") as out:
                proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), *overrides, f"hydra.run.dir={run_dir}"],
                                        cwd=REPO, env={**self.env, **(env or {})}, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    code = proc.wait(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    from tests.helpers import kill_tree

                    kill_tree(proc)  # the workers too: they hold the GPUs the next run needs
                    code = -1
                    out.write(f"\ngpu-check: killed after --timeout {self.timeout:g} s\n")
            self.done[name] = Run(name, run_dir, code, log)
        return self.done[name]


class Setup:
    """What differs between a GPU machine and the CPU rehearsal: the device count, the
    parity tolerance (fp32 on CPU, bf16 on a GPU: train.precision=auto either way), the
    model the plans train."""

    def __init__(self, args):
        self.rehearse = args.rehearse_on_cpu
        self.gpus = 2 if self.rehearse else gpu_count()
        self.steps = args.steps
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.tolerance = PARITY_FP32 if self.rehearse else PARITY_BF16
        self.precision = "auto"  # bf16 on a GPU that supports it, fp32 on CPU: the precision row checks it
        env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
        if self.rehearse:
            env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        self.run = Runner(self.work, env, args.timeout)
        self.tiny = REPO / "assets" / "tiny-llama"
        self._model = Path(args.model) if args.model else None
        self._data: Path | None = None

    def plan_model(self) -> Path:
        """The plans' model: on a GPU a random-init 360M Llama (bench/memory_estimate.py's
        shape), big enough that the estimate's terms dominate what CUDA allocates for
        itself; in the rehearsal the bundled tiny model."""
        if self._model is None:
            if self.rehearse:
                self._model = self.tiny
            else:
                from _model100m import build
                from memory_estimate import SHAPE

                self._model = build(self.work / "model", max_shard_size="200MB", **SHAPE)
        return self._model

    def plan_data(self) -> Path:
        if self._data is None:
            from memory_estimate import full_length_rows

            self._data = full_length_rows(self.work / "train.jsonl")
        return self._data

    def common(self, model: Path, precision: str | None = None, steps: int | None = None) -> list[str]:
        return [f"model.path={model}", f"train.max_steps={steps or self.steps}", f"train.precision={precision or self.precision}",
                "train.save_every=1000", "train.report_to=[]", "data.eval=null", "method.dropout=0",
                "optim.warmup_steps=0", "optim.schedule=constant"]

    # One global batch of 4 x N rows everywhere: the single device 4 x N accumulation,
    # N data-parallel ranks 4 x 1, a 2-stage pipeline N/2 data-parallel ranks of 4 x 2.
    def reference(self) -> Run:
        return self.run("ref", [*self.common(self.plan_model()), f"data.train={self.plan_data()}", "data.max_seq_len=64",
                                "data.packing=false", "parallel=none", "train.micro_batch_size=4",
                                f"train.grad_accum={self.gpus}"])

    def plan(self, plan: str) -> Run:
        layout = (["parallel.stages=2", "train.grad_accum=2"] if plan == "pipeline" else ["train.grad_accum=1"])
        return self.run(plan, [*self.common(self.plan_model()), f"data.train={self.plan_data()}", "data.max_seq_len=64",
                               "data.packing=false", f"parallel={plan}", f"launcher.nproc_per_node={self.gpus}",
                               "train.micro_batch_size=4", *layout])

    def tiny_run(self, name: str, *overrides: str, precision: str | None = None, env: dict | None = None,
                 steps: int | None = None) -> Run:
        """A single-device run of the bundled model on the bundled task (it learns in a few steps)."""
        return self.run(name, [*self.common(self.tiny, precision, steps), "train.micro_batch_size=8",
                               "train.grad_accum=1", *overrides], env)


# ----------------------------------------------------------------------------- checks
def losses(run: Run) -> dict[int, float]:
    from tests.helpers import losses as recorded

    return recorded(run.dir)


def parity(run: Run, ref: Run, tolerance: float, label: str) -> tuple[str, bool]:
    """(measured, within tolerance): the largest relative per-step loss difference."""
    from tests.helpers import rel

    got, want = losses(run), losses(ref)
    if sorted(got) != sorted(want) or not want:
        return f"steps {sorted(got)} vs {label}'s {sorted(want)}", False
    worst = max(rel(got[s], want[s]) for s in want)
    finite = all(math.isfinite(v) for v in got.values())
    return f"max rel. loss diff {worst:.1e} over {len(want)} steps", finite and worst <= tolerance


def check_precision(s: Setup) -> list[Row]:
    ref = s.reference()
    # whether the GPU supports bf16 is torch's word about the device, recorded by the worker
    # (asking here would create a CUDA context in this process, on GPU 0, for the whole check)
    capable = bool(ref.devices()) and all(d["bf16_supported"] for d in ref.devices())
    want = "bfloat16" if capable and not s.rehearse else "float32"
    if not ref.ok:
        return [Row("precision=auto", "bfloat16 on a bf16 GPU", ref.failure(), "FAIL")]
    got = sorted({d["compute_dtype"] for d in ref.devices()})
    where = sorted({d["device_name"] for d in ref.devices()})
    return [Row("precision=auto", want, f"{','.join(got) or 'not recorded'} on {','.join(where)}",
                "PASS" if got == [want] else "FAIL")]


def check_backend(s: Setup) -> list[Row]:
    want = "gloo" if s.rehearse else "nccl"
    if s.gpus < 2:
        return [Row("backend (ddp)", want, "one GPU: no process group to check", "SKIP")]
    run = s.plan("ddp")
    if not run.ok:
        return [Row("backend (ddp)", want, run.failure(), "FAIL")]
    got = [d["backend"] for d in run.devices()]
    return [Row(f"backend (ddp, {s.gpus} ranks)", f"{want} on every rank", ",".join(map(str, got)) or "not recorded",
                "PASS" if got and all(b == want for b in got) and len(got) == s.gpus else "FAIL")]


def check_plan(s: Setup, plan: str) -> list[Row]:
    name = f"{plan} x{s.gpus} vs 1 device"
    expected = f"losses within {s.tolerance:g} rel."
    if plan == "pipeline" and (s.gpus < 2 or s.gpus % 2):
        return [Row(name, expected, f"{s.gpus} GPU(s): a 2-stage pipeline needs an even count", "SKIP")]
    ref = s.reference()
    run = s.plan(plan)
    if not (ref.ok and run.ok):
        return [Row(name, expected, (run if ref.ok else ref).failure(), "FAIL")]
    measured, ok = parity(run, ref, s.tolerance, "the single device")
    return [Row(name, expected, measured, "PASS" if ok else "FAIL")]


def check_qlora(s: Setup) -> list[Row]:
    """bitsandbytes' 4-bit CUDA kernels against its CPU path: the same NF4 weights and bf16
    compute must give the same losses (and they must fall)."""
    name, expected = "qlora CUDA vs CPU (bf16)", f"losses within {PARITY_BF16:g} rel., falling"
    if s.rehearse:
        return [Row(name, expected, "needs CUDA (bitsandbytes' CUDA kernels; CPU QLoRA is in tests/)", "SKIP")]
    cuda = s.tiny_run("qlora-cuda", "method=qlora", precision="bf16")
    cpu = s.tiny_run("qlora-cpu", "method=qlora", precision="bf16", env={"CUDA_VISIBLE_DEVICES": ""})
    if not (cuda.ok and cpu.ok):
        return [Row(name, expected, (cpu if cuda.ok else cuda).failure(), "FAIL")]
    measured, ok = parity(cuda, cpu, PARITY_BF16, "the CPU run")
    curve = losses(cuda)
    falls = curve[max(curve)] < curve[min(curve)]
    on = sorted({d["device"] for d in cuda.devices()})
    return [Row(name, expected, f"{measured}; {curve[min(curve)]:.3f} -> {curve[max(curve)]:.3f} on {','.join(on)}",
                "PASS" if ok and falls and on == ["cuda:0"] else "FAIL")]


def check_paged(s: Setup, optim: str) -> list[Row]:
    tolerance = PAGED_8BIT if "8bit" in optim else PARITY_BF16
    name, expected = f"optim={optim} vs adamw", f"losses within {tolerance:g} rel."
    if not (REPO / "conf" / "optim" / f"{optim}.yaml").exists():
        return [Row(name, expected, "not in this checkout", "SKIP")]
    if s.rehearse:
        return [Row(name, expected, "needs CUDA (bitsandbytes' paged optimizers)", "SKIP")]
    ref, run = s.tiny_run("tiny-adamw", "optim=adamw"), s.tiny_run(f"tiny-{optim}", f"optim={optim}")
    if not (ref.ok and run.ok):
        return [Row(name, expected, (run if ref.ok else ref).failure(), "FAIL")]
    measured, ok = parity(run, ref, tolerance, "adamw")
    return [Row(name, expected, measured, "PASS" if ok else "FAIL")]


def check_grpo(s: Setup) -> list[Row]:
    name, expected = "grpo generation", "completes; finite loss, rewards, completion lengths"
    run = s.tiny_run("grpo", "objective=grpo", "data=reverse_rl", steps=min(s.steps, 3))
    if not run.ok:
        return [Row(name, expected, run.failure(), "FAIL")]
    from tests.helpers import metrics

    steps = [r for r in metrics(run.dir) if "loss" in r]
    fine = steps and all(math.isfinite(r["loss"]) and math.isfinite(r.get("reward", math.nan))
                         and r.get("completions/mean_length", 0) > 0 for r in steps)
    on = sorted({d["device"] for d in run.devices()})
    measured = (f"{len(steps)} steps on {','.join(on)}, reward {steps[-1].get('reward', math.nan):.3f}, "
                f"mean completion {steps[-1].get('completions/mean_length', 0):.1f} tokens" if steps else "no step logged")
    return [Row(name, expected, measured, "PASS" if fine else "FAIL")]


def estimated_tensor_bytes(run: Run) -> float:
    """The estimate without its CUDA context/NCCL and fragmentation terms: what
    torch.cuda.max_memory_allocated counts (tensors, through the caching allocator)."""
    from launch.config import load, register_resolvers
    from launch.estimate import CUDA_OVERHEAD, FRAGMENTATION, for_config

    register_resolvers()
    est = for_config(load(run.dir / "config.yaml"), device="gpu")
    load_state = (est.load - CUDA_OVERHEAD) / (1 + FRAGMENTATION)
    return max(est.train - est.overhead, load_state)


def memory_row(run: Run) -> Row:
    lo, hi = MEMORY_RATIO
    try:
        done = json.loads((run.dir / "summary.json").read_text())
        name = f"memory {done['plan']} x{done['world_size']} {done['method']}"
    except (OSError, ValueError, KeyError):
        name = f"memory {run.name}"
    expected = f"estimate/measured in [{lo:g}, {hi:g}]"
    if not run.ok:
        return Row(name, expected, run.failure(), "FAIL")
    peaks = [d["cuda_max_memory_allocated"] for d in run.devices() if d["cuda_max_memory_allocated"] is not None]
    if not peaks:
        return Row(name, expected, "no CUDA peak recorded", "FAIL")
    est, got = estimated_tensor_bytes(run), max(peaks)
    ratio = est / got
    return Row(name, expected, f"{est / MiB:.0f} / {got / MiB:.0f} MiB = {ratio:.2f}",
               "PASS" if lo <= ratio <= hi else "FAIL")


def check_memory(s: Setup, chosen: list[str]) -> list[Row]:
    if s.rehearse:
        return [Row("memory vs estimate", f"estimate/measured in [{MEMORY_RATIO[0]:g}, {MEMORY_RATIO[1]:g}]",
                    "needs CUDA (torch.cuda.max_memory_allocated)", "SKIP")]
    runs = [s.reference(), *(s.plan(p) for p in PLANS if p in chosen and p in s.run.done)]
    runs.append(s.run("qlora", [*s.common(s.plan_model()), f"data.train={s.plan_data()}", "data.max_seq_len=64",
                                "data.packing=false", "method=qlora", "train.micro_batch_size=4", "train.grad_accum=1"]))
    return [memory_row(r) for r in runs]


def run_checks(s: Setup, chosen: list[str]) -> list[Row]:
    rows: list[Row] = []
    for check in chosen:
        if check in PLANS:
            rows += check_plan(s, check)
        elif check in PAGED:
            rows += check_paged(s, check)
        elif check == "memory":
            rows += check_memory(s, chosen)
        else:
            rows += {"precision": check_precision, "backend": check_backend, "qlora": check_qlora,
                     "grpo": check_grpo}[check](s)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rehearse-on-cpu", action="store_true",
                    help="run the checks on CPU (gloo, fp32, 2 processes where the GPUs would be)")
    ap.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS), metavar="CHECK",
                    help=f"a subset, in this order: {' '.join(CHECKS)}")
    ap.add_argument("--steps", type=int, default=10, help="training steps per run (parity over all of them)")
    ap.add_argument("--model", help="the plans' model (default: a random-init 360M Llama on a GPU, the bundled "
                                    "tiny model in the rehearsal)")
    ap.add_argument("--work", default="/tmp/gpu_check", help="run directories and logs")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    args = ap.parse_args(argv)
    if not args.rehearse_on_cpu and gpu_count() == 0:
        print("gpu-check: no GPU visible (torch.cuda.device_count() is 0): nothing checked; "
              "`python scripts/gpu_check.py --rehearse-on-cpu` runs the same checks on CPU.")
        return 0
    s = Setup(args)
    chosen = [c for c in CHECKS if c in args.checks]  # memory after the runs it reads
    rows = run_checks(s, chosen)
    print()
    print(f"gpu-check: {'CPU rehearsal, 2 processes' if s.rehearse else f'{s.gpus} GPU(s)'}, "
          f"{s.steps} steps per run, runs in {s.work}")
    print(table(rows))
    code = exit_code(rows)
    failed = sum(r.verdict == "FAIL" for r in rows)
    print(f"gpu-check: {'all checks passed' if not code else f'{failed} mismatch(es)'} "
          f"({sum(r.verdict == 'SKIP' for r in rows)} skipped)")
    return code


if __name__ == "__main__":
    sys.exit(main())
