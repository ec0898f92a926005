"""The chunked loss (trainers/objectives/lm_loss.py) equals the plain one, value and gradients, in
process: on random tensors, and through a real (random-init) Llama whose lm_head was
installed to return it, including prompt tuning's virtual tokens."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainers.data.rows import IGNORE
from trainers.errors import UserError
from trainers.memory import chunk_tokens_for
from trainers.objectives.lm_loss import (chunked_ce_sum, install_chunked_head, lm_ce_sum, plain_logits,
                              token_ce_sum)


def _random_case(dtype=torch.float32, rows=3, width=37, hidden=24, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, width, hidden, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.2).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (rows, width), generator=g)
    labels[torch.rand(rows, width, generator=g) < 0.3] = IGNORE  # prompts and padding
    labels[-1] = IGNORE  # a row without any target
    return h, w, labels


def _loss_and_grads(fn, h, w):
    loss = fn()
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), gh, gw


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_loss_and_gradients_equal_plain(chunk):
    h, w, labels = _random_case()
    plain = _loss_and_grads(lambda: token_ce_sum(F.linear(h, w), labels), h, w)
    chunked = _loss_and_grads(lambda: chunked_ce_sum(lambda x: F.linear(x, w), h, labels, chunk), h, w)
    for got, want in zip(chunked, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_loss_under_bf16_autocast_matches_plain():
    """bf16 autocast (what a GPU run uses): the logits are bf16 matmul rows either way and
    the cross-entropy is fp32, so the loss differs only by the order of its fp32 sum. The
    gradients are bf16 matmuls over all tokens at once vs per chunk: equal to bf16 rounding."""
    h, w, labels = _random_case(rows=2, width=256, hidden=64, vocab=512)

    def under_autocast(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn()

    plain = _loss_and_grads(lambda: under_autocast(lambda: token_ce_sum(F.linear(h, w), labels)), h, w)
    chunked = _loss_and_grads(
        lambda: under_autocast(lambda: chunked_ce_sum(lambda x: F.linear(x, w), h, labels, 50)), h, w)
    assert chunked[0].dtype == torch.float32
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=0)
    for got, want in zip(chunked[1:], plain[1:]):
        assert float((got - want).norm() / want.norm()) < 1e-2


def test_no_targets_gives_zero_loss_on_the_graph():
    h, w, labels = _random_case()
    labels[:] = IGNORE
    loss = chunked_ce_sum(lambda x: F.linear(x, w), h, labels, 8)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert float(loss.detach()) == 0.0 and not gh.any() and not gw.any()


def test_logits_recomputed_per_chunk_not_kept():
    """What backward keeps alive: with chunks, no tensor of (targets x vocab) elements is
    saved, only the hidden states; the plain loss saves the whole logits."""
    h, w, labels = _random_case(rows=4, width=128, hidden=16, vocab=4096)
    n_targets = int((labels != IGNORE).sum())

    def largest_saved(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return max(sizes)

    assert largest_saved(lambda: token_ce_sum(F.linear(h, w), labels)) >= n_targets * 4096
    assert largest_saved(lambda: chunked_ce_sum(lambda x: F.linear(x, w), h, labels, 32)) < 32 * 4096


def _tiny_llama(vocab=97):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).train()


def _peft(model, kind):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    if kind == "lora":
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    return get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))


@pytest.mark.parametrize("kind", ["full", "lora", "prompt"])
def test_installed_head_returns_the_same_loss_and_gradients(kind):
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :10] = IGNORE

    def run(chunk):
        model = _tiny_llama()
        if kind != "full":
            model = _peft(model, kind)
        installed = install_chunked_head(model.get_base_model() if kind != "full" else model, chunk)
        loss = lm_ce_sum(lambda: model(input_ids=ids, use_cache=False).logits, labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():  # evaluation: no recomputation, the same loss
            eval_loss = lm_ce_sum(lambda: model(input_ids=ids, use_cache=False).logits, labels)
            logits = model(input_ids=ids).logits  # outside lm_ce_sum the head returns logits
        return installed, loss.detach(), eval_loss, grads, logits

    _, want_loss, want_eval, want_grads, want_logits = run(0)
    installed, loss, eval_loss, grads, logits = run(6)
    assert installed and loss.dim() == 0
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(eval_loss, want_eval, rtol=1e-6, atol=0)
    assert grads.keys() == want_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(logits, want_logits)


def test_small_micro_batch_keeps_plain_logits_path():
    """Fewer targets than one chunk: the head returns logits and the plain loss runs."""
    model = _tiny_llama()
    assert install_chunked_head(model, 1000)
    ids = torch.randint(0, 97, (2, 16))
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, out: seen.append(out.shape))
    lm_ce_sum(lambda: model(input_ids=ids, use_cache=False).logits, ids)
    assert seen == [torch.Size([2, 16, 97])]


def test_plain_logits_inside_the_loss_context():
    """The pipeline's eval forward runs under the Evaluator's lm_ce_sum but must return logits."""
    model = _tiny_llama()
    assert install_chunked_head(model, 4)
    ids = torch.randint(0, 97, (2, 16))
    inside = []

    def forward():
        with plain_logits():
            inside.append(model(input_ids=ids, use_cache=False).logits.shape)
        return model(input_ids=ids, use_cache=False).logits

    assert lm_ce_sum(forward, ids).dim() == 0
    assert inside == [torch.Size([2, 16, 97])]


def test_chunk_setting():
    assert chunk_tokens_for("auto", 128256) == 261
    assert chunk_tokens_for(0, 128256) == 0 and chunk_tokens_for(512, 10) == 512
    for bad in (-1, "big", 1.5, True):
        with pytest.raises(UserError, match="train.loss_chunk_tokens"):
            chunk_tokens_for(bad, 100)


def test_models_that_transform_logits_keep_the_plain_loss():
    """Gemma-2 soft-caps its logits after the lm_head: a loss returned by the head would be
    soft-capped instead. auto leaves such models alone; an explicit chunk size is refused."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    assert config.final_logit_softcapping
    model = Gemma2ForCausalLM(config)
    assert not install_chunked_head(model, "auto")
    with pytest.raises(UserError, match="final_logit_softcapping"):
        install_chunked_head(model, 16)
