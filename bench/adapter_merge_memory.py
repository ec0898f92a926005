"""Peak memory of `python -m launch.merge adapters=true` against the base model's size: the
combined adapter is merged into the base one tensor at a time, so the merge should hold the
adapters, one output file being filled (out_shard_mib) and about one tensor, not the model.

Builds a random-init Llama (bench/_model100m.py's builder, 1024 wide, --layers deep, fp32)
and two random rank-16 LoRA adapters on every linear of it, then merges them
(method=task_arithmetic, eval=false, out_shard_mib=64) in a fresh process. That process first
imports everything the merge imports (torch, transformers, peft, the Llama modeling code,
launch.merging.run) and records its private memory (RssAnon) and peak RSS (VmHWM) there: the
baseline. The parent polls the child's RssAnon while it merges; `private growth` is its peak
minus the baseline, `peak RSS growth` the same for VmHWM (the base is read with pread, not
mapped, so file-backed pages do not hide in it). Not ru_maxrss: Linux carries it over
exec from the forking parent, so a child of a process that built a 400 MB model starts with
that model's peak. --code DIR runs the merge from another
checkout (e.g. `git archive main`) to compare with the whole-model path.

    python bench/adapter_merge_memory.py [--layers 6] [--work /tmp/adapter-merge-bench] [--code DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

HIDDEN, INTERMEDIATE, HEADS = 1024, 4096, 16

# the merging process: baseline after the imports, then the merge itself (launch.merge's main)
CHILD = r"""
import json, sys
import torch, transformers, peft, safetensors.torch
import transformers.models.llama.modeling_llama, peft.tuners.lora
import launch.merging.run, launch.merging.adapters, trainers.model.export
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
print("BASELINE " + json.dumps({"anon": status("RssAnon"), "maxrss": status("VmHWM")}), flush=True)
sys.stdin.readline()  # the parent has read the baseline
sys.argv = ["launch.merge"] + sys.argv[1:]
import runpy
try:
    runpy.run_module("launch.merge", run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
print("END " + json.dumps({"maxrss": status("VmHWM")}), flush=True)
"""


def build_inputs(work: Path, layers: int) -> tuple[Path, list[Path]]:
    """The base (saved in files of ~100 MB, like a real checkpoint) and two LoRA adapter
    folders on it (with its tokenizer, as a run's export/adapter has)."""
    import torch
    from _model100m import build
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from launch.merging.adapters import _skeleton

    base = build(work / "base", seed=0, hidden=HIDDEN, layers=layers, intermediate=INTERMEDIATE, heads=HEADS,
                 max_shard_size="100MB")
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    dirs = []
    for k in range(2):
        folder = work / f"adapter{k}"
        if not (folder / "adapter_config.json").exists():
            torch.manual_seed(10 + k)  # LoRA's B is zeros unless init_lora_weights=False; the adapters on placeholders
            model = get_peft_model(_skeleton(base), LoraConfig(r=16, lora_alpha=16, target_modules="all-linear",
                                                               init_lora_weights=False))
            model.peft_config["default"].base_model_name_or_path = str(base)
            model.save_pretrained(str(folder))
            tokenizer.save_pretrained(str(folder))
        dirs.append(folder)
    return base, dirs


def model_mib(base: Path) -> float:
    return sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20


def measure(base: Path, adapter_dirs: list[Path], out: Path, code: Path = REPO, shard_mib: int = 64,
            timeout: float = 900) -> dict:
    """Merge the adapters (task_arithmetic) in a fresh process run from `code`; its baseline,
    peak private memory and ru_maxrss (MiB)."""
    args = [sys.executable, "-c", CHILD, "method=task_arithmetic", "adapters=true", "eval=false",
            f"inputs=[{','.join(map(str, adapter_dirs))}]", f"base={base}", f"out={out}",
            f"out_shard_mib={shard_mib}", f"hydra.run.dir={out.parent / (out.name + '-hydra')}"]
    t0 = time.time()
    log = out.parent / f"{out.name}-stderr.log"  # a file, not a pipe nobody drains while the merge runs
    with open(log, "w") as err:
        proc = subprocess.Popen(args, cwd=code, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    baseline = None
    for line in proc.stdout:
        if line.startswith("BASELINE "):
            baseline = json.loads(line.split(" ", 1)[1])
            break
    assert baseline is not None, log.read_text()[-3000:]
    proc.stdin.write("\n")
    proc.stdin.flush()
    peak = 0.0
    while proc.poll() is None and time.time() - t0 < timeout:
        peak = max(peak, _anon(proc.pid))
        time.sleep(0.01)
    rest, _ = proc.communicate(timeout=max(1.0, timeout - (time.time() - t0)))
    assert proc.returncode == 0, log.read_text()[-3000:]
    end = json.loads(next(line for line in rest.splitlines() if line.startswith("END ")).split(" ", 1)[1])
    return {"baseline_anon": baseline["anon"], "peak_anon": peak, "private_growth": peak - baseline["anon"],
            "baseline_maxrss": baseline["maxrss"], "maxrss": end["maxrss"],
            "maxrss_growth": end["maxrss"] - baseline["maxrss"], "seconds": time.time() - t0}


def _anon(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--work", default="/tmp/adapter-merge-bench")
    ap.add_argument("--code", action="append", default=[], help="another checkout to run the merge from")
    a = ap.parse_args()
    import shutil

    work = Path(a.work)
    base, dirs = build_inputs(work / f"l{a.layers}", a.layers)
    size = model_mib(base)
    print(f"base: {size:.0f} MiB fp32 ({a.layers} layers); adapters: "
          f"{sum(f.stat().st_size for d in dirs for f in d.glob('*.safetensors')) / 2**20:.1f} MiB")
    print("| code | private growth | / model | peak RSS growth | / model | baseline private | baseline peak RSS | time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for code in [REPO, *map(Path, a.code)]:
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        r = measure(base, dirs, out, code)
        print(f"| {code} | {r['private_growth']:.0f} MiB | {r['private_growth'] / size:.2f} | "
              f"{r['maxrss_growth']:.0f} MiB | {r['maxrss_growth'] / size:.2f} | {r['baseline_anon']:.0f} MiB | "
              f"{r['baseline_maxrss']:.0f} MiB | {r['seconds']:.1f} s |", flush=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
