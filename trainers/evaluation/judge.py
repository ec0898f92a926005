"""Judging a run by its evals: before (step 0), best (with its step), final and delta for
every eval set and metric, which eval is the best checkpoint's, early stopping, and
forgetting alarms.

Eval results are all-reduced, so every rank holds the same judge and reaches the same
stop decision without a collective. Its state goes into each checkpoint's trainer state:
a resumed run keeps its before values, its best and its patience count.
"""
from __future__ import annotations

import logging
import math

from trainers.errors import UserError

log = logging.getLogger("train")


def lower_is_better(metric: str) -> bool:
    """Losses fall as a run improves; exact match and preference accuracies rise."""
    return "loss" in metric


def parse_best_metric(value: str, set_names: list[str]) -> tuple[str, str]:
    """train.best_metric -> (set, metric). `eval_loss` is the first set's loss; otherwise
    `<set>/<metric>`, where set names may themselves contain a slash (reverse/eval)."""
    if value == "eval_loss":
        return set_names[0], "loss"
    for name in sorted(set_names, key=len, reverse=True):
        if value.startswith(name + "/") and len(value) > len(name) + 1:
            return name, value[len(name) + 1:]
    raise UserError(
        f"train.best_metric={value!r} names no eval set of this run. Use eval_loss (the first "
        f"set's loss) or <set>/<metric> with a set among: {', '.join(set_names)} (e.g. "
        f"train.best_metric={set_names[0]}/loss or {set_names[0]}/exact_match)."
    )


class EvalJudge:
    def __init__(self, train_cfg, eval_cfg, set_names: list[str], is_main: bool, on_policy: bool = False):
        self.best_set, self.best_name = parse_best_metric(train_cfg.best_metric, set_names)
        self.mode = train_cfg.best_mode
        if on_policy and train_cfg.best_metric == "eval_loss":
            # An on-policy objective (GRPO) scores its own generations: its held-out headline
            # is the mean reward, and higher is better.
            self.best_name, self.mode = "reward", "max"
        self.patience = train_cfg.early_stopping_patience
        self.alarm = eval_cfg.forgetting_alarm
        self.action = eval_cfg.forgetting_action
        self.is_main = is_main
        self.history: list[tuple[int, dict[str, dict[str, float]]]] = []
        self.best: tuple[float, int] | None = None  # (value, step)
        self.evals_without_improvement = 0
        self.alarms: list[dict] = []
        self.stop_reason: str | None = None
        self.improved = False

    @property
    def best_metric(self) -> str:
        return f"{self.best_set}/{self.best_name}"

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best[0] if self.mode == "min" else value > self.best[0]

    def observe(self, step: int, scores: dict[str, dict[str, float]]) -> None:
        """One eval's scores ({set: {metric: value}}); updates the best, the patience count,
        the forgetting alarms and `stop_reason`."""
        self.history = [(s, v) for s, v in self.history if s != step] + [(step, scores)]
        value = scores.get(self.best_set, {}).get(self.best_name)
        if value is None:
            raise UserError(
                f"train.best_metric={self.best_metric!r}: the eval set {self.best_set!r} reports "
                f"{', '.join(sorted(scores.get(self.best_set, {})))}, not {self.best_name!r}.")
        self.improved = step > 0 and self._better(value)  # the best is a trained checkpoint
        if self.improved:
            self.best, self.evals_without_improvement = (value, step), 0
        elif step > 0 and self.best is not None:
            self.evals_without_improvement += 1
        if self.patience and self.evals_without_improvement >= self.patience:
            self.stop_reason = (
                f"early stopping: {self.best_metric} did not improve for {self.evals_without_improvement} "
                f"evals (train.early_stopping_patience={self.patience}); best {self.best[0]:.4g} at step "
                f"{self.best[1]}")
        self._check_forgetting(step, scores)

    def _check_forgetting(self, step: int, scores: dict[str, dict[str, float]]) -> None:
        if self.alarm is None or step == 0 or not self.history or self.history[0][0] != 0:
            return
        before = self.history[0][1]
        for name, metrics in scores.items():
            b, now = before.get(name, {}).get("loss"), metrics.get("loss")
            if b is None or now is None or b <= 0 or (now - b) / b <= self.alarm:
                continue
            rise = (now - b) / b
            self.alarms.append({"set": name, "step": step, "before": b, "loss": now, "rise": rise})
            if self.is_main:
                log.warning("forgetting: %s loss %.4g at step %d is %.0f%% above its %.4g before training "
                            "(eval.forgetting_alarm=%s)", name, now, step, 100 * rise, b, self.alarm)
            if self.action == "stop" and self.stop_reason is None:
                self.stop_reason = (f"forgetting: {name} loss rose {100 * rise:.0f}% above its value before "
                                    f"training at step {step} (eval.forgetting_alarm={self.alarm}, "
                                    f"eval.forgetting_action=stop)")

    # ------------------------------------------------------------------ reporting
    def table(self) -> dict[str, dict[str, dict]]:
        """{set: {metric: {before, best, best_step, final, delta}}}."""
        if not self.history:
            return {}
        out: dict[str, dict[str, dict]] = {}
        first_step, first = self.history[0]
        last = self.history[-1][1]
        for name, metrics in last.items():
            for metric, final in metrics.items():
                points = [(v[name][metric], s) for s, v in self.history
                          if metric in v.get(name, {}) and math.isfinite(v[name][metric])]
                points = [p for p in points if p[1] > 0] or points  # best of the trained steps
                if not points:
                    continue
                pick = min if lower_is_better(metric) else max
                best, best_step = pick(points, key=lambda p: p[0])
                before = first.get(name, {}).get(metric) if first_step == 0 else None
                out.setdefault(name, {})[metric] = {
                    "before": before, "best": best, "best_step": best_step, "final": final,
                    "delta": None if before is None else final - before}
        return out

    def summary(self) -> dict:
        out = {"evals": self.table(), "best_metric": self.best_metric,
               "best": None if self.best is None else {"value": self.best[0], "step": self.best[1]}}
        if self.alarms:
            out["forgetting"] = self.alarms
        if self.stop_reason:
            out["stop_reason"] = self.stop_reason
        return out

    def report_lines(self) -> list[str]:
        """The end-of-run table, one line per set and metric."""
        def f(x):
            return "-" if x is None else f"{x:.4g}"
        rows = [("set", "metric", "before", "best (step)", "final", "delta")]
        for name, metrics in self.table().items():
            for metric, r in metrics.items():
                rows.append((name, metric, f(r["before"]), f"{f(r['best'])} ({r['best_step']})", f(r["final"]),
                             "-" if r["delta"] is None else f"{r['delta']:+.4g}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]

    # ------------------------------------------------------------------ resume
    def state(self) -> dict:
        return {"history": self.history, "best": self.best, "without_improvement": self.evals_without_improvement,
                "alarms": self.alarms, "stop_reason": self.stop_reason}

    def load_state(self, state: dict | None) -> None:
        if not state:
            return
        self.history = [(int(s), v) for s, v in state["history"]]
        self.best = tuple(state["best"]) if state["best"] else None
        self.evals_without_improvement = state["without_improvement"]
        self.alarms = state["alarms"]
        self.stop_reason = state.get("stop_reason")  # a relaunch of a stopped run stays stopped
