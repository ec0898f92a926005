"""trainers/objectives/preference.py against TRL 1.16.0's own code, in-process and fast.

TRL computes these losses inside trainer methods (DPOTrainer._compute_loss,
KTOTrainer._compute_loss, CPOTrainer/ORPOTrainer.get_batch_loss_metrics) rather than in
free functions, so each test calls the real method on a stand-in `self` holding only the
attributes it reads, with a stand-in model: a random bigram LM (logits of position t =
W[input_ids[t]]), which serves both TRL's fused-head outputs (per-token log-probs) and its
logits path, and whose logits our side feeds to `sequence_logps`. Nothing of TRL's
arithmetic is copied here.
"""
from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from trainers.objectives import preference as P
from trainers.objectives.settings import DPO_LOSS_TYPES

from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer import dpo_trainer as trl_dpo
from trl.trainer.kto_trainer import KTOTrainer

DPOTrainer = trl_dpo.DPOTrainer
V = 11
PAD = 0
TOL = 1e-6


class Accel:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def unwrap_model(m):
        return m


class Bigram:
    """A causal LM whose logits at position t depend on input_ids[t] only."""

    training = True

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(V, V, generator=g, dtype=torch.float64) * 2

    def logits(self, input_ids):
        return self.W[input_ids]

    def __call__(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, **_):
        logits = self.logits(input_ids)
        if not fused_lm_head:
            return types.SimpleNamespace(logits=logits)
        # TRL's fused head: per-token log-probs of labels[:, 1:] from positions [:, :-1], 0 where -100.
        tgt = labels[:, 1:]
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)
        lp = lp.masked_fill(tgt == P.IGNORE, 0)
        zeros = torch.zeros_like(lp)
        return types.SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def shifted(labels):
    """TRL's unshifted labels -> ours (labels[t] is the target of position t)."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], P.IGNORE)], dim=1)


def rand_ids(g, n, lo=1):
    return torch.randint(lo, V, (n,), generator=g).tolist()


def rand_pairs(n, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        L = lambda a, b: int(torch.randint(a, b, (1,), generator=g))  # noqa: E731
        rows.append((rand_ids(g, L(1, 5)), rand_ids(g, L(1, 6)), rand_ids(g, L(1, 6))))
    return rows


def pad_rows(seqs, value):
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs])


def our_logps(model, seqs, masks):
    """Summed completion log-probs and counts from our code, row by row padded together."""
    ids = pad_rows(seqs, PAD)
    labels = torch.where(pad_rows(masks, 0).bool(), ids, P.IGNORE)
    return P.sequence_logps(model.logits(ids), shifted(labels), chunk_positions=3)


def fake_self(cls, **attrs):
    base = dict(accelerator=Accel(), model=types.SimpleNamespace(training=True), _metrics={"train": defaultdict(list)},
                aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1)
    base.update(attrs)
    ns = types.SimpleNamespace(**base)
    for name in ("_compute_kl_logps", "concatenated_forward", "cpo_loss", "odds_ratio_loss"):
        if hasattr(cls, name):
            setattr(ns, name, types.MethodType(getattr(cls, name), ns))
    for name in ("concatenated_inputs", "get_batch_logps"):
        if hasattr(cls, name):
            setattr(ns, name, getattr(cls, name))
    return ns


def close(a, b, tol=TOL):
    a, b = float(a), float(b)
    return abs(a - b) <= tol * max(1.0, abs(b))


# ---------------------------------------------------------------------------- logps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_token_logps_values_and_grads_match_log_softmax(dtype):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 9, 17, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 17, (3, 7), generator=g)
    labels[0, :4] = P.IGNORE
    labels[2] = P.IGNORE  # a row without targets
    w = torch.randn(3, 7, generator=g, dtype=torch.float64)

    def run(fn):
        x = base.to(dtype).requires_grad_()
        # A non-contiguous slice with extra leading positions (prompt tuning's layout).
        out = fn(x[:, :, :][:, 2:], labels)
        (out.double() * w).sum().backward()
        return out.double(), x.grad.double()

    def naive(logits, y):
        lp = torch.log_softmax(logits.float(), -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
        return lp.masked_fill(y == P.IGNORE, 0)

    ours, g_ours = run(lambda lg, y: P.token_logps(lg, y, chunk_positions=4))
    ref, g_ref = run(naive)
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(ours, ref, atol=tol, rtol=0)
    assert torch.allclose(g_ours, g_ref, atol=tol, rtol=0)
    sums, counts = P.sequence_logps(base.to(dtype)[:, 2:], labels)
    assert counts.tolist() == [3, 7, 0] and sums[2] == 0


def test_sequence_logps_is_row_independent():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 6, V, generator=g)
    labels = torch.randint(0, V, (4, 6), generator=g)
    labels[:, -1] = P.IGNORE
    labels[1, 3:] = P.IGNORE
    whole, n = P.sequence_logps(logits, labels)
    for i in range(4):
        width = int((labels[i] != P.IGNORE).nonzero().max()) + 1
        s, c = P.sequence_logps(logits[i : i + 1, :width], labels[i : i + 1, :width])
        assert torch.allclose(s, whole[i : i + 1], atol=1e-6) and c.item() == n[i].item()


# ------------------------------------------------------------------------------ DPO


def dpo_batch(rows):
    chosen = [p + c for p, c, _ in rows]
    rejected = [p + r for p, _, r in rows]
    cmask = [[0] * len(p) + [1] * len(c) for p, c, _ in rows]
    rmask = [[0] * len(p) + [1] * len(r) for p, _, r in rows]
    return chosen, rejected, cmask, rmask


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_loss_types_equal_trl(loss_type):
    rows = rand_pairs(6, seed=3)
    policy, ref = Bigram(0), Bigram(1)
    chosen, rejected, cmask, rmask = dpo_batch(rows)
    seqs, masks = chosen + rejected, cmask + rmask
    ids = pad_rows(seqs, PAD)
    cm = pad_rows(masks, 0)
    ref_lp = ref(input_ids=ids, labels=ids.masked_fill(cm == 0, P.IGNORE), fused_lm_head=True).log_probs.sum(1)
    inputs = {"input_ids": ids, "attention_mask": pad_rows([[1] * len(s) for s in seqs], 0), "completion_mask": cm,
              "ref_chosen_logps": ref_lp[:6], "ref_rejected_logps": ref_lp[6:]}
    ls = 0.1 if loss_type in ("robust", "exo_pair") else 0.0
    me = fake_self(DPOTrainer, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                   loss_types=[loss_type], loss_weights=[1.0], beta=0.3, label_smoothing=ls,
                   use_weighting=False, args=types.SimpleNamespace(discopop_tau=0.05))
    trl_loss = DPOTrainer._compute_loss(me, policy, inputs, False)

    lp, n = our_logps(policy, seqs, masks)
    loss_sum, sums = P.dpo_loss(lp[:6], lp[6:], ref_lp[:6], ref_lp[6:], n[:6], n[6:], beta=0.3,
                                loss_type=loss_type, label_smoothing=ls, discopop_tau=0.05)
    assert close(loss_sum / 6, trl_loss), (float(loss_sum / 6), float(trl_loss))
    ours = P.finalize_metrics(sums, 6)
    for k, v in ours.items():
        assert close(v, me._metrics["train"][k][0]), k
    assert set(ours) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                         "logps/chosen", "logps/rejected"}


# ---------------------------------------------------------------------- SimPO / ORPO


def cpo_batch(rows):
    """The padded dict CPOTrainer/ORPOTrainer's collator produces (labels unshifted, -100
    on the prompt)."""
    out = {}
    for side, k in (("chosen", 1), ("rejected", 2)):
        seqs = [r[0] + r[k] for r in rows]
        labels = [[P.IGNORE] * len(r[0]) + r[k] for r in rows]
        out[f"{side}_input_ids"] = pad_rows(seqs, PAD)
        out[f"{side}_attention_mask"] = pad_rows([[1] * len(s) for s in seqs], 0)
        out[f"{side}_labels"] = pad_rows(labels, P.IGNORE)
    return out


def test_simpo_equals_trl_cpo():
    rows = rand_pairs(5, seed=4)
    policy = Bigram(2)
    me = fake_self(CPOTrainer, is_encoder_decoder=False, pad_token_id=PAD, cpo_alpha=0.0, loss_type="simpo",
                   beta=2.0, simpo_gamma=0.7, label_smoothing=0.0, alpha=0.0)
    trl_loss, trl_metrics = CPOTrainer.get_batch_loss_metrics(me, policy, cpo_batch(rows))

    chosen, rejected, cmask, rmask = dpo_batch(rows)
    lp, n = our_logps(policy, chosen + rejected, cmask + rmask)
    loss_sum, sums = P.simpo_loss(lp[:5], n[:5], lp[5:], n[5:], beta=2.0, gamma=0.7)
    assert close(loss_sum / 5, trl_loss)
    for k, v in P.finalize_metrics(sums, 5).items():
        assert close(v, trl_metrics[k]), k


def orpo_ours(policy, rows, beta, tokens_per_pair=None):
    chosen, rejected, cmask, rmask = dpo_batch(rows)
    ids = pad_rows(chosen + rejected, PAD)
    attn = pad_rows([[1] * len(s) for s in chosen + rejected], 0)
    comp = pad_rows(cmask + rmask, 0)
    full = shifted(ids.masked_fill(attn == 0, P.IGNORE))  # every real token is a target
    per_token = P.token_logps(policy.logits(ids), full)
    lp, n = P.masked_sums(per_token, shifted(comp.masked_fill(comp == 0, P.IGNORE)) != P.IGNORE)
    nll_sum, nll_n = P.masked_sums(-per_token, full != P.IGNORE)
    k = len(rows)
    if tokens_per_pair is None:
        tokens_per_pair = float(nll_n[:k].sum()) / k
    return P.orpo_loss(lp[:k], n[:k], lp[k:], n[k:], nll_sum[:k], nll_tokens_per_pair=tokens_per_pair,
                       beta=beta), tokens_per_pair


def test_orpo_equals_trl():
    rows = rand_pairs(5, seed=5)
    policy = Bigram(3)
    me = fake_self(ORPOTrainer, is_encoder_decoder=False, padding_value=PAD, beta=0.25)
    trl_loss, trl_metrics = ORPOTrainer.get_batch_loss_metrics(me, policy, cpo_batch(rows))
    (loss_sum, sums), _ = orpo_ours(policy, rows, beta=0.25)
    assert close(loss_sum / 5, trl_loss), (float(loss_sum / 5), float(trl_loss))
    ours = P.finalize_metrics(sums, 5)
    for k, v in ours.items():
        assert close(v, trl_metrics[k]), k
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(ours)


# ------------------------------------------------------------------------------ KTO


def kto_rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        p = rand_ids(g, int(torch.randint(1, 5, (1,), generator=g)))
        c = rand_ids(g, int(torch.randint(1, 6, (1,), generator=g)))
        rows.append((p, c, bool(torch.rand(1, generator=g) < 0.6) if i > 1 else bool(i == 0)))
    return rows


def kto_inputs(rows, ref):
    prompts, comps = [r[0] for r in rows], [r[1] for r in rows]
    out = {}
    for prefix, cs in (("", comps), ("KL_", P.kto_mismatched(comps))):
        seqs = [p + c for p, c in zip(prompts, cs)]
        out[f"{prefix}input_ids"] = ids = pad_rows(seqs, PAD)
        out[f"{prefix}attention_mask"] = pad_rows([[1] * len(s) for s in seqs], 0)
        out[f"{prefix}completion_mask"] = cm = pad_rows([[0] * len(p) + [1] * len(c) for p, c in zip(prompts, cs)], 0)
        key = "ref_logps" if prefix == "" else "ref_KL_logps"
        out[key] = ref(input_ids=ids, labels=ids.masked_fill(cm == 0, P.IGNORE), fused_lm_head=True).log_probs.sum(1)
    out["label"] = torch.tensor([r[2] for r in rows])
    return out


def kto_ours(policy, inputs, rows, lo, hi, kl):
    prompts = [r[0] for r in rows]
    comps = [r[1] for r in rows]
    seqs = [prompts[i] + comps[i] for i in range(lo, hi)]
    masks = [[0] * len(prompts[i]) + [1] * len(comps[i]) for i in range(lo, hi)]
    lp, _ = our_logps(policy, seqs, masks)
    return P.kto_loss(lp, inputs["ref_logps"][lo:hi], inputs["label"][lo:hi], kl, beta=0.2,
                      desirable_weight=1.3, undesirable_weight=0.8)


def kto_kl_sum(policy, inputs, rows, lo, hi):
    prompts, kl_comps = [r[0] for r in rows], P.kto_mismatched([r[1] for r in rows])
    seqs = [prompts[i] + kl_comps[i] for i in range(lo, hi)]
    masks = [[0] * len(prompts[i]) + [1] * len(kl_comps[i]) for i in range(lo, hi)]
    with torch.no_grad():
        lp, _ = our_logps(policy, seqs, masks)
    return (lp - inputs["ref_KL_logps"][lo:hi]).sum()


@pytest.mark.parametrize("seed", [6, 7])
def test_kto_equals_trl(seed):
    rows = kto_rows(7, seed)
    policy, ref = Bigram(4), Bigram(seed)  # seed 7: a reference point clamped at 0
    inputs = kto_inputs(rows, ref)
    me = fake_self(KTOTrainer, calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=0.2,
                   desirable_weight=1.3, undesirable_weight=0.8)
    trl_loss = KTOTrainer._compute_loss(me, policy, inputs, False)

    kl = P.kto_reference_point(kto_kl_sum(policy, inputs, rows, 0, 7), 7)
    assert close(kl, me._metrics["train"]["kl"][0])
    loss_sum, sums = kto_ours(policy, inputs, rows, 0, 7, kl)
    assert close(loss_sum / 7, trl_loss), (float(loss_sum / 7), float(trl_loss))
    ours = P.finalize_metrics(sums, 7)
    for k, v in ours.items():
        assert close(v, me._metrics["train"][k][0]), k
    assert "rewards/margins" in ours and "rewards/accuracies" not in ours


# ------------------------------------------------------------------ split-invariance

SPLITS = [(0, 3), (3, 4), (4, 8)]  # uneven micro-batches, as accumulation x ranks may give


def summed(parts):
    loss = sum(p[0] for p in parts)
    keys = parts[0][1].keys()
    return loss, {k: sum(p[1][k] for p in parts) for k in keys}


def assert_split_invariant(whole, parts, n):
    loss, sums = summed(parts)
    assert close(loss / n, whole[0] / n)
    a, b = P.finalize_metrics(sums, n), P.finalize_metrics(whole[1], n)
    assert a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_split_invariant(loss_type):
    g = torch.Generator().manual_seed(8)
    x = [torch.randn(8, generator=g) * 5 for _ in range(4)]
    n = [torch.randint(1, 9, (8,), generator=g).float() for _ in range(2)]
    f = lambda lo, hi: P.dpo_loss(*(t[lo:hi] for t in x + n), beta=0.1, loss_type=loss_type)  # noqa: E731
    assert_split_invariant(f(0, 8), [f(lo, hi) for lo, hi in SPLITS], 8)


def test_simpo_split_invariant():
    g = torch.Generator().manual_seed(9)
    lp = [-torch.rand(8, generator=g) * 20 for _ in range(2)]
    n = [torch.randint(1, 9, (8,), generator=g).float() for _ in range(2)]
    f = lambda lo, hi: P.simpo_loss(lp[0][lo:hi], n[0][lo:hi], lp[1][lo:hi], n[1][lo:hi], beta=2.0, gamma=0.5)  # noqa: E731
    assert_split_invariant(f(0, 8), [f(lo, hi) for lo, hi in SPLITS], 8)


def test_orpo_split_invariant_and_equal_to_trl_whole_batch():
    rows = rand_pairs(8, seed=10)
    policy = Bigram(5)
    (whole, tokens_per_pair) = orpo_ours(policy, rows, beta=0.1)
    parts = [orpo_ours(policy, rows[lo:hi], beta=0.1, tokens_per_pair=tokens_per_pair)[0] for lo, hi in SPLITS]
    assert_split_invariant(whole, parts, 8)
    me = fake_self(ORPOTrainer, is_encoder_decoder=False, padding_value=PAD, beta=0.1)
    trl_loss, _ = ORPOTrainer.get_batch_loss_metrics(me, policy, cpo_batch(rows))
    assert close(summed(parts)[0] / 8, trl_loss)


def test_kto_split_invariant_and_equal_to_trl_whole_batch():
    rows = kto_rows(8, 11)
    policy, ref = Bigram(6), Bigram(7)
    inputs = kto_inputs(rows, ref)  # mismatched completions rotated over the global batch
    # The reference point: no-grad sums from every micro-batch, added (all-reduce), then one z0.
    kl = P.kto_reference_point(sum(kto_kl_sum(policy, inputs, rows, lo, hi) for lo, hi in SPLITS), 8)
    parts = [kto_ours(policy, inputs, rows, lo, hi, kl) for lo, hi in SPLITS]
    whole = kto_ours(policy, inputs, rows, 0, 8, kl)
    assert_split_invariant(whole, parts, 8)
    me = fake_self(KTOTrainer, calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=0.2,
                   desirable_weight=1.3, undesirable_weight=0.8)
    assert close(summed(parts)[0] / 8, KTOTrainer._compute_loss(me, policy, inputs, False))


def test_loss_gradients_flow_only_through_policy():
    lp = torch.randn(4, requires_grad=True)
    ref = torch.randn(4)
    loss, sums = P.dpo_loss(lp[:2], lp[2:], ref[:2], ref[2:], beta=0.1)
    loss.backward()
    assert lp.grad.abs().sum() > 0 and all(not v.requires_grad for v in sums.values())
    kl = P.kto_reference_point(torch.tensor(-3.0), 4)
    assert kl.item() == 0.0 and not kl.requires_grad
