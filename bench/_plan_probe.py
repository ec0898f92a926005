"""One plan, N ranks: run real training steps through the plan classes and count the
model-state bytes each rank actually holds. Started by bench/plans_memory.py as
`torchrun --nproc_per_node 2 bench/_plan_probe.py PLAN MODEL_DIR OUT_JSON STEPS [TRAIN_JSONL]`.

Counting (snapshot taken on the last step, after forward_backward and before plan.step,
when parameters, gradients and optimizer state are all alive):
- every tensor is deduplicated by its storage (views into one flat buffer count once,
  whole storage bytes), first category wins, in this order:
  params: module parameters' local data (DTensor -> _local_tensor; ZeRO-3 -> ds_tensor
          partition; the empty ZeRO-3 placeholder p.data counts 0)
  grads:  module parameters' .grad (local shard for DTensor)
  optim:  state tensors of the torch optimizer (for DeepSpeed: the inner torch optimizer)
  ds_master / ds_grad / ds_other: any other tensor reachable from the DeepSpeed ZeRO
          optimizer's attributes (lists / dicts / tuples walked), by attribute name
          (fp32 master partitions, flat grad partition buffers, ipg buckets, ...).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class Counter:
    ORDER = ("params", "grads", "optim", "ds_master", "ds_grad", "ds_other")

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes = {k: 0 for k in self.ORDER}

    def add(self, cat: str, t) -> None:
        import torch

        if t is None or not isinstance(t, torch.Tensor):
            return
        if hasattr(t, "_local_tensor"):
            t = t._local_tensor
        if t.numel() == 0:
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.seen or key == 0:
            return
        self.seen.add(key)
        self.bytes[cat] += st.nbytes()


def walk(obj, depth=0):
    """Tensors reachable through lists / tuples / dicts (not through arbitrary objects)."""
    import torch

    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from walk(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from walk(v, depth + 1)


def count(plan) -> dict:

    c = Counter()
    params = list(plan.inner.parameters())
    for p in params:
        if hasattr(p, "ds_tensor"):
            c.add("params", p.ds_tensor)
        c.add("params", p.data if not hasattr(p, "_local_tensor") else p)
    for p in params:
        c.add("grads", p.grad)
    engine = getattr(plan, "engine", None)
    opt = plan.optimizer
    inner = getattr(opt, "optimizer", opt) if engine is not None else opt
    for st in inner.state.values():
        for t in walk(st):
            c.add("optim", t)
    if engine is not None:
        for name, val in vars(opt).items():
            if name == "optimizer":
                continue
            lname = name.lower()
            cat = "ds_master" if "fp32" in lname else "ds_grad" if "grad" in lname else "ds_other"
            for t in walk(val):
                c.add(cat, t)
    return c.bytes


def main(plan_name: str, model_dir: str, out: str, steps: int, data: str | None = None) -> None:
    import torch
    from hydra import compose, initialize_config_dir

    from launch.config import finalize, register_resolvers
    from launch.quiet import quiet_libraries
    from launch.worker import setup_logging
    from parallel import build_plan
    from trainers.data.sources import training_batches
    from trainers.distributed import all_reduce_sum, init_distributed
    from trainers.model.load import ModelSource, load_tokenizer
    from trainers.objectives.catalog import get_objective
    from trainers.rng import seed_everything

    setup_logging()
    quiet_libraries()
    register_resolvers()
    overrides = [
        f"parallel={plan_name}", "method=full", "launcher.nproc_per_node=2", f"model.path={model_dir}",
        "data.eval=null", f"train.max_steps={steps}", "train.micro_batch_size=2", "train.grad_accum=1",
        "train.precision=fp32", "optim.warmup_steps=0", "optim.schedule=constant",
    ] + ([f"data.train={data}"] if data else [])
    run_dir = Path(out).parent / f"run-{plan_name}"
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = finalize(compose("config", overrides=overrides), str(run_dir))
    env = init_distributed()
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    plan = build_plan(cfg, env)
    batches, _ = training_batches(cfg, tokenizer, plan.dp_world)
    seed_everything(cfg.seed)
    plan.prepare(ModelSource(cfg.model, cfg.method, plan.compute_dtype, cfg.seed, cfg.train))
    objective = get_objective(cfg.objective)
    expected = plan.expected_state_bytes()
    times, toks, losses, snap = [], [], [], None
    for step in range(steps):
        t0 = time.perf_counter()
        micro, n_targets = batches.micro_batches(step, plan.dp_rank)
        loss_sum, real, _ = plan.forward_backward(micro, n_targets, objective)
        loss_sum, real = all_reduce_sum([loss_sum, real], env.device)
        t_fb = time.perf_counter()
        if step == steps - 1:
            snap = count(plan)
        t_c = time.perf_counter()
        plan.step()
        dt = (time.perf_counter() - t0) - (t_c - t_fb)  # counting time excluded
        times.append(dt)
        toks.append(int(real))
        losses.append(loss_sum / n_targets)
    extra = {}
    reducer = getattr(plan.model, "reducer", None)
    if reducer is not None and hasattr(reducer, "_get_zeros_like_grad_buckets"):
        # DDP's flat gradient buckets live in C++ (not reachable as Python tensors): size them
        extra["ddp_grad_buckets"] = sum(b.buffer().numel() * b.buffer().element_size() for b in reducer._get_zeros_like_grad_buckets())
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rec = {
        "plan": plan_name, "rank": env.rank, "counted": snap, "expected": expected, "extra": extra,
        "peak_rss": rss_peak, "step_s": times, "tokens": toks, "losses": losses,
        "n_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in plan.inner.parameters()),
    }
    Path(f"{out}.rank{env.rank}").write_text(json.dumps(rec))
    plan.close()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else None)
    sys.stdout.flush()
    os._exit(0)  # DeepSpeed sometimes aborts at interpreter exit (notes): skip teardown
