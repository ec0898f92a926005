"""Our side of bench/sft_vs_trl.py: `python launch.py OVERRIDES...`, unchanged, plus RSS.

Usage: python bench/_ours_launch.py SRC_DIR RESULT_JSON launch-overrides...
SRC_DIR holds launch.py and its packages (the driver passes a snapshot of the repo).

Runs launch.py with runpy in this process (nproc_per_node=1 trains in-process), so
ru_maxrss(RUSAGE_SELF) at exit is the peak RSS of the whole run. The only additions are
measurements: ru_maxrss when MetricsLogger is created (after data, model and optimizer
are built, right before step 1), so import/model footprint and training growth can be
told apart; and the process CPU time at each logged step (tokens per CPU-second is much
less sensitive than wall-clock tokens/s to other processes on a shared machine).
"""
import json
import resource
import runpy
import sys
import time
from pathlib import Path


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def main() -> None:
    src, result_path, overrides = Path(sys.argv[1]).resolve(), sys.argv[2], sys.argv[3:]
    sys.path.insert(0, str(src))
    import torch

    import trainers.metrics.sinks as metrics

    snapshot = {"cpu_s": {}}
    original_init, original_log = metrics.MetricsLogger.__init__, metrics.MetricsLogger.log

    def init(self, *a, **k):
        snapshot["rss_train_start_kib"] = maxrss_kib()
        original_init(self, *a, **k)

    def log(self, record):
        if "loss" in record:  # a train step: process CPU time next to metrics.jsonl's elapsed_s
            snapshot["cpu_s"][record["step"]] = time.process_time()
        original_log(self, record)

    metrics.MetricsLogger.__init__, metrics.MetricsLogger.log = init, log
    assert Path(metrics.__file__).is_relative_to(src), metrics.__file__
    sys.argv = [str(src / "launch.py"), *overrides]
    code = 0
    try:
        runpy.run_path(str(src / "launch.py"), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    Path(result_path).write_text(json.dumps(
        {"peak_rss_kib": maxrss_kib(), "threads": torch.get_num_threads(), "exit_code": code, **snapshot}
    ))
    sys.exit(code)


if __name__ == "__main__":
    main()
