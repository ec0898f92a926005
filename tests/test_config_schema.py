"""The config schema is conf/ and nothing else: defaults live in conf/ (no fallback in code),
a key conf/ does not define is refused, every enumerated setting is honoured or refused,
and a credential typed into the config is refused before anything is printed or written.

Refusals are checked in-process (helpers.refused: launch.main.main with the launcher
replaced by a recorder); what only launch.py's own pre-Hydra check does (a credential on
the command line under `--cfg job`, a run dir Hydra would fail to create) runs as the real
command, once each."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import REPO, launch, launch_in_process, refused

CODE = ("launch", "parallel", "slurm", "trainers")
# `.get("key", ...)` on dicts that are not the config but happen to share a key name with it:
# JSON read from files (a model's config.json, data rows and mixture entries, checkpoint
# metadata written by the plans, run state and summaries, a checkpoint's saved state, a merge report).
NOT_CONFIG = {"src", "entry", "written", "values", "row", "s", "state", "resumed", "report"}


def conf_key_names() -> set[str]:
    names: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k not in ("defaults", "hydra"):
                    names.add(k)
                    walk(v)

    for path in (REPO / "conf").rglob("*.yaml"):
        walk(OmegaConf.to_container(OmegaConf.load(path), resolve=False))
    return names


def test_code_reads_keys_conf_defines_without_a_fallback():
    """`cfg.get("key", default)` (or `.get("key")`, whose default is None) for a key conf/
    defines keeps a second default that can disagree with conf/ (it did: zero3's
    stage3_param_persistence_threshold, 100000 in code and 0 in conf/). Read `cfg.x.y`;
    a key only some options define is read where that option is chosen."""
    keys = conf_key_names()
    found = []
    for package in CODE:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                first = node.args[0]
                if not (isinstance(first, ast.Constant) and first.value in keys):
                    continue
                f = node.func
                if isinstance(f, ast.Attribute) and f.attr == "get" and ast.unparse(f.value) not in NOT_CONFIG:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
                elif isinstance(f, ast.Attribute) and f.attr == "select" and len(node.args) > 1:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                        and len(node.args) == 3 and "cfg" in ast.unparse(node.args[0])
                        and isinstance(node.args[1], ast.Constant) and node.args[1].value in keys):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "config keys read with a fallback default (conf/ holds the default):\n" + "\n".join(found)


# ------------------------------------------------------------------ closed schema
def test_a_key_conf_does_not_define_is_refused_with_the_nearest_ones(tmp_path):
    out = refused(tmp_path, "+train.num_epochs=3")
    assert "`train.num_epochs` is not a setting" in out and "train.max_steps" in out, out
    out = refused(tmp_path, "+optim.lr_schedule=linear")
    assert "`optim.lr_schedule`" in out and "Nearest accepted keys: optim.schedule" in out, out
    # a group's schema is its chosen option's: sft has no beta, dpo has
    out = refused(tmp_path, "objective=sft", "+objective.beta=0.2")
    assert "`objective.beta`" in out and "objective=dpo" in out and "objective=sft" in out, out


def test_keys_the_chosen_options_define_are_accepted(tmp_path):
    """Including free-form mappings conf/ leaves empty and values given as lists/mappings."""
    proc = launch_in_process(tmp_path, "objective=dpo", "data=reverse_pref", "objective.beta=0.2", "parallel=zero2",
                             "+parallel.extra_config.zero_optimization.round_robin_gradients=true",
                             "data.eval={held_out: x.jsonl}", "dry_run=true")
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------ enumerated settings
def option_trees():
    """(group, option, the tree it contributes) for every conf/ option."""
    from launch.schema import _option_tree, groups, options

    return [(g, o, _option_tree(g, o)) for g in groups() for o in options(g)]


def leaves(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict) and v:
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_every_string_setting_in_conf_is_an_enumeration_or_free_text():
    """A new string setting cannot land without its accepted values (launch/choices.py)."""
    from launch.choices import AUTO_OR_NUMBER, CHECKED_ELSEWHERE, CHOICES, FREE_TEXT, NAMED_GROUPS
    from parallel.specs import PIPELINE_SCHEDULES
    from trainers.data.rows import FORMATS
    from trainers.optim import SCHEDULES

    known = {*CHOICES, *CHECKED_ELSEWHERE, *AUTO_OR_NUMBER, *FREE_TEXT, *(f"{g}.name" for g in NAMED_GROUPS)}
    unclassified = set()
    for group, option, tree in option_trees():
        for key, value in leaves(tree):
            if isinstance(value, str) and not value.startswith("${"):
                if key not in known:
                    unclassified.add(f"{key} ({group}={option})")
                if key in CHOICES:
                    assert value in CHOICES[key], (key, value, group, option)
    assert not unclassified, f"add these to launch/choices.py (CHOICES or FREE_TEXT): {sorted(unclassified)}"
    # the table and the modules that honour the values agree
    assert set(CHOICES["data.format"]) == set(FORMATS)
    assert set(CHOICES["optim.schedule"]) == set(SCHEDULES)
    assert set(CHOICES["parallel.schedule"]) == set(PIPELINE_SCHEDULES)


def enumerated_cases():
    """(key, a value outside its set, overrides choosing an option that defines the key)."""
    from launch.choices import AUTO_OR_NUMBER, CHECKED_ELSEWHERE, CHOICES, NAMED_GROUPS

    special = {"method.quantize": "int4", "optim.name": "adamw_8bit", "method.peft": "lokr"}
    keys = [*CHOICES, *CHECKED_ELSEWHERE, *AUTO_OR_NUMBER, *(f"{g}.name" for g in NAMED_GROUPS)]
    listed = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "config.yaml"), resolve=False)["defaults"]
    defaults = {next(iter(d)): d[next(iter(d))] for d in listed if isinstance(d, dict)}
    # the default option first, so that a key it defines is tested on the default run
    trees = sorted(option_trees(), key=lambda t: defaults.get(t[0]) != t[1])
    cases = []
    for key in keys:
        group = key.split(".")[0]
        for g, option, tree in trees:
            node = tree
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None or (isinstance(tree.get(group), dict) and key.split(".")[-1] in tree[group]):
                chosen = [] if defaults.get(g) == option else [f"{g}={option}"]
                if key == "objective.loss_type":
                    chosen.append("data=reverse_pref")
                cases.append((key, special.get(key, "wavy"), chosen))
                break
        else:
            raise AssertionError(f"{key} is in launch/choices.py but no conf/ option defines it")
    return cases


@pytest.mark.parametrize("key, value, chosen", enumerated_cases(), ids=lambda x: x if isinstance(x, str) else None)
def test_an_enumerated_setting_outside_its_set_is_refused(tmp_path, key, value, chosen):
    out = refused(tmp_path, *chosen, f"{key}={value}")
    assert f"{key}={value!r}" in out or f"{key}={value}" in out, out


def test_a_local_model_path_is_estimated_from_its_own_config_json(tmp_path):
    """model=8b model.path=DIR: the estimate and the plans' checks describe DIR's model
    (here a small Qwen-shaped one), not the preset's Llama."""
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True}))
    proc = launch_in_process(tmp_path / "run", "model=8b", f"model.path={tmp_path / 'qwen'}", "dry_run=true")
    assert proc.returncode == 0, proc.stderr
    # Qwen2.5-0.5B's shape (494.03 M with its q/k/v biases, which the Llama-shaped count omits)
    assert "494.01 M params" in proc.stdout and "8.03 B" not in proc.stdout, proc.stdout
    out = refused(tmp_path / "run", "model=8b", f"model.path={tmp_path / 'qwen'}", "parallel=pipeline",
                  "method=full", "launcher.nproc_per_node=2", "dry_run=true")
    assert "ties its input and output embeddings" in out, out  # DIR's tie_word_embeddings, not the preset's


# ------------------------------------------------------------ simple refusals
def test_bad_simple_values_are_refused_naming_them(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    no_type = tmp_path / "no_type"
    no_type.mkdir()
    (no_type / "config.json").write_text('{"hidden_size": 8}')
    for overrides, needles in [
        (["launcher.nproc_per_node=0"], ["launcher.nproc_per_node=0", "positive integer"]),
        (["seed=abc"], ["seed='abc'", "whole number"]),
        ([f"model.path={no_type}"], [str(no_type), "names no model_type"]),
    ]:
        out = refused(tmp_path / "run", *overrides)
        assert all(n in out for n in needles), out
    for run_dir, needle in [(a_file, "is an existing file"), (a_file / "sub", "is a file"),
                            (Path("/proc/llm-launcher-run"), "cannot be written")]:
        out = refused(run_dir)
        assert str(run_dir) in out and needle in out, out


def test_the_command_line_refuses_a_run_dir_hydra_could_not_create(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    proc = launch(f"hydra.run.dir={a_file}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"hydra.run.dir='{a_file}' is an existing file" in proc.stderr, proc.stderr
    # an unknown key on the real command line: one paragraph, exit code 2 (refused before the torch import)
    proc = launch("+train.num_epochs=3", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: `train.num_epochs` is not a setting"), proc.stderr


# ------------------------------------------------------------ credentials
SECRETS = {
    "+model.token=hf_" + "Ab3" * 12: ("`model.token`", "HF_TOKEN"),
    "+model.db_password=hunter2": ("`model.db_password`", "environment variable"),
    "data.name=sk-" + "x9Y" * 10: ("`data.name`", "OPENAI_API_KEY"),
    "+train.wandb_key=" + "0123456789abcdef" * 2 + "01234567": ("`train.wandb_key`", "WANDB_API_KEY"),
}


@pytest.mark.parametrize("override", sorted(SECRETS))
def test_a_credential_in_the_config_is_refused_without_echoing_it(tmp_path, override):
    secret = override.split("=", 1)[1]
    out = refused(tmp_path, override, "dry_run=true")
    assert secret not in out and all(n in out for n in SECRETS[override]), out
    assert not (tmp_path / "config.yaml").exists()


def test_a_credential_on_the_command_line_is_refused_before_hydra_prints_or_writes(tmp_path):
    secret = "hf_" + "Zq7" * 12
    for args in (["--cfg", "job", f"+model.token={secret}"], [f"+model.token={secret}", f"hydra.run.dir={tmp_path}/r"]):
        proc = launch(*args, check=False)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert secret not in proc.stderr and "`model.token`" in proc.stderr and "HF_TOKEN" in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()  # Hydra did not create the run dir (nor write .hydra/ into it)
