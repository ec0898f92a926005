"""`python -m launch.evaluate RUN_DIR tasks=[reverse_choice] [limit=N] [batch_size=8]`:
score a run's export with lm-evaluation-harness (its HFLM model, its evaluator).

The merged model (export/merged) is scored when there is one, else the adapter on its
base (export/adapter with model.path from the run's config). A task name is first looked
up among the project's local task files (data/harness/*.yaml: a task YAML with a JSON
dataset whose data_files are relative to the YAML, no network); any other name goes to
the harness's own registry. Prompts go through the tokenizer's chat template when it has
one, the way the run trained. Results land next to the run's own evals:
RUN_DIR/harness.json (the harness's results) and summary.json's `harness` key.
eval.harness.tasks runs this after a local training run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from trainers.errors import UserError

TASK_DIR = Path(__file__).resolve().parent.parent / "data" / "harness"


def local_tasks() -> dict[str, dict]:
    """Task configs of data/harness/*.yaml by task name, with absolute data_files."""
    out = {}
    for path in sorted(TASK_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        files = config.get("dataset_kwargs", {}).get("data_files", {})
        for split, name in files.items():
            files[split] = str((path.parent / name).resolve())
        out[config["task"]] = config
    return out


def model_args(run_dir: Path) -> dict:
    merged, adapter = run_dir / "export" / "merged", run_dir / "export" / "adapter"
    if (merged / "config.json").exists():
        return {"pretrained": str(merged)}
    if (adapter / "adapter_config.json").exists():
        from omegaconf import OmegaConf

        base = OmegaConf.load(run_dir / "config.yaml").model.path
        return {"pretrained": str(base), "peft": str(adapter), "tokenizer": str(adapter)}
    raise UserError(f"{run_dir} has no export to score (export/merged or export/adapter): the run has not "
                    f"finished, or this is not a run directory.")


def evaluate_run(run_dir: Path, tasks: list[str], limit: int | None = None, batch_size: int = 8) -> dict:
    run_dir = Path(run_dir).resolve()
    args = model_args(run_dir)  # refuses a run without export before the harness's imports

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    if not tasks:
        raise UserError("No task given: python -m launch.evaluate RUN_DIR tasks=[reverse_choice] "
                        f"(local tasks: {', '.join(local_tasks())}).")
    known = local_tasks()
    lm = HFLM(**args, device="cuda" if torch.cuda.is_available() else "cpu",
              batch_size=batch_size, dtype="float32")
    chat = bool(getattr(lm.tokenizer, "chat_template", None))
    results = lm_eval.simple_evaluate(model=lm, tasks=[known.get(t, t) for t in tasks], limit=limit,
                                      apply_chat_template=chat, log_samples=False)
    scores = {task: {k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "alias"}
              for task, r in results["results"].items()}
    (run_dir / "harness.json").write_text(json.dumps(
        {"tasks": tasks, "limit": limit, "chat_template": chat, "model_args": args,
         "results": scores, "versions": results.get("versions")}, indent=1, default=str))
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        from trainers.metrics.sinks import write_summary

        summary = json.loads(summary_path.read_text())
        summary["harness"] = scores
        write_summary(run_dir, summary)
    return scores


def parse(argv: list[str]) -> tuple[Path, dict]:
    usage = "usage: python -m launch.evaluate RUN_DIR tasks=[name,...] [limit=N] [batch_size=N]"
    if not argv or "=" in argv[0]:
        raise UserError(usage)
    options = {"tasks": [], "limit": None, "batch_size": 8}
    for arg in argv[1:]:
        key, _, value = arg.partition("=")
        if key not in options:
            raise UserError(f"Unknown option {arg!r}. {usage}")
        parsed = yaml.safe_load(value)
        options[key] = [str(t) for t in parsed] if key == "tasks" and isinstance(parsed, list) else parsed
    if isinstance(options["tasks"], str):
        options["tasks"] = [options["tasks"]]
    return Path(argv[0]), options


def main(argv: list[str]) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    try:
        run_dir, options = parse(argv)
        scores = evaluate_run(run_dir, **options)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for task, metrics in scores.items():
        print(task, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
