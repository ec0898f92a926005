"""GRPO's sampler draws exactly what torch.multinomial draws from the same per-completion
generators (trainers/objectives/rollout.py writes the draw out to skip multinomial's per-row
checks): a faster sampler must not change a single sampled token, or runs before and after
it, and a resume across the change, would differ."""
from __future__ import annotations

import math

import torch

from trainers.objectives.rollout import Sampler, draw


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
