"""Run the real CLI in a subprocess and read what it wrote."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cannot_run(reason: str) -> None:
    """A test whose real component (the SLURM cluster, a tmpfs mount) cannot run here:
    skipped on a developer's machine, failed under CI=true (the CI sets it, .ci/run), so a
    green CI means every real component ran."""
    import pytest

    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"CI=true and this test cannot run its real component: {reason}", pytrace=False)
    pytest.skip(reason)

# Small, fast, deterministic settings shared by most tests (no dropout so that runs
# split differently over micro-batches/ranks are comparable).
FAST = [
    "train.max_steps=10",
    "train.micro_batch_size=4",
    "train.grad_accum=2",
    "train.eval_every=1000",
    "train.save_every=1000",
    "data.metric_rows=8",
    "method.dropout=0",
]


def launch(*overrides: str, timeout: int = 600, env: dict | None = None, check: bool = True):
    """`python launch.py OVERRIDES...` in a fresh process; returns CompletedProcess."""
    full_env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *overrides],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss (the last record wins, as after a resume)."""
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def fast_for(method: str) -> list[str]:
    """FAST without `method.dropout` for method=full (it has no dropout key)."""
    return [o for o in FAST if method != "full" or not o.startswith("method.dropout")]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def exported(run_dir: Path) -> dict:
    """Every tensor of export/adapter and export/merged, keyed "adapter/..." / "merged/..."."""
    from safetensors.torch import load_file

    out = {}
    for kind in ("adapter", "merged"):
        for f in sorted((Path(run_dir) / "export" / kind).glob("*.safetensors")):
            out.update({f"{kind}/{k}": v for k, v in load_file(f).items()})
    return out


def assert_resumed_exactly(run_dir: Path, uninterrupted: Path, steps: int = 10) -> None:
    """A relaunched run ends exactly like the run that was never interrupted: per-step
    losses and final eval loss to 1e-6."""
    ref, got = losses(uninterrupted), losses(run_dir)
    assert sorted(got) == list(range(1, steps + 1))
    for s in ref:
        assert rel(got[s], ref[s]) < 1e-6, (s, got[s], ref[s])
    final = summary(run_dir)
    assert final["status"] == "completed" and final["final_step"] == steps
    assert rel(final["final_eval_loss"], summary(uninterrupted)["final_eval_loss"]) < 1e-6


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 300, what: str = "condition") -> None:
    """Poll `predicate` while the run `proc` (from `start`) is alive; fail with its output
    if it ends first."""
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {Path(proc.log).read_text()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def start(run_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    """`python launch.py OVERRIDES... hydra.run.dir=RUN_DIR` in the background, in a session
    of its own; its output goes to RUN_DIR.log (`proc.log`)."""
    log = Path(f"{run_dir}.log")
    full_env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1", **(env or {}))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), *overrides, f"hydra.run.dir={run_dir}"],
                                cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.log = log
    return proc


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker (torch's elastic agent starts each worker in a
    session of its own, so killing the launcher's group alone is not enough)."""
    import psutil

    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    for p in [proc.pid, *(w.pid for w in workers)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(workers, timeout=30)


def kill_once_committed(proc: subprocess.Popen, run_dir: Path, timeout: float = 300) -> int:
    """SIGKILL the run as soon as a checkpoint is committed; returns its step."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    try:
        wait_until(latest.exists, proc, timeout, str(latest))
    finally:
        kill_tree(proc)
    return int(latest.read_text().strip().removeprefix("step_"))


def launched_once(root: Path):
    """For module-scoped fixtures: get(name, *overrides) launches `name` into root/name the
    first time and returns (run dir, launcher output) ever after."""
    done: dict[str, tuple[Path, str]] = {}

    def get(name: str, *overrides: str) -> tuple[Path, str]:
        if name not in done:
            run_dir = Path(root) / name
            proc = launch(*overrides, f"hydra.run.dir={run_dir}")
            done[name] = (run_dir, proc.stdout + proc.stderr)
        return done[name]

    return get


def assert_trains_like(run_dir: Path, ref_dir: Path, steps: int = 10) -> None:
    """Every step's loss, learning rate and pre-clip global grad norm equal the reference
    run's. A wrong loss scale (over ranks or accumulation) or a per-shard norm shows in the
    norm even where Adam's scale invariance hides it in the losses."""
    ref = {r["step"]: r for r in metrics(ref_dir) if "loss" in r}
    got = {r["step"]: r for r in metrics(run_dir) if "loss" in r}
    assert sorted(got) == sorted(ref) == list(range(1, steps + 1))
    for s in ref:
        assert rel(got[s]["loss"], ref[s]["loss"]) < 1e-5, (s, got[s], ref[s])
        assert rel(got[s]["lr"], ref[s]["lr"]) < 1e-9, (s, got[s], ref[s])
        assert math.isfinite(got[s]["grad_norm"]) and got[s]["grad_norm"] > 0, (s, got[s])  # a norm was measured
        assert rel(got[s]["grad_norm"], ref[s]["grad_norm"]) < 1e-4, (s, got[s], ref[s])


def assert_same_export(run_dir: Path, ref_dir: Path) -> None:
    """The exported safetensors hold the same tensors (names, dtypes, shapes, values to 1e-5)."""
    ref_w, got_w = exported(ref_dir), exported(run_dir)
    assert ref_w and set(got_w) == set(ref_w)
    for k, v in ref_w.items():
        assert got_w[k].dtype == v.dtype and got_w[k].shape == v.shape, k
        assert float((got_w[k].float() - v.float()).abs().max()) < 1e-5, k


def worker(proc: subprocess.Popen, rank: int):
    """The psutil.Process of training worker `rank` under the launcher `proc` (found by the
    RANK its elastic agent gave it), to inject a fault into that one process."""
    import psutil

    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank) and "launch.worker" in p.cmdline():
                return p
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank} under pid {proc.pid}")


def launch_many(root: Path, launches: dict[str, tuple[Path, list[str]]], timeout: int = 1800,
                check: bool = True) -> dict[str, subprocess.CompletedProcess]:
    """Several launches, in this order, in ONE process (tests/launch_worker.py: each is
    `launch.main.main` on the config `python launch.py OVERRIDES hydra.run.dir=RUN_DIR`
    composes): name -> (run dir, overrides) gives name -> CompletedProcess with the launch's
    exit code, stdout and stderr. The torch/transformers import and interpreter start are
    paid once. Each CompletedProcess also has `left`: the run dir's summary.json (a dict)
    and checkpoints/latest (its text) as this launch left them, or None. `check`: every
    launch must exit 0."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    spec = [{"run_dir": str(run_dir), "overrides": list(overrides), "log": str(root / f"launch-{name}")}
            for name, (run_dir, overrides) in launches.items()]
    (root / "launches.json").write_text(json.dumps(spec, indent=1))
    env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "launch_worker.py"), str(root / "launches.json"),
                           str(root / "results.json")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"tests/launch_worker.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    results = json.loads((root / "results.json").read_text())
    out = {}
    for (name, _), entry, result in zip(launches.items(), spec, results, strict=True):
        log = Path(entry["log"])
        out[name] = subprocess.CompletedProcess(entry["overrides"], result["code"], Path(f"{log}.out").read_text(),
                                                Path(f"{log}.err").read_text())
        left = result["left"]
        out[name].left = {"summary": json.loads(left["summary.json"]) if left["summary.json"] else None,
                          "latest": (left["checkpoints/latest"] or "").strip() or None}
        if check and result["code"] != 0:
            raise AssertionError(f"launch {name} failed ({result['code']}):\n{out[name].stdout[-4000:]}\n"
                                 f"{out[name].stderr[-6000:]}")
    return out


def compose(*overrides: str):
    """The config `python launch.py OVERRIDES...` composes (Hydra's compose API, no run dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from launch.config import register_resolvers

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as Hydra's entry point does: runtime.choices
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def launch_in_process(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python launch.py OVERRIDES... hydra.run.dir=RUN_DIR` in this process, up to the point
    where it would start training: launch.main.main on the composed config, with the
    launcher (local or slurm) replaced by a recorder. Returns a CompletedProcess (exit
    code, what it printed on stdout, on stderr with its log lines) whose `calls` lists the
    (cfg, config_path) the launcher was handed: empty when refused."""
    import contextlib
    import io
    import logging
    from unittest import mock

    import launch.main as entry

    calls: list = []
    cfg = compose(*overrides)
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with mock.patch.object(entry, "launcher_for", lambda name: lambda *a: calls.append(a) or 0), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = entry.main(cfg, str(run_dir))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    proc = subprocess.CompletedProcess(list(overrides), code, out.getvalue(), err.getvalue())
    proc.calls = calls
    return proc


def refused(run_dir: Path, *overrides: str) -> str:
    """What `python launch.py OVERRIDES... hydra.run.dir=RUN_DIR` refuses, checked in-process
    (launch_in_process): exit code 2, one `error: ...` paragraph and no traceback, and
    nothing handed to the launcher, so no process spawned and no job submitted. Returns
    the output (stdout + stderr)."""
    metrics_file = Path(run_dir) / "metrics.jsonl"
    before = metrics_file.read_bytes() if metrics_file.exists() else None  # a resumed run has some
    proc = launch_in_process(run_dir, *overrides)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and not proc.calls, (proc.returncode, text)
    assert "error: " in proc.stderr and "Traceback" not in text, text
    assert (metrics_file.read_bytes() if metrics_file.exists() else None) == before, "training started"
    return text


def data_cfg(**kw):
    """A `data` config with the settings the tokenizing code reads, for in-process data tests
    (the conf/data/common.yaml values those tests do not vary)."""
    from omegaconf import OmegaConf

    base = dict(format="auto", max_seq_len=64, truncation=True, on_bad_row="error", packing=True, num_proc=1,
                columns={})
    base.update(kw)
    return OmegaConf.create(base)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def bundled_head(root: Path, dataset: str, rows: dict[str, int]) -> list[str]:
    """The first rows[split] rows of each split of data/<dataset>, written under `root`, as
    data.<split>=PATH overrides (a short run on real bundled rows)."""
    out = []
    for split, n in rows.items():
        path = root / f"{split}.jsonl"
        path.write_text("".join((REPO / "data" / dataset / f"{split}.jsonl").read_text().splitlines(True)[:n]))
        out.append(f"data.{split}={path}")
    return out
