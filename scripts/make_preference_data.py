"""Generate the bundled preference task (issue 11) from the reverse task.

Why derive it from data/reverse: the SFT run on that task is the natural starting point of
DPO (point model.path at its export/merged), and its held-out strings are disjoint from
every training string, so held-out preference accuracy and exact match after DPO measure
generalisation exactly as the SFT metric does. Train rows come from
data/reverse/train.jsonl, held-out rows from data/reverse/eval.jsonl (run
scripts/make_data.py first); the prompt is the row's messages up to its last user turn.

chosen is the correct reversal. rejected is a near miss of the kinds a partly trained
character model produces, so the preference signal is about the skill and not about
format: two adjacent characters swapped, one dropped, one duplicated, one substituted,
the input echoed unreversed, or only the first half reversed. A near miss never equals the
answer and never is empty (TRL and our data layer treat both as bad rows).

Outputs (deterministic for a given --seed; TRL's conversational formats):
  data/reverse_pref/{train,eval}.jsonl  {"prompt": [messages...],
                                         "chosen": [{"role": "assistant", "content": ...}],
                                         "rejected": [{"role": "assistant", "content": ...}]}
  data/reverse_kto/{train,eval}.jsonl   {"prompt": [...], "completion": [one assistant
                                         message], "label": true|false}
KTO rows are one per source row (label drawn with probability 1/2), not both halves of a
pair one after the other: TRL estimates KTO's KL from each row's prompt with its
neighbour's completion, which must be another prompt's answer. Every row fits the 64-token
budget of the bundled chat template, rejected included.
"""

import argparse
import json
import random
import string
from pathlib import Path

from make_data import write_jsonl  # scripts/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
MAX_CHAT_TOKENS = 64  # data.max_seq_len of conf/data/reverse_pref.yaml
KINDS = ("swap", "drop", "duplicate", "substitute", "unreversed", "half")


def chat_tokens(messages):
    """Tokens under the bundled char-level template: bos + per turn (role + content + end)."""
    return 1 + sum(len(m["content"]) + 2 for m in messages)


def near_miss(rng, word, kind):
    """A wrong answer for reversing `word`, or None when `kind` cannot make one."""
    r = word[::-1]
    if kind == "swap":
        spots = [i for i in range(len(r) - 1) if r[i] != r[i + 1]]
        if not spots:
            return None
        i = rng.choice(spots)
        out = r[:i] + r[i + 1] + r[i] + r[i + 2 :]
    elif kind == "drop":
        i = rng.randrange(len(r))
        out = r[:i] + r[i + 1 :]
    elif kind == "duplicate":
        i = rng.randrange(len(r))
        out = r[: i + 1] + r[i] + r[i + 1 :]
    elif kind == "substitute":
        i = rng.randrange(len(r))
        out = r[:i] + rng.choice([c for c in string.ascii_lowercase if c != r[i]]) + r[i + 1 :]
    elif kind == "unreversed":
        out = word
    else:  # half: the first half reversed in place, the rest left as is
        h = len(word) // 2
        out = word[:h][::-1] + word[h:]
    return out if out and out != r else None


def pair_row(rng, messages):
    """(preference row, kto row) for one chat row whose last message is the answer."""
    prompt, answer = messages[:-1], messages[-1]
    assert answer["role"] == "assistant" and prompt[-1]["role"] == "user", messages
    word = answer["content"][::-1]
    kinds = list(KINDS)
    rng.shuffle(kinds)
    for kind in kinds:
        rejected = near_miss(rng, word, kind)
        if rejected is not None and chat_tokens(prompt + [{"content": rejected}]) <= MAX_CHAT_TOKENS:
            break
    else:
        raise AssertionError(f"no near miss for {word!r}")
    chosen = [{"role": "assistant", "content": answer["content"]}]
    reject = [{"role": "assistant", "content": rejected}]
    good = rng.random() < 0.5
    return ({"prompt": prompt, "chosen": chosen, "rejected": reject},
            {"prompt": prompt, "completion": chosen if good else reject, "label": good})


def read_jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--train", type=int, default=2000, help="rows taken from data/reverse/train.jsonl")
    ap.add_argument("--eval", type=int, default=200, help="rows taken from data/reverse/eval.jsonl")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    for split, n in (("train", args.train), ("eval", args.eval)):
        source = read_jsonl(ROOT / f"data/reverse/{split}.jsonl")[:n]
        pairs, kto = zip(*(pair_row(rng, r["messages"]) for r in source))
        write_jsonl(ROOT / f"data/reverse_pref/{split}.jsonl", pairs)
        write_jsonl(ROOT / f"data/reverse_kto/{split}.jsonl", kto)
        print(f"{split}: {len(pairs)} pairs, {len(kto)} kto rows "
              f"({sum(r['label'] for r in kto)} desirable)")


if __name__ == "__main__":
    main()
