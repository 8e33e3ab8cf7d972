"""The pre-training loop: seeded, gradient accumulation, clipping, logging, checkpoints."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from vlblocks.contracts import Echo
from vlblocks.data.datasets.run_data import RunData
from vlblocks.data.pipeline.collate import collate_text
from vlblocks.data.pipeline.sampling import LengthBucketSampler
from vlblocks.models.task import Task
from vlblocks.train.checkpoint import save_checkpoint
from vlblocks.train.device import pins_memory
from vlblocks.train.evaluate import evaluate_run
from vlblocks.train.logging import JsonLinesLog, MetricAverager, ProgressLine
from vlblocks.train.optim import build_adamw, build_sgd, scaled_learning_rate, warmup_linear_schedule, warmup_step_schedule
from vlblocks.train.precision import PRECISIONS, Precision, resolve_precision

# The training masks draw from seed + MASKING_SEED_OFFSET, apart from the data order's seed.
MASKING_SEED_OFFSET = 1


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
        log_every: steps between JSON-lines records. eval_every: steps between validation
            passes (0: only at the end). eval_batches: validation batches per pass.
        checkpoint_every: steps between checkpoints (0: only at the end).
        seed: seeds initialisation, data order and masking.
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
        log_every: int = 10,
        eval_every: int = 0,
        eval_batches: int = 8,
        checkpoint_every: int = 0,
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

    def _batches(self, dataset, batch_size: int, collate, shuffle: bool, pin_memory: bool = False) -> Iterator:
        """Batches forever, epoch after epoch (a shuffled, or length-bucketed, order each epoch),
        collated into pinned memory when `pin_memory`."""
        if shuffle and self.length_bucketing:
            if not hasattr(dataset, "length"):
                raise ValueError(f"Trainer.length_bucketing needs a dataset with length(index); {type(dataset).__name__} has none")
            sampler = LengthBucketSampler([dataset.length(i) for i in range(len(dataset))], batch_size, seed=self.seed)
            make_loader = lambda: DataLoader(
                dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers, pin_memory=pin_memory
            )
        else:
            generator = torch.Generator().manual_seed(self.seed)
            make_loader = lambda: DataLoader(
                dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, drop_last=shuffle,
                generator=generator if shuffle else None, num_workers=self.num_workers, pin_memory=pin_memory,
            )
        for _ in itertools.count():
            yield from make_loader()

    def build_optimizer(self, task: torch.nn.Module, lr: float, schedule: Schedule):
        """The optimiser and its LR schedule, as the recipe asks."""
        if self.optimizer == "sgd":
            optimizer = build_sgd(task, lr, self.momentum, self.weight_decay)
        else:
            optimizer = build_adamw(task, lr, self.betas, self.eps, self.weight_decay)
        if self.lr_milestones is not None:
            return optimizer, warmup_step_schedule(optimizer, schedule.warmup_steps, self.lr_milestones, self.lr_gamma)
        return optimizer, warmup_linear_schedule(optimizer, schedule.warmup_steps, schedule.total_steps)

    def optimizer_step(self, task: Task, optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler]) -> bool:
        """Clip the gradients and step; with fp16's scaler, unscale first and let the scaler skip
        a step whose gradients overflowed. Returns whether the step was taken."""
        if scaler is not None:
            scaler.unscale_(optimizer)
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(task.parameters(), self.clip_norm)
        if scaler is None:
            optimizer.step()
            return True
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        return scaler.get_scale() >= scale  # the scale backs off exactly when the step was skipped

    def fit(
        self, task: Task, data: RunData, out_dir: str | Path, recipe_text: str = "", max_steps: Optional[int] = None,
        echo: Echo = print, precision: Optional[Precision] = None,
    ) -> dict[str, float]:
        """Train on the device the task is on, log to `out_dir/metrics.jsonl`, checkpoint to
        `out_dir/checkpoints/`; returns the last validation metrics.

        `precision` (e.g. from `--precision`) overrides the recipe's `Trainer.precision`."""
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
        scaler = precision.grad_scaler()
        pin = pins_memory(device)
        optimizer, scheduler = self.build_optimizer(task, lr, schedule)
        log = JsonLinesLog(out_dir / "metrics.jsonl")
        masking = torch.Generator().manual_seed(self.seed + MASKING_SEED_OFFSET)
        batches = self._batches(data.train, schedule.batch_size, data.collate, shuffle=True, pin_memory=pin)
        texts = self._batches(data.text, schedule.text_batch_size, collate_text, shuffle=False, pin_memory=pin) if text_stream else None
        progress = ProgressLine(schedule.total_steps)
        averager = MetricAverager()
        interval_start, interval_samples = time.perf_counter(), 0
        validation: dict[str, float] = {}
        task.train()
        for step in range(1, schedule.total_steps + 1):
            for _ in range(schedule.accumulation_steps):
                batch = next(batches).to(device, non_blocking=pin)
                text_batch = next(texts).to(device, non_blocking=pin) if texts is not None else None
                with precision.autocast():
                    output = task(batch, text_batch, masking)
                loss = output.loss / schedule.accumulation_steps
                (scaler.scale(loss) if scaler is not None else loss).backward()
                averager.add(output.metrics)
                interval_samples += batch.batch_size
            if self.optimizer_step(task, optimizer, scaler):
                scheduler.step()
            else:  # the learning-rate schedule counts the steps taken
                echo(f"step {step}: fp16 gradients overflowed, step skipped (loss scale now {scaler.get_scale():g})")
                log.write({"step": step, "event": "overflow_skipped", "loss_scale": scaler.get_scale()})
            optimizer.zero_grad(set_to_none=True)
            throughput = interval_samples / max(time.perf_counter() - interval_start, 1e-9)
            progress.update(step, {k: v for k, v in averager.averages().items() if k.endswith(("loss", "accuracy"))}, throughput)
            if step % self.log_every == 0 or step == schedule.total_steps:
                skipped = {"data/skipped": float(len(data.train.skipped))} if getattr(data.train, "skip_bad_records", False) else {}
                log.write({"step": step, "lr": scheduler.get_last_lr()[0], "samples_per_second": throughput, **averager.averages(), **skipped})
                averager, interval_start, interval_samples = MetricAverager(), time.perf_counter(), 0
            if (self.eval_every and step % self.eval_every == 0) or step == schedule.total_steps:
                with precision.autocast():
                    validation = evaluate_run(task, data, schedule.batch_size, self.eval_batches, seed=self.seed)
                log.write({"step": step, "split": "val", **validation})
            if (self.checkpoint_every and step % self.checkpoint_every == 0) or step == schedule.total_steps:
                save_checkpoint(task, out_dir / "checkpoints", step, recipe_text, optimizer)
        progress.close()
        return validation
