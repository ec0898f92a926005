"""Generate data/probes/general.jsonl, the general-ability probe every SFT run scores.

Why: fine-tuning on the bundled reverse task can make the model worse at what it knew
before (catastrophic forgetting). The base was pre-trained on plain English sentences as
well as on reversal (data/corpus/pretrain.txt); the probe holds English sentences of the
same grammar that never occur in the corpus, as prompt/completion rows (the subject is
the prompt), scored by loss only. A rise of its loss over the value before training is
forgetting (eval.forgetting_alarm, `python -m launch.doctor`).
"""
import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_data import OBJECTS, PLACES, SUBJECTS, VERBS  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument("--rows", type=int, default=64)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    seen = set((ROOT / "data/corpus/pretrain.txt").read_text().splitlines())
    rows, taken = [], set()
    while len(rows) < args.rows:
        subject, rest = rng.choice(SUBJECTS), f"{rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
        line = f"{subject} {rest}"
        if line in seen or line in taken:
            continue
        taken.add(line)
        rows.append({"prompt": subject, "completion": " " + rest})
    out = ROOT / "data/probes/general.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{out}: {len(rows)} sentences absent from the corpus")


if __name__ == "__main__":
    main()
