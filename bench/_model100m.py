"""Build a ~100M-parameter random-init Llama (char tokenizer of scripts/build_tiny_base)
saved with save_pretrained; cached by directory so benches can share it.

    python bench/_model100m.py OUT_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

HIDDEN, LAYERS, INTERMEDIATE, HEADS = 768, 14, 2048, 12


def build(out: Path, seed: int = 0, hidden: int = HIDDEN, layers: int = LAYERS,
          intermediate: int = INTERMEDIATE, heads: int = HEADS, max_shard_size: str | None = None) -> Path:
    """A random-init Llama of the given shape (default ~99M params); `max_shard_size` saves
    it as several safetensors files, like a real checkpoint."""
    out = Path(out)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from build_tiny_base import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tok.save_pretrained(out)
    print(f"built {n/1e6:.1f}M-param Llama at {out}")
    return out


if __name__ == "__main__":
    build(Path(sys.argv[1]))
