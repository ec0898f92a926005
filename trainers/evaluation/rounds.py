"""The loop's eval points: score every eval set (step 0, every train.eval_every steps, the
end), log the scores, let the judge weigh them (best, early stopping, forgetting) and keep
the best checkpoint, so run_job only says when.
"""
from __future__ import annotations

import logging

from trainers.evaluation.evaluator import Evaluator
from trainers.evaluation.judge import EvalJudge
from trainers.evaluation.keeper import BestKeeper

log = logging.getLogger("train")


class EvalRounds:
    def __init__(self, cfg, plan, tokenizer, data, metrics, ckpt, resumed: dict | None):
        self.env, self.metrics, self.ckpt = plan.env, metrics, ckpt
        self.every, self.export_from = cfg.train.eval_every, cfg.train.export_from
        self.evaluator = self.judge = None
        self.last_step: int | None = None
        keep = bool(data.eval) and (cfg.train.keep_best or cfg.train.export_from == "best")
        self.keeper = BestKeeper(ckpt, self.env.is_main, keep)
        if data.eval:
            self.evaluator = Evaluator(cfg, plan, tokenizer, data.eval, data.packed)
            self.judge = EvalJudge(cfg.train, cfg.eval, [s.name for s in data.eval], self.env.is_main,
                                   on_policy=hasattr(self.evaluator.objective, "evaluate"))
            self.judge.load_state((resumed or {}).get("evals"))

    @property
    def stop_reason(self) -> str | None:
        return self.judge.stop_reason if self.judge else None

    def run(self, step: int) -> dict:
        scores = self.evaluator.run_sets(step)
        flat = self.evaluator.flatten(scores)
        self.metrics.log({"step": step, **flat})
        self.judge.observe(step, scores)
        self.last_step = step
        return flat

    def at_start(self, start: int) -> None:
        if self.evaluator and start == 0:
            self.run(0)

    def due(self, step: int) -> bool:
        return self.evaluator is not None and step % self.every == 0

    def at_end(self, step: int) -> dict:
        """The final eval, unless this step was just scored."""
        return self.run(step) if self.evaluator and self.last_step != step else {}

    def wants_checkpoint(self, step: int) -> bool:
        """A save at this step, because its eval is the best so far."""
        return self.keeper.enabled and self.last_step == step and self.judge.improved

    def after_save(self, step: int) -> None:
        if self.wants_checkpoint(step):
            self.keeper.keep(step)

    def before_export(self) -> str:
        """train.export_from=best: load the best checkpoint into the plan first."""
        best = self.keeper.directory()
        if self.export_from != "best":
            return "last"
        if best is None:
            if self.env.is_main:
                log.warning("train.export_from=best: no eval after step 0 was kept as best; exporting the last weights")
            return "last"
        state = self.ckpt.restore(directory=best)
        if self.env.is_main:
            log.info("export: from the best checkpoint (step %d, %s)", state["step"], self.judge.best_metric)
        return f"best (step {state['step']})"

    def state(self) -> dict | None:
        return self.judge.state() if self.judge else None

    def summary(self) -> dict:
        if not self.judge:
            return {}
        if self.env.is_main:
            for line in self.judge.report_lines():
                log.info("eval: %s", line)
        out = self.judge.summary()
        if self.keeper.directory() is not None:
            out["best_checkpoint"] = str(self.keeper.directory())
        return out
