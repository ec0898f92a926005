"""GRPO's rollout pieces. The sampler draws exactly what torch.multinomial draws from the same per-completion
generators (trainers/objectives/rollout.py writes the draw out to skip multinomial's per-row
checks): a faster sampler must not change a single sampled token, or runs before and after
it, and a resume across the change, would differ."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trainers.objectives.rollout import Sampler, draw

REPO = Path(__file__).resolve().parent.parent


def test_draw_equals_multinomial_row_by_row_over_many_tokens():
    for trial in range(20):
        torch.manual_seed(trial)
        logits = torch.randn(16, 97) * (1 + trial % 4)
        if trial % 2:
            logits[:, ::3] = -math.inf  # zero-probability tokens, as top_k / top_p leave them
        probs = logits.softmax(-1)
        seeds = [trial * 100 + i for i in range(16)]
        want_g = [torch.Generator().manual_seed(s) for s in seeds]
        got_g = [torch.Generator().manual_seed(s) for s in seeds]
        for _ in range(8):  # consecutive tokens: the generators' states must advance alike
            want = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(want_g)])
            assert torch.equal(draw(probs, got_g), want)


def test_sampler_returns_the_draw_as_a_one_hot_greedy_choice_with_temperature_and_top_k():
    torch.manual_seed(0)
    scores = torch.randn(8, 50)
    sampler = Sampler(list(range(8)), temperature=0.7, top_k=5, top_p=1.0, device="cpu")
    out = sampler(torch.zeros(8, 3, dtype=torch.long), scores.clone())
    picks = out.argmax(-1)
    assert torch.equal((out == 0).sum(-1), torch.ones(8, dtype=torch.long)) and torch.isinf(out).sum() == 8 * 49
    top5 = scores.topk(5, dim=-1).indices
    assert all(p in row for p, row in zip(picks.tolist(), top5.tolist()))
    probs = torch.full_like(scores, -math.inf).scatter(1, top5, scores.gather(1, top5) / 0.7).softmax(-1)
    gens = [torch.Generator().manual_seed(s) for s in range(8)]
    assert torch.equal(picks, torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)]))


def test_a_group_prefilled_once_generates_what_each_row_prefilled_alone_generates():
    """generate(copies=G) runs each prompt's prefix once and repeats its KV cache for the G
    rows; the completions (sampled from per-row generators, and greedy) must equal those of
    the same prompts repeated G times and prefilled row by row, on prompts of unequal length
    (left padding) through a LoRA model, and the prefix forward must see one row per prompt."""
    import contextlib
    import types

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.objectives.rollout import completion_seed, generate

    base = REPO / "assets" / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    plan = types.SimpleNamespace(eval_model=model, env=types.SimpleNamespace(device=torch.device("cpu")),
                                 autocast=contextlib.nullcontext, dp_world=1)
    prompts = [tok(t)["input_ids"] for t in ("Reverse: abc", "Reverse: hatofwd", "Reverse: qz")]
    G = 4
    rows_seen = []
    hook = model.get_base_model().model.register_forward_pre_hook(
        lambda mod, args, kw: rows_seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    seeds = [completion_seed(7, 3, i) for i in range(len(prompts) * G)]
    for s in (seeds, None):
        rows_seen.clear()
        shared = generate(plan, tok, prompts, 12, len(prompts) * G, s, temperature=1.0, top_k=20, copies=G)
        assert rows_seen[0] == (len(prompts), max(map(len, prompts)) - 1) and rows_seen[1][0] == len(prompts) * G
        alone = generate(plan, tok, [p for p in prompts for _ in range(G)], 12, len(prompts) * G, s,
                         temperature=1.0, top_k=20)
        assert shared == alone and len(shared) == len(prompts) * G
    hook.remove()
    assert len({tuple(c) for c in shared}) < len(shared)  # greedy: a group's rows agree


def test_merged_generation_forwards_through_w_plus_delta_and_leaves_the_weights_untouched():
    """Inside merged_linears each plain LoRA linear is one matmul with W + scale B A: logits
    equal the adapter path's to float rounding, greedy completions are the same, and on exit
    every parameter is bit for bit what it was and the modules forward through PEFT again."""
    import contextlib
    import types

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.objectives.merged_generation import mergeable, merged_linears
    from trainers.objectives.rollout import generate

    base = REPO / "assets" / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([tok("Reverse: hatofwd")["input_ids"]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with merged_linears(model) as n:
            got = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    n_linears = sum(mergeable(m) for m in model.modules())
    assert n == n_linears == 7 * model.config.num_hidden_layers
    assert torch.allclose(got, want, atol=1e-5) and not torch.equal(got, want)  # one matmul, not base + A, B
    assert torch.equal(again, want)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all("forward" not in m.__dict__ for m in model.modules() if mergeable(m))
    plan = types.SimpleNamespace(eval_model=model, env=types.SimpleNamespace(device=torch.device("cpu")),
                                 autocast=contextlib.nullcontext, dp_world=1)
    prompts = [tok(t)["input_ids"] for t in ("Reverse: abc", "Reverse: hatofwd")]
    assert generate(plan, tok, prompts, 12, 8, None, merged=True) == generate(plan, tok, prompts, 12, 8, None)
    with model.disable_adapter(), merged_linears(model) as n:
        assert n == 0  # the reference pass (adapter disabled) is never merged


def test_token_logps_in_one_chunk_or_many_give_the_same_values_and_gradients():
    """Several chunks are recomputed in backward, a single chunk is kept: both give the
    log-probs, entropies and gradients of a plain full-logits log_softmax (to float rounding:
    the head's matmul runs on chunks of different sizes)."""
    from transformers import AutoModelForCausalLM

    from trainers.objectives.token_logps import install, token_logps

    model = AutoModelForCausalLM.from_pretrained(REPO / "assets" / "tiny-llama", dtype=torch.float32)
    install(model)
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (3, 12))
    labels = torch.full_like(ids, -100)
    labels[:, 4:11] = ids[:, 5:12]
    out = {}
    model.zero_grad()
    with torch.no_grad():
        plain = model(input_ids=ids).logits.float() / 0.7
    logp = plain.log_softmax(-1)
    want = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1).masked_fill(labels == -100, 0.0)
    for chunk in (5, 1 << 40):
        model.zero_grad()
        lp, ent = token_logps(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels, 0.7, chunk)
        lp.sum().backward()
        out[chunk] = (lp.detach(), ent, [p.grad.clone() for p in model.parameters()])
    (a, ea, ga), (b, eb, gb) = out.values()
    assert torch.allclose(a, want, atol=1e-5) and torch.allclose(b, want, atol=1e-5)
    assert torch.allclose(ea, eb, atol=1e-5) and all((x - y).norm() <= 1e-4 * y.norm() + 1e-7 for x, y in zip(ga, gb))
    assert (a != 0).sum() == 21 and (a[labels == -100] == 0).all() and any(x.abs().sum() > 0 for x in ga)


def test_micro_batches_group_rows_of_like_extent_and_drop_unused_columns():
    """Every row lands in exactly one micro-batch with its own labels and advantage; rows are
    ordered by their last attended column, and each micro-batch keeps exactly the columns
    one of its rows attends (TRL's layout pads every row to the batch's longest)."""
    from trainers.objectives.rollout import micro_batches, training_rows

    prompts = [[5, 6, 7], [5, 6], [8, 9, 10, 11], [12]]
    completions = [[20, 21, 1], [22] * 9 + [1], [23, 1], [24, 25, 26, 27, 28, 1]]
    whole = training_rows(prompts, completions, pad_id=0, eos_id=1, mask_truncated=False)
    whole["advantages"] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    batches = micro_batches(whole, 2)
    assert [b["advantages"].tolist() for b in batches] == [pytest.approx([0.3, 0.1]), pytest.approx([0.4, 0.2])]
    width = whole["input_ids"].size(1)
    assert batches[0]["input_ids"].size(1) < width and batches[1]["input_ids"].size(1) <= width
    for b in batches:
        used = b["attention_mask"].any(0)
        assert used[0] and used[-1]  # no column that no row attends
        for row in range(2):
            i = [0.1, 0.2, 0.3, 0.4].index(round(float(b["advantages"][row]), 1))
            keep = whole["attention_mask"][i] == 1
            assert torch.equal(b["input_ids"][row][b["attention_mask"][row] == 1], whole["input_ids"][i][keep])
            assert torch.equal(b["labels"][row][b["labels"][row] != -100], whole["labels"][i][whole["labels"][i] != -100])
