"""Model-state bytes per rank, peak RSS and throughput of each data-parallel plan at N=2.

    python bench/plans_memory.py [--plans ddp zero1 zero2 zero3 zero3_offload fsdp2] [--steps 3]
                                 [--work /tmp/bench100m] [--out bench/results/plans_memory.md]

For each plan, one `torchrun --nproc_per_node 2 bench/_plan_probe.py` runs the real plan
class (composed with Hydra like tests/matrix_worker.py; method=full, fp32, micro batch 2,
no accumulation, packed 64-token rows) on a ~99M-param random Llama (bench/_model100m.py)
for --steps optimizer steps through plan.forward_backward / plan.step, and counts the
bytes of the tensors each rank holds on the last step (see _plan_probe.py's docstring).
tokens/s: global real tokens / step time, median over steps after the first.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
MiB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", nargs="+", default=["ddp", "zero1", "zero2", "zero3", "zero3_offload", "fsdp2"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--work", default="/tmp/bench100m")
    ap.add_argument("--out", default=str(HERE / "results" / "plans_memory.md"))
    args = ap.parse_args()
    from _model100m import build
    from checkpoint_stall import snapshot_data

    work = Path(args.work)
    model = build(work / "model")
    data = snapshot_data(work)  # other jobs may rewrite data/reverse/train.jsonl
    probe = work / "probe"
    probe.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    res: dict[str, list[dict]] = {}
    for plan in args.plans:
        out = probe / f"{plan}.json"
        for f in probe.glob(f"{plan}.json.rank*"):
            f.unlink()
        t0 = time.time()
        p = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             str(HERE / "_plan_probe.py"), plan, str(model), str(out), str(args.steps), str(data)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
        )
        recs = [json.loads(f.read_text()) for f in sorted(probe.glob(f"{plan}.json.rank*"))]
        print(f"{plan}: rc={p.returncode} {time.time() - t0:.0f}s ranks={len(recs)}", flush=True)
        if len(recs) != 2:
            print(p.stderr[-3000:], flush=True)
            continue
        res[plan] = recs

    def total(r):
        return sum(r["counted"].values())

    base = max(total(r) for r in res["ddp"]) if "ddp" in res else None
    lines = [
        "# Model-state bytes per rank by plan (N=2, CPU, gloo, fp32, method=full)",
        "",
        f"Command: `python bench/plans_memory.py --steps {args.steps}` "
        f"(one `torchrun --nproc_per_node 2 bench/_plan_probe.py PLAN ...` per plan, sequential, OMP_NUM_THREADS=1).",
        f"Model: random Llama, {res[next(iter(res))][0]['n_params'] / 1e6:.1f}M params (hidden 768, 14 layers, "
        "intermediate 2048, char vocab); micro batch 2 x 64 tokens per rank, 3 optimizer steps.",
        "",
        "State = bytes of the tensors each rank holds, counted on the last step after backward and "
        "before the optimizer step (params = local shard / ZeRO-3 partition; grads = .grad; optim = "
        "AdamW state; ds_* = every other tensor reachable from DeepSpeed's ZeRO optimizer: fp32 master "
        "partitions, flat gradient partition buffers, buckets), deduplicated by storage. "
        "Max over the 2 ranks. Expected = Plan.expected_state_bytes().",
        "",
        "| plan | state MiB/rank | ratio to ddp | params | grads | optim | ds_master | ds_grad | ds_other | expected MiB/rank | peak RSS/rank MiB | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for plan, recs in res.items():
        r = max(recs, key=total)
        c = r["counted"]
        exp = sum(r["expected"].values())
        rss = max(x["peak_rss"] for x in recs)
        tps = statistics.median(t / s for t, s in zip(recs[0]["tokens"][1:], recs[0]["step_s"][1:]))
        ratio = f"{total(r) / base:.2f}" if base else "-"
        lines.append(
            f"| {plan} | {total(r) / MiB:.0f} | {ratio} | " + " | ".join(f"{c[k] / MiB:.0f}" for k in
            ("params", "grads", "optim", "ds_master", "ds_grad", "ds_other"))
            + f" | {exp / MiB:.0f} | {rss / MiB:.0f} | {tps:.1f} |"
        )
    lines.append("")
    for plan, recs in res.items():
        for k, v in recs[0].get("extra", {}).items():
            lines.append(f"Not in the state column: {plan} {k} = {v / MiB:.0f} MiB per rank "
                         "(C++-owned DDP reducer buckets; gradient_as_bucket_view=False keeps them besides .grad).")
    lines.append("")
    lines.append("Losses per step (rank 0): " + "; ".join(
        f"{p}: " + ", ".join(f"{x:.4f}" for x in recs[0]["losses"]) for p, recs in res.items()))
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
