"""Scores a model folder on a run's held-out sets with the training loop's own evaluator
(trainers/evaluate.py: eval loss and exact match of greedy generations on data.eval), in
this process on the CPU, so an input's score and the merge's are measured alike.
"""
from __future__ import annotations

import contextlib

import torch
from omegaconf import OmegaConf

from trainers.distributed import DistEnv
from trainers.errors import UserError

# metric -> True when higher is better
METRICS = {"eval_loss": False, "eval_exact_match": True}


class _OneProcess:
    """The part of the runtime plan (parallel/base.py) the evaluator uses, for one CPU process."""

    def __init__(self, model: torch.nn.Module):
        self.env = DistEnv(0, 1, 0, torch.device("cpu"))
        self.dp_rank, self.dp_world = 0, 1
        self.eval_model = model

    def autocast(self):
        return contextlib.nullcontext()


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise UserError(f"metric={metric!r} is not a held-out metric the merge can rank by; accepted: "
                        f"{', '.join(METRICS)}.")


def better(a: float, b: float, metric: str) -> bool:
    """Whether score `a` is strictly better than `b`."""
    return a > b if METRICS[metric] else a < b


class Scorer:
    """The held-out sets of `run_cfg` (a run's saved config), opened once; call it on a
    model folder to get {"eval_loss": ..., "eval_exact_match": ..., per-set keys}."""

    def __init__(self, run_cfg, where: str):
        from trainers.data.sources import open_data
        from trainers.model.load import load_tokenizer

        if run_cfg.objective.name != "sft":
            raise UserError(f"merge evaluation scores runs of objective=sft, and {where} trained "
                            f"objective={run_cfg.objective.name}: pass eval=false to merge without scoring.")
        if not run_cfg.data.eval:
            raise UserError(f"{where} has no held-out set (data.eval is null), so the merge cannot be scored: pass "
                            f"eval=false, or eval_from=RUN_DIR of a run with data.eval.")
        cfg = OmegaConf.to_container(run_cfg, resolve=True)
        cfg["data"]["train"], cfg["data"]["prepared"] = None, None  # only the held-out sets (cached by content)
        self.cfg = OmegaConf.create(cfg)
        self.tokenizer = load_tokenizer(self.cfg.model)
        data = open_data(self.cfg, self.tokenizer)
        self.sets, self.packed = data.eval, data.packed
        self.names = [s.name for s in self.sets]

    def __call__(self, model_dir) -> dict:
        from transformers import AutoModelForCausalLM

        from trainers.evaluation.evaluator import Evaluator

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        try:
            return Evaluator(self.cfg, _OneProcess(model), self.tokenizer, self.sets, self.packed).run()
        finally:
            del model
