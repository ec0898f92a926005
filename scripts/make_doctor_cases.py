"""Regenerate tests/data/doctor/: real short runs of the bundled model, each made to show
one thing `python -m launch.doctor` names (or nothing: `healthy`). The doctor's tests
read the metrics.jsonl, summary.json and config (objective, optim) these runs wrote, so
they cost no training time in CI. About 5 minutes on 2 CPU cores.
"""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/data/doctor"


def first_lines(src: str, n: int, dst: Path) -> Path:
    dst.write_text("\n".join((ROOT / src).read_text().splitlines()[:n]) + "\n")
    return dst


def main():
    tmp = Path(tempfile.mkdtemp())
    held = first_lines("data/reverse/eval.jsonl", 8, tmp / "held.jsonl")
    probe = first_lines("data/general/probe.jsonl", 8, tmp / "probe.jsonl")
    two = first_lines("data/reverse/train.jsonl", 2, tmp / "two.jsonl")
    pref = first_lines("data/reverse_pref/eval.jsonl", 8, tmp / "pref.jsonl")
    common = [f"data.eval={{held: {held}}}", f"eval.probes={{general: {probe}}}", "data.metric_rows=4",
              "train.save_every=1000", "method.dropout=0", "train.report_to=[]"]
    few = [f"data.train={two}", "data.packing=false", "train.micro_batch_size=2", "train.grad_accum=1"]
    cases = {
        # the task learned, forgetting not measured (the default LoRA run does forget the probe)
        "healthy": [*common[:1], "eval.probes={}", *common[2:], "train.max_steps=40", "train.eval_every=10"],
        "diverge": [*common, "train.max_steps=20", "train.eval_every=10", "optim.lr=0.9"],
        "underfit": [*common, "train.max_steps=20", "train.eval_every=10", "optim.lr=1e-7"],
        "overfit": [*common, *few, "train.max_steps=16", "train.eval_every=2", "optim.lr=1e-2"],
        "collapse": [*common, *few, "train.max_steps=60", "train.eval_every=20", "optim.lr=1e-2",
                     "optim.schedule=constant"],
        "dpo": ["objective=dpo", "data=reverse_pref", f"data.eval={pref}", *common[2:], "train.max_steps=20",
                "train.eval_every=10", "optim.lr=1e-2"],
    }
    for name in sys.argv[1:] or cases:
        run = tmp / name
        subprocess.run([sys.executable, str(ROOT / "launch.py"), f"hydra.run.dir={run}", *cases[name]],
                       cwd=ROOT, check=False)
        dst = OUT / name
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        shutil.copy(run / "metrics.jsonl", dst)
        shutil.copy(run / "summary.json", dst)
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(run / "config.yaml")
        (dst / "config.yaml").write_text(OmegaConf.to_yaml({"objective": cfg.objective, "optim": cfg.optim}))
        print(name, json.loads((dst / "summary.json").read_text())["status"])


if __name__ == "__main__":
    main()
