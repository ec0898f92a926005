"""Held-out evaluation: the objective's loss, its metrics and the task metric (exact match
of generations).

With a preference objective the loss is the mean over held-out pairs (KTO: rows) and the
metrics are TRL's, prefixed `eval_`: `eval_rewards/accuracies` is the held-out preference
accuracy (the fraction of pairs whose chosen answer gains more reward than the rejected
one). Exact match generates from each pair's prompt and compares with the chosen answer
(KTO: the desirable rows' completions).

Rows are sharded over data-parallel ranks with equal counts (short shards are padded
with weight-0 rows) because sharded plans (FSDP2, ZeRO-3) need every rank to run the
same number of forwards; generation runs with synced_gpus for the same reason.
"""
from __future__ import annotations

import math

import torch

from trainers.data.batches import Source, collate, collate_preference, heldout_partners
from trainers.distributed import all_reduce_sum
from trainers.objectives.catalog import get_objective
from trainers.data.preference_rows import answer_text
from trainers.data.formats import to_loop_row
from trainers.data.rows import read_rows


def _shard(items, rank: int, world: int) -> list[tuple[object, float]]:
    per = math.ceil(len(items) / world)
    mine = items[rank * per : (rank + 1) * per]
    return [(x, 1.0) for x in mine] + [(items[0], 0.0)] * (per - len(mine))


def prompt_and_answer(row: dict, tokenizer) -> tuple[list[int], str]:
    if "chosen" in row or "label" in row:  # preference / KTO rows: the prompt and the preferred answer
        answer = answer_text(row["chosen"] if "chosen" in row else row["completion"])
        if isinstance(row["prompt"], list):
            text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False)["input_ids"], answer
        return tokenizer(row["prompt"])["input_ids"], answer
    if "messages" in row:
        msgs = row["messages"]
        text = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"], msgs[-1]["content"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(row["prompt"], add_special_tokens=False)["input_ids"], row["completion"]


class Evaluator:
    """Scores one or more held-out sets. With one set the results are `eval_loss` and
    `eval_exact_match`; with several, each set also reports `eval_loss/<name>` and
    `eval_exact_match/<name>`, and the unsuffixed keys are the first set's."""

    def __init__(self, cfg, plan, tokenizer, sets: list[Source], packed: bool):
        self.cfg = cfg
        self.plan = plan
        self.tokenizer = tokenizer
        self.sets = sets
        self.packed = packed
        self.objective = get_objective(cfg.objective)
        self._rows: dict[str, list[dict]] = {}

    def generation_rows(self, source: Source) -> list[dict]:
        """The first data.metric_rows kept rows (KTO: desirable rows), read back from the
        file by row number."""
        if source.name not in self._rows:
            numbers = source.store.rows[:: source.per_row]
            if source.store.kind == "unpaired":
                numbers = numbers[source.store.desirable.astype(bool)]
            wanted = [int(n) for n in numbers[: self.cfg.data.metric_rows]]
            fmt, columns = source.store.meta["format"], self.cfg.data.columns  # the user's format, as trained
            found = {n: to_loop_row(r, fmt, columns) for n, r in read_rows(source.path, set(wanted))} if wanted else {}
            self._rows[source.name] = [found[n] for n in wanted if n in found]
        return self._rows[source.name]

    def _batches(self, source: Source, shard: list[tuple[int, float]]) -> list[dict]:
        mb, pad = self.cfg.train.micro_batch_size, self.tokenizer.pad_token_id
        out = []
        for k in range(0, len(shard), mb):
            chunk = shard[k : k + mb]
            keep = [bool(w) for _, w in chunk]
            if source.store.kind == "sft":
                out.append(collate([source.tensors(r) for r, _ in chunk], pad, self.packed, keep=keep))
                continue
            # KTO's mismatched completions: rotation by one over the whole held-out set
            partners = ([(0, heldout_partners(r, len(source))) for r, _ in chunk]
                        if source.store.kind == "unpaired" else None)
            kl_ref = None if source.kl_reference is None else [source.kl_reference[r] for r, _ in chunk]
            out.append(collate_preference([source], [(0, r) for r, _ in chunk], pad, keep, partners,
                                          int(self.cfg.data.max_seq_len), self.packed, kl_ref))
        return out

    @torch.no_grad()
    def loss(self, source: Source) -> dict:
        """{"eval_loss": ..., "eval_<metric>": ...} over the whole set (all ranks)."""
        env, plan = self.plan.env, self.plan
        shard = _shard(range(len(source)), plan.dp_rank, plan.dp_world)
        batches = self._batches(source, shard)
        if self.objective.prepare is not None:
            with plan.autocast():
                self.objective.prepare(plan.eval_model, batches, env.device)
        total, sums = 0.0, {}
        for batch in batches:
            with plan.autocast():
                loss, metrics = self.objective(plan.eval_model, batch, env.device)
            total += float(loss)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        if self.objective.unit == "targets":
            count = sum(source.targets(r) for r, w in shard if w)
        else:
            count = sum(1 for _, w in shard if w)
        names = sorted(sums)
        total, count, *values = all_reduce_sum([total, count, *(sums[k] for k in names)], env.device)
        out = {"eval_loss": total / max(count, 1.0)}
        out.update({f"eval_{k}": v for k, v in self.objective.finalize(dict(zip(names, values)), count).items()})
        return out

    @torch.no_grad()
    def exact_match(self, source: Source) -> float:
        env, plan, tok = self.plan.env, self.plan, self.tokenizer
        rows = self.generation_rows(source)
        if not rows:
            return float("nan")
        shard = _shard(rows, plan.dp_rank, plan.dp_world)
        hits = n = 0.0
        bs = max(self.cfg.train.micro_batch_size, 16)
        model = plan.eval_model
        for k in range(0, len(shard), bs):
            chunk = shard[k : k + bs]
            pairs = [prompt_and_answer(r, tok) for r, _ in chunk]
            width = max(len(p) for p, _ in pairs)
            ids = torch.full((len(pairs), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (p, _) in enumerate(pairs):  # left padding for generation
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            with plan.autocast():
                out = model.generate(
                    input_ids=ids.to(env.device),
                    attention_mask=mask.to(env.device),
                    max_new_tokens=self.cfg.data.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                    synced_gpus=plan.dp_world > 1,
                )
            for (_, w), (_, answer), seq in zip(chunk, pairs, out[:, width:]):
                text = tok.decode(seq, skip_special_tokens=True).strip()
                hits += w * float(text == answer.strip())
                n += w
        hits, n = all_reduce_sum([hits, n], env.device)
        return hits / max(n, 1.0)

    def run_sets(self, step: int = 0) -> dict[str, dict[str, float]]:
        """{set name: {metric: value}}, every set in data.eval order. Loss-only sets
        (eval.probes) skip generation."""
        was_training = self.plan.eval_model.training
        self.plan.eval_model.eval()
        try:
            out = {}
            for source in self.sets:
                if hasattr(self.objective, "evaluate"):  # on-policy objectives (grpo) score their own generations
                    scores = self.objective.evaluate(self, source, step)
                else:
                    scores = self.loss(source)
                    if self.objective.generates and not source.loss_only:  # (a reward model writes no text)
                        scores["eval_exact_match"] = self.exact_match(source)
                out[source.name] = {k[len("eval_"):]: v for k, v in scores.items()}
            return out
        finally:
            self.plan.eval_model.train(was_training)

    def flatten(self, per_set: dict[str, dict[str, float]]) -> dict:
        """The metrics.jsonl form: the first set's metrics as `eval_<metric>`; with several
        sets each also as `eval_<metric>/<set>`."""
        out = {}
        for i, (name, scores) in enumerate(per_set.items()):
            if i == 0:
                out.update({f"eval_{k}": v for k, v in scores.items()})
            if len(per_set) > 1:
                out.update({f"eval_{k}/{name}": v for k, v in scores.items()})
        return out

    def run(self) -> dict:
        return self.flatten(self.run_sets())
