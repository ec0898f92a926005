"""Activation checkpointing and the chunked loss: memory saved, speed paid, one run, side by side.

    python bench/activation_checkpointing.py [--part ac|loss|all] [--steps 4] [--hidden 512]
        [--layers 8] [--seq 512] [--micro 4] [--loss-tokens 4096] [--vocab 128256]
        [--loss-hidden 64] [--out bench/results/activation_checkpointing.md]

Part `ac` trains the same job twice in this process, train.activation_checkpointing off
then on: a random-init Llama built in a temp dir (hidden 512, 8 layers, the bundled
character tokenizer), LoRA on all linear layers, parallel=none, fp32, micro-batch 4 of
packed 512-token rows, through the real pieces of the loop (plan, ModelSource,
apply_memory_options, plan.forward_backward, plan.step). Per mode:
- saved for backward: bytes of the unique storages autograd saves during step 1's forward
  (torch.autograd.graph.saved_tensors_hooks; parameters excluded). This is the activation
  memory proper, deterministic, and what checkpointing is meant to cut: with it on, a
  layer saves only its input (checkpoint's own hooks hold the rest, and drop it).
- peak RSS above the step: VmHWM after step 1 minus VmRSS before it (the peak is reset
  through /proc/self/clear_refs first). Includes the transient backward buffers, the
  logits and the allocator's behaviour; noisier, but what the OS sees.
- tokens/s: real tokens / step time, median of steps 2..N (step 1 is measured, not timed);
  also per CPU-second of this process (one thread), which other jobs on a shared machine
  disturb much less than the wall clock.
The losses of both modes are printed too: checkpointing must not change them.

Part `loss` runs the loss alone, forward + backward, plain (token_ce_sum of the whole
logits) and chunked (trainers/objectives/lm_loss.py, chunk size from train.loss_chunk_tokens=auto),
on one 4096-token row of bf16 hidden states (requiring grad, as under LoRA) against a
frozen bf16 lm_head of Llama-3's vocabulary (128256), every token a target. Memory:
- tensor peak: the largest total of tensor bytes alive at once during forward + backward,
  counted by torch's own MemTracker (torch.distributed._tools.mem_tracker, a dispatch mode
  that sees every tensor an op creates and every storage freed; inputs made before are
  not counted). Exact and independent of the allocator.
- peak RSS above start, as in part ac, as a cross-check from the OS.
The hidden size only changes the matmul cost, not the logits' bytes (tokens x vocab): it
defaults to 64 because bf16 matmuls run at a few GFLOP/s on this CPU (a 4096-wide
lm_head would take minutes per matmul here).

Numbers were measured on a 2-core machine shared with other jobs: compare the ratios.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
MiB = 2**20


# ------------------------------------------------------------------------ measuring
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class RssPeak:
    """Peak RSS above the RSS at entry (VmHWM reset at entry through clear_refs)."""

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")
        self.start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.bytes = (_status_kib("VmHWM") - self.start) * 1024


class SavedForBackward:
    """Bytes of the unique storages autograd saves while active (parameters excluded)."""

    def __init__(self, params):
        import torch

        self.exclude = {p.untyped_storage().data_ptr() for p in params}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self.exclude:
            self.storages.setdefault(ptr, st.nbytes())
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


# -------------------------------------------------------------- activation checkpointing
def build_model_dir(out: Path, hidden: int, layers: int, seq: int) -> Path:
    import torch
    from build_tiny_base import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=max(seq, 256), tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_ac_mode(model_dir: Path, run_dir: Path, on: bool, args) -> dict:
    from hydra import compose, initialize_config_dir

    from launch.config import finalize, register_resolvers
    from parallel import build_plan
    from trainers.data.sources import training_batches
    from trainers.distributed import init_distributed
    from trainers.model.load import ModelSource, count_parameters, load_tokenizer
    from trainers.objectives.catalog import get_objective
    from trainers.rng import seed_everything

    register_resolvers()
    overrides = [
        f"model.path={model_dir}", "method=lora", "method.dropout=0", "parallel=none", "data.eval=null",
        f"data.max_seq_len={args.seq}", f"train.micro_batch_size={args.micro}", "train.grad_accum=1",
        "train.precision=fp32", f"train.max_steps={args.steps}", "optim.warmup_steps=0",
        f"train.activation_checkpointing={str(on).lower()}",
    ]
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = finalize(compose("config", overrides=overrides), str(run_dir))
    env = init_distributed()
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    plan = build_plan(cfg, env)
    batches, _ = training_batches(cfg, tokenizer, 1)
    seed_everything(cfg.seed)
    plan.prepare(ModelSource(cfg.model, cfg.method, plan.compute_dtype, cfg.seed, cfg.train))
    objective = get_objective(cfg.objective)
    rec = {"mode": "on" if on else "off", "params": count_parameters(plan.inner)[1], "losses": [], "step_s": [],
           "cpu_s": [], "tokens": []}
    for step in range(args.steps):
        micro, n_targets = batches.micro_batches(step, 0)
        if step == 0:
            with SavedForBackward(plan.inner.parameters()) as saved, RssPeak() as rss:
                loss_sum, real, _ = plan.forward_backward(micro, n_targets, objective)
            rec["saved_bytes"], rec["rss_bytes"] = saved.bytes, rss.bytes
            rec["seq_shape"] = list(micro[0]["input_ids"].shape)
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            loss_sum, real, _ = plan.forward_backward(micro, n_targets, objective)
            rec["step_s"].append(time.perf_counter() - t0)
            rec["cpu_s"].append(time.process_time() - c0)
            rec["tokens"].append(int(real))
        plan.step()
        rec["losses"].append(loss_sum / n_targets)
    plan.close()
    del plan
    for key, times in (("tokens_per_s", rec["step_s"]), ("tokens_per_cpu_s", rec["cpu_s"])):
        speeds = [t / s for t, s in zip(rec["tokens"], times)]
        rec[key] = statistics.median(speeds) if speeds else float("nan")
    return rec


def part_ac(args, work: Path) -> list[str]:
    model_dir = build_model_dir(work / "model", args.hidden, args.layers, args.seq)
    recs = [run_ac_mode(model_dir, work / f"run-{m}", m == "on", args) for m in ("off", "on")]
    off, on = recs
    diff = max(abs(a - b) / abs(b) for a, b in zip(on["losses"], off["losses"]))
    lines = [
        f"Activation checkpointing: {off['params'] / 1e6:.1f}M-param Llama (hidden {args.hidden}, {args.layers} layers), "
        f"LoRA, fp32, micro-batch {off['seq_shape'][0]} x {off['seq_shape'][1]} tokens, parallel=none, "
        f"{args.steps} steps (losses equal to rel {diff:.1e})",
        "",
        "| activation checkpointing | saved for backward MiB | peak RSS above step start MiB | tokens/s | tokens/CPU-s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in recs:
        lines.append(f"| {r['mode']} | {r['saved_bytes'] / MiB:.1f} | {r['rss_bytes'] / MiB:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} |")
    lines.append(f"| **ratio on/off** | **{on['saved_bytes'] / off['saved_bytes']:.3f}** | "
                 f"**{on['rss_bytes'] / off['rss_bytes']:.3f}** | **{on['tokens_per_s'] / off['tokens_per_s']:.2f}** | "
                 f"**{on['tokens_per_cpu_s'] / off['tokens_per_cpu_s']:.2f}** |")
    return lines


# ------------------------------------------------------------------------ chunked loss
def run_loss_mode(chunked: bool, args) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.distributed._tools.mem_tracker import MemTracker

    from trainers.memory import chunk_tokens_for
    from trainers.objectives.lm_loss import chunked_ce_sum, token_ce_sum

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, args.loss_tokens, args.loss_hidden, generator=g).bfloat16().requires_grad_(True)
    weight = (torch.randn(args.vocab, args.loss_hidden, generator=g) * 0.02).bfloat16()
    labels = torch.randint(0, args.vocab, (1, args.loss_tokens), generator=g)
    chunk = chunk_tokens_for("auto", args.vocab)
    head = lambda x: F.linear(x, weight)  # noqa: E731
    t0, c0 = time.perf_counter(), time.process_time()
    with RssPeak() as rss, MemTracker() as tracker:
        loss = chunked_ce_sum(head, hidden, labels, chunk) if chunked else token_ce_sum(head(hidden), labels)
        loss.backward()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return {"mode": f"chunked ({chunk} tokens)" if chunked else "plain", "peak": peak, "rss": rss.bytes,
            "seconds": seconds, "cpu_seconds": cpu_seconds, "loss": float(loss.detach()),
            "grad": hidden.grad.float().norm().item()}


def part_loss(args) -> list[str]:
    plain, chunked = run_loss_mode(False, args), run_loss_mode(True, args)
    logits = args.loss_tokens * args.vocab
    lines = [
        f"Loss forward + backward: one {args.loss_tokens}-token row of bf16 hidden states (width {args.loss_hidden}), "
        f"frozen bf16 lm_head, vocabulary {args.vocab} (logits {logits * 2 / MiB:.0f} MiB in bf16, "
        f"{logits * 4 / MiB:.0f} MiB in fp32); loss rel diff "
        f"{abs(chunked['loss'] - plain['loss']) / plain['loss']:.1e}, hidden-grad norm rel diff "
        f"{abs(chunked['grad'] - plain['grad']) / plain['grad']:.1e}",
        "",
        "| loss | tensor peak MiB (MemTracker) | peak RSS above start MiB | seconds | CPU seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in (plain, chunked):
        lines.append(f"| {r['mode']} | {r['peak'] / MiB:.0f} | {r['rss'] / MiB:.0f} | {r['seconds']:.1f} | "
                     f"{r['cpu_seconds']:.1f} |")
    lines.append(f"| **ratio chunked/plain** | **{chunked['peak'] / plain['peak']:.3f}** | "
                 f"**{chunked['rss'] / plain['rss']:.3f}** | **{chunked['seconds'] / plain['seconds']:.2f}** | "
                 f"**{chunked['cpu_seconds'] / plain['cpu_seconds']:.2f}** |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("ac", "loss", "all"), default="all")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--loss-tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--loss-hidden", type=int, default=64)
    ap.add_argument("--out", default=str(HERE / "results" / "activation_checkpointing.md"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from launch.quiet import quiet_libraries

    quiet_libraries()
    command = "python bench/activation_checkpointing.py " + " ".join(sys.argv[1:])
    lines = [f"`{command.strip()}`", ""]
    with tempfile.TemporaryDirectory(prefix="bench-ac-") as tmp:
        if args.part in ("ac", "all"):
            lines += part_ac(args, Path(tmp)) + [""]
        if args.part in ("loss", "all"):
            lines += part_loss(args) + [""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
