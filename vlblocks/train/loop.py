"""The training loop: seeded, gradient accumulation, clipping, mixed precision, logging, and
checkpoints that a killed or interrupted run resumes from exactly."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from vlblocks.contracts import Echo
from vlblocks.data.datasets.run_data import RunData
from vlblocks.data.pipeline.collate import collate_text
from vlblocks.metrics import TaskMetrics
from vlblocks.models.task import Task
from vlblocks.train.batches import BatchStream
from vlblocks.train.checkpoint import keep_last, load_checkpoint, load_training_state, save_checkpoint
from vlblocks.train.device import pins_memory
from vlblocks.train.evaluate import evaluate_run
from vlblocks.train.logging import JsonLinesLog, ProgressLine
from vlblocks.train.optim import build_adamw, build_sgd, scaled_learning_rate, warmup_linear_schedule, warmup_step_schedule
from vlblocks.train.precision import PRECISIONS, Precision, resolve_precision
from vlblocks.train.random_state import capture_random_state, restore_random_state
from vlblocks.train.run_folder import CHECKPOINTS, METRICS
from vlblocks.train.signals import StopSignals

NONFINITE_POLICIES = ("stop", "skip")


class TrainingStopped(RuntimeError):
    """Training ended before its last step; the message says why and where the last checkpoint is."""


class TrainingInterrupted(TrainingStopped):
    """SIGINT or SIGTERM: the last finished step was checkpointed."""


class NonFiniteGradients(TrainingStopped):
    """A NaN or infinite loss or gradient (with `Trainer.nonfinite = 'stop'`)."""


@dataclass
class Schedule:
    """How long and how big: steps, image-text and text-only samples per micro-batch, accumulation, warm-up."""

    total_steps: int
    batch_size: int
    text_batch_size: int
    accumulation_steps: int
    warmup_steps: int


class Trainer:
    """Pre-training and fine-tuning: AdamW (or SGD) with warm-up, then linear decay (or steps).

    The learning rate is given per sample, as in VL-BERT's configs, and scaled by the effective
    batch: lr = lr_per_sample x (batch_size + text_batch_size) x accumulation_steps (x world
    size, 1 here); text_batch_size counts only when the text-only stream is on.

    Args:
        total_steps, batch_size, text_batch_size, accumulation_steps, warmup_steps: the schedule
            for real data (text_batch_size None: same as batch_size).
        demo_total_steps, demo_batch_size, demo_text_batch_size, demo_accumulation_steps,
            demo_warmup_steps: the bounded schedule used on the embedded demo dataset.
        lr_per_sample, betas, eps, weight_decay: AdamW (VL-BERT: 1e-7, (0.9, 0.999), 1e-6, 1e-4).
        optimizer: 'adamw', or 'sgd' (with `momentum`; VL-BERT's VCR).
        lr_milestones: steps after which the LR is multiplied by `lr_gamma` (VCR's step
            schedule); None decays linearly to 0 at the last step.
        clip_norm: gradient-norm clip (10 in pre-training); None for none.
        precision: 'fp32', 'bf16' or 'fp16' autocast (see `vlblocks.train.precision`); fp16
            scales the loss dynamically and skips (and logs) steps whose gradients overflow.
        nonfinite: 'stop' (default) ends the run at a NaN or infinite loss or gradient, naming
            the step and the last good checkpoint; 'skip' skips such a step and counts it.
        keep_last: keep only this many newest checkpoints (None: all).
        log_every: steps between JSON-lines records. eval_every: steps between validation
            passes (0: only at the end). eval_batches: validation batches per pass.
        checkpoint_every: steps between checkpoints (0: only at the end).
        seed: seeds initialisation, data order and masking (each sample's from (seed, epoch, index)).
        num_workers: DataLoader workers.
        length_bucketing: batch captions of similar length together (`LengthBucketSampler`);
            reads every record once at the start to learn the lengths.
    """

    def __init__(
        self,
        total_steps: int = 1000,
        batch_size: int = 256,
        accumulation_steps: int = 1,
        warmup_steps: int = 100,
        text_batch_size: Optional[int] = None,
        demo_total_steps: int = 100,
        demo_batch_size: int = 16,
        demo_text_batch_size: Optional[int] = None,
        demo_accumulation_steps: int = 1,
        demo_warmup_steps: int = 10,
        lr_per_sample: float = 1e-7,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 1e-4,
        optimizer: str = "adamw",
        momentum: float = 0.9,
        lr_milestones: Optional[Sequence[int]] = None,
        lr_gamma: float = 0.1,
        clip_norm: Optional[float] = 10.0,
        precision: str = "fp32",
        nonfinite: str = "stop",
        log_every: int = 10,
        eval_every: int = 0,
        eval_batches: int = 8,
        checkpoint_every: int = 0,
        keep_last: Optional[int] = None,
        seed: int = 0,
        num_workers: int = 0,
        length_bucketing: bool = False,
    ) -> None:
        text_batch_size = batch_size if text_batch_size is None else text_batch_size
        self.real = Schedule(total_steps, batch_size, text_batch_size, accumulation_steps, warmup_steps)
        demo_text_batch_size = demo_batch_size if demo_text_batch_size is None else demo_text_batch_size
        self.demo = Schedule(demo_total_steps, demo_batch_size, demo_text_batch_size, demo_accumulation_steps, demo_warmup_steps)
        self.lr_per_sample = lr_per_sample
        self.betas = tuple(betas)
        self.eps = eps
        self.weight_decay = weight_decay
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"Trainer.optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        self.optimizer = optimizer
        self.momentum = momentum
        self.lr_milestones = None if lr_milestones is None else list(lr_milestones)
        self.lr_gamma = lr_gamma
        self.clip_norm = clip_norm
        if precision not in PRECISIONS:
            raise ValueError(f"Trainer.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Trainer.nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.keep_last = keep_last
        self.log_every = log_every
        self.eval_every = eval_every
        self.eval_batches = eval_batches
        self.checkpoint_every = checkpoint_every
        self.seed = seed
        self.num_workers = num_workers
        self.length_bucketing = length_bucketing

    def schedule_for(self, data: RunData, max_steps: Optional[int] = None) -> Schedule:
        schedule = self.demo if data.is_demo else self.real
        if max_steps is not None:
            schedule = Schedule(
                max_steps, schedule.batch_size, schedule.text_batch_size, schedule.accumulation_steps, min(schedule.warmup_steps, max_steps)
            )
        return schedule

    def build_optimizer(self, task: torch.nn.Module, lr: float, schedule: Schedule):
        """The optimiser and its LR schedule, as the recipe asks."""
        if self.optimizer == "sgd":
            optimizer = build_sgd(task, lr, self.momentum, self.weight_decay)
        else:
            optimizer = build_adamw(task, lr, self.betas, self.eps, self.weight_decay)
        if self.lr_milestones is not None:
            return optimizer, warmup_step_schedule(optimizer, schedule.warmup_steps, self.lr_milestones, self.lr_gamma)
        return optimizer, warmup_linear_schedule(optimizer, schedule.warmup_steps, schedule.total_steps)

    def optimizer_step(self, task: Task, optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler]) -> Optional[str]:
        """Clip the gradients and step. Returns None when the step was taken, else why it was
        skipped: 'overflow' (fp16's scaler found infinite gradients; the scale backs off) or
        'nonfinite' (a NaN or infinite gradient, with `nonfinite = 'skip'`).

        Raises:
            NonFiniteGradients: a NaN or infinite gradient with `nonfinite = 'stop'` (the caller
                names the step).
        """
        if scaler is not None:
            scaler.unscale_(optimizer)
        gradients = [parameter for parameter in task.parameters() if parameter.grad is not None]
        if self.clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(gradients, self.clip_norm)
        else:
            norm = torch.nn.utils.get_total_norm([parameter.grad for parameter in gradients])
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            return None if scaler.get_scale() >= scale else "overflow"
        if not torch.isfinite(norm):
            if self.nonfinite == "stop":
                raise NonFiniteGradients("the loss or a gradient is not finite (NaN or infinite)")
            return "nonfinite"
        optimizer.step()
        return None

    def fit(
        self, task: Task, data: RunData, out_dir: str | Path, recipe_text: str = "", max_steps: Optional[int] = None,
        echo: Echo = print, precision: Optional[Precision] = None, resume_from: Optional[str | Path] = None,
    ) -> dict[str, float]:
        """Train on the device the task is on, log to `out_dir/metrics.jsonl`, checkpoint to
        `out_dir/checkpoints/step-XXXXXXX/`; returns the last validation metrics.

        `precision` (e.g. from `--precision`) overrides the recipe's `Trainer.precision`.
        `resume_from` (a checkpoint folder of this run, see `claim_run_folder`) continues the run
        exactly where that checkpoint was written: weights, optimiser, schedule, loss scale, data
        position and every random generator; the log keeps its records up to that step.

        Raises:
            TrainingInterrupted: SIGINT or SIGTERM arrived; the last finished step was checkpointed.
            NonFiniteGradients: a NaN or infinite loss or gradient with `nonfinite = 'stop'`.
        """
        out_dir = Path(out_dir)
        schedule = self.schedule_for(data, max_steps)
        text_stream = data.text is not None and getattr(task, "text_only", None) is not None
        samples = schedule.batch_size + (schedule.text_batch_size if text_stream else 0)
        lr = scaled_learning_rate(self.lr_per_sample, samples, schedule.accumulation_steps)
        echo(data.description)
        echo(
            f"schedule: {schedule.total_steps} steps of {schedule.batch_size} image-text"
            + (f" + {schedule.text_batch_size} text-only" if text_stream else "")
            + f" samples x {schedule.accumulation_steps} accumulation; lr = {self.lr_per_sample:g} per sample"
            f" x {samples * schedule.accumulation_steps} = {lr:g}, {self.optimizer}, warm-up {schedule.warmup_steps} steps then "
            + (f"x{self.lr_gamma:g} after steps {self.lr_milestones}" if self.lr_milestones is not None else "linear decay to 0")
        )
        device = next(task.parameters()).device
        precision = precision or resolve_precision(self.precision, device, from_recipe=True, echo=echo)
        echo(f"computing on {device} in {precision.name}")
        torch.manual_seed(self.seed)
        pin = pins_memory(device)
        optimizer, scheduler = self.build_optimizer(task, lr, schedule)
        run = _RunState(
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=precision.grad_scaler(),
            metrics=TaskMetrics(device),
            batches=BatchStream(data.train, schedule.batch_size, data.collate, self.seed, self.length_bucketing, self.num_workers, pin),
            texts=BatchStream(data.text, schedule.text_batch_size, collate_text, self.seed, num_workers=self.num_workers, pin_memory=pin)
            if text_stream else None,
        )
        log = JsonLinesLog(out_dir / METRICS)
        checkpoints = out_dir / CHECKPOINTS
        last_checkpoint: Optional[Path] = None
        if resume_from is not None:
            load_checkpoint(task, resume_from, recipe_text or None)
            run.load_state_dict(load_training_state(resume_from))
            log.keep_until(run.step)
            last_checkpoint = Path(resume_from)
            echo(f"resumed from {resume_from} at step {run.step}")
        progress = ProgressLine(schedule.total_steps)
        interval_start = time.perf_counter()
        shown: dict[str, float] = {}  # the progress line shows the last logged averages
        validation: dict[str, float] = {}
        task.train()
        with StopSignals() as signals:
            while run.step < schedule.total_steps:
                run.step += 1
                step = run.step
                for _ in range(schedule.accumulation_steps):
                    batch, text_batch = task.prepare(next(run.batches), next(run.texts) if run.texts is not None else None)
                    batch = batch.to(device, non_blocking=pin)
                    text_batch = text_batch.to(device, non_blocking=pin) if text_batch is not None else None
                    with precision.autocast():
                        output = task(batch, text_batch)
                    loss = output.loss / schedule.accumulation_steps
                    (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
                    run.metrics.update(output.metrics)
                    run.interval_samples += batch.batch_size
                try:
                    skipped = self.optimizer_step(task, optimizer, run.scaler)
                except NonFiniteGradients as error:
                    where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
                    raise NonFiniteGradients(f"step {step}: {error}; {where} (resume from it with --resume, e.g. at a lower learning rate)") from None
                if skipped is None:
                    scheduler.step()
                else:  # the learning-rate schedule counts the steps taken
                    run.skipped_steps += 1
                    if skipped == "overflow":
                        echo(f"step {step}: fp16 gradients overflowed, step skipped (loss scale now {run.scaler.get_scale():g})")
                    else:
                        echo(f"step {step}: a NaN or infinite gradient, step skipped")
                    log.write({"step": step, "event": f"{skipped}_skipped", **({"loss_scale": run.scaler.get_scale()} if skipped == "overflow" else {})})
                optimizer.zero_grad(set_to_none=True)
                throughput = run.interval_samples / max(time.perf_counter() - interval_start, 1e-9)
                if step % self.log_every == 0 or step == schedule.total_steps:
                    averages = run.metrics.compute()  # the interval's one wait for the device
                    shown = {k: v for k, v in averages.items() if k.endswith(("loss", "accuracy"))}
                    skipped_records = {"data/skipped": float(len(data.train.skipped))} if getattr(data.train, "skip_bad_records", False) else {}
                    log.write({
                        "step": step, "lr": scheduler.get_last_lr()[0], "samples_per_second": throughput, **averages,
                        **skipped_records, **({"skipped_steps": run.skipped_steps} if run.skipped_steps else {}),
                    })
                    run.metrics, run.interval_samples, interval_start = TaskMetrics(device), 0, time.perf_counter()
                progress.update(step, shown, throughput)
                if (self.eval_every and step % self.eval_every == 0) or step == schedule.total_steps:
                    with precision.autocast():
                        validation = evaluate_run(task, data, schedule.batch_size, self.eval_batches, seed=self.seed)
                    log.write({"step": step, "split": "val", **validation})
                due = (self.checkpoint_every and step % self.checkpoint_every == 0) or step == schedule.total_steps
                if due or signals.received:
                    last_checkpoint = save_checkpoint(task, checkpoints, step, recipe_text, run.state_dict())
                    if self.keep_last is not None:
                        keep_last(checkpoints, self.keep_last)
                if signals.received and step < schedule.total_steps:
                    progress.close()
                    raise TrainingInterrupted(
                        f"{signals.received} after step {step}: checkpoint written to {last_checkpoint}; continue with --resume"
                    )
        progress.close()
        if resume_from is not None and not validation:  # the run had already reached its last step
            with precision.autocast():
                validation = evaluate_run(task, data, schedule.batch_size, self.eval_batches, seed=self.seed)
        return validation


@dataclass
class _RunState:
    """What a training run carries from step to step, and saves in every checkpoint."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    metrics: TaskMetrics
    batches: BatchStream
    texts: Optional[BatchStream]
    step: int = 0
    skipped_steps: int = 0
    interval_samples: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "batches": self.batches.state_dict(),
            "texts": self.texts.state_dict() if self.texts is not None else None,
            "metrics": self.metrics.state_dict(),
            "interval_samples": self.interval_samples,
            "skipped_steps": self.skipped_steps,
            "random": capture_random_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's state; the random generators last, after the data streams have
        drawn what restarting their epoch draws."""
        self.step, self.skipped_steps, self.interval_samples = state["step"], state["skipped_steps"], state["interval_samples"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["batches"])
        if self.texts is not None and state["texts"] is not None:
            self.texts.load_state_dict(state["texts"])
        self.metrics.load_state_dict(state["metrics"])
        restore_random_state(state["random"])
