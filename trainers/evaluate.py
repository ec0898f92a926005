"""Held-out evaluation: token-mean loss and the task metric (exact match of generations).

Rows are sharded over data-parallel ranks with equal counts (short shards are padded
with weight-0 rows) because sharded plans (FSDP2, ZeRO-3) need every rank to run the
same number of forwards; generation runs with synced_gpus for the same reason.
"""
from __future__ import annotations

import math

import torch

from trainers.data import Sequence, collate
from trainers.distributed import all_reduce_sum
from trainers.objectives import get_objective


def _shard(items: list, rank: int, world: int) -> list[tuple[object, float]]:
    per = math.ceil(len(items) / world)
    mine = items[rank * per : (rank + 1) * per]
    return [(x, 1.0) for x in mine] + [(items[0], 0.0)] * (per - len(mine))


def prompt_and_answer(row: dict, tokenizer) -> tuple[list[int], str]:
    if "messages" in row:
        msgs = row["messages"]
        text = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"], msgs[-1]["content"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(row["prompt"], add_special_tokens=False)["input_ids"], row["completion"]


class Evaluator:
    def __init__(self, cfg, plan, tokenizer, sequences: list[Sequence], rows: list[dict], packed: bool):
        self.cfg = cfg
        self.plan = plan
        self.tokenizer = tokenizer
        self.sequences = sequences
        self.rows = rows[: cfg.data.metric_rows]
        self.packed = packed
        self.objective = get_objective(cfg.objective.name)

    @torch.no_grad()
    def loss(self) -> float:
        env, plan = self.plan.env, self.plan
        mb = self.cfg.train.micro_batch_size
        shard = _shard(self.sequences, plan.dp_rank, plan.dp_world)
        total = count = 0.0
        for k in range(0, len(shard), mb):
            chunk = shard[k : k + mb]
            seqs = [s if w else Sequence(s.input_ids, [-100] * len(s.labels), s.position_ids) for s, w in chunk]
            batch = collate(seqs, self.tokenizer.pad_token_id, self.packed)
            with plan.autocast():
                total += float(self.objective(plan.eval_model, batch, env.device))
            count += sum(s.n_targets for s in seqs)
        total, count = all_reduce_sum([total, count], env.device)
        return total / max(count, 1.0)

    @torch.no_grad()
    def exact_match(self) -> float:
        env, plan, tok = self.plan.env, self.plan, self.tokenizer
        if not self.rows:
            return float("nan")
        shard = _shard(self.rows, plan.dp_rank, plan.dp_world)
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

    def run(self) -> dict:
        was_training = self.plan.eval_model.training
        self.plan.eval_model.eval()
        try:
            return {"eval_loss": self.loss(), "eval_exact_match": self.exact_match()}
        finally:
            self.plan.eval_model.train(was_training)
