"""Config helpers shared by the entry point, the workers and the SLURM jobs."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from trainers.files import atomic_write

REPO_ROOT = Path(__file__).resolve().parent.parent


def register_resolvers() -> None:
    """`${repo:path}` makes bundled assets work from any working directory;
    `${unless_set:${train.epochs},200}` is 200 while train.epochs is null and null once it
    is set, so a setting with an alternative (max_steps / epochs, warmup_steps /
    warmup_ratio) is turned off by giving the other one alone."""
    if not OmegaConf.has_resolver("repo"):
        OmegaConf.register_new_resolver("repo", lambda p="": str(REPO_ROOT / p))
    if not OmegaConf.has_resolver("unless_set"):
        OmegaConf.register_new_resolver("unless_set", lambda other, value: value if other is None else None)


def finalize(cfg: DictConfig, run_dir: str) -> DictConfig:
    """Resolve every interpolation (Hydra's included) into a plain, self-contained config
    that workers on other machines can load without Hydra."""
    with open_dict(cfg):
        cfg.run_dir = str(Path(run_dir).resolve())
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.set_struct(resolved, True)
    return resolved


def save(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, OmegaConf.to_yaml(cfg))


def world_size(cfg: DictConfig) -> int:
    """Processes in the run: launcher=local names them per node, launcher=slurm per node
    (one task per GPU) times nodes."""
    launcher = cfg.launcher
    if launcher.name == "local":
        return int(launcher.nproc_per_node)
    return int(launcher.gpus_per_node) * nodes(cfg)


def nodes(cfg: DictConfig) -> int:
    """Machines the run spans: launcher=slurm's `nodes`, this one for launcher=local."""
    return int(cfg.launcher.nodes) if cfg.launcher.name == "slurm" else 1


def load(path: str | Path) -> DictConfig:
    cfg = OmegaConf.load(path)
    OmegaConf.set_struct(cfg, True)
    return cfg


def group_option(group: str, name: str) -> dict:
    """One option of a config group (conf/GROUP/NAME.yaml) with its defaults list applied,
    as a plain dict: lets the launcher ask about another plan or method (suggestions)
    without composing a whole new Hydra config."""
    path = REPO_ROOT / "conf" / group / f"{name}.yaml"
    node = OmegaConf.load(path)
    merged = OmegaConf.create({})
    defaults = node.pop("defaults", None) or ["_self_"]
    if "_self_" not in defaults:
        defaults = [*defaults, "_self_"]
    for entry in defaults:
        merged = OmegaConf.merge(merged, node if entry == "_self_" else group_option(group, entry))
    return OmegaConf.to_container(merged, resolve=False)
