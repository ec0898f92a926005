"""The dry run's look at one training row as the model will see it: the chat template
applied, tokenized, and which tokens the loss trains on. Checking this before a long run
catches a wrong template or a mask that trains on the prompt (or on nothing).

It needs the model's tokenizer (transformers, which imports torch: about a second), so it
is the dry run's last part and only for a local model.path; a hub id's tokenizer is not
fetched before launch, and the rest of the dry run imports neither."""
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
    from pathlib import Path

    from trainers.data.source_specs import parse_sources, row_kind

    spec = parse_sources(cfg.data.train, "data.train")[0]
    if not Path(str(cfg.model.path)).expanduser().is_dir():
        return [f"first training row of {spec.path}: shown when the run starts (model.path={cfg.model.path} is "
                f"not a local directory: its tokenizer is not fetched before launch)"]
    from trainers.data.encoding import encode_chunk
    from trainers.data.rows import read_raw
    from trainers.model.load import load_tokenizer

    from trainers.errors import UserError

    try:
        tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
        first = next(read_raw(spec.path, batch=1))[:1]
        enc = encode_chunk(tokenizer, first, cfg.data, row_kind(cfg))
    except (OSError, ValueError, UserError) as e:  # e.g. no tokenizer files, no chat template
        return [f"first training row of {spec.path}: cannot be rendered with model.path={cfg.model.path}'s "
                f"tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"]
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
