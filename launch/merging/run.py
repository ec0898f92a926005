"""One merge, start to end: check everything (refusals), then run mergekit's own merge
through its Python API (streamed tensor by tensor), score inputs and result on the runs'
held-out sets, and write the merged model with merge_report.{json,md} into `out`.

The model is written into a hidden sibling of `out` and renamed into place at the end, so
an interrupted merge never leaves a half-written model where a later run would load it.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from launch.config import REPO_ROOT
from launch.merging import adapters, estimate, report
from launch.merging.inputs import MergeInput, check_compatible, default_base, resolve, sweep_inputs
from launch.merging.methods import Method, check_count, get_method, input_weights, mergekit_config
from launch.merging.scoring import METRICS, SCORED, Scorer, better, check_metric, check_scored_metric
from trainers.errors import UserError

log = logging.getLogger("merge")

MATH_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass
class MergePlan:
    cfg: object
    method: Method
    inputs: list[MergeInput]
    base: MergeInput | None
    out: Path
    left_out: list[dict] = field(default_factory=list)
    eval_run: object = None  # the run config whose held-out sets score the merge
    eval_from: str | None = None
    estimate: dict | None = None
    kept: list[MergeInput] | None = None  # greedy_soup: the inputs its soup kept
    combination: str | None = None  # adapters=true: PEFT's combination_type

    def peft(self) -> dict:
        """adapters=true: the add_weighted_adapter call (launch/merging/adapters.py)."""
        weights = input_weights(self.cfg.weights, len(self.inputs))
        return {"add_weighted_adapter": {
            "adapters": [str(i.adapter_dir) for i in self.inputs], "base": str(self.base.model_dir),
            "weights": adapters.peft_weights(self.method.name, weights, float(self.cfg["lambda"])),
            "combination_type": self.combination,
            "density": float(self.cfg.density) if self.combination in adapters.USES_DENSITY else None}}

    def mergekit(self, models: list[MergeInput] | None = None, method: Method | None = None) -> dict:
        models = self.inputs if models is None else models
        cfg = self.cfg
        if method is not None and method.name == "greedy_soup":
            from omegaconf import OmegaConf

            cfg = OmegaConf.merge(cfg, {"weights": None})
        return mergekit_config(method or self.method, [str(m.model_dir) for m in models],
                               str(self.base.model_dir) if self.base else None, cfg)


def default_out(cfg, method: Method) -> Path:
    if cfg.sweep:
        return Path(str(cfg.sweep)) / f"merge-{method.name}"
    return REPO_ROOT / "runs" / "merges" / f"{method.name}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"


def prepare(cfg) -> MergePlan:
    """Every check, from headers and run records; nothing is written."""
    method = get_method(cfg.method)
    if cfg.metric is not None:
        check_metric(cfg.metric)
    if str(cfg.dtype) not in MATH_BYTES:
        raise UserError(f"dtype={cfg.dtype!r} is not a dtype mergekit computes in; accepted: {', '.join(MATH_BYTES)}.")
    ctype = adapters.combination_type(method.name, cfg.combination) if cfg.adapters else None
    if cfg.combination is not None and not cfg.adapters:
        raise UserError(f"combination={cfg.combination!r} is PEFT's combination_type for adapters=true; add "
                        f"adapters=true, or drop combination=.")
    if cfg.sweep and cfg.inputs:
        raise UserError("give either sweep=SWEEP_DIR (its completed points) or inputs=[...], not both.")
    left_out = []
    if cfg.sweep:
        inputs, left_out = sweep_inputs(cfg.sweep, cfg.adapters)
        for p in left_out:
            log.warning("sweep point %s left out: %s", p["num"], p["reason"])
    else:
        inputs = [resolve(str(p), cfg.adapters) for p in (cfg.inputs or [])]
    check_count(method, len(inputs), [i.given for i in inputs])
    seen: dict = {}
    for i in inputs:
        if i.model_dir in seen:
            raise UserError(f"inputs {seen[i.model_dir]!r} and {i.given!r} are the same model ({i.model_dir}); "
                            f"give each model once (use weights=[...] to weigh one more).")
        seen[i.model_dir] = i.given
    if method.name == "greedy_soup" and cfg.weights is not None:
        raise UserError("method=greedy_soup averages the models it keeps with equal weights; drop weights=.")
    input_weights(cfg.weights, len(inputs))
    base = None
    if ctype is not None:
        recorded = adapters.check_inputs(inputs, ctype)
        base = resolve(str(cfg.base) if cfg.base else recorded)
        if cfg.base:
            adapters.check_base(base.model_dir, recorded)
        base.label = f"base ({Path(str(base.model_dir)).name})"
    elif method.base:
        base_path = str(cfg.base) if cfg.base else default_base(inputs, method.name)
        base = resolve(base_path)
        if base.run_dir is not None:
            base.label = f"base ({base.label})"
        else:
            base.label = f"base ({Path(base_path).name})"
    elif cfg.base:
        raise UserError(f"base={cfg.base!r} is read by the task-vector methods (task_arithmetic, ties, dare_ties, "
                        f"dare_linear, model_stock); method={method.name} does not use a base: drop base=.")
    if ctype is None:
        check_compatible(inputs, base)
    out = Path(str(cfg.out)).expanduser() if cfg.out else default_out(cfg, method)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"out={str(out)!r} already exists and is not empty; a merge never overwrites: give another "
                        f"out= or remove it.")
    plan = MergePlan(cfg, method, inputs, base, out.resolve(), left_out, combination=ctype)
    if cfg.eval:
        source = cfg.eval_from or next((str(i.run_dir) for i in inputs if i.run_dir is not None), None)
        if source is not None:
            from launch.config import load

            path = Path(str(source))
            path = path / "config.yaml" if path.is_dir() else path
            if not path.exists():
                raise UserError(f"eval_from={source!r} has no config.yaml; give a run directory whose data.eval "
                                f"should score the merge.")
            plan.eval_run, plan.eval_from = load(path), str(source)
            objective = plan.eval_run.objective.name
            if objective not in SCORED:
                raise UserError(f"merge evaluation scores runs of objective {', '.join(SCORED)}, and {source} trained "
                                f"objective={objective}: pass eval=false to merge without scoring.")
            if objective == "grpo":  # the rewards scoring calls: importable here, reward model folders present
                from trainers.objectives.grpo_settings import check_reward_specs

                check_reward_specs(plan.eval_run.objective.rewards, plan.eval_run.objective.reward_weights)
            if method.name == "greedy_soup":
                if cfg.metric is None:  # the objective's headline metric (grpo: eval_reward, the others: eval_loss)
                    cfg.metric = SCORED[objective][0]
                check_scored_metric(cfg.metric, objective, str(source))
        elif method.name == "greedy_soup":
            raise UserError("method=greedy_soup ranks and keeps inputs by their held-out score, and no input is a "
                            "run: give eval_from=RUN_DIR (a run whose data.eval to score on).")
    if method.name == "greedy_soup" and not cfg.eval:
        raise UserError("method=greedy_soup needs held-out scores to decide what to keep: drop eval=false.")
    shapes = (base or inputs[0]).shapes
    if shapes and ctype is None:
        n_models = len(inputs) + (1 if base is not None and method.name != "model_stock" else 0)
        n_models += 1 if method.name == "model_stock" else 0
        plan.estimate = estimate.estimate(method.name, shapes, n_models if method.name != "greedy_soup" else 2,
                                          MATH_BYTES[str(cfg.dtype)], cfg.out_shard_mib)
    return plan


def dry_run_text(plan: MergePlan) -> str:
    import yaml

    lines = [f"merge: method={plan.method.name} ({plan.method.when})", f"out: {plan.out}"]
    for i in plan.inputs:
        lines.append(f"  input {i.label}: {i.model_dir}")
    for p in plan.left_out:
        lines.append(f"  left out: point {p['num']}: {p['reason']}")
    if plan.base is not None:
        lines.append(f"  base: {plan.base.model_dir}")
    lines.append(f"scored on: {plan.eval_from}'s data.eval" if plan.eval_run is not None else
                 "scored on: nothing (eval=false, or no input is a run; eval_from=RUN_DIR)")
    if plan.estimate:
        n = len(plan.inputs) + (plan.base is not None)
        lines.append(estimate.describe(plan.estimate, n))
    if plan.combination is not None:
        whole = adapters.needs_base_weights(plan.inputs)
        held = f"the base loaded whole, in fp32: {whole}" if whole else \
            "the adapters on the base's shapes; the merge written one base tensor at a time"
        lines += [f"PEFT ({held}):", yaml.safe_dump(plan.peft(), sort_keys=False).rstrip()]
    elif plan.method.name == "greedy_soup":
        lines.append("mergekit config: linear merges of the kept inputs, one candidate soup per input")
    else:
        lines += ["mergekit config:", yaml.safe_dump(plan.mergekit(), sort_keys=False).rstrip()]
    return "\n".join(lines)


def merge_into(out: Path, config: dict, cfg, tokenizer_from: Path) -> None:
    """mergekit's own merge (mergekit.merge.run_merge, what `mergekit-yaml` runs): tensors are
    read lazily per output tensor and written in shards of out_shard_mib."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(random_seed=int(cfg.seed), lazy_unpickle=True, copy_tokenizer=False,
                           out_shard_size=int(float(cfg.out_shard_mib) * 2**20), quiet=True,
                           safe_serialization=True, write_model_card=True)
    source = yaml.safe_dump(config, sort_keys=False)
    run_merge(MergeConfiguration.model_validate(config), str(out), options, config_source=source)
    _copy_tokenizer(tokenizer_from, out)


def _copy_tokenizer(src: Path, out: Path, generation_from: Path | None = None) -> None:
    """The inputs' tokenizer (chat template included) and generation settings, so the merge is
    an ordinary export that `model.path=` trains on."""
    from transformers import AutoTokenizer, GenerationConfig

    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    gen = generation_from or src
    if (gen / "generation_config.json").exists():
        GenerationConfig.from_pretrained(str(gen)).save_pretrained(str(out))


def execute(plan: MergePlan) -> dict:
    t0 = time.time()
    cfg = plan.cfg
    scorer = Scorer(plan.eval_run, plan.eval_from) if plan.eval_run is not None else None
    work = plan.out.parent / f".{plan.out.name}.partial-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    work.parent.mkdir(parents=True, exist_ok=True)
    scores: dict[Path, dict] = {}
    if scorer is not None:
        for i in plan.inputs + ([plan.base] if plan.base is not None else []):
            if i.score_dir is not None:
                log.info("scoring %s", i.label)
                scores[i.model_dir] = scorer(i.score_dir)
    try:
        greedy = None
        if plan.method.name == "greedy_soup":
            greedy = _greedy_soup(plan, scorer, scores, work)
        elif plan.combination is not None:
            call = plan.peft()["add_weighted_adapter"]
            adapters.combine(plan.base.model_dir, plan.inputs, call["weights"], plan.combination, cfg.density,
                             int(cfg.seed), work, int(float(cfg.out_shard_mib) * 2**20))
            _copy_tokenizer(plan.inputs[0].adapter_dir, work, plan.base.model_dir)
        else:
            merge_into(work, plan.mergekit(), cfg, plan.inputs[0].model_dir)
        merged_scores = scorer(work, samples_to=work / "completions.jsonl") if scorer is not None else None
        rep = _report(plan, scores, merged_scores, greedy, time.time() - t0, scorer.columns if scorer else ())
        text = report.write(work, rep)
        plan.out.parent.mkdir(parents=True, exist_ok=True)
        if plan.out.exists():  # an empty folder (checked in prepare)
            plan.out.rmdir()
        work.rename(plan.out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    rep["table"] = text.replace(str(work), str(plan.out))
    return rep


def _peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM, not ru_maxrss, which Linux carries over
    exec from the process that forked it (a merge started by a process that held a model
    would report that model's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _greedy_soup(plan: MergePlan, scorer: Scorer, scores: dict, work: Path) -> list[dict]:
    """Wortsman et al. (2022), recipe 1: inputs in order of their held-out score, best first;
    each is added to the soup (a uniform average) only if the soup's score improves."""
    metric = plan.cfg.metric
    for i in plan.inputs:
        if metric not in scores[i.model_dir]:  # (a grpo run's exact match needs an `answer` column)
            raise UserError(f"metric={metric}: the held-out evaluation of {i.label} reports no {metric}, only "
                            f"{', '.join(k for k in scores[i.model_dir] if k in METRICS)}; rank by one "
                            f"of those.")
    order = sorted(plan.inputs, key=lambda i: scores[i.model_dir][metric], reverse=better(1.0, 0.0, metric))
    soup, best = [order[0]], scores[order[0].model_dir][metric]
    trace = [{"label": order[0].label, "score": best, "soup_score": best, "kept": True}]
    candidates = work.parent / f".{plan.out.name}.candidates-{os.getpid()}"
    current = None
    try:
        for k, item in enumerate(order[1:], 1):
            cand = candidates / f"soup-{k}"
            merge_into(cand, plan.mergekit(soup + [item], plan.method), plan.cfg, soup[0].model_dir)
            got = scorer(cand)[metric]
            kept = better(got, best, metric)
            trace.append({"label": item.label, "score": scores[item.model_dir][metric], "soup_score": got,
                          "kept": kept})
            log.info("greedy soup: +%s -> %s %.4f (%s)", item.label, metric, got, "kept" if kept else "dropped")
            if kept:
                soup.append(item)
                best = got
                if current is not None:
                    shutil.rmtree(current)
                current = cand
            else:
                shutil.rmtree(cand)
        if current is None:  # the best input alone
            merge_into(work, plan.mergekit(soup, plan.method), plan.cfg, soup[0].model_dir)
        else:
            current.rename(work)
    finally:
        shutil.rmtree(candidates, ignore_errors=True)
    plan.kept = soup
    return trace


def _report(plan: MergePlan, scores: dict, merged_scores: dict | None, greedy, seconds: float,
            columns: tuple = ()) -> dict:
    method, cfg = plan.method, plan.cfg
    kept = {i.model_dir for i in plan.kept or plan.inputs}
    rows = []
    for i in plan.inputs:
        role = "input" if method.name != "greedy_soup" else ("input, kept" if i.model_dir in kept else "input, dropped")
        rows.append({"label": i.label, "path": str(i.model_dir), "run_dir": str(i.run_dir) if i.run_dir else None,
                     "role": role, "scores": scores.get(i.model_dir)})
    if plan.base is not None:
        rows.append({"label": plan.base.label, "path": str(plan.base.model_dir), "run_dir": None, "role": "base",
                     "scores": scores.get(plan.base.model_dir)})
    rows.append({"label": f"**merged ({method.name})**", "path": str(plan.out), "run_dir": None, "role": "merge",
                 "scores": merged_scores})
    params = {k: (cfg[k] if k != "weights" else list(cfg.weights) if cfg.weights is not None else None)
              for k in method.knobs}
    return {
        "method": method.name, "out": str(plan.out), "parameters": params,
        "base": str(plan.base.model_dir) if plan.base else None,
        "inputs": [{"given": i.given, "path": str(i.model_dir), "run_dir": str(i.run_dir) if i.run_dir else None}
                   for i in plan.inputs],
        "kept": [str(i.model_dir) for i in plan.kept or plan.inputs],
        "metric": cfg.metric, "scored_on": plan.eval_from,
        "objective": plan.eval_run.objective.name if plan.eval_run is not None else None,
        "columns": list(columns),
        "scores": merged_scores, "not_scored": None if merged_scores is not None else
        "eval=false" if not cfg.eval else "no input is a run (give eval_from=RUN_DIR)",
        "rows": rows, "greedy": greedy, "left_out": plan.left_out,
        "mergekit": None if plan.combination is not None else plan.mergekit() if method.name != "greedy_soup" else
        plan.mergekit(plan.kept or plan.inputs, method),
        "peft": plan.peft() if plan.combination is not None else None,
        "estimate": plan.estimate, "seed": int(cfg.seed), "wall_time_s": round(seconds, 2),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
    }
