"""launcher=local: in-process for one worker, torch's elastic launcher for several."""
from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path

from trainers.errors import TrainingError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(cfg, config_path: Path) -> int:
    n = int(cfg.launcher.nproc_per_node)
    if n == 1:
        from launch.worker import run, setup_logging

        setup_logging()
        return run(cfg)

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = cfg.launcher.master_port or free_port()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=n,
        run_id=f"run-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "launch.worker", str(config_path))
    except SignalException as e:
        # The workers got the same signal, saved a checkpoint at the next step boundary and
        # wrote summary.json with status "preempted"; relaunching resumes.
        print(f"stopped by signal {e.sigval.name}: relaunch with hydra.run.dir={cfg.run_dir} to resume",
              file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        failures = ", ".join(f"rank {r} exit code {f.exitcode}" for r, f in sorted(e.failures.items()))
        raise TrainingError(f"A worker failed ({failures}); its error is printed above.") from None
    return 0
