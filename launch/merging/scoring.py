"""Scores a model folder on a run's held-out sets with the training loop's own evaluator
(trainers/evaluation/evaluator.py), in this process on the CPU, so an input's score and the
merge's are measured alike, with the metrics of the run's objective:
- sft: eval loss and exact match of greedy generations on data.eval;
- dpo, ipo, simpo, orpo, kto: the objective's held-out loss, TRL's preference accuracy
  (`eval_rewards/accuracies`, not for kto) and reward margin, and exact match of
  generations against the chosen answers. DPO, IPO and KTO compare with a reference
  model: the run's model.path (what its own evaluation compared with: the base with the
  adapter disabled, or the initial model of method=full), whose held-out log-probs are
  computed once here (trainers/objectives/reference.heldout_reference);
- reward: the reward model's loss, accuracy (pairs whose chosen answer scores higher) and
  margin; nothing is generated;
- grpo: GRPO's own evaluation (trainers/objectives/grpo.py `GRPO.evaluate`): greedy
  completions of the first data.metric_rows held-out prompts scored by the run's reward
  functions (objective.rewards: `fn:` functions, user modules, `model:` reward models), their
  weighted mean `eval_reward`, each reward's mean, and `eval_exact_match` when the rows have
  an `answer` column. The rewards see trainer_state.global_step = the run's train.max_steps,
  as at its final eval. The sample of completions GRPO writes beside a run goes to a scratch
  folder, never into the runs read; the merged model's is kept as OUT/completions.jsonl.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from trainers.distributed import DistEnv
from trainers.errors import UserError

# metric -> True when higher is better
METRICS = {"eval_loss": False, "eval_exact_match": True, "eval_rewards/accuracies": True,
           "eval_rewards/margins": True, "eval_accuracy": True, "eval_margin": True, "eval_reward": True}
_PAIRS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_exact_match")
# what the evaluator reports for each objective's runs: the report's columns, greedy_soup's metrics
# (the first: what it ranks by when metric=null)
SCORED = {"sft": ("eval_loss", "eval_exact_match"), "dpo": _PAIRS, "ipo": _PAIRS, "simpo": _PAIRS, "orpo": _PAIRS,
          "kto": ("eval_loss", "eval_rewards/margins", "eval_exact_match"),
          "reward": ("eval_loss", "eval_accuracy", "eval_margin"),
          "grpo": ("eval_reward", "eval_exact_match")}  # + each reward's mean (report columns, not ranked by)


class _OneProcess:
    """The part of the runtime plan (parallel/base.py) the evaluator uses, for one CPU process:
    the loaded model is the plan's model, its inner module and its eval model at once (GRPO's
    evaluation reads `model`, `inner`, `cfg` and `compute_dtype` too: rewards load in fp32,
    the dtype scoring loads the model in)."""

    def __init__(self, model: torch.nn.Module, cfg):
        self.env = DistEnv(0, 1, 0, torch.device("cpu"))
        self.dp_rank, self.dp_world = 0, 1
        self.cfg = cfg
        self.model = self.inner = self.eval_model = model
        self.compute_dtype = torch.float32

    def autocast(self):
        return contextlib.nullcontext()


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise UserError(f"metric={metric!r} is not a held-out metric the merge can rank by; accepted: "
                        f"{', '.join(METRICS)}.")


def check_scored_metric(metric: str, objective: str, where: str) -> None:
    """greedy_soup ranks by `metric`: it must be one the objective's evaluation reports."""
    if metric not in SCORED[objective]:
        raise UserError(f"metric={metric!r}: {where} trained objective={objective}, whose held-out evaluation "
                        f"reports {', '.join(SCORED[objective])}; greedy_soup ranks by one of those.")


def better(a: float, b: float, metric: str) -> bool:
    """Whether score `a` is strictly better than `b`."""
    return a > b if METRICS[metric] else a < b


class Scorer:
    """The held-out sets of `run_cfg` (a run's saved config), opened once; call it on a
    model folder to get {"eval_loss": ..., "eval_exact_match": ..., per-set keys}."""

    def __init__(self, run_cfg, where: str):
        from trainers.data.sources import open_data
        from trainers.model.load import load_tokenizer
        from trainers.objectives.catalog import get_objective

        if run_cfg.objective.name not in SCORED:
            raise UserError(f"merge evaluation scores runs of objective {', '.join(SCORED)}, and {where} trained "
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
        self.objective = get_objective(self.cfg.objective)
        # the forgetting probe (eval.probes) and other loss-only sets: their loss beside the task's
        self.columns = SCORED[self.objective.name] + tuple(f"eval_loss/{s.name}" for s in self.sets if s.loss_only)
        self.step = 0
        if self.objective.name == "grpo":
            from trainers.objectives.grpo_settings import reward_names

            self.columns += tuple(f"eval_rewards/{n}/mean" for n in reward_names(self.cfg.objective.rewards))
            self.step = int(self.cfg.train.max_steps) if self.cfg.train.max_steps is not None else 0
        # what an evaluation writes beside its run (GRPO's completions/step_N.jsonl) lands here,
        # not in the run folder the config names: scoring never writes into the runs it reads
        self._scratch = tempfile.TemporaryDirectory(prefix="merge-scoring-")
        self.cfg.run_dir = self._scratch.name
        if self.objective.reference:  # dpo, ipo, kto: log-probs of the run's starting model
            from trainers.objectives.reference import heldout_reference

            base = self._load(self.cfg.model.path)
            heldout_reference(_OneProcess(base, self.cfg), self.sets, int(self.cfg.train.micro_batch_size),
                              self.tokenizer.pad_token_id, self.objective.name == "kto",
                              int(self.cfg.data.max_seq_len))
            del base

    def _load(self, model_dir) -> torch.nn.Module:
        from trainers.model.load import HEADS

        return HEADS[self.objective.head].from_pretrained(str(model_dir), dtype=torch.float32)

    def __call__(self, model_dir, samples_to: Path | None = None) -> dict:
        """`samples_to`: where to keep the sample of completions the evaluation wrote (grpo)."""
        from trainers.evaluation.evaluator import Evaluator

        model = self._load(model_dir)
        try:
            ev = Evaluator(self.cfg, _OneProcess(model, self.cfg), self.tokenizer, self.sets, self.packed)
            return ev.flatten(ev.run_sets(self.step))
        finally:
            del model
            written = Path(self._scratch.name) / "completions"
            sample = written / f"step_{self.step}.jsonl"
            if samples_to is not None and sample.exists():
                shutil.move(str(sample), str(samples_to))
            shutil.rmtree(written, ignore_errors=True)
