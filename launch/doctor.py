"""`python -m launch.doctor RUN_DIR`: read a finished or running run (metrics.jsonl,
summary.json, config.yaml) and name what its curves show, each finding with its evidence
and what to try. A healthy run gets one line saying nothing was found.

The rules follow the usual reading of fine-tuning curves: eval loss turning up while
train loss keeps falling is overfitting (and where it started); train and eval loss both
flat is underfitting; a loss that spikes, rises or turns NaN, or a grad norm that
explodes, is divergence (usually a too-high learning rate); a train loss collapsing to
zero is a leak or a trivial task; a general-ability set whose loss rises is forgetting;
a preference run whose chosen log-probs fall is likelihood displacement; a GRPO run whose
groups all score alike (frac_reward_zero_std near 1) has no signal to learn from.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Finding:
    name: str
    evidence: str
    advice: str

    def __str__(self) -> str:
        return f"{self.name}: {self.evidence}\n  try: {self.advice}"


def g(x: float) -> str:
    return f"{x:.4g}"


class Run:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            raise SystemExit(f"error: {path} does not exist: give a run directory (RUN_DIR/metrics.jsonl).")
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        by_step: dict[int, dict] = {}
        for r in rows:  # after a resume the latest record of a step wins
            by_step.setdefault(r["step"], {}).update(r)
        self.steps = [by_step[s] for s in sorted(by_step)]
        s = self.dir / "summary.json"
        self.summary = json.loads(s.read_text()) if s.exists() else {}
        c = self.dir / "config.yaml"
        self.config = {}
        if c.exists():
            from omegaconf import OmegaConf

            self.config = OmegaConf.to_container(OmegaConf.load(c), resolve=False)

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(r["step"], float(r[key])) for r in self.steps if key in r and r[key] is not None]

    def saved(self, dotted: str, default=None):
        """A setting of the run's saved config.yaml: a run written by an older version (or
        one still starting) may lack it."""
        node = self.config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return default if node is None else node

    @property
    def objective(self) -> str:
        return self.saved("objective.name", "sft")

    @property
    def lr(self):
        return self.saved("optim.lr")


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def divergence(run: Run) -> list[Finding]:
    loss = [(s, v) for s, v in run.series("loss")]
    out = []
    bad = [s for s, v in loss if not math.isfinite(v)]
    error = run.summary.get("error") or ""
    if bad or "loss became" in error:
        where = f"step {bad[0]}" if bad else error.split(" (")[0]
        out.append(Finding("divergence (NaN loss)", f"the loss became non-finite ({where})",
                           f"lower optim.lr (now {run.lr}), check train.precision and the data; "
                           f"train.spike_guard.enabled=true skips isolated bad batches"))
    finite = [(s, v) for s, v in loss if math.isfinite(v)]
    spikes = []
    for i in range(5, len(finite)):
        window = [v for _, v in finite[max(0, i - 20):i]]
        if finite[i][1] > 3 * statistics.median(window):
            spikes.append(finite[i])
    grads = [(s, v) for s, v in run.series("grad_norm") if math.isfinite(v)]
    exploded = []
    if len(grads) > 5:
        base = statistics.median(v for _, v in grads[:5])
        exploded = [(s, v) for s, v in grads[5:] if v > 10 * base]
    n = len(finite)
    rising = n >= 8 and _mean([v for _, v in finite[-n // 4:]]) > 1.1 * _mean([v for _, v in finite[:n // 4]])
    if spikes or exploded or rising:
        parts = []
        if spikes:
            parts.append(f"{len(spikes)} loss spikes above 3x the running median (first at step {spikes[0][0]}: "
                         f"{g(spikes[0][1])})")
        if exploded:
            parts.append(f"grad norm up to {g(max(v for _, v in exploded))} against {g(base)} in the first steps "
                         f"(from step {exploded[0][0]})")
        if rising:
            parts.append(f"train loss rose from {g(_mean([v for _, v in finite[:n // 4]]))} (first quarter) to "
                         f"{g(_mean([v for _, v in finite[-n // 4:]]))} (last quarter)")
        out.append(Finding("divergence / learning rate too high", "; ".join(parts),
                           f"lower optim.lr (now {run.lr}) by 3-10x or lengthen the warmup; keep gradient "
                           f"clipping on; train.spike_guard.enabled=true skips isolated bad batches"))
    return out


def overfitting(run: Run) -> list[Finding]:
    evals = [(s, v) for s, v in run.series("eval_loss") if s > 0 and math.isfinite(v)]
    train = dict(run.series("loss"))
    if len(evals) < 3:
        return []
    best_step, best = min(evals, key=lambda p: p[1])
    last_step, last = evals[-1]
    if last_step == best_step or last <= 1.1 * best:
        return []
    t_best, t_last = train.get(best_step), train.get(last_step)
    if t_best is None or t_last is None or t_last >= t_best:
        return []
    return [Finding("overfitting", f"eval loss was lowest at step {best_step} ({g(best)}) and rose to {g(last)} by "
                    f"step {last_step} while train loss kept falling ({g(t_best)} -> {g(t_last)})",
                    f"keep the step-{best_step} weights (train.export_from=best, train.early_stopping_patience), "
                    f"train fewer steps, add data, lower the lr or raise method.dropout")]


def underfitting(run: Run) -> list[Finding]:
    loss = [v for _, v in run.series("loss") if math.isfinite(v)]
    if len(loss) < 8:
        return []
    k = max(2, len(loss) // 10)
    first, last = _mean(loss[:k]), _mean(loss[-k:])
    evals = [v for s, v in run.series("eval_loss") if math.isfinite(v)]
    eval_flat = len(evals) < 2 or evals[-1] > 0.9 * evals[0]
    if last < 0.9 * first or not eval_flat:
        return []
    ev = f"; eval loss {g(evals[0])} -> {g(evals[-1])}" if len(evals) >= 2 else ""
    return [Finding("underfitting", f"train loss barely moved: {g(first)} over the first {k} steps, {g(last)} over "
                    f"the last {k}{ev}",
                    f"raise optim.lr (now {run.lr}), train longer, or give the adapter more capacity "
                    f"(method.r, more target modules, method=full); check the loss mask in the dry run")]


def collapse(run: Run) -> list[Finding]:
    if run.objective != "sft":
        return []
    loss = [(s, v) for s, v in run.series("loss") if math.isfinite(v)]
    if len(loss) < 5:
        return []
    tail = [v for _, v in loss[-3:]]
    if max(tail) >= 0.02 or max(tail) >= 0.01 * loss[0][1]:
        return []
    first = next(s for s, v in loss if v < 0.02)
    return [Finding("loss collapsed to zero", f"train loss below 0.02 from step {first} (last {g(tail[-1])}, "
                    f"first {g(loss[0][1])})",
                    "check for eval or answer text leaking into the prompts, duplicated rows, or a task too trivial "
                    "to teach anything; compare with the held-out loss")]


def forgetting(run: Run) -> list[Finding]:
    out = []
    evals = run.summary.get("evals") or {}
    alarms = run.summary.get("forgetting") or []
    sets = list(evals)
    for name in sets[1:]:  # the first set is the task's own
        loss = evals[name].get("loss")
        if not loss or loss.get("before") in (None, 0):
            continue
        rise = (loss["final"] - loss["before"]) / loss["before"]
        if rise > 0.2 or any(a["set"] == name for a in alarms):
            out.append(Finding("forgetting", f"{name} loss rose {100 * rise:.0f}% ({g(loss['before'])} before training, "
                               f"{g(loss['final'])} at the end)",
                               "lower the lr or train fewer steps, use a smaller adapter (method.r), or mix general "
                               "data into data.train (a replay source with a weight)"))
    return out


def likelihood_displacement(run: Run) -> list[Finding]:
    chosen = [(s, v) for s, v in run.series("logps/chosen") if math.isfinite(v)]
    if len(chosen) < 8:
        return []
    k = max(2, len(chosen) // 4)
    first, last = _mean([v for _, v in chosen[:k]]), _mean([v for _, v in chosen[-k:]])
    if last >= first - max(0.5, 0.1 * abs(first)):
        return []
    return [Finding("likelihood displacement", f"chosen log-probs fell from {g(first)} to {g(last)} "
                    f"(logps/chosen, mean of the first and of the last quarter of the steps)",
                    "the policy lowers the chosen answers too, only the rejected more: lower the lr or raise "
                    "objective.beta, add an SFT term on the chosen answers (objective=orpo) or try "
                    "objective.loss_type=apo_zero")]


def zero_reward_variance(run: Run) -> list[Finding]:
    frac = [v for _, v in run.series("frac_reward_zero_std") if math.isfinite(v)]
    if len(frac) < 3:
        return []
    tail = frac[len(frac) // 2:]
    if _mean(tail) < 0.9:
        return []
    return [Finding("GRPO: no reward variance", f"frac_reward_zero_std averaged {g(_mean(tail))} over the last half "
                    f"of the steps: almost every group's completions got the same reward, so advantages are zero",
                    "make the reward less all-or-nothing (partial credit), raise num_generations or the sampling "
                    "temperature, or start from an SFT checkpoint that sometimes succeeds")]


RULES = (divergence, overfitting, underfitting, collapse, forgetting, likelihood_displacement, zero_reward_variance)


def diagnose(run_dir: Path) -> list[Finding]:
    run = Run(run_dir)
    return [f for rule in RULES for f in rule(run)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.doctor", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    args = ap.parse_args(argv)
    findings = diagnose(args.run_dir)
    if not findings:
        print(f"{args.run_dir}: nothing wrong found in the loss curves, evals and summary.")
        return 0
    print(f"{args.run_dir}: {len(findings)} finding(s)")
    for f in findings:
        print(f"- {f}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
