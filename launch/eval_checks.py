"""Pre-launch checks of the evaluation, best-checkpoint and tracker settings (each a
UserError naming the bad value and what is accepted, before any process starts)."""
from __future__ import annotations

from trainers.data.source_specs import held_out_names, parse_sources, probe_specs
from trainers.errors import UserError
from trainers.evaluation.judge import parse_best_metric
from trainers.metrics.trackers import TRACKERS


def _choice(key: str, value, accepted) -> None:
    if value not in accepted:
        raise UserError(f"{key}={value!r} is not accepted; use one of: {', '.join(map(str, accepted))}.")


def check_eval_settings(cfg) -> None:
    t, e = cfg.train, cfg.eval
    if not isinstance(t.keep_best, bool):
        raise UserError(f"train.keep_best={t.keep_best!r} must be true or false.")
    p = t.early_stopping_patience
    if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
        raise UserError(f"train.early_stopping_patience={p!r} must be a positive number of evals (e.g. 3), "
                        f"or null to never stop early.")
    a = e.forgetting_alarm
    if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or a <= 0):
        raise UserError(f"eval.forgetting_alarm={a!r} must be a relative rise greater than 0 (0.2: a set's loss "
                        f"20 % above its value before training), or null for no alarm.")
    names = [s.name for s in parse_sources(cfg.data.eval, "data.eval")] + held_out_names(cfg)
    names += [s.name for s in probe_specs(cfg, names)]
    if names:
        parse_best_metric(t.best_metric, names)
    elif p is not None or t.export_from == "best":
        raise UserError("train.early_stopping_patience and train.export_from=best need eval sets: set data.eval.")
    report_to = list(t.report_to or [])
    for name in report_to:
        _choice("train.report_to", name, TRACKERS)
    peak = t.peak_tflops
    if peak is not None and (isinstance(peak, bool) or not isinstance(peak, (int, float)) or peak <= 0):
        raise UserError(f"train.peak_tflops={peak!r} must be the device's peak in TFLOP/s (e.g. 989 for an "
                        f"H100 SXM in bf16), or null to use the built-in table.")
