"""The training recipe every plan and objective shares. Read it top to bottom:

    data -> model -> plan.prepare -> resume -> [step: micro-batches -> backward -> step
    -> log -> eval -> checkpoint] -> final eval -> export -> summary

A step's loss is the objective's loss summed over the whole global batch divided by the
batch's count in the objective's unit (target tokens for SFT, pairs or rows for the
preference objectives); each micro-batch contributes its share, so splitting the batch
over micro-batches, accumulation steps or ranks changes speed and memory but not the
numbers. The objective's metrics (TRL's rewards/*, logps/*) are sums divided the same way.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

from trainers.checkpoint import Checkpointer
from trainers.data.sources import training_batches
from trainers.distributed import (
    agree,
    all_reduce_sum,
    any_rank,
    init_distributed,
    shutdown,
)
from trainers.errors import TrainingError
from trainers.evaluation.rounds import EvalRounds
from trainers.model.export import export
from trainers.metrics.device import record_device
from trainers.metrics.sinks import MetricsLogger, plot_losses, write_summary
from trainers.model.load import ModelSource, count_parameters, load_tokenizer
from trainers.model.method_step import MethodStep
from trainers.objectives.catalog import get_objective
from trainers.model.peft_methods import method_summary
from trainers.objectives.reference import precompute_kl_reference, precompute_reference
from trainers.rng import seed_everything
from trainers.spike_guard import SpikeGuard, corrupt_targets, planted_steps
from trainers.metrics.throughput import Throughput
from trainers.watchdog import Watchdog, allowances

log = logging.getLogger("train")


class StopRequest:
    """SIGTERM / SIGUSR1 / SIGUSR2 set a flag; ranks agree on it at the next step boundary,
    save and exit as `preempted` (the scheduler requeues; the next launch resumes).
    SIGUSR2 is what SLURM sends before a time limit (sbatch --signal, see slurm/sbatch.py).

    SIGINT (Ctrl-C; the local launcher forwards it to its workers) is the same stop,
    recorded `interrupted`; a second SIGINT (or any stop signal after it: on a second Ctrl-C
    torch's elastic agent shuts its workers down again with SIGTERM) stops at once
    (KeyboardInterrupt), losing only the steps since the last committed checkpoint. `at_once_before_training` (launcher=local):
    a stop that arrives before the first step has nothing to save, so the process exits
    right away instead of loading the model first (64 starting workers took 80 s to stop)."""

    def __init__(self, at_once_before_training: bool = False):
        self.requested = False
        self.interrupted = False
        self.at_once = at_once_before_training
        self.training = False  # set when the step loop starts
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame):
        if self.interrupted:  # any stop after a Ctrl-C: torch's agent turns a second Ctrl-C into SIGTERM
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            self.interrupted = True
        self.requested = True
        if self.at_once and not self.training:
            if int(os.environ.get("WORLD_SIZE", 1)) == 1:  # (under torch's agent, the launcher says it)
                print(f"stopped by {signal.Signals(signum).name} before training started: nothing to save",
                      file=sys.stderr, flush=True)
            os._exit(128 + signum)  # like the signal's default action, quietly: nothing is lost


def train(cfg, build_plan, leave_process_group: bool = False, on_hang=None) -> dict:
    """Run (or resume) one training job under the plan `build_plan(cfg, env)` returns (the
    runtime plan, parallel/base.py's interface: the loop never names a plan and imports
    nothing from parallel/); `leave_process_group` keeps the process group for a caller
    that runs several jobs in the same workers. A hang watchdog covers the whole job,
    start-up included (trainers/watchdog.py); `on_hang(summary)` is the launcher's part
    of a hang (a SLURM job requeues), called by the rank that reports it before it exits."""
    run_dir = Path(cfg.run_dir)
    step_timeout, long_timeout = allowances(cfg.train)
    # Collectives time out a little after the watchdog's longest allowance: it fires first.
    env = init_distributed(long_timeout + 120 if long_timeout else None, run_dir / "hangs")
    run_dir.mkdir(parents=True, exist_ok=True)
    attempt = agree(time.strftime("%Y-%m-%d_%H-%M-%S"))
    watchdog = Watchdog(run_dir, env.rank, env.world_size, attempt, step_timeout, long_timeout, on_hang=on_hang)
    try:
        return run_job(cfg, build_plan(cfg, env), watchdog, leave_process_group)
    finally:
        watchdog.close()


def run_job(cfg, plan, watchdog: Watchdog, leave_process_group: bool) -> dict:
    run_dir = Path(cfg.run_dir)
    env = plan.env
    seed_everything(cfg.seed)
    stop = StopRequest(at_once_before_training=cfg.launcher.name == "local")
    t_start = time.time()

    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    objective = get_objective(cfg.objective)
    batches, data = training_batches(cfg, tokenizer, plan.dp_world)
    seed_everything(cfg.seed)  # every rank builds identical initial weights
    source = ModelSource(cfg.model, cfg.method, plan.compute_dtype, cfg.seed, cfg.train, objective.head)
    plan.prepare(source)
    if objective.reference and cfg.method.peft is None:
        # before a resume loads a checkpoint: the reference is the initial model
        precompute_reference(plan, data.train + data.eval, run_dir, cfg.train.micro_batch_size,
                             tokenizer.pad_token_id)
        if objective.name == "kto":  # and of the mismatched pairs of every step (KL reference point)
            precompute_kl_reference(plan, batches, data.eval, run_dir, cfg.train.max_steps,
                                    cfg.train.micro_batch_size, tokenizer.pad_token_id, int(cfg.data.max_seq_len))
    trainable, total = count_parameters(plan.inner)
    method_step = MethodStep(cfg.method, plan)  # the method's own part of a step (AdaLoRA), before any resume
    speed = Throughput(cfg, env.device, total, env.world_size)
    if env.is_main:
        for r in data.reports:
            log.info("data: %s", r.kept_and_skipped())
        log.info(
            "plan: world_size=%d plan=%s method=%s trainable=%s/%s (%.3f%%) packed=%s global_batch=%d rows",
            env.world_size, plan.name, method_summary(cfg.method), f"{trainable:,}", f"{total:,}",
            100 * trainable / max(total, 1), data.packed, batches.layout.rows_per_step,
        )
        log.info("plan: %s", plan.expected_state_line())
        if source.read_report:
            read, whole = source.read_report
            log.info("weights: rank 0 read %.1f MiB of the checkpoint's %.1f MiB", read / 2**20, whole / 2**20)

    ckpt = Checkpointer(run_dir, plan, env, cfg.train.keep_last, cfg.train.checkpoint.mode, objective)
    resumed = ckpt.restore()
    start = resumed["step"] if resumed else 0
    tokens_seen = resumed["tokens_seen"] if resumed else 0
    if resumed and env.is_main:
        log.info("resumed from %s (step %d)", resumed["path"], start)
    guard = SpikeGuard(cfg.train.spike_guard)
    guard.load_state(resumed.get("spike_guard") if resumed else None)
    planted = planted_steps()  # fault injection for tests (environment), empty otherwise

    metrics = MetricsLogger(cfg, env.is_main, start)
    evals = EvalRounds(cfg, plan, tokenizer, data, metrics, ckpt, resumed)
    status, error, last, exported_from = "completed", None, {}, None
    step = start
    try:
        evals.at_start(start)  # (start-up allowance still running)
        stop.training = True
        while step < cfg.train.max_steps and not evals.stop_reason:
            t0 = time.perf_counter()
            micro, count = batches.micro_batches(step, plan.dp_rank, objective.unit)
            if getattr(objective, "rollout", None):  # on-policy objectives (grpo): prompts -> scored completions
                micro, count = objective.rollout(plan, micro, step)
            if step + 1 in planted:
                micro = corrupt_targets(micro, len(tokenizer), cfg.seed + step)
            loss_sum, real_tokens, sums = plan.forward_backward(micro, count, objective)
            names = sorted(sums)
            loss_sum, real_tokens, *values = all_reduce_sum([loss_sum, real_tokens, *(sums[k] for k in names)],
                                                            env.device)
            loss = loss_sum / count
            if not math.isfinite(loss):
                raise TrainingError(
                    f"The loss became {loss} at step {step + 1} (lr {plan.lr:.3g}). Training "
                    f"stopped before the optimizer step; the last committed checkpoint is "
                    f"untouched. Lower optim.lr, or check the data and train.precision."
                )
            lr = plan.lr
            grad_norm = method_step.step(step, skip=guard.judge(step + 1, loss))
            step += 1
            watchdog.progress(step)
            tokens_seen += int(real_tokens)
            dt = time.perf_counter() - t0
            last = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens": int(real_tokens), **speed.of(real_tokens, dt), **batches.stats(step - 1),
                    **objective.finalize(dict(zip(names, values)), count)}
            if guard.reason:
                last.update(skipped=True, skip_reason=guard.reason, rows=batches.row_ids(step - 1))
                if env.is_main:
                    log.warning("spike guard: step %d not applied (%s); rows of its batch: %s",
                                step, guard.reason, last["rows"])
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps or guard.reason:
                metrics.log(dict(last))
            if guard.needs_rollback:
                with watchdog.long("spike-guard rollback"):
                    roll_back_past_spikes(guard, ckpt, metrics, step, env.is_main)
            if evals.due(step):
                with watchdog.long("eval"):
                    last.update(evals.run(step))
            preempt = any_rank(stop.requested, env.device)
            if (step % cfg.train.save_every == 0 or step == cfg.train.max_steps or preempt
                    or evals.wants_checkpoint(step) or evals.stop_reason):
                with watchdog.long("checkpoint save"):
                    ckpt.save(step, {"epoch": batches.epoch_of(step), "tokens_seen": tokens_seen,
                                     "spike_guard": guard.state(), "evals": evals.state()})
                    evals.after_save(step)
            if evals.stop_reason:
                break
            if preempt:
                with watchdog.long("checkpoint save"):
                    ckpt.wait()
                status = "interrupted" if any_rank(stop.interrupted, env.device) else "preempted"
                break
        if status == "completed":
            with watchdog.long("final eval, checkpoint and export"):
                last.update(evals.at_end(step))
                ckpt.wait()
                exported_from = evals.before_export()
                written = export(plan, cfg, tokenizer, run_dir)
            if env.is_main:
                log.info("export: %s", written)
    except TrainingError as e:
        status, error = "failed", str(e)
        raise
    except KeyboardInterrupt:
        status, error = "interrupted", "stopped at once by a second Ctrl-C (from the last committed checkpoint on)"
        raise
    except BaseException as e:
        status, error = "failed", f"{type(e).__name__}: {e}"
        raise
    finally:
        # A run that ends normally has waited for its last save above (so a failed write
        # fails the run); a failing run still lets an in-flight save commit.
        if error is not None:
            with contextlib.suppress(TrainingError):
                ckpt.wait()
        metrics.close()
        summary = run_summary(cfg, env, status, step, last, trainable, tokens_seen, t_start, error,
                              {**evals.summary(), "exported_from": exported_from})
        if env.is_main:
            plot_losses(run_dir)
            write_summary(run_dir, summary)
        record_device(run_dir, env, plan.compute_dtype)  # precision, backend, CUDA peak: scripts/gpu_check.py
        plan.close()
    if not leave_process_group:
        shutdown()
    return summary


def run_summary(cfg, env, status: str, step: int, last: dict, trainable: int, tokens_seen: int,
                t_start: float, error: str | None, evals: dict) -> dict:
    """summary.json: how the run ended, its final numbers and its evals' before/best/final."""
    summary = {
        "status": status, "final_step": step, "world_size": env.world_size,
        "plan": cfg.parallel.name, "method": cfg.method.name,
        "final_loss": last.get("loss"), "final_eval_loss": last.get("eval_loss"),
        "final_eval_exact_match": last.get("eval_exact_match"),
        "trainable_params": trainable, "tokens_seen": tokens_seen,
        "wall_time_s": round(time.time() - t_start, 2), "error": error, **evals,
    }
    if "eval_reward" in last:  # grpo: held-out mean reward of greedy completions
        summary["final_eval_reward"] = last["eval_reward"]
    if "eval_rewards/accuracies" in last:  # preference objectives: held-out preference accuracy
        summary["final_eval_preference_accuracy"] = last["eval_rewards/accuracies"]
    elif "eval_accuracy" in last:  # a reward model's (objective=reward)
        summary["final_eval_preference_accuracy"] = last["eval_accuracy"]
    return summary


def roll_back_past_spikes(guard: SpikeGuard, ckpt: Checkpointer, metrics: MetricsLogger, step: int,
                          is_main: bool) -> None:
    """After the guard's streak of skipped steps: load the newest committed checkpoint from
    before the streak and carry on from `step` (the data position), so the batches from
    that checkpoint to the end of the streak are never applied."""
    streak = guard.end_streak()
    ckpt.wait()
    back = ckpt.restore(before_step=streak[0])
    if back:
        metrics.log({"step": step, "rolled_back_to": back["step"], "skipped_steps": streak})
    if is_main:
        log.warning("spike guard: %d steps in a row skipped (%s): %s, continuing with step %d",
                    len(streak), ", ".join(map(str, streak)),
                    f"rolled back to {back['path']} (step {back['step']})" if back
                    else "no committed checkpoint from before them to roll back to", step + 1)
