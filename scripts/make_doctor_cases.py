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
    probe = first_lines("data/probes/general.jsonl", 8, tmp / "probe.jsonl")
    two = first_lines("data/reverse/train.jsonl", 2, tmp / "two.jsonl")
    pref = first_lines("data/reverse_pref/eval.jsonl", 8, tmp / "pref.jsonl")
    common = [f"data.eval={{held: {held}}}", f"eval.probes={{general: {probe}}}", "data.metric_rows=4",
              "train.save_every=1000", "method.dropout=0", "train.report_to=[]"]
    few = [f"data.train={two}", "data.packing=false", "train.micro_batch_size=2", "train.grad_accum=1"]
    cases = {
        # the task learned, forgetting not measured (the default LoRA run does forget the probe)
        "healthy": [*common[:1], "eval.probes=null", *common[2:], "train.max_steps=40", "train.eval_every=10"],
        "diverge": [*common, "train.max_steps=20", "train.eval_every=10", "optim.lr=0.9"],
        "underfit": [*common, "train.max_steps=20", "train.eval_every=10", "optim.lr=1e-7"],
        "overfit": [*common, *few, "train.max_steps=16", "train.eval_every=2", "optim.lr=1e-2"],
        "collapse": [*common, *few, "train.max_steps=80", "train.eval_every=20", "optim.lr=3e-3"],
        "dpo": ["objective=dpo", "data=reverse_pref", f"data.eval={pref}", *common[2:], "train.max_steps=20",
                "train.eval_every=10", "optim.lr=1e-2"],
    }
    if sys.argv[1:] == ["grpo_flat"]:
        return grpo_flat()
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


def grpo_flat(out: Path = OUT / "grpo_flat") -> None:
    """A real TRL GRPOTrainer run of the bundled model whose reward is the same for every
    completion (no variance in any group), its log history written as metrics.jsonl."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompts = [json.loads(x)["messages"][:1] for x in (ROOT / "data/reverse/train.jsonl").read_text().splitlines()[:24]]
    tmp = Path(tempfile.mkdtemp())
    args = GRPOConfig(output_dir=str(tmp), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                      max_steps=6, logging_steps=1, use_cpu=True, bf16=False, report_to=[], save_strategy="no")
    trainer = GRPOTrainer(model=str(ROOT / "assets/tiny-llama"), reward_funcs=lambda completions, **kw: [1.0] * len(completions),
                          args=args, train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    trainer.train()
    out.mkdir(parents=True, exist_ok=True)
    rows = [dict(r) for r in trainer.state.log_history if "frac_reward_zero_std" in r]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "config.yaml").write_text("objective: {name: grpo}\noptim: {lr: 1.0e-06}\n")


if __name__ == "__main__":
    main()
