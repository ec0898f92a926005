"""`dry_run=true`: what would run, without loading weights or starting anything."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from launch.config import REPO_ROOT, world_size
from launch.sample_row import sample_row


def dry_run_report(cfg: DictConfig, epochs: str | None = None) -> str:
    """`epochs`: how train.epochs became train.max_steps (launch/optim_checks.apply_epochs)."""
    lines = [
        "dry run: nothing started",
        f"  model     {cfg.model.name} ({cfg.model.path})",
        f"  method    {cfg.method.name}",
        f"  plan      {cfg.parallel.name}, world size {world_size(cfg)}",
        f"  launcher  {cfg.launcher.name}",
        f"  run dir   {cfg.run_dir}",
        "  global batch "
        f"{cfg.train.micro_batch_size} x {cfg.train.grad_accum} x {world_size(cfg)} rows of <= {cfg.data.max_seq_len} tokens",
        f"  length    {epochs or f'train.max_steps={cfg.train.max_steps} optimizer steps'}",
        f"  optimizer optim={cfg.optim.name}, schedule {cfg.optim.schedule}",
    ]
    lines += ["", memory(cfg)]
    if cfg.launcher.name == "local":
        lines += ["", host_memory(cfg)]
    lines += ["", *sample_row(cfg)]
    if cfg.launcher.name == "slurm":
        lines += ["", *slurm_script(cfg)]
    lines += ["", "config:", OmegaConf.to_yaml(cfg)]
    return "\n".join(lines)


def memory(cfg: DictConfig) -> str:
    from launch.estimate import for_config, gpu_budget

    est = for_config(cfg)
    if est is None:
        return "memory per GPU: no estimate (model.arch is not set and model.path has no local config.json)"
    budget = gpu_budget(cfg)
    if budget is None:
        verdict = ""
    elif est.fits(budget):
        verdict = f"\n  -> fits launcher.gpu_mem_gb={budget:g}"
    else:
        verdict = f"\n  -> does NOT fit launcher.gpu_mem_gb={budget:g} (launcher.check_memory=false)"
    return est.table(budget) + verdict


def host_memory(cfg: DictConfig) -> str:
    from launch.host_memory import host_need

    need = host_need(cfg)
    if need.fits:
        return need.line()
    return need.line() + ": a launch would be refused" + (
        "" if cfg.launcher.check_memory else " (but launcher.check_memory=false lets it start)")


def slurm_script(cfg: DictConfig) -> list[str]:
    from slurm.sbatch import new_folder, render_script
    from slurm.secrets import refuse_secrets

    folder = new_folder(Path(cfg.run_dir))
    script = render_script(cfg, folder, str(REPO_ROOT))
    refuse_secrets({"sbatch script": script, "config": OmegaConf.to_yaml(cfg)})
    return [f"sbatch script (submitted by submitit from {folder}):", "-" * 60, script.rstrip(), "-" * 60]
