"""Peak RSS of `python -m launch.merge` against model size: mergekit streams tensor by tensor,
so merging three models (plus their base) should cost about the process plus a few copies
of the largest tensor, not the models.

Builds random-init Llamas from a config (bench/_model100m.py; 3 inputs + a base per size,
saved in 2 safetensors files each), merges them with `linear` and `ties` (eval=false) in a
fresh process each, and prints a table of the merge process's peak RSS beside the models'
size and the dry run's estimate. The process baseline is a process that only imports what
the merge imports. Resident memory is split (polling /proc/PID/status) into private memory
(RssAnon: tensors, buffers) and file-backed pages of the memory-mapped safetensors inputs
(RssFile: page cache the kernel can drop at any time), since ru_maxrss counts both.

    python bench/merge_memory.py [--layers 2,8] [--work /tmp/merge-bench] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

HIDDEN, INTERMEDIATE, HEADS = 1024, 4096, 16


def baseline_mib() -> float:
    code = ("import resource, torch, transformers, mergekit.merge, launch.merging.run;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def merge(method: str, models: list[Path], base: Path, out: Path) -> dict:
    args = [sys.executable, "-m", "launch.merge", f"method={method}",
            f"inputs=[{','.join(map(str, models))}]", f"out={out}", "eval=false", "out_shard_mib=64"]
    if method != "linear":
        args.append(f"base={base}")
    dry = subprocess.run(args + ["dry_run=true"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    estimate = next(line for line in dry.splitlines() if line.startswith("memory estimate"))
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    anon = file = 0
    while proc.poll() is None:  # resident memory by kind: private (heap) and file-backed (mapped inputs)
        anon, file = max(anon, _status(proc.pid, "RssAnon")), max(file, _status(proc.pid, "RssFile"))
        time.sleep(0.02)
    assert proc.returncode == 0, f"{args} failed"
    report = json.loads((out / "merge_report.json").read_text())
    return {"peak": report["peak_rss_mib"], "anon": anon / 1024, "file": file / 1024, "estimate": report["estimate"]["peak_mib"],
            "model": report["estimate"]["model_mib"], "largest": report["estimate"]["largest_mib"],
            "seconds": report["wall_time_s"], "estimate_line": estimate}


def _status(pid: int, key: str) -> int:
    """A /proc/PID/status field in KiB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,8", help="model sizes, as decoder layers of a 1024-wide Llama")
    ap.add_argument("--methods", default="linear,ties")
    ap.add_argument("--work", default="/tmp/merge-bench")
    ap.add_argument("--keep", action="store_true", help="keep the built models")
    a = ap.parse_args()
    from _model100m import build

    work = Path(a.work)
    base_rss = baseline_mib()
    rows = []
    for layers in [int(x) for x in a.layers.split(",")]:
        folder = work / f"l{layers}"
        models = [build(folder / f"m{s}", seed=s, hidden=HIDDEN, layers=layers, intermediate=INTERMEDIATE,
                        heads=HEADS, max_shard_size=f"{max(50, 40 * layers)}MB") for s in range(4)]
        for method in a.methods.split(","):
            out = folder / f"out-{method}"
            shutil.rmtree(out, ignore_errors=True)
            r = merge(method, models[1:], models[0], out)
            n = 3 + (method != "linear")
            rows.append((layers, method, n, r))
            print(f"layers={layers} {method}: peak {r['peak']:.0f} MiB, model {r['model']:.0f} MiB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\nprocess baseline (torch, transformers, mergekit imported): {base_rss:.0f} MiB; "
          f"{os.cpu_count()} CPUs\n")
    print("| model (fp32) | largest tensor | method | models read | all models | peak RSS | of which private "
          "(heap) | of which file-backed (mapped inputs) | private - baseline | estimate | time |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for layers, method, n, r in rows:
        print(f"| {r['model']:.0f} MiB ({layers} layers) | {r['largest']:.0f} MiB | {method} | {n} | "
              f"{n * r['model']:.0f} MiB | {r['peak']:.0f} MiB | {r['anon']:.0f} MiB | {r['file']:.0f} MiB | "
              f"{r['anon'] - base_rss:.0f} MiB | "
              f"{r['estimate']:.0f} MiB | {r['seconds']:.1f} s |")


if __name__ == "__main__":
    main()
