"""Generate the bundled toy data for the default `python launch.py` run.

Why: the default run must fine-tune a tiny model on CPU in minutes and show a
held-out metric clearly improving, with no network access. The task is string
reversal because the answer is exactly checkable (string equality) and a tiny
character-level model can learn it.

Outputs (all deterministic for a given --seed):
  data/corpus/pretrain.txt                  raw text for pretraining the tiny base:
                                            template English sentences plus plain-text
                                            statements of the skill ("the reverse of kxq is qxk.",
                                            "kxq reversed is qxk.", ...)
  data/reverse/train.jsonl                  chat SFT rows {"messages": [...]}
  data/reverse/eval.jsonl                   held-out chat rows; the prompt is messages[:-1],
                                            the reference is messages[-1]["content"]
  data/reverse/train_prompt_completion.jsonl  the same skill as {"prompt", "completion"} rows

The base learns reversal in raw-text form only, so before SFT it does not know the
chat format (exact match ~0); SFT only has to connect the format to the skill.
Eval strings are disjoint from train and corpus strings, so the metric measures
generalisation, not memorisation. Every chat row fits in 64 tokens under the
character-level chat template (see scripts/build_tiny_base.py).
"""

import argparse
import json
import random
import string
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIN_LEN, MAX_LEN = 3, 8
MAX_CHAT_TOKENS = 64  # sequence budget of the default run

USER_TEMPLATES = [
    "Reverse: {s}",
    "Reverse the string {s}",
    "What is {s} reversed?",
    "reverse {s}",
]
SHORT_TEMPLATES = ["Reverse: {s}", "reverse {s}"]
SYSTEM_PROMPTS = ["Be concise.", "Answer briefly."]

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "a small bird", "the farmer",
            "her brother", "the old man", "a child", "the cook", "our neighbour", "the king"]
VERBS = ["sees", "likes", "finds", "wants", "makes", "takes", "reads", "paints",
         "carries", "builds", "sells", "opens"]
OBJECTS = ["a red apple", "the big house", "a blue book", "the green door", "a warm coat",
           "the long road", "a little boat", "the bright lamp", "a wooden box", "the cold river"]
PLACES = ["in the garden", "at the market", "near the school", "by the sea", "in the morning",
          "after dinner", "on the hill", "under the tree"]


def rand_word(rng):
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def unique_words(rng, n, taken):
    """n fresh random strings; neither a string nor its reverse may be in `taken`
    (which is updated), so no string shows up anywhere else in either direction."""
    out = []
    while len(out) < n:
        w = rand_word(rng)
        if w not in taken and w[::-1] not in taken:
            taken.update((w, w[::-1]))
            out.append(w)
    return out


def english_line(rng):
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    if rng.random() < 0.5:
        s += " " + rng.choice(PLACES)
    return s + "."


SKILL_FORMS = [  # varied wordings/delimiters so the base learns reversal, not one phrasing
    "the reverse of {w} is {r}.",
    "the reverse of {w} is {r}.",
    "{w} reversed is {r}.",
    "{w} backwards is {r}.",
    "reverse {w}: {r}",
    "if you reverse {w} you get {r}.",
    "{w} spelled backwards is {r}.",
    "\"{w}\" reversed gives \"{r}\".",
]


def skill_line(rng, w):
    return rng.choice(SKILL_FORMS).format(w=w, r=w[::-1])


def chat_tokens(messages):
    """Token count under the char-level template: bos + per turn (role + content + end)."""
    return 1 + sum(len(m["content"]) + 2 for m in messages)


def chat_row(rng, words, system=False):
    """One exchange per word. Two-exchange rows use the short templates and no system
    message so that they still fit the 64-token budget."""
    templates = USER_TEMPLATES if len(words) == 1 else SHORT_TEMPLATES
    msgs = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if system else []
    for w in words:
        msgs += [{"role": "user", "content": rng.choice(templates).format(s=w)},
                 {"role": "assistant", "content": w[::-1]}]
    assert chat_tokens(msgs) <= MAX_CHAT_TOKENS, msgs
    return {"messages": msgs}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--corpus-skill-lines", type=int, default=40000)
    ap.add_argument("--corpus-english-lines", type=int, default=20000)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--prompt-completion", type=int, default=500)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    # English words are reserved too, so eval strings never occur in the corpus at all.
    taken = {w for p in SUBJECTS + VERBS + OBJECTS + PLACES + SKILL_FORMS for w in p.split()}

    # Eval strings are drawn first and never reused anywhere else.
    eval_words = unique_words(rng, args.eval, taken)
    corpus_words = unique_words(rng, args.corpus_skill_lines, taken)

    lines = [skill_line(rng, w) for w in corpus_words]
    lines += [english_line(rng) for _ in range(args.corpus_english_lines)]
    rng.shuffle(lines)
    corpus = ROOT / "data/corpus/pretrain.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n".join(lines) + "\n")

    # Train rows: ~10% two-exchange rows, ~5% with a system message.
    train = []
    while len(train) < args.train:
        multi = rng.random() < 0.10
        words = unique_words(rng, 2 if multi else 1, taken)
        train.append(chat_row(rng, words, system=not multi and rng.random() < 0.05))
    write_jsonl(ROOT / "data/reverse/train.jsonl", train)

    # Eval rows: single exchange (a few with a system message) so the prompt is messages[:-1].
    evals = [chat_row(rng, [w], system=rng.random() < 0.05) for w in eval_words]
    write_jsonl(ROOT / "data/reverse/eval.jsonl", evals)

    pc_words = unique_words(rng, args.prompt_completion, taken)
    pc = [{"prompt": f"Reverse: {w}\nAnswer: ", "completion": w[::-1]} for w in pc_words]
    write_jsonl(ROOT / "data/reverse/train_prompt_completion.jsonl", pc)

    print(f"corpus: {len(lines)} lines, {corpus.stat().st_size / 1e6:.2f} MB; "
          f"train {len(train)} (multi-turn {sum(len(r['messages']) > 3 for r in train)}), "
          f"eval {len(evals)}, prompt/completion {len(pc)}")


if __name__ == "__main__":
    main()
