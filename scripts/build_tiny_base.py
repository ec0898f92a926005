"""Build and pretrain the tiny bundled base model at assets/tiny-llama/.

Why: the default `python launch.py` run must work offline on a CPU in minutes, so
it cannot download a model. This script creates a real `LlamaForCausalLM` (about
0.8M parameters) with a character-level tokenizer and pretrains it on
data/corpus/pretrain.txt (run scripts/make_data.py first). The corpus teaches
string reversal in plain-text form only, so the base knows the skill but not the
chat format; supervised fine-tuning then has to connect the two, which gives a
held-out exact-match metric that starts near 0 and climbs quickly.

Tokenizer: every printable ASCII character and "\\n" is one token (no merges) plus
the special tokens <|bos|> <|end|> (EOS) <|pad|> <|system|> <|user|> <|assistant|>.
The chat template is prefix-stable and puts no whitespace between turns, so the
assistant tokens of a turn are exactly `content + <|end|>`.

Deterministic (bit-identical weights) for a given --seed and --threads (CPU, fp32).
The default 2000 steps of 16x128 tokens take ~3.5 min on 2 idle cores; the skill
appears abruptly around step 800-1000 (printed "probe" = raw-text reversal accuracy);
a peak lr of 3e-3 delayed it past 1500 steps. On a busy machine use --threads 1 (two
threads on contended cores were >10x slower here) and raise --max-seconds, since
hitting the cap ends pretraining early. The bundled asset was built with the defaults.
"""

import argparse
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
SPECIAL_TOKENS = ["<|bos|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer():
    """Char-level BPE with an empty merge list: each known character is its own token.
    Characters outside printable ASCII + newline are dropped (there is no unk token)."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()  # join tokens with no separator
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        extra_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
        padding_side="right",
    )


def build_model(tokenizer, args):
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def corpus_ids(tokenizer, text, rng):
    """Pack the corpus as documents `<|bos|>line\nline...<|end|>` of 1-4 lines each, so the
    base learns BOS, EOS and newline embeddings (role tokens stay unseen, as in a real base)."""
    lines, ids, doc_starts = text.splitlines(), [], []
    i = 0
    while i < len(lines):
        n = rng.randint(1, 4)
        doc = tokenizer.backend_tokenizer.encode("\n".join(lines[i:i + n]), add_special_tokens=False).ids
        doc_starts.append(len(ids))
        ids += [tokenizer.bos_token_id] + doc + [tokenizer.eos_token_id]
        i += n
    return torch.tensor(ids), torch.tensor(doc_starts)


def batches(ids, doc_starts, seq_len, batch_size, gen):
    """Endless random windows of seq_len tokens, each starting at a document start."""
    starts = doc_starts[doc_starts < len(ids) - seq_len]
    while True:
        idx = starts[torch.randint(len(starts), (batch_size,), generator=gen)]
        yield torch.stack([ids[i:i + seq_len] for i in idx.tolist()])


def pretrain(model, tokenizer, args):
    text = (ROOT / args.corpus).read_text()
    assert all(c in CHARS for c in set(text)), "corpus must be printable ASCII + newline"
    ids, doc_starts = corpus_ids(tokenizer, text, random.Random(args.seed))
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def lr_at(step):  # linear warmup, cosine decay to 10%
        if step < warmup:
            return args.lr * (step + 1) / warmup
        p = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * p)))

    model.train()
    t0, data = time.time(), batches(ids, doc_starts, args.seq_len, args.batch_size, gen)
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch = next(data)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.time() - t0
        if step % 100 == 0 or step == args.steps - 1:
            acc = f" probe {probe(model, tokenizer):.2f}" if step % 500 == 0 and step else ""
            print(f"step {step:5d} loss {loss.item():.4f} lr {lr_at(step):.2e} {elapsed:6.0f}s{acc}", flush=True)
        if elapsed > args.max_seconds:
            print(f"time budget reached at step {step}")
            break
    model.eval()
    return time.time() - t0


@torch.no_grad()
def probe(model, tokenizer, n=64, seed=123):
    """Raw-text skill check on fresh random strings (length 5-8, so practically never in
    the corpus): fraction of greedy completions of "the reverse of w is " equal to reverse(w)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(5, 8)))
             for _ in range(n)]
    prompts = [f"{tokenizer.bos_token}the reverse of {w} is " for w in words]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = "right"
    tokenizer.backend_tokenizer.no_padding()  # keep padding state out of the saved tokenizer.json
    was_training = model.training
    model.eval()
    out = model.generate(**batch, max_new_tokens=9, do_sample=False)
    model.train(was_training)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(t.startswith(w[::-1] + ".") for t, w in zip(texts, words)) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="assets/tiny-llama")
    ap.add_argument("--corpus", default="data/corpus/pretrain.txt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-seconds", type=float, default=480, help="safety cap; normally not reached")
    ap.add_argument("--threads", type=int, default=2, help="use 1 on a busy machine: 2 threads on "
                    "contended cores can be many times slower")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, params {n_params:,}")

    secs = pretrain(model, tokenizer, args)
    print(f"pretraining took {secs:.0f}s")
    acc = probe(model, tokenizer)
    print(f"raw-text reversal accuracy on fresh strings: {acc:.2f}")
    if acc < 0.8:
        print("WARNING: the base has not learned the skill; train longer (--steps / --max-seconds)")

    out = ROOT / args.out
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"saved to {out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
