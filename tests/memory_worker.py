"""Runs several training jobs one after another in the same worker processes (one
process start for all of them, like matrix_worker.py), counting two things each job's
forward passes do, through global module hooks (the real modules, nothing replaced):

- `mlp_calls`: training-mode calls of the decoder layers' MLP blocks (counted as they start: a
  recomputation stops early, inside the MLP's last projection, once it has what backward
  needs). Activation checkpointing recomputes every layer in backward: twice the calls.
- `head_losses`: lm_head calls that returned the chunked loss (a 0-d tensor) instead of
  logits.

Started by test_memory_options.py as
`python [-m torch.distributed.run --nproc_per_node 2] tests/memory_worker.py OUT RUNS_JSON`,
RUNS_JSON mapping a run name to its Hydra overrides; each rank writes OUT/counts.rankR.json.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class Counts:
    def __init__(self):
        self.mlp_calls = 0
        self.head_losses = 0

    def before(self, module, args):
        if module.training and type(module).__name__.endswith("MLP"):
            self.mlp_calls += 1

    def after(self, module, args, output):
        import torch

        if isinstance(module, torch.nn.Linear) and isinstance(output, torch.Tensor) and output.dim() == 0:
            self.head_losses += 1


def main(out: Path, runs: dict[str, list[str]]) -> None:
    import torch
    from hydra import compose, initialize_config_dir

    from launch.config import finalize, register_resolvers
    from launch.quiet import quiet_libraries
    from launch.worker import setup_logging
    from parallel import build_plan
    from trainers.loop import train

    setup_logging()
    quiet_libraries()
    register_resolvers()
    results = {}
    for name, overrides in runs.items():
        with initialize_config_dir(str(REPO / "conf"), version_base=None):
            cfg = finalize(compose("config", overrides=overrides), str(out / name))
        counts = Counts()
        hooks = [torch.nn.modules.module.register_module_forward_pre_hook(counts.before),
                 torch.nn.modules.module.register_module_forward_hook(counts.after)]
        try:
            summary = train(cfg, build_plan, leave_process_group=True)
            results[name] = {"status": summary["status"]}
        except Exception:  # recorded per run; the test reports it
            results[name] = {"status": "error", "error": traceback.format_exc()[-3000:]}
        finally:
            for hook in hooks:
                hook.remove()
        results[name].update(mlp_calls=counts.mlp_calls, head_losses=counts.head_losses)
    rank = int(os.environ.get("RANK", 0))
    (out / f"counts.rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))
