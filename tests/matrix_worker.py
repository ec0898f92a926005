"""Runs many (plan, method) cells in the same 2 workers, so the full compatibility
matrix costs one process start instead of one per cell. Started by test_matrix.py (and
test_preference_plans.py) with
`python -m torch.distributed.run --nproc_per_node 2 tests/matrix_worker.py OUT MODEL DATA CELLS...`.

A cell is `plan:method`, optionally followed by `|override|override...` (Hydra overrides
applied after the cell's defaults, e.g. `ddp:lora|objective=dpo|data.train=PATH`)."""
from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cell_overrides(plan: str, method: str, model: str, data: str) -> list[str]:
    """Every optimizer step sees the same 4 rows (the whole data file), so the loss must
    fall: 2 rows per rank x 2 data-parallel ranks, or for the pipeline (one data-parallel
    rank) 2 x 2 accumulated rows split into 2 pipeline micro-batches. No LoRA dropout: which
    rank draws which mask would depend on the batch order."""
    from launch.config import group_option

    return [
        f"parallel={plan}", f"method={method}", "launcher.nproc_per_node=2", f"model.path={model}",
        f"data.train={data}", "data.eval=null", "data.packing=false", "train.max_steps=4",
        "train.micro_batch_size=2", "train.grad_accum=1", "train.save_every=2",
        "optim.warmup_steps=0", "optim.schedule=constant",
    ] + (["parallel.microbatches=2", "train.grad_accum=2"] if plan == "pipeline" else []) + (
        ["method.dropout=0"] if "dropout" in group_option("method", method) else [])


def parse_cell(cell: str) -> tuple[str, str, list[str]]:
    head, *extra = cell.split("|")
    plan, method = head.split(":")
    return plan, method, extra


def cell_dir(cell: str) -> str:
    """The cell's run directory name under OUT: `plan-method` for plain cells."""
    return re.sub(r"[^\w.=-]+", "_", cell.replace(":", "-").replace("|", "+"))[:120]


def main(out: Path, model: str, data: str, cells: list[str]) -> None:
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
    for cell in cells:
        plan, method, extra = parse_cell(cell)
        overrides = cell_overrides(plan, method, model, data) + extra
        with initialize_config_dir(str(REPO / "conf"), version_base=None):
            cfg = finalize(compose("config", overrides=overrides), str(out / cell_dir(cell)))
        began = time.perf_counter()
        try:
            summary = train(cfg, build_plan, leave_process_group=True)
            results[cell] = {"status": summary["status"]}
        except Exception:  # recorded per cell; the test reports it
            results[cell] = {"status": "error", "error": traceback.format_exc()[-2000:]}
        results[cell]["seconds"] = round(time.perf_counter() - began, 2)  # what each cell adds to the launch
    if int(os.environ.get("RANK", 0)) == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:])
