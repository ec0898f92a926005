"""Put on PYTHONPATH with RSS_PROBE_DIR set (bench/rank_fixed.py does): every Python process of
a run writes RSS_PROBE_DIR/<pid>.json at exit, saying where its resident memory came from.

- imports: the RSS each top-level package added when it was first imported from outside
  another package's import (so `peft` includes what peft pulls in, e.g. bitsandbytes).
- phases: VmRSS / VmHWM after each named point of trainers/loop.py's run_job (process group,
  tokenizer, data, model built and sharded, each step), by wrapping the names run_job calls.

Measurement only: nothing is patched unless RSS_PROBE_DIR is set."""
import atexit
import json
import os
import sys
import time

OUT = os.environ.get("RSS_PROBE_DIR")


def _mem():
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                got[line[:5]] = int(line.split()[1]) / 1024
    return got["VmRSS"], got["VmHWM"]


if OUT:
    import builtins
    import functools

    _imports, _phases, _depth, _where = {}, [], [0], {}

    def _caller():
        """file:line of the innermost frame outside the import machinery and this file."""
        try:
            f = sys._getframe(2)
        except ValueError:  # imported from the top of the interpreter's own start-up
            return "?"
        while f and ("importlib" in f.f_code.co_filename or f.f_code.co_filename == __file__):
            f = f.f_back
        return f"{f.f_code.co_filename.split('site-packages/')[-1]}:{f.f_lineno}" if f else "?"

    _orig_import = builtins.__import__

    def _import(name, globals=None, locals=None, fromlist=(), level=0):
        top = name.split(".")[0]
        if level or _depth[0] or top in sys.modules or top in _imports:
            return _orig_import(name, globals, locals, fromlist, level)
        before = _mem()[0]
        _depth[0] += 1
        try:
            return _orig_import(name, globals, locals, fromlist, level)
        finally:
            _depth[0] -= 1
            _imports[top] = round(_mem()[0] - before, 1)
            _where[top] = [len(_phases), _caller()]

    builtins.__import__ = _import

    def phase(name):
        rss, hwm = _mem()
        _phases.append([name, round(rss), round(hwm), round(time.time(), 2)])

    def _after(fn, label):
        @functools.wraps(fn)
        def inner(*a, **k):
            out = fn(*a, **k)
            phase(label)
            return out
        return inner

    def _patch_loop(loop):
        for name, label in (("init_distributed", "process group"), ("load_tokenizer", "tokenizer"),
                            ("get_objective", "objective"), ("training_batches", "data"),
                            ("ModelSource", "model source"), ("Checkpointer", "checkpointer"),
                            ("MetricsLogger", "metrics logger"), ("EvalRounds", "eval rounds")):
            setattr(loop, name, _after(getattr(loop, name), label))
        run_job = loop.run_job

        def patched_run_job(cfg, plan, *a, **k):
            phase("run_job start (imports done)")
            plan.prepare = _after(plan.prepare, "model built (plan.prepare)")
            steps = [0]
            fb, st = plan.forward_backward, plan.step

            def forward_backward(*x, **y):
                out = fb(*x, **y)
                phase(f"step {steps[0] + 1} forward+backward")
                return out

            def step(*x, **y):
                out = st(*x, **y)
                steps[0] += 1
                phase(f"step {steps[0]} optimizer")
                return out
            plan.forward_backward, plan.step = forward_backward, step
            return run_job(cfg, plan, *a, **k)
        loop.run_job = patched_run_job

    class _Hook:
        """Patch trainers.loop as soon as it has been executed."""
        def find_spec(self, fullname, path=None, target=None):
            if fullname != "trainers.loop":
                return None
            sys.meta_path.remove(self)
            try:
                import importlib.util
                spec = importlib.util.find_spec(fullname)
            finally:
                sys.meta_path.insert(0, self)
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                _patch_loop(module)
            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, _Hook())

    def _dump():
        phase("exit")
        json.dump({"argv": sys.argv, "rank": os.environ.get("RANK"), "imports": _imports, "imported_at": _where, "phases": _phases},
                  open(os.path.join(OUT, f"{os.getpid()}.json"), "w"), indent=0)

    atexit.register(_dump)
