"""merge_report.json and its table: each input's held-out scores beside the merged model's."""
from __future__ import annotations

from pathlib import Path

from trainers.files import atomic_write, write_json

# held-out metric -> its column (which ones a report shows: scoring.SCORED, by objective)
NAMES = {"eval_loss": "eval loss", "eval_exact_match": "exact match", "eval_rewards/accuracies": "preference accuracy",
         "eval_rewards/margins": "reward margin", "eval_accuracy": "accuracy", "eval_margin": "margin",
         "eval_reward": "mean reward"}


def _name(key: str) -> str:
    """A column's heading: eval_loss/general (a probe set's loss) reads "general loss", a GRPO
    reward's mean (eval_rewards/partial_credit/mean) "partial_credit reward"."""
    if key.startswith("eval_loss/"):
        return f"{key.split('/', 1)[1]} loss"
    if key.startswith("eval_rewards/") and key.endswith("/mean"):
        return f"{key[len('eval_rewards/'):-len('/mean')]} reward"
    return NAMES.get(key, key)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def table(report: dict) -> str:
    scored = report.get("scores") is not None
    columns = [(k, _name(k)) for k in report.get("columns") or ("eval_loss", "eval_exact_match")]
    head = ["model", "role", *(name for _, name in columns)] if scored else ["model", "role"]
    lines = [f"# Merge: {report['method']}", "", f"output: `{report['out']}`  ",
             *([f"scored as objective={report['objective']} runs on {report['scored_on']}'s held-out sets  "]
               if scored and report.get("objective") else []),
             f"inputs: {len(report['inputs'])}"
             + (f"; base: `{report['base']}`" if report.get("base") else "")
             + (f"; parameters: {report['parameters']}" if report.get("parameters") else ""), ""]
    if not scored:
        lines.append(f"not scored: {report.get('not_scored', 'eval=false')}")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        cells = [row["label"], row["role"]]
        if scored:
            cells += [_fmt((row.get("scores") or {}).get(k)) for k, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("greedy"):
        lines += ["", "Greedy soup (inputs in order of their score; kept if the soup's score improved):", "",
                  "| added | its score | soup score with it | kept |", "|---|---|---|---|"]
        for g in report["greedy"]:
            lines.append(f"| {g['label']} | {_fmt(g['score'])} | {_fmt(g['soup_score'])} | "
                         f"{'yes' if g['kept'] else 'no'} |")
    if report.get("left_out"):
        lines += ["", "Left out of the sweep's merge:"] + [f"- point {p['num']}: {p['reason']}"
                                                          for p in report["left_out"]]
    return "\n".join(lines) + "\n"


def write(out: Path, report: dict) -> str:
    write_json(Path(out) / "merge_report.json", report)
    text = table(report)
    atomic_write(Path(out) / "merge_report.md", text)
    return text
