"""Generate the bundled prompt data for objective=grpo (data=reverse_rl).

Why: GRPO learns from a reward on the model's own completions, so its data is prompts
plus whatever the reward needs to score an answer. The prompts are the reverse task's
("Reverse: <s>", as chat messages) with an `answer` column (the reversed string) that
the built-in rewards (trainers/objectives/reverse_rewards.py) receive as a keyword list.
The strings are 6-9 letters, longer than the SFT task's 3-8, so a model after a short
SFT run still gets many wrong and there is room for the reward to improve it.

Outputs (deterministic for a given --seed):
  data/reverse_rl/train.jsonl  {"prompt": [{"role": "user", "content": "Reverse: s"}], "answer": "..."}
  data/reverse_rl/eval.jsonl   held-out prompts, strings disjoint from train, from the SFT
                               data and from the pre-training corpus (in either direction)
"""
import argparse
import json
import random
import re
import string
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIN_LEN, MAX_LEN = 6, 9


def taken_strings() -> set[str]:
    """Every lowercase word already in the bundled corpus and SFT data."""
    words: set[str] = set()
    for path in [ROOT / "data/corpus/pretrain.txt", *sorted((ROOT / "data/reverse").glob("*.jsonl"))]:
        if path.exists():
            words.update(re.findall(r"[a-z]+", path.read_text()))
    return words


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=22)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=200)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    taken = taken_strings()
    out: list[str] = []
    while len(out) < args.train + args.eval:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
        if w not in taken and w[::-1] not in taken:
            taken.update((w, w[::-1]))
            out.append(w)
    folder = ROOT / "data/reverse_rl"
    folder.mkdir(parents=True, exist_ok=True)
    for name, words in (("train", out[: args.train]), ("eval", out[args.train :])):
        rows = [{"prompt": [{"role": "user", "content": f"Reverse: {w}"}], "answer": w[::-1]} for w in words]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{folder / name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
