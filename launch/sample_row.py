"""The dry run's look at one training row as the model will see it: the chat template
applied, tokenized, and which tokens the loss trains on. Checking this before a long run
catches a wrong template or a mask that trains on the prompt (or on nothing)."""
from __future__ import annotations

OPEN, CLOSE = "[[", "]]"


def marked(tokenizer, ids, mask) -> str:
    """The decoded tokens, each run of trained tokens (loss mask 1) between [[ and ]]."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or bool(mask[i]) != bool(mask[start]):
            text = tokenizer.decode([int(t) for t in ids[start:i]], skip_special_tokens=False)
            out.append(f"{OPEN}{text}{CLOSE}" if mask[start] else text)
            start = i
    return "".join(out)


def sample_row(cfg) -> list[str]:
    from trainers.data.encoding import encode_chunk
    from trainers.data.rows import read_raw
    from trainers.data.sources import parse_sources, row_kind
    from trainers.model.load import load_tokenizer

    spec = parse_sources(cfg.data.train, "data.train")[0]
    tokenizer = load_tokenizer(cfg.model)
    first = next(read_raw(spec.path, batch=1))[:1]
    enc = encode_chunk(tokenizer, first, cfg.data, row_kind(cfg))
    if enc.error is not None:
        return [f"first training row of {spec.path}: bad row ({enc.error[1]})"]
    lines = [f"first training row of {spec.path}, as trained (tokens the loss trains on between "
             f"{OPEN} and {CLOSE}):"]
    offset = 0
    for length in enc.lengths:  # preference rows: chosen, then rejected
        ids, mask = enc.ids[offset:offset + length], enc.mask[offset:offset + length]
        offset += length
        lines.append(f"  ({len(ids)} tokens, {int(mask.sum())} trained) {marked(tokenizer, ids, mask)!r}")
    return lines
