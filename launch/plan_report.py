"""`dry_run=true`: what would run, without loading weights or starting anything."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from launch.validate import world_size


def describe(cfg: DictConfig) -> str:
    lines = [
        "dry run: nothing started",
        f"  model     {cfg.model.name} ({cfg.model.path})",
        f"  method    {cfg.method.name}",
        f"  plan      {cfg.parallel.name}, world size {world_size(cfg)}",
        f"  launcher  {cfg.launcher.name}",
        f"  run dir   {cfg.run_dir}",
        "  global batch "
        f"{cfg.train.micro_batch_size} x {cfg.train.grad_accum} x {world_size(cfg)} rows of <= {cfg.data.max_seq_len} tokens",
        "config:",
        OmegaConf.to_yaml(cfg),
    ]
    return "\n".join(lines)
