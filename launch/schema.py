"""The closed config schema: a run accepts only the keys conf/ defines for the options it chose.

Hydra refuses `train.nope=1` but takes `+train.num_epochs=3`, which nothing reads: the run
would go on without the setting the user believes is in force. The schema is read from the
conf/ yaml files themselves (config.yaml, and each chosen group option with its defaults
list; `@package _global_` presets at the root), so a key added to conf/ is accepted without
a code edit, and conf/ stays the one place a user reads every setting and its default. A
mapping conf/ leaves empty (`parallel.extra_config: {}`, `launcher.sbatch: {}`) is free-form;
a value conf/ gives as a scalar may be given as a list or mapping (`data.train`, `data.eval`).
"""
from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from launch.config import REPO_ROOT, group_option
from trainers.errors import UserError

CONF = REPO_ROOT / "conf"
# What the launcher itself adds to the config it hands the workers (launch/config.finalize,
# launch/validate.prepare_data): never a user's key.
LAUNCHER_KEYS = ("run_dir", "data.prepared")


def _global_package(path: Path) -> bool:
    return any(line.strip().replace(" ", "") == "#@package_global_" for line in path.read_text().splitlines()[:5])


def groups() -> list[str]:
    """The config groups launch.py composes: those its defaults list names (conf/merge/ is
    another entry point's config, python -m launch.merge)."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"), resolve=False)["defaults"]
    named = {k for entry in defaults if isinstance(entry, dict) for k in entry}
    return sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name in named)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _merge(into: dict, node: dict) -> dict:
    for k, v in node.items():
        if isinstance(v, dict) and v and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
    return into


@lru_cache(maxsize=256)
def _option_tree(group: str, option: str) -> dict:
    """What choosing `group=option` contributes, rooted at the config's top."""
    node = group_option(group, option)
    return node if _global_package(CONF / group / f"{option}.yaml") else {group: node}


def schema(choices: dict[str, str] | None) -> dict:
    """Every key conf/ defines for these group choices (None: any option of every group)."""
    top = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"), resolve=False)
    tree = {k: v for k, v in top.items() if k not in ("defaults", "hydra")}
    for group in groups():
        chosen = [choices[group]] if choices and choices.get(group) else options(group)
        for option in chosen:
            _merge(tree, _option_tree(group, option))
    return tree


def _paths(node: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        path = f"{prefix}{k}"
        out.append(path)
        if isinstance(v, dict) and v:
            out += _paths(v, f"{path}.")
    return out


def unknown_keys(cfg: dict, tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        if path in LAUNCHER_KEYS:
            continue
        if k not in tree:
            out.append(path)
        elif isinstance(tree[k], dict) and tree[k] and isinstance(v, dict):
            out += unknown_keys(v, tree[k], f"{path}.")
    return out


def _defined_elsewhere(path: str, choices: dict[str, str]) -> list[str]:
    """`group=option` choices whose conf/ defines `path` (e.g. objective.beta: dpo, ipo...)."""
    found = []
    for group in groups():
        for option in options(group):
            if option == choices.get(group):
                continue
            node = _option_tree(group, option)
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
                if node is None:
                    break
            else:
                found.append(f"{group}={option}")
    return found


def hydra_choices() -> dict[str, str] | None:
    """The group options Hydra composed this run from (None outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra/")}


def check_closed(cfg: DictConfig, choices: dict[str, str] | None = None) -> None:
    """Refuse a key no conf/ file defines for the chosen options, naming the nearest ones."""
    choices = choices or hydra_choices()
    tree = schema(choices)
    bad = unknown_keys(OmegaConf.to_container(cfg, resolve=False), tree)
    if not bad:
        return
    key = bad[0]
    accepted = _paths(tree)
    group = key.split(".")[0]
    same_group = [p for p in accepted if p.startswith(f"{group}.")] or accepted
    nearest = difflib.get_close_matches(key, same_group, n=3, cutoff=0.5) or difflib.get_close_matches(
        key.rsplit(".", 1)[-1], [p.rsplit(".", 1)[-1] for p in same_group], n=3, cutoff=0.5)
    if nearest and "." not in nearest[0] and "." in key:  # matched on the last part: give full paths
        nearest = [p for p in same_group if p.rsplit(".", 1)[-1] in nearest][:3]
    where = _defined_elsewhere(key, choices or {})
    chosen = (f" (it is a setting of {', '.join(where[:6])}, not of the {group}={choices[group]} this run "
              f"chose)" if where and choices and group in choices else "")
    more = f" (and {len(bad) - 1} more: {', '.join(bad[1:4])})" if len(bad) > 1 else ""
    how = (f"choose that option (`{where[0]} {key}=VALUE`)" if chosen else
           f"override an existing one as `{nearest[0] if nearest else group + '.KEY'}=VALUE`, without `+`")
    raise UserError(
        f"`{key}` is not a setting of this launcher{chosen}{more}: nothing would read it, so the run would "
        f"go on without it. Nearest accepted keys: {', '.join(nearest) if nearest else 'none close'}. "
        f"The accepted keys are those conf/ defines for the chosen options (`python launch.py --cfg job` "
        f"prints them): {how}."
    )
