"""Turning a Hydra config into processes: validate, then run here, spawn local workers,
or submit to SLURM. Every path ends in the same `trainers.loop.train`."""
