"""Generate data/harness/reverse_choice.jsonl, the local lm-evaluation-harness task the
project ships (data/harness/reverse_choice.yaml), so `python -m launch.evaluate` and
eval.harness.tasks are tested without network.

Why: a benchmark run through the harness, on the project's own held-out prompts. Each
row is a held-out reverse prompt of data/reverse_pref/eval.jsonl with two choices, the
correct reversal and its near miss (the pair's rejected answer), in random order; the
harness scores which one the model finds more likely (acc).
"""
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    rng = random.Random(7)
    rows = []
    for line in (ROOT / "data/reverse_pref/eval.jsonl").read_text().splitlines():
        pair = json.loads(line)
        right, wrong = pair["chosen"][-1]["content"], pair["rejected"][-1]["content"]
        label = rng.randrange(2)
        choices = [wrong, right] if label else [right, wrong]
        rows.append({"question": pair["prompt"][-1]["content"], "choices": choices, "label": label})
    out = ROOT / "data/harness/reverse_choice.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{out}: {len(rows)} rows")


if __name__ == "__main__":
    main()
