"""objective=grpo: Group Relative Policy Optimization as TRL 1.16's GRPOTrainer defines it
(trl/trainer/grpo_trainer.py: `_generate_and_score_completions`, `_compute_loss`), as an
objective of the one training loop.

The loop calls `rollout` once per step, at one point (trainers/loop.py): it turns the
step's prompt rows into training micro-batches (generate num_generations completions per
prompt, score them, advantages, old/reference log-probs) and says what the step's loss sum
is divided by. Everything after that is the shared step: the plan's forward_backward over
the micro-batches (`loss`), clipping, the optimizer, checkpoints, resume.

Batch shape, as in TRL: train.micro_batch_size and train.grad_accum count completions, so
a step trains micro_batch_size x grad_accum x data-parallel ranks completions of
(that / num_generations) prompts, each rank holding whole groups.

Math (TRL's, with its names):
  advantage  A = (r - mean of the prompt's group) / (std + 1e-4), the std unbiased over the
             group (scale_rewards=group), over the global batch (batch), or no division (none);
             r = sum of weighted rewards; a completion no reward scores gets A = 0.
  per token  -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A) + beta KL,
             rho = exp(logp - old logp) per token, or per sequence (importance_sampling_level=
             sequence: exp of the mean log-ratio), KL = exp(ref - logp) - (ref - logp) - 1,
             times rho with use_bias_correction_kl (TRL's default).
             With num_iterations=1 the old log-probs are the current ones detached (rho = 1).
  aggregate  dapo: / completion tokens of the global batch; grpo: mean over the sequences
             of each sequence's token mean; dr_grpo: / (sequences x max_completion_length);
             bnpo: TRL divides by the tokens of each micro-batch, which is not split-invariant:
             here by the tokens of the global batch (= dapo; TRL's value whenever a step is
             one micro-batch on one rank).
Reward metrics are those of the completions the step trains on (with num_iterations > 1,
logged again at each reuse; TRL logs them at generation).
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from trainers.distributed import all_reduce_sum
from trainers.objectives import rollout as R
from trainers.objectives.grpo_settings import reward_names
from trainers.objectives.reward import load_rewards, score
from trainers.objectives.token_logps import install, token_logps

log = logging.getLogger("train")
_SAID: set[int] = set()

# ------------------------------------------------------------------------- the math
def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str):
    """(advantages, per-completion std used, is_std_zero) from the weighted rewards of the
    global batch (NaN: unscorable), TRL's `sum_then_normalize`."""
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), std, torch.isclose(std, torch.zeros_like(std))


def nanstd(x: torch.Tensor, dim=None) -> torch.Tensor:
    """Unbiased std ignoring NaN (TRL's `nanstd`)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    var = var * count / (count - 1)
    return torch.sqrt(var).squeeze() if dim is None else torch.sqrt(var).squeeze(dim)


def policy_loss(logps, mask, advantages, old_logps, ref_logps, *, epsilon, epsilon_high, beta, loss_type, level,
                bias_correction_kl=True):
    """(loss SUM over the micro-batch in the unit of `loss_type`, {metric: sum}) from
    per-token log-probs in the [rows, positions] frame (mask: completion targets)."""
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = (logps - old) * mask
    if level == "sequence":
        log_w = (log_ratio.sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_w = log_ratio
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon_high)
    a = advantages.unsqueeze(1)
    per_token = -torch.min(coef_1 * a, coef_2 * a)
    sums = {}
    if beta != 0.0:
        d = (ref_logps - logps) * mask
        kl = torch.exp(d) - d - 1
        if bias_correction_kl:  # TRL's use_bias_correction_kl (default on): the unbiased reverse-KL gradient
            kl = kl * coef_1
        per_token = per_token + beta * kl
        sums["kl"] = (kl.detach() * mask).sum()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    else:
        loss = (per_token * mask).sum()
    low = ((coef_1 < 1 - epsilon) & (a < 0)).float().detach()
    high = ((coef_1 > 1 + epsilon_high) & (a > 0)).float().detach()
    for name, x in (("clip_ratio/low_mean", low), ("clip_ratio/high_mean", high),
                    ("clip_ratio/region_mean", torch.maximum(low, high))):
        sums[name] = x.sum() if x.size(1) == 1 else (x * mask).sum()
    return loss, sums


# ----------------------------------------------------------------------- objective
class GRPO:
    """The objective the loop receives for objective=grpo (same interface as
    trainers.objectives.catalog.Objective, plus the `rollout` and `evaluate` hooks)."""

    name = "grpo"
    unit = "rows"
    rows = "prompts"
    reference = False  # the reference is the adapter-disabled base, computed in the rollout
    prepare = None
    head = "lm"  # a causal LM (trainers/model/load.py builds the model by it)
    generates = True

    def __init__(self, knobs: dict):
        self.knobs = knobs
        k = knobs
        self.G = int(k["num_generations"])
        self.eps = float(k["epsilon"])
        self.eps_high = float(k["epsilon_high"]) if k["epsilon_high"] is not None else self.eps
        self.beta = float(k["beta"])
        self.names = reward_names(k["rewards"])
        self._rewards = None
        self._tokenizer = None
        self._step_metrics: dict = {}
        self._cache: tuple | None = None  # (generation step, micro-batches, count, metrics): num_iterations > 1

    # ------------------------------------------------------------------ helpers
    def _setup(self, plan):
        if self._tokenizer is None:
            from trainers.memory import hf_model
            from trainers.model.load import load_tokenizer

            self._tokenizer = load_tokenizer(plan.cfg.model, plan.cfg.data.chat_template)
            install(hf_model(plan.inner))
            self._chunk_n = self._chunk(plan)
            self._rewards = load_rewards(self.knobs["rewards"], self.knobs["reward_weights"], plan.compute_dtype,
                                         plan.env.device)
            self._log_generation_path(plan)
        return self._tokenizer

    def _log_generation_path(self, plan) -> None:
        from trainers.objectives.merged_generation import mergeable

        if id(plan) in _SAID:  # (the evaluator's GRPO and the loop's share the plan: say it once)
            return
        _SAID.add(id(plan))
        linears = [m for m in plan.eval_model.modules() if mergeable(m)]
        if self.knobs["merged_generation"] and linears:
            mib = sum(m.base_layer.weight.nbytes for m in linears) / 2**20
            log.info("grpo: rollouts generate through merged LoRA weights (%d linears, a %.0f MiB copy while "
                     "generating; objective.merged_generation=false: through the adapter)", len(linears), mib)
        elif hasattr(plan.eval_model, "peft_config"):  # (a plain model, e.g. a merge being scored: nothing to say)
            log.info("grpo: rollouts generate through the model as it trains (%s)",
                     "objective.merged_generation=false" if not self.knobs["merged_generation"] else
                     "no whole, unquantized plain-LoRA linear to merge under this plan and method")

    def _chunk(self, plan) -> int:
        from trainers.objectives.lm_loss import chunk_tokens_for

        vocab = len(self._tokenizer)
        n = chunk_tokens_for(plan.cfg.train.loss_chunk_tokens, vocab)
        return n if n > 0 else 1 << 40

    @torch.no_grad()
    def _logps(self, plan, batches: list[dict], disabled: bool) -> None:
        """Old (or, `disabled`, reference) per-token log-probs of each micro-batch, no grad."""
        from trainers.objectives.catalog import adapter_disabled

        key = "ref_logps" if disabled else "old_logps"
        chunk, device = self._chunk(plan), plan.env.device
        for b in batches:
            ctx = adapter_disabled(plan.model) if disabled else contextlib.nullcontext()
            with ctx, plan.autocast():
                lp, _ = token_logps(plan.model, _inputs(b, device), b["labels"].to(device),
                                    float(self.knobs["temperature"]), chunk)
            b[key] = lp.detach()

    # ----------------------------------------------------------------- the hook
    def rollout(self, plan, micro: list[dict], step: int) -> tuple[list[dict], float]:
        """The step's prompt rows -> (training micro-batches, what the loss sum is divided by)."""
        iters = int(self.knobs["num_iterations"])
        gen_step = step - step % iters
        if self._cache is not None and self._cache[0] == gen_step:
            self._setup(plan)  # (a relaunch reuses the checkpoint's rollout before anything else set up)
            _, batches, count, metrics = self._cache
            self._step_metrics = metrics
            return batches, count
        tok = self._setup(plan)
        cfg, k = plan.cfg, self.knobs
        items = R.prompt_items(micro)
        G, rank, world = self.G, plan.dp_rank, plan.dp_world
        prompts_once = R.prompt_arrays(items)
        prompt_ids = [p for p in prompts_once for _ in range(G)]
        n_local = len(prompt_ids)
        seeds = [R.completion_seed(int(cfg.seed), gen_step, rank * n_local + i) for i in range(n_local)]
        # The rank's whole batch in one generate call, as TRL does (its generation batch):
        # at these scales a decoding step costs the same for 16 or 32 rows, so one call of
        # n_local rows makes half the decoding forwards of grad_accum calls.
        completion_ids = R.generate(plan, tok, prompts_once, int(k["max_completion_length"]), n_local, seeds,
                                    float(k["temperature"]), int(k["top_k"]), float(k["top_p"]), copies=G,
                                    merged=bool(k["merged_generation"]))
        rows = R.raw_rows([(it["path"], it["row"]) for it in items], cfg.data.columns)
        rows = [r for r in rows for _ in range(G)]
        names = [it["name"] for it in items for _ in range(G)]
        prompts = [r["prompt"] for r in rows]
        texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                       for p, t in zip(prompts, texts)]
        columns = {c: [r.get(c) for r in rows] for c in rows[0] if c != "prompt"}
        per_func = score(self._rewards, prompts, completions, completion_ids, columns, names, step,
                         int(cfg.train.max_steps), plan.env.device)
        batches, active, metrics = self.score_and_build(per_func, prompt_ids, completion_ids, tok, rank, world,
                                                        int(cfg.train.micro_batch_size))
        count = self.count(active, n_local * world, plan.env.device)
        if iters > 1:
            self._logps(plan, batches, disabled=False)
        if self.beta != 0.0:
            self._logps(plan, batches, disabled=True)
        self._step_metrics = metrics
        self._last_samples = list(zip(names, texts))
        self._cache = (gen_step, batches, count, metrics) if iters > 1 else None
        return batches, count

    # ----------------------------------------------------------- checkpoint state
    def checkpoint_state(self) -> dict | None:
        """The generation in progress (num_iterations > 1), so that a relaunch from a
        checkpoint taken between its iterations trains on the same completions, advantages
        and old log-probs instead of regenerating them with the checkpoint's weights. This
        rank's micro-batches only: small tensors (completion ids, per-token log-probs),
        plain types, loadable with torch.load(weights_only=True)."""
        if self._cache is None:
            return None
        gen_step, batches, count, metrics = self._cache
        return {"gen_step": gen_step, "count": float(count), "metrics": dict(metrics),
                "batches": [{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]}

    def load_checkpoint_state(self, state: dict | None) -> None:
        self._cache = None if state is None else (int(state["gen_step"]), state["batches"], float(state["count"]),
                                                  dict(state["metrics"]))

    def score_and_build(self, per_func_local: torch.Tensor, prompt_ids, completion_ids, tok, rank: int, world: int,
                        micro_size: int | None = None):
        """Rewards (this rank's) -> advantages over the global batch, metrics, micro-batches."""
        k = self.knobs
        n_local = per_func_local.size(0)
        weights = torch.tensor([r.weight for r in self._rewards], dtype=torch.float32)
        per_func = R.gather_rows(per_func_local, rank, world)
        unscorable = torch.isnan(per_func).all(dim=1)
        rewards = (per_func * weights).nansum(dim=1)
        rewards[unscorable] = float("nan")
        adv, std, zero = group_advantages(rewards, self.G, k["scale_rewards"])
        eos = tok.eos_token_id
        lengths = torch.tensor([[len(c), float(bool(c) and c[-1] == eos)] for c in completion_ids], dtype=torch.float32)
        lengths = R.gather_rows(lengths, rank, world)
        metrics = {"reward": float(torch.nanmean(rewards)), "reward_std": float(nanstd(rewards)),
                   "frac_reward_zero_std": float(zero.float().mean()),
                   "completions/mean_length": float(lengths[:, 0].mean()),
                   "completions/min_length": float(lengths[:, 0].min()),
                   "completions/max_length": float(lengths[:, 0].max()),
                   "completions/clipped_ratio": float(1 - lengths[:, 1].mean())}
        for j, name in enumerate(self.names):
            metrics[f"rewards/{name}/mean"] = float(torch.nanmean(per_func[:, j]))
            metrics[f"rewards/{name}/std"] = float(nanstd(per_func[:, j]))
        self.last_advantages = adv
        whole = R.training_rows(prompt_ids, completion_ids, tok.pad_token_id, eos,
                                bool(k["mask_truncated_completions"]))
        whole["advantages"] = adv[rank * n_local:(rank + 1) * n_local].float()
        size = micro_size or n_local
        batches = R.micro_batches(whole, size)
        for b in batches:
            b["n_real_tokens"] = int(b["attention_mask"].sum())
        active = float(sum((b["labels"] != -100).sum() for b in batches))
        return batches, active, metrics

    def count(self, active_tokens: float, sequences: int, device) -> float:
        """What a step's loss sum is divided by (the loss type's unit over the global batch)."""
        lt = self.knobs["loss_type"]
        if lt in ("dapo", "bnpo"):
            return max(all_reduce_sum([active_tokens], device)[0], 1.0)
        if lt == "grpo":
            return float(sequences)
        return float(sequences * int(self.knobs["max_completion_length"]))

    # --------------------------------------------------------------- the step
    def __call__(self, model, batch: dict, device: torch.device):
        labels = batch["labels"].to(device)
        logps, entropy = token_logps(model, _inputs(batch, device), labels, float(self.knobs["temperature"]),
                                     self._chunk_size)
        mask = labels != -100
        loss, sums = policy_loss(logps, mask, batch["advantages"].to(device),
                                 batch["old_logps"].to(device) if "old_logps" in batch else None,
                                 batch["ref_logps"].to(device) if "ref_logps" in batch else None,
                                 epsilon=self.eps, epsilon_high=self.eps_high, beta=self.beta,
                                 loss_type=self.knobs["loss_type"], level=self.knobs["importance_sampling_level"],
                                 bias_correction_kl=bool(self.knobs["use_bias_correction_kl"]))
        sums["entropy"] = (entropy * mask).sum()
        sums["count/tokens"] = mask.sum().float()
        sums["count/sequences"] = torch.tensor(float(mask.size(0)))
        return loss, sums

    @property
    def _chunk_size(self) -> int:
        return getattr(self, "_chunk_n", 1 << 40)

    def finalize(self, sums: dict, count: float) -> dict:
        sums = {k: float(v) for k, v in sums.items()}
        tokens, seqs = max(sums.pop("count/tokens", 0.0), 1.0), max(sums.pop("count/sequences", 0.0), 1.0)
        out = dict(self._step_metrics)
        per_seq = self.knobs["importance_sampling_level"] == "sequence"
        for name, v in sums.items():
            out[name] = v / (seqs if name.startswith("clip_ratio") and per_seq else tokens)
        return out

    # ----------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self, evaluator, source, step: int) -> dict:
        """Greedy completions of the first data.metric_rows held-out prompts: mean reward,
        each reward's mean, exact match against the `answer` column (when the rows have one);
        a sample of completions with their rewards goes to RUN_DIR/completions/step_N.jsonl."""
        from trainers.data.batches import prompt_item
        from trainers.evaluation.evaluator import _shard

        plan, cfg = evaluator.plan, evaluator.cfg
        tok = self._setup(plan)
        n = min(len(source), int(cfg.data.metric_rows))
        items = [prompt_item(source, r) for r in range(n)]
        shard = _shard(items, plan.dp_rank, plan.dp_world)
        mine = [it for it, _ in shard]
        ids = R.generate(plan, tok, R.prompt_arrays(mine), int(self.knobs["max_completion_length"]),
                         max(int(cfg.train.micro_batch_size), 16), None,
                         merged=bool(self.knobs["merged_generation"]))
        rows = R.raw_rows([(it["path"], it["row"]) for it in mine], cfg.data.columns)
        prompts = [r["prompt"] for r in rows]
        texts = tok.batch_decode(ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                       for p, t in zip(prompts, texts)]
        columns = {c: [r.get(c) for r in rows] for c in rows[0] if c != "prompt"}
        per_func = score(self._rewards, prompts, completions, ids, columns, [it["name"] for it in mine], step,
                         int(cfg.train.max_steps), plan.env.device)
        weights = torch.tensor([r.weight for r in self._rewards])
        total = (per_func * weights).nansum(1)
        w = torch.tensor([wt for _, wt in shard])
        hit = torch.tensor([float("answer" in r and t.strip() == str(r["answer"]).strip())
                            for r, t in zip(rows, texts)])
        sums = [float((total * w).sum()), float((hit * w).sum()), float(w.sum())]
        sums += [float((torch.nan_to_num(per_func[:, j]) * w).sum()) for j in range(len(self.names))]
        sums = all_reduce_sum(sums, plan.env.device)
        out = {"eval_reward": sums[0] / max(sums[2], 1.0)}
        for j, name in enumerate(self.names):
            out[f"eval_rewards/{name}/mean"] = sums[3 + j] / max(sums[2], 1.0)
        if "answer" in rows[0]:
            out["eval_exact_match"] = sums[1] / max(sums[2], 1.0)
        if plan.env.is_main:
            folder = Path(cfg.run_dir) / "completions"
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"step_{step}.jsonl", "w") as f:
                for it, r, t, rw in list(zip(mine, rows, texts, per_func.tolist()))[:32]:
                    f.write(json.dumps({"row": it["name"], "prompt": r["prompt"], "completion": t,
                                        "rewards": dict(zip(self.names, rw)), "answer": r.get("answer")}) + "\n")
        return out


def _inputs(batch: dict, device) -> dict:
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def grpo_objective(knobs: dict) -> GRPO:
    return GRPO(knobs)
