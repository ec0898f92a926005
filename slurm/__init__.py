"""The SLURM backend of the launcher, over submitit: submit a run or a sweep's points
(submit.py, rendering the script with sbatch.py, refusing secrets with secrets.py), what
runs inside the allocation (task.py: attempts, requeues after a preemption or a hang;
after_srun.py: a task that died), the scheduler's answers (scheduler.py, and pending.py:
whether a pending job can ever start), and the two-node test cluster (local_cluster.sh).

Nothing here imports launch/: what the backend needs from the launcher (the entry point
every task runs, the config loader, the run-state records, the hook called when a sweep
point ends, world size, the repo root) arrives as one slurm.hands.Hands when the launcher
calls it, the way submitit knows nothing of the function it runs. launch/ -> slurm/ is
the only arrow between them, and another backend would be a sibling with the same hand-ins.
"""
