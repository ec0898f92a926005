"""Builds each plan's model in the same 2 workers (one process start, like
matrix_worker.py) and records, per rank, what loading did: bytes read from the checkpoint,
bytes of parameters held, their dtypes, and (rank 0) whether the gathered weights equal
the checkpoint's. Started by test_loading.py as
`python -m torch.distributed.run --nproc_per_node 2 tests/load_worker.py OUT MODEL CASES_JSON`.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def held_bytes(model) -> dict[str, int]:
    """Bytes of parameter storage this rank holds, frozen and trainable (a DTensor's local
    shard, a ZeRO-3 parameter's partition), each storage counted once."""
    seen, out = set(), {"frozen": 0, "trainable": 0}
    for p in model.parameters():
        t = getattr(p, "ds_tensor", None)
        if t is None:
            t = p.to_local() if hasattr(p, "to_local") else p
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out["trainable" if p.requires_grad else "frozen"] += t.untyped_storage().nbytes()
    return out


def main(out: Path, model_path: str, cases: dict[str, list[str]]) -> None:
    import torch
    from hydra import compose, initialize_config_dir

    from launch.config import finalize, register_resolvers
    from launch.worker import setup_logging
    from parallel import build_plan
    from trainers.distributed import init_distributed
    from trainers.model.load import ModelSource
    from trainers.rng import seed_everything
    from trainers.model.weights import CheckpointFiles, checkpoint_key

    setup_logging()
    register_resolvers()
    env = init_distributed()
    reference = CheckpointFiles(model_path)
    results = {}
    for name, overrides in cases.items():
        with initialize_config_dir(str(REPO / "conf"), version_base=None):
            cfg = finalize(compose("config", overrides=[f"model.path={model_path}", "launcher.nproc_per_node=2",
                                                        *overrides]), str(out / name))
        try:
            plan = build_plan(cfg, env)
            seed_everything(cfg.seed)
            source = ModelSource(cfg.model, cfg.method, plan.compute_dtype, cfg.seed, cfg.train)
            plan.prepare(source)
            model = getattr(plan.model, "module", plan.model)  # the engine's / DDP's module
            dtypes = sorted({f"{'trainable' if p.requires_grad else 'frozen'}:{p.dtype}" for p in model.parameters()})
            read, checkpoint = source.read_report or (None, None)  # None: from_pretrained read it
            rec = {"read": read, "checkpoint": checkpoint, "held": held_bytes(model), "dtypes": dtypes}
            full = {k: v for k, v in plan.export_tensors(trainable_only=False) if v is not None}
            if env.is_main and cfg.method.get("quantize"):
                # 4-bit weights are not the checkpoint's values: record their bytes, which
                # the test compares between plans (each against transformers' loading)
                rec["digests"] = {k: hashlib.sha1(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                                  for k, v in full.items()}
            elif env.is_main:
                mismatched = []
                for key, value in full.items():
                    ck = checkpoint_key(key)
                    if ck in reference:
                        want = reference.read(ck, torch.float32)
                        if not torch.equal(value.float(), want.to(value.dtype).float()):
                            mismatched.append(ck)
                rec["compared"] = sum(1 for k in full if checkpoint_key(k) in reference)
                rec["mismatched"] = mismatched
            plan.close()
        except Exception:  # recorded per case; the test reports it
            rec = {"error": traceback.format_exc()[-3000:]}
        results[name] = rec
    rank = int(os.environ.get("RANK", 0))
    (out / f"load.rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], json.loads(Path(sys.argv[3]).read_text()))
