"""Pipeline bubble and activation memory of torch.distributed.pipelining on this machine.

    python bench/pipeline_bubble.py [--compute sleep|matmul] [--microbatches 2 4 8 16] [--steps 3]
                                    [--out bench/results/pipeline_bubble.md]

Prints a markdown report with two tables, for p = 2 stages (2 processes, gloo, one thread
each):

1. Idle (bubble) fraction of each stage, 1F1B and GPipe, for m micro-batches, against
   the theory (p-1)/(m+p-1). A stage's idle fraction over one optimizer step is
   1 - busy / wall, where busy is the time spent inside the stage's forward and backward
   computations (PipelineStage.forward_one_chunk / backward_one_chunk, timed by wrapping
   them on the instance) and wall the pipeline's time for the step (earliest start to latest
   end of schedule.step() over both ranks); the rest is waiting for the neighbour plus
   send/recv and scheduling overhead. Median over --steps timed steps
   after one warm-up step (which also runs the schedule's shape inference).
2. Peak activation memory per stage, 1F1B vs GPipe: the bytes of tensors autograd saves
   for backward (a saved_tensors_hooks pack/unpack pair counts each saved non-parameter
   tensor while it is alive), i.e. exactly the activations a schedule keeps in flight.
   Also given in units of one micro-batch's activations: theory is m for GPipe (all
   forwards before any backward) and min(m, p - stage) for 1F1B.

Workload: each stage is a stack of Linear(h, h) + tanh layers with a fixed micro-batch
of rows x h, so per-micro-batch compute is the same for every m (the global batch grows
with m), which is the setting the bubble formula describes. With --compute sleep (the
default) every micro-batch's forward additionally sleeps FWD_S and its backward BWD_S
(a tensor hook): a fixed per-micro-batch "compute" time that does not depend on how much
CPU other jobs leave us, so the table shows the schedule's bubble plus the real gloo
send/recv and scheduling overhead. --compute matmul uses bigger layers and no sleep (real
compute only): on a shared 2-core machine a descheduled rank then shows up as idle time
of its neighbour, and the numbers mostly measure the machine's load.
"""
from __future__ import annotations

import argparse
import gc
import os
import socket
import statistics
import sys
import time
import weakref
from pathlib import Path

P = 2
ROWS = 32
LAYERS = 4
FWD_S, BWD_S = 0.020, 0.040  # --compute sleep: fixed forward / backward time per micro-batch
HIDDEN = {"sleep": 256, "matmul": 1024}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SavedBytes:
    """Live bytes of tensors saved for backward (parameters excluded), and the peak."""

    def __init__(self, params):
        self.param_ptrs = {p.data_ptr() for p in params}
        self.live = 0
        self.peak = 0

    def reset(self):
        self.peak = self.live

    def hooks(self):
        import torch

        tracker = self

        class Holder:
            __slots__ = ("t", "__weakref__")

        def pack(t):
            h = Holder()
            h.t = t
            if t.data_ptr() not in tracker.param_ptrs:
                n = t.numel() * t.element_size()
                tracker.live += n
                tracker.peak = max(tracker.peak, tracker.live)
                weakref.finalize(h, tracker._free, n)
            return h

        def unpack(h):
            return h.t

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _free(self, n):
        self.live -= n


def worker(rank: int, port: int, compute: str, microbatches: list[int], steps: int, queue) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=P)
    torch.manual_seed(rank)
    hidden = HIDDEN[compute]
    sleep = compute == "sleep"

    def slow_backward(grad):
        time.sleep(BWD_S)
        return grad

    class Block(nn.Module):
        def __init__(self, tracker_ref):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(LAYERS))
            self.tracker_ref = tracker_ref

        def forward(self, x):
            with self.tracker_ref[0].hooks():
                for layer in self.layers:
                    x = torch.tanh(layer(x))
            if sleep:
                time.sleep(FWD_S)
                if x.requires_grad:
                    x.register_hook(slow_backward)
            return x

    holder: list = [None]
    module = Block(holder)
    holder[0] = tracker = SavedBytes(module.parameters())
    results = []
    for name, cls in (("1F1B", Schedule1F1B), ("GPipe", ScheduleGPipe)):
        for m in microbatches:
            stage = PipelineStage(module, rank, P, torch.device("cpu"))
            sched = cls(stage, m, loss_fn=lambda out, tgt: ((out - tgt) ** 2).mean(), scale_grads=True)
            busy = [0.0]

            def timed(fn):
                def run(*a, **k):
                    t0 = time.perf_counter()
                    try:
                        return fn(*a, **k)
                    finally:
                        busy[0] += time.perf_counter() - t0
                return run

            stage.forward_one_chunk = timed(stage.forward_one_chunk)
            stage.backward_one_chunk = timed(stage.backward_one_chunk)
            x = torch.randn(m * ROWS, hidden)
            y = torch.randn(m * ROWS, hidden)
            idle, peaks = [], []
            for step in range(steps + 1):
                gc.collect()  # earlier schedules' reference cycles still hold saved tensors
                dist.barrier()
                busy[0] = 0.0
                tracker.reset()
                baseline = tracker.live
                t0 = time.perf_counter()
                if rank == 0:
                    sched.step(x)
                else:
                    sched.step(target=y)
                t1 = time.perf_counter()
                # The step's wall time is the whole pipeline's (first start to last end over
                # both ranks): a rank's own step() returns before its neighbour's tail work.
                # perf_counter is CLOCK_MONOTONIC, shared by processes on one machine.
                span = torch.tensor([-t0, t1], dtype=torch.float64)
                dist.all_reduce(span, op=dist.ReduceOp.MAX)
                wall = float(span[0] + span[1])
                module.zero_grad(set_to_none=True)
                if step:  # step 0: warm-up + shape inference
                    idle.append(1 - busy[0] / wall)
                    peaks.append(tracker.peak - baseline)
            per_mb = per_microbatch_bytes(module, tracker, hidden)
            results.append({"schedule": name, "m": m, "stage": rank, "idle": statistics.median(idle),
                            "peak": max(peaks), "per_mb": per_mb})
    queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def per_microbatch_bytes(module, tracker, hidden: int) -> int:
    """Saved-activation bytes of one micro-batch's forward through this stage."""
    import torch

    gc.collect()
    before = tracker.live
    x = torch.randn(ROWS, hidden)  # no grad: the sleep hook is not registered
    out = module(x.requires_grad_())
    n = tracker.live - before
    del out
    return n


def report(rows: list[dict], compute: str, microbatches: list[int], steps: int) -> str:
    theory = {m: (P - 1) / (m + P - 1) for m in microbatches}
    by = {(r["schedule"], r["m"], r["stage"]): r for r in rows}
    lines = [
        f"# Pipeline bubble and activation memory (p={P} stages, gloo, CPU, 1 thread per rank)",
        "",
        f"Per stage: {LAYERS} x Linear({HIDDEN[compute]}, {HIDDEN[compute]}) + tanh, micro-batch {ROWS} x "
        f"{HIDDEN[compute]} fp32"
        + (f", plus a fixed {FWD_S * 1e3:.0f} ms forward / {BWD_S * 1e3:.0f} ms backward per micro-batch "
           f"(sleep: see the script's docstring)" if compute == "sleep" else " (real compute only)")
        + f". Median of {steps} timed steps after a warm-up step. Produced by "
        f"`python bench/pipeline_bubble.py --compute {compute}`.",
        "",
        "## Idle fraction per stage vs theory (p-1)/(m+p-1)",
        "",
        "| m | theory | 1F1B stage 0 | 1F1B stage 1 | GPipe stage 0 | GPipe stage 1 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for m in microbatches:
        cells = [f"{by[(s, m, st)]['idle']:.3f}" for s in ("1F1B", "GPipe") for st in range(P)]
        lines.append(f"| {m} | {theory[m]:.3f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Peak saved activations per stage (MiB, and in micro-batches of activations)",
        "",
        "Theory: GPipe keeps all m micro-batches' activations until the backward phase; 1F1B "
        "keeps at most p - stage in flight (stage 0: 2, stage 1: 1).",
        "",
        "| m | 1F1B stage 0 | 1F1B stage 1 | GPipe stage 0 | GPipe stage 1 |",
        "|---:|---:|---:|---:|---:|",
    ]
    for m in microbatches:
        cells = []
        for s in ("1F1B", "GPipe"):
            for st in range(P):
                r = by[(s, m, st)]
                cells.append(f"{r['peak'] / 2**20:.2f} ({r['peak'] / max(r['per_mb'], 1):.1f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compute", choices=("sleep", "matmul"), default="sleep")
    ap.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, args.compute, args.microbatches, args.steps, queue)) for r in range(P)]
    for p in procs:
        p.start()
    rows = []
    for _ in procs:
        rows += queue.get()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        print("a worker failed", file=sys.stderr)
        return 1
    text = report(rows, args.compute, args.microbatches, args.steps)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
