"""Write data/examples/: the bundled reverse task in the formats users bring (Alpaca,
ShareGPT, OpenAI-style conversations, plain text), 64 rows each, for the commands of
docs/objectives-and-data.md#data-formats and tests/test_data_formats.py.

Deterministic: rows are taken in order from data/reverse/train.jsonl (chat rows) and
data/corpus/pretrain.txt (plain text), so the examples teach what the bundled task does.
"""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N = 64


def main() -> None:
    chats = [json.loads(x)["messages"] for x in (ROOT / "data/reverse/train.jsonl").read_text().splitlines()[:2 * N]]
    lines = (ROOT / "data/corpus/pretrain.txt").read_text().splitlines()
    out = ROOT / "data/examples"
    out.mkdir(exist_ok=True)
    rows = {
        # Alpaca: the instruction, its input (joined with a newline), the output
        "alpaca.jsonl": [{"instruction": m[0]["content"].rsplit(" ", 1)[0], "input": m[0]["content"].rsplit(" ", 1)[1],
                          "output": m[1]["content"]} for m in chats[:N]],
        # ShareGPT: from/value turns; every fourth row carries a system prompt
        "sharegpt.jsonl": [{"conversations": [{"from": "human", "value": m[0]["content"]},
                                              {"from": "gpt", "value": m[1]["content"]}],
                            **({"system": "Be brief."} if i % 4 == 0 else {})}
                           for i, m in enumerate(chats[N:2 * N])],
        # the OpenAI variant: role/content messages under `conversations`
        "openai_conversations.jsonl": [{"conversations": m} for m in chats[:N]],
        # plain text: continued pre-training on the corpus, three lines a document (longer than
        # data.max_seq_len=64 tokens, so each is cut into blocks)
        "text.jsonl": [{"text": " ".join(lines[3 * i : 3 * i + 3])} for i in range(N)],
    }
    for name, data in rows.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in data))


if __name__ == "__main__":
    main()
