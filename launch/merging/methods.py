"""The merge methods `python -m launch.merge method=...` offers, and the mergekit config each
becomes. The arithmetic is mergekit's (run through its Python API in launch/merging/run.py);
this table only says what each method needs from the user, so that a request it cannot
serve is refused before anything is read or written.
"""
from __future__ import annotations

from dataclasses import dataclass

from trainers.errors import UserError


@dataclass(frozen=True)
class Method:
    name: str
    mergekit: str  # mergekit's merge_method
    base: bool  # needs a base model (task vectors are deltas from it)
    min_inputs: int
    max_inputs: int | None
    knobs: tuple[str, ...]  # which of weights / density / t / lambda it reads
    when: str  # one line for the docs and --help: when to use it


METHODS = {m.name: m for m in (
    Method("linear", "linear", False, 2, None, ("weights",),
           "a uniform (or weighted) soup of fine-tunes of one base: the safe default, never worse than guessing"),
    Method("greedy_soup", "linear", False, 2, None, (),
           "a soup that only keeps runs that help the held-out metric (Wortsman et al. 2022): use after a sweep"),
    Method("task_arithmetic", "task_arithmetic", True, 1, None, ("weights", "lambda"),
           "add (or with negative weights, remove) skills as deltas from the base; lambda scales them"),
    Method("ties", "ties", True, 1, None, ("weights", "density", "lambda"),
           "combine models trained on different tasks: keeps each delta's largest entries and a majority sign"),
    Method("dare_ties", "dare_ties", True, 1, None, ("weights", "density", "lambda"),
           "as ties, but drops delta entries at random (rescaled); for many models with redundant deltas"),
    Method("dare_linear", "dare_linear", True, 1, None, ("weights", "density", "lambda"),
           "task arithmetic on randomly sparsified, rescaled deltas"),
    Method("slerp", "slerp", False, 2, 2, ("t",),
           "blend exactly two models along the sphere (t=0: the first, t=1: the second)"),
    Method("model_stock", "model_stock", True, 3, None, (),
           "no knobs: moves from the base toward the average by the angle between the fine-tunes (>= 3 of them)"),
)}
ALIASES = {"soup": "linear", "uniform_soup": "linear"}


def get_method(name: str, key: str = "method") -> Method:
    """`key` is the setting the name came from (launch.merge's `method`, a sweep's
    `merge.after_sweep`), so the refusal names what the user typed."""
    name = ALIASES.get(str(name), str(name))
    if name not in METHODS:
        raise UserError(f"{key}={name!r} is not a merge method; accepted: {', '.join(METHODS)} "
                        f"(soup = linear).")
    return METHODS[name]


def check_count(method: Method, n: int, names: list[str]) -> None:
    if n < method.min_inputs:
        why = {"slerp": "slerp interpolates between exactly two models",
               "model_stock": "model_stock estimates its interpolation from the angles between at least three "
                              "fine-tuned models"}.get(method.name, f"{method.name} combines several models")
        raise UserError(f"method={method.name} got {n} input(s) ({', '.join(names) or 'none'}): {why}; "
                        f"give at least {method.min_inputs}.")
    if method.max_inputs is not None and n > method.max_inputs:
        raise UserError(f"method={method.name} got {n} inputs ({', '.join(names)}): slerp interpolates between "
                        f"exactly two models. Use method=linear (or ties, model_stock) for more, or merge two at a time.")


def input_weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise UserError(f"weights={weights} has {len(weights)} entries for {n} inputs; give one weight per input "
                        f"(in the order of inputs), or none for equal weights.")
    return weights


def mergekit_config(method: Method, models: list[str], base: str | None, cfg) -> dict:
    """The mergekit configuration (what `mergekit-yaml` reads) for these model folders."""
    weights = input_weights(cfg.weights, len(models))
    out: dict = {"merge_method": method.mergekit, "dtype": str(cfg.dtype)}
    if method.name in ("linear", "greedy_soup"):
        out["models"] = [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, weights)]
        out["parameters"] = {"normalize": True}
    elif method.name == "slerp":
        out["base_model"] = models[0]
        out["models"] = [{"model": m} for m in models]
        out["parameters"] = {"t": float(cfg.t)}
    elif method.name == "model_stock":
        out["base_model"] = base
        out["models"] = [{"model": base}] + [{"model": m} for m in models]
    else:  # task vectors: task_arithmetic, ties, dare_*
        params = [{"weight": w} for w in weights]
        if "density" in method.knobs:
            for p in params:
                p["density"] = float(cfg.density)
        out["base_model"] = base
        out["models"] = [{"model": m, "parameters": p} for m, p in zip(models, params)]
        out["parameters"] = {"lambda": float(cfg["lambda"])}
    return out
