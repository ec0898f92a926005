"""Model merging (launch/merging/): one real sweep of three short runs of the bundled model
with merge.after_sweep=greedy_soup (`python launch.py -m ...`, one subprocess), whose points
then feed every test: equality with mergekit's own CLI (`mergekit-yaml`) per method, greedy
soup keeping and dropping as the scores say, the refusals, and a merged model trained on
as model.path."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, launch_many

pytestmark = pytest.mark.slow  # a sweep of three short runs, mergekit-yaml and launch.merge subprocesses

SWEEP_ARGS = ["train.max_steps=3", "train.micro_batch_size=4", "train.grad_accum=1", "train.eval_every=1000",
              "train.save_every=1000", "data.metric_rows=2", "data.max_new_tokens=8", "method.dropout=0"]


def merge_cfg(**values):
    """conf/merge/merge.yaml with `values` set (what `python -m launch.merge k=v ...` composes)."""
    from launch.merging.after_sweep import merge_config
    from omegaconf import OmegaConf

    cfg = merge_config(Path("."), values.pop("method", "linear"))
    OmegaConf.set_struct(cfg, False)
    cfg.sweep = None
    for k, v in values.items():
        cfg[k] = v
    return cfg


def merged_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    """`python launch.py -m seed=1,2,3 merge.after_sweep=greedy_soup` on an 8-row eval set."""
    root = tmp_path_factory.mktemp("merge")
    evals = root / "eval.jsonl"
    evals.write_text("\n".join((REPO / "data" / "reverse" / "eval.jsonl").read_text().splitlines()[:8]) + "\n")
    sweep_dir = root / "sweep"
    env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(REPO / "launch.py"), "-m", "seed=1,2,3", *SWEEP_ARGS,
                           f"data.eval={evals}", "merge.after_sweep=greedy_soup", f"hydra.sweep.dir={sweep_dir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    points = [sweep_dir / str(n) for n in range(3)]
    return {"root": root, "dir": sweep_dir, "points": points, "out": proc.stdout, "eval": evals,
            "base": str(yaml.safe_load((points[0] / "config.yaml").read_text())["model"]["path"])}


def test_after_sweep_greedy_soup_keeps_and_drops_as_the_scores_say(sweep):
    out = sweep["dir"] / "merge-greedy_soup"
    rep = json.loads((out / "merge_report.json").read_text())
    assert "merge.after_sweep=greedy_soup" in sweep["out"] and "| **merged (greedy_soup)** |" in sweep["out"]
    scores = {r["path"]: r["scores"]["eval_loss"] for r in rep["rows"] if r["role"].startswith("input")}
    assert len(scores) == 3 and all(math.isfinite(s) for s in scores.values())
    # each input is scored as the run scored itself at its end
    for p in sweep["points"]:
        summary = json.loads((p / "summary.json").read_text())
        assert abs(scores[str(p / "export" / "merged")] - summary["final_eval_loss"]) < 1e-5
    # and on the forgetting probe (eval.probes), a column of its own, again as the run scored itself
    assert "eval_loss/general" in rep["columns"] and "| general loss |" in (out / "merge_report.md").read_text()
    probe = {r["path"]: r["scores"]["eval_loss/general"] for r in rep["rows"] if r["role"].startswith("input")}
    for p in sweep["points"]:
        final = [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]
        final = [m for m in final if "eval_loss/general" in m][-1]["eval_loss/general"]
        assert abs(probe[str(p / "export" / "merged")] - final) < 1e-5
    assert math.isfinite(rep["scores"]["eval_loss/general"])
    _check_greedy(rep, scores, out)


def _check_greedy(rep: dict, scores: dict, out: Path) -> None:
    trace = rep["greedy"]
    assert [g["score"] for g in trace] == sorted(scores.values())  # best (lowest loss) first
    best = trace[0]["soup_score"]
    for g in trace[1:]:
        assert g["kept"] == (g["soup_score"] < best), g
        best = g["soup_score"] if g["kept"] else best
    assert abs(rep["scores"]["eval_loss"] - best) < 1e-6  # the merge is the last kept soup
    kept = [merged_tensors(Path(p)) for p in rep["kept"]]
    got = merged_tensors(out)
    for k in kept[0]:  # a uniform average of the kept inputs
        want = sum(t[k] for t in kept) / len(kept)
        assert float((got[k] - want).abs().max()) <= 1e-6 * max(1.0, float(want.abs().max())), k


def test_greedy_soup_drops_an_input_that_hurts(sweep, tmp_path):
    """The untrained base (eval loss ~7.2) ranks last, and averaging it in makes the soup worse."""
    from launch.merging.run import execute, prepare

    out = tmp_path / "greedy"
    rep = execute(prepare(merge_cfg(method="greedy_soup", inputs=[str(p) for p in sweep["points"][:2]] +
                                    [sweep["base"]], out=str(out))))
    scores = {r["path"]: r["scores"]["eval_loss"] for r in rep["rows"] if r["role"].startswith("input")}
    assert rep["greedy"][-1]["label"] == Path(sweep["base"]).name and not rep["greedy"][-1]["kept"]
    assert str(Path(sweep["base"]).resolve()) not in rep["kept"]
    _check_greedy(rep, scores, out)


# method -> (extra merge_cfg values, the mergekit YAML written by hand: M0..M2 the points' exports, B the base)
CASES = {
    "linear": ({"weights": [1.0, 2.0, 3.0]}, """
merge_method: linear
dtype: float32
parameters: {normalize: true}
models: [{model: "@M0", parameters: {weight: 1.0}}, {model: "@M1", parameters: {weight: 2.0}},
         {model: "@M2", parameters: {weight: 3.0}}]"""),
    "task_arithmetic": ({"lambda": 0.7}, """
merge_method: task_arithmetic
dtype: float32
base_model: "@B"
parameters: {lambda: 0.7}
models: [{model: "@M0", parameters: {weight: 1.0}}, {model: "@M1", parameters: {weight: 1.0}},
         {model: "@M2", parameters: {weight: 1.0}}]"""),
    "ties": ({"density": 0.4}, """
merge_method: ties
dtype: float32
base_model: "@B"
models: [{model: "@M0", parameters: {weight: 1.0, density: 0.4}}, {model: "@M1", parameters: {weight: 1.0, density: 0.4}},
         {model: "@M2", parameters: {weight: 1.0, density: 0.4}}]"""),
    "dare_ties": ({"density": 0.5}, """
merge_method: dare_ties
dtype: float32
base_model: "@B"
models: [{model: "@M0", parameters: {weight: 1.0, density: 0.5}}, {model: "@M1", parameters: {weight: 1.0, density: 0.5}},
         {model: "@M2", parameters: {weight: 1.0, density: 0.5}}]"""),
    "dare_linear": ({"density": 0.5}, """
merge_method: dare_linear
dtype: float32
base_model: "@B"
models: [{model: "@M0", parameters: {weight: 1.0, density: 0.5}}, {model: "@M1", parameters: {weight: 1.0, density: 0.5}},
         {model: "@M2", parameters: {weight: 1.0, density: 0.5}}]"""),
    "slerp": ({"t": 0.3}, """
merge_method: slerp
dtype: float32
base_model: "@M0"
parameters: {t: 0.3}
models: [{model: "@M0"}, {model: "@M1"}]"""),
    "model_stock": ({}, """
merge_method: model_stock
dtype: float32
base_model: "@B"
models: [{model: "@M0"}, {model: "@M1"}, {model: "@M2"}]"""),
}


def test_every_method_equals_mergekit_yaml(sweep, tmp_path):
    """Our merge (mergekit's Python API, streamed) and `mergekit-yaml` on an equivalent config
    written by hand give the same tensors, within 1e-5 relative per tensor; dare_* with the
    same seed (--random-seed) draw the same masks."""
    from launch.merging.run import execute, prepare

    exports = [str(p / "export" / "merged") for p in sweep["points"]]
    procs = {}
    for method, (values, text) in CASES.items():
        for i, e in enumerate(exports):
            text = text.replace(f"@M{i}", e)
        (tmp_path / f"{method}.yml").write_text(text.replace("@B", sweep["base"]))
        procs[method] = subprocess.Popen(
            [str(Path(sys.executable).parent / "mergekit-yaml"), str(tmp_path / f"{method}.yml"),
             str(tmp_path / f"cli-{method}"), "--random-seed", "0", "--no-copy-tokenizer", "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for method, (values, _) in CASES.items():
        inputs = [str(p) for p in sweep["points"][: 2 if method == "slerp" else 3]]
        execute(prepare(merge_cfg(method=method, inputs=inputs, out=str(tmp_path / method), eval=False, seed=0,
                                  **values)))
    for method, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        ours, theirs = merged_tensors(tmp_path / method), merged_tensors(tmp_path / f"cli-{method}")
        assert set(ours) == set(theirs) and ours, method
        base = merged_tensors(Path(exports[0]))
        moved = 0
        for k, v in theirs.items():
            assert float((ours[k] - v).abs().max()) <= 1e-5 * max(float(v.abs().max()), 1e-12), (method, k)
            moved += int(not (v == base[k]).all())
        assert moved, method  # not a copy of the first input


@pytest.mark.parametrize("case", ["still training", "preempted", "missing export", "shapes", "slerp of three",
                                  "model_stock of two", "out exists"])
def test_refusals_name_the_input_and_write_nothing(sweep, tmp_path, case):
    from launch.merging.run import prepare
    from trainers.errors import UserError

    p0, p1, p2 = sweep["points"]
    bad = tmp_path / "bad"
    inputs, values, expect = [str(p0), str(bad)], {}, None
    if case in ("still training", "preempted", "missing export"):
        shutil.copytree(p1, bad, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
        if case == "still training":
            (bad / "summary.json").unlink()
            expect = "still training"
        elif case == "preempted":
            summary = json.loads((bad / "summary.json").read_text())
            (bad / "summary.json").write_text(json.dumps({**summary, "status": "preempted"}))
            expect = "'preempted'"
        else:
            shutil.rmtree(bad / "export" / "merged")
            expect = "export is missing"
    elif case == "shapes":
        from tests.conftest import build_tiny_model

        build_tiny_model(bad, layers=4, hidden=64)  # same tensor names, other shapes
        expect = "shape"
    elif case == "slerp of three":
        inputs, values, expect, bad = [str(p0), str(p1), str(p2)], {"method": "slerp"}, "exactly two", p2
    elif case == "model_stock of two":
        inputs, values, expect, bad = [str(p0), str(p1)], {"method": "model_stock"}, "at least three", p1
    else:
        inputs, expect = [str(p0), str(p1)], "already exists"
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        prepare(merge_cfg(inputs=inputs, out=str(out), **values))
    assert expect in str(e.value) and (str(bad) in str(e.value) or case == "out exists"), str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "bad") == (["out"] if case == "out exists" else [])
    assert not list(tmp_path.glob(".out.partial-*"))


def test_cli_dry_run_and_refusal(sweep):
    """`python -m launch.merge ... dry_run=true` prints the plan and its memory estimate and
    writes nothing; a refusal exits 2 with one paragraph on stderr."""
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    p0, p1, p2 = sweep["points"]
    out = sweep["root"] / "dry"
    proc = subprocess.run([sys.executable, "-m", "launch.merge", "method=ties", f"inputs=[{p0},{p1},{p2}]",
                           f"out={out}", "dry_run=true"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory estimate: peak ~" in proc.stdout and "merge_method: ties" in proc.stdout
    assert f"base_model: {sweep['base']}" in proc.stdout and not out.exists()
    proc = subprocess.run([sys.executable, "-m", "launch.merge", "method=slerp", f"inputs=[{p0},{p1},{p2}]",
                           f"out={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stderr.startswith("error: method=slerp got 3 inputs"), proc.stderr[-2000:]
    assert not out.exists()


def test_merged_model_trains_on_as_model_path(sweep, tmp_path):
    merged = sweep["dir"] / "merge-greedy_soup"
    run = tmp_path / "next"
    launch_many(tmp_path, {"next": (run, [f"model.path={merged}", *SWEEP_ARGS, "train.max_steps=2",
                                         f"data.eval={sweep['eval']}"])})
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == 2
    # it starts where the merge ends: step 0's eval is the merge's own score
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    rep = json.loads((merged / "merge_report.json").read_text())
    assert abs(first["eval_loss"] - rep["scores"]["eval_loss"]) < 1e-5


@pytest.mark.parametrize("value, needle", [("soup", "this is a single run (no -m)"),
                                           ("blend", "merge.after_sweep='blend' is not a merge method")])
def test_after_sweep_is_checked_before_anything_starts(tmp_path, value, needle):
    from tests.helpers import launch_in_process

    proc = launch_in_process(tmp_path / "run", f"merge.after_sweep={value}")
    assert proc.returncode == 2 and needle in proc.stderr and not proc.calls, proc.stderr[-2000:]


# ------------------------------------------------------------------ adapters=true (PEFT)
def _peft_reference(base: str, adapter_dirs: list, weights: list, ctype: str, density=None, seed: int = 0):
    """PEFT itself: the adapters loaded on the base, add_weighted_adapter called directly."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      str(adapter_dirs[0]), adapter_name="a0")
    for k, a in enumerate(adapter_dirs[1:], 1):
        model.load_adapter(str(a), adapter_name=f"a{k}")
    torch.manual_seed(seed)
    model.add_weighted_adapter([f"a{k}" for k in range(len(adapter_dirs))], weights, "m", combination_type=ctype,
                               density=density)
    model.set_adapter("m")
    return model


def _rank8_adapter(base: str, out: Path) -> Path:
    """An adapter of another rank on the same base (PEFT's own, non-zero B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.mul_(0.05)
    model.save_pretrained(str(out))
    return out


# (method, merge_cfg values, PEFT combination_type, weights handed to PEFT, density)
ADAPTER_CASES = [
    ("task_arithmetic", {"weights": [1.0, -0.5, 0.7], "lambda": 0.8}, "cat", [0.8, -0.4, 0.56], None),
    ("ties", {"density": 0.4}, "ties_svd", [1.0, 1.0, 1.0], 0.4),
    ("dare_linear", {"density": 0.5, "seed": 3}, "dare_linear_svd", [1.0, 1.0, 1.0], 0.5),
    ("ties", {"density": 0.4, "combination": "ties"}, "ties", [1.0, 1.0, 1.0], 0.4),
    ("linear", {"combination": "cat", "weights": [1.0, 3.0]}, "cat", [0.25, 0.75], None),  # ranks 16 and 8
]


def test_adapters_equal_peft_add_weighted_adapter(sweep, tmp_path):
    """adapters=true writes PEFT's own combined adapter (out/adapter) and the base with it merged
    (out), tensor for tensor and logit for logit against add_weighted_adapter called here; a
    cat of ranks 16 and 8 works; the linear soup of adapters equals the soup of the merged models."""
    import torch
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from launch.merging.run import execute, prepare

    runs = [str(p) for p in sweep["points"]]
    adapters = [p / "export" / "adapter" for p in sweep["points"]]
    rank8 = _rank8_adapter(sweep["base"], tmp_path / "rank8")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 11]])
    for k, (method, values, ctype, weights, density) in enumerate(ADAPTER_CASES):
        inputs, dirs = (runs, adapters) if method != "linear" else ([runs[0], str(rank8)], [adapters[0], rank8])
        out = tmp_path / f"out{k}"
        rep = execute(prepare(merge_cfg(method=method, inputs=inputs, out=str(out), eval=False, adapters=True,
                                        **values)))
        assert rep["peft"]["add_weighted_adapter"]["combination_type"] == ctype
        ref = _peft_reference(sweep["base"], dirs, weights, ctype, density, int(values.get("seed", 0)))
        want = {k2.replace(".m.", "."): v for k2, v in get_peft_model_state_dict(ref, adapter_name="m").items()}
        got = load_file(out / "adapter" / "adapter_model.safetensors")
        assert set(got) == set(want) and got, (method, sorted(set(got) ^ set(want))[:4])
        for name, v in want.items():
            assert torch.allclose(got[name], v, rtol=1e-5, atol=1e-7), (method, name)
        merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)  # an ordinary export
        with torch.no_grad():
            theirs, ours = ref(input_ids=ids).logits, merged(input_ids=ids).logits
        assert float((ours - theirs).abs().max()) <= 1e-4 * float(theirs.abs().max()), method
        if method == "linear":  # cat: exactly the weighted sum of the deltas, as a soup of merged models
            base = merged_tensors(Path(sweep["base"]))
            one = merged_tensors(Path(runs[0]) / "export" / "merged")
            eight = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sweep["base"], dtype=torch.float32),
                                              str(rank8)).merge_and_unload().state_dict()
            got_m = merged_tensors(out)
            for n, b in base.items():
                want_m = b + 0.25 * (one[n] - b) + 0.75 * (eight[n] - b)
                assert float((got_m[n] - want_m).abs().max()) <= 1e-5 * max(1.0, float(want_m.abs().max())), n


@pytest.mark.parametrize("case", ["mixed bases", "not an adapter", "slerp", "ranks"])
def test_adapters_refusals_write_nothing(sweep, tmp_path, case):
    from launch.merging.run import prepare
    from trainers.errors import UserError

    p0, p1, _ = sweep["points"]
    values, inputs = {}, [str(p0), str(p1)]
    if case == "mixed bases":
        from tests.conftest import build_tiny_model

        other = build_tiny_model(tmp_path / "other-base")
        bad = shutil.copytree(p1 / "export" / "adapter", tmp_path / "bad")
        conf = json.loads((bad / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps({**conf, "base_model_name_or_path": str(other)}))
        inputs, expect = [str(p0), str(bad)], "trained on different ones"
    elif case == "not an adapter":
        inputs, expect, bad = [str(p0), sweep["base"]], "not a run with a PEFT adapter", sweep["base"]
    elif case == "slerp":
        values, expect, bad = {"method": "slerp"}, "no form of method=slerp", "linear, task_arithmetic, ties"
    else:
        bad = _rank8_adapter(sweep["base"], tmp_path / "bad")
        inputs, values, expect = [str(p0), str(bad)], {"method": "ties", "combination": "ties"}, "one rank"
    with pytest.raises(UserError) as e:
        prepare(merge_cfg(inputs=inputs, out=str(tmp_path / "out"), adapters=True, **values))
    assert expect in str(e.value) and str(bad) in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
