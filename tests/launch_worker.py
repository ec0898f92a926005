"""Runs several launches one after another in one process, so a test module's launches
pay the interpreter start and the torch/transformers import once instead of once each
(started by `tests.helpers.launch_many`).

Each launch is what `python launch.py OVERRIDES... hydra.run.dir=RUN_DIR` does once Hydra
has composed the config: `launch.main.main(cfg, RUN_DIR)` (validation, data preparation,
then the local launcher, which trains one process in its own process and spawns torch's
elastic agent for several). Its stdout and stderr, at the file-descriptor level so that
spawned workers' output is caught too, go to LOG.out / LOG.err, and its exit code and
what it left (summary.json, checkpoints/latest: a later launch into the same run dir
replaces them) to RESULTS.json. What only Hydra's own entry point does (`--cfg`, composition
errors, the exit code of the process) is covered by the subprocess launches in
tests/test_cli.py.

`python tests/launch_worker.py SPEC.json RESULTS.json`; SPEC.json is a list of
{"run_dir", "overrides", "log"}, launched in that order (several may share a run dir: a
relaunch resumes)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(spec: Path, results_path: Path) -> None:
    from launch.main import main as launch_main
    from tests.helpers import compose

    results = []
    saved = os.dup(1), os.dup(2)
    for launch in json.loads(spec.read_text()):
        run_dir, overrides, log = launch["run_dir"], launch["overrides"], launch["log"]
        began = time.perf_counter()
        sys.stdout.flush(), sys.stderr.flush()
        with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
            os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
            try:
                code = launch_main(compose(*overrides), run_dir)
            except BaseException as e:  # recorded; the test reports it with the output
                import traceback

                traceback.print_exc()
                code = f"exception: {e!r}"
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        # what this launch left, before a later launch into the same run dir replaces it
        left = {}
        for name in ("summary.json", "checkpoints/latest"):
            path = Path(run_dir) / name
            left[name] = path.read_text() if path.exists() else None
        results.append({"run_dir": run_dir, "code": code, "left": left,
                        "seconds": round(time.perf_counter() - began, 2)})
    results_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
