"""The training loop: seeded, gradient accumulation, clipping, mixed precision, logging, and
checkpoints that a killed or interrupted run resumes from exactly."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn

from vlblocks.batch import VLBatch
from vlblocks.contracts import Echo
from vlblocks.data.datasets.run_data import RunData
from vlblocks.data.errors import DataError
from vlblocks.data.pipeline.collate import collate_text
from vlblocks.metrics import TaskMetrics
from vlblocks.models.task import Task, TaskOutput
from vlblocks.seeding import mix_seed
from vlblocks.train.batches import BatchStream
from vlblocks.train.checkpoint import (
    STATE_FILE,
    CheckpointError,
    checkpoint_folder,
    error_summary,
    keep_last,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
)
from vlblocks.train.device import default_workers, pins_memory
from vlblocks.train.distributed import (
    STRATEGIES,
    Processes,
    all_sum,
    full_weights,
    gradient_sync,
    load_optimizer_state,
    local_value,
    optimizer_state,
    wrap,
)
from vlblocks.train.evaluate import evaluate_run
from vlblocks.train.lengths import run_lengths
from vlblocks.train.logging import TENSORBOARD_MISSING, JsonLinesLog, Logs, NullLog, NullProgress, ProgressLine, TensorBoardLog, tensorboard_available
from vlblocks.train.onednn_linear import MIN_MULTIPLY_ADDS
from vlblocks.train.optim import build_adamw, build_sgd, scaled_learning_rate, warmup_linear_schedule, warmup_step_schedule
from vlblocks.train.precision import PRECISIONS, Precision, resolve_precision
from vlblocks.train.random_state import capture_random_state, restore_random_state
from vlblocks.train.run_folder import CHECKPOINTS, LENGTHS, METRICS, TENSORBOARD
from vlblocks.train.signals import StopSignals

NONFINITE_POLICIES = ("stop", "skip")
TEXT_STREAM = 1  # salt of the text-only stream's seed
LOSS_NORMALIZATIONS = ("micro_batch", "step")
OPTIMIZERS = ("adamw", "torch_adamw", "sgd")


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

    Batch sizes count the samples of a micro-batch over all processes: under torchrun each of N
    processes takes batch_size / N of them (`per_process_batches`), so a recipe trains the same
    global batch on one process or many. The learning rate is given per sample, as in VL-BERT's
    configs, and scaled by the step's samples: lr = lr_per_sample x (batch_size +
    text_batch_size) x accumulation_steps (the official LR x world size x per-GPU batch x
    accumulation); text_batch_size counts only when the text-only stream is on.

    A run on the embedded demo dataset builds its Trainer in the gin scope `demo`, so a recipe
    gives the demo its own bounded schedule (`demo/Trainer.total_steps = 20`, ...) beside the
    real one, and a real run never sees those bindings.

    Args:
        total_steps, batch_size, text_batch_size, accumulation_steps, warmup_steps: the schedule
            (batch sizes over all processes; text_batch_size None: same as batch_size).
        lr_per_sample, betas, eps, weight_decay: AdamW (VL-BERT: 1e-7, (0.9, 0.999), 1e-6, 1e-4).
        decay_biases_and_norms: True (VL-BERT) decays every parameter; False exempts biases and
            LayerNorm parameters from weight decay (BERT's convention), with either optimiser.
        optimizer: 'adamw' (VL-BERT's own AdamW, `VLBertAdamW`), 'torch_adamw'
            (`torch.optim.AdamW`: epsilon after the bias correction, decay before the update),
            or 'sgd' (with `momentum`; VL-BERT's VCR).
        fused_optimizer: update the weights in one fused pass per tensor (PyTorch's fused AdamW
            or SGD kernel; `VLBertAdamW(fused=True)` keeps VL-BERT's epsilon and decay order).
            The same update up to float32 rounding, several times faster: VL-BERT's AdamW over
            BERT-base's 110M parameters took 266 ms unfused and 67 ms fused on a 2-core CPU.
        lr_milestones: steps after which the LR is multiplied by `lr_gamma` (VCR's step
            schedule); None decays linearly to 0 at the last step.
        clip_norm: gradient-norm clip (10 in pre-training); None for none.
        precision: 'fp32', 'bf16' or 'fp16' autocast (see `vlblocks.train.precision`); fp16
            scales the loss dynamically and skips (and logs) steps whose gradients overflow.
        nonfinite: 'stop' (default) ends the run at a NaN or infinite loss or gradient, naming
            the step and the last good checkpoint; 'skip' skips such a step and counts it.
        keep_last: keep only this many newest checkpoints (None: all).
        tensorboard: also write the log as TensorBoard event files in `out_dir/tensorboard`
            (`pip install "vlblocks[tensorboard]"`; watch with `tensorboard --logdir out_dir`).
        distributed: under torchrun, 'ddp' (default: replicas, gradients averaged) or 'fsdp'
            (`fully_shard`: parameters, gradients and optimiser state sharded; for BERT-large
            and beyond).
        log_every: steps between JSON-lines records. eval_every: steps between validation
            passes (0: only at the end). eval_batches: validation batches per pass.
        checkpoint_every: steps between checkpoints (0: only at the end).
        seed: seeds initialisation, data order and masking (each sample's from (seed, epoch, index)).
        num_workers: DataLoader worker processes per training process (persistent, each keeping
            2 batches ready); None chooses: none on the CPU, where training uses every core,
            and on a GPU one per spare core (up to 8), so reading overlaps the GPU's work.
        compile: a `torch.compile` backend for the task's forward ('inductor', PyTorch's
            compiler; 'aot_eager' traces without generating code), or None (default) to run
            eagerly. Parameter names and checkpoints are unchanged, and the weights equal the
            eager run's up to float rounding. Each new batch shape costs a compilation (then
            shapes are treated as dynamic); docs/performance.md has what inductor measured on a
            2-core CPU.
        onednn_linears: in fp32 on a CPU, run the large linear layers' matmuls on oneDNN rather
            than the BLAS library (`vlblocks.train.onednn_linear`): 5.5-13.5% off a BASE step on
            a 2-core AMD CPU, float32 results that differ from the BLAS's in the last bits. Off
            under `compile`, which chooses its own kernels.
        onednn_min_multiply_adds: the smallest product (rows x inputs x outputs) that goes to
            oneDNN; smaller ones stay on the BLAS (default 2^26: oneDNN's fixed cost per call
            made it slower at 2^23 and below on that CPU, even at 2^25-2^27; `python
            bench/step_leads.py` measures where it pays on another).
        length_bucketing: batch captions of similar length together (`LengthBucketSampler`);
            reads every record once at the start to learn the lengths (`run_lengths`: in the
            worker processes when there are any, each process of a distributed run its share),
            and keeps them in `out_dir/lengths.npy`, where a resumed run finds them.
        loss_normalization: how a step split into micro-batches (`accumulation_steps`) or
            processes averages its losses. 'micro_batch' (the official code): each micro-batch's
            loss is its own mean (e.g. over its masked words), and the step averages those means.
            'step': each loss term is averaged over all of the step's items (e.g. every masked
            word of the global batch), so a run's updates do not depend on how its global batch
            is split across processes and accumulation steps.
    """

    def __init__(
        self,
        total_steps: int = 1000,
        batch_size: int = 256,
        accumulation_steps: int = 1,
        warmup_steps: int = 100,
        text_batch_size: Optional[int] = None,
        lr_per_sample: float = 1e-7,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 1e-4,
        decay_biases_and_norms: bool = True,
        loss_normalization: str = "micro_batch",
        optimizer: str = "adamw",
        momentum: float = 0.9,
        fused_optimizer: bool = False,
        lr_milestones: Optional[Sequence[int]] = None,
        lr_gamma: float = 0.1,
        clip_norm: Optional[float] = 10.0,
        precision: str = "fp32",
        nonfinite: str = "stop",
        distributed: str = "ddp",
        log_every: int = 10,
        eval_every: int = 0,
        eval_batches: int = 8,
        checkpoint_every: int = 0,
        keep_last: Optional[int] = None,
        tensorboard: bool = False,
        seed: int = 0,
        num_workers: Optional[int] = None,
        length_bucketing: bool = False,
        compile: Optional[str] = None,
        onednn_linears: bool = True,
        onednn_min_multiply_adds: int = MIN_MULTIPLY_ADDS,
    ) -> None:
        text_batch_size = batch_size if text_batch_size is None else text_batch_size
        self.schedule = Schedule(total_steps, batch_size, text_batch_size, accumulation_steps, warmup_steps)
        self.lr_per_sample = lr_per_sample
        self.betas = tuple(betas)
        self.eps = eps
        self.weight_decay = weight_decay
        self.decay_biases_and_norms = decay_biases_and_norms
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"Trainer.optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.optimizer = optimizer
        self.momentum = momentum
        self.fused_optimizer = fused_optimizer
        self.lr_milestones = None if lr_milestones is None else list(lr_milestones)
        self.lr_gamma = lr_gamma
        self.clip_norm = clip_norm
        if precision not in PRECISIONS:
            raise ValueError(f"Trainer.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Trainer.nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        if distributed not in STRATEGIES:
            raise ValueError(f"Trainer.distributed must be one of {', '.join(STRATEGIES)}, got {distributed!r}")
        self.distributed = distributed
        self.keep_last = keep_last
        self.tensorboard = tensorboard
        self.log_every = log_every
        self.eval_every = eval_every
        self.eval_batches = eval_batches
        self.checkpoint_every = checkpoint_every
        self.seed = seed
        self.num_workers = num_workers
        self.length_bucketing = length_bucketing
        if compile is not None and compile not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(f"Trainer.compile must be None or a torch.compile backend ({', '.join(torch._dynamo.list_backends())}), got {compile!r}")
        self.compile = compile
        self.onednn_linears = onednn_linears
        self.onednn_min_multiply_adds = onednn_min_multiply_adds
        if loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"Trainer.loss_normalization must be one of {LOSS_NORMALIZATIONS}, not {loss_normalization!r}")
        self.loss_normalization = loss_normalization

    def resolve_precision(self, device: torch.device, echo: Echo, requested: Optional[str] = None, compiled: Optional[bool] = None) -> Precision:
        """The precision a run on `device` computes in: `requested` (e.g. `--precision`), else the
        recipe's. `compiled`: whether the task runs under torch.compile (default: as
        `Trainer.compile` says), which keeps the linear layers off oneDNN."""
        compiled = self.compile is not None if compiled is None else compiled
        return resolve_precision(
            requested or self.precision, device, from_recipe=requested is None, echo=echo,
            onednn_linears=self.onednn_linears and not compiled, onednn_min_multiply_adds=self.onednn_min_multiply_adds,
        )

    def check_runnable(self, world_size: int, text_stream: bool) -> None:
        """What would otherwise fail only once a run has claimed its folder: batch sizes that
        `world_size` processes cannot share, TensorBoard without its package.

        Raises:
            ValueError: saying what to bind or install.
        """
        self.per_process_batches(world_size, text_stream)
        if self.tensorboard and not tensorboard_available():
            raise ValueError(TENSORBOARD_MISSING)

    def per_process_batches(self, world_size: int, text_stream: bool = True) -> tuple[int, int]:
        """(image-text, text-only) samples of a micro-batch that each of `world_size` processes
        takes (text-only 0 without the `text_stream`).

        Raises:
            ValueError: a batch size that does not split evenly between the processes (with
                bindings that keep the step's samples and do split, where there are such).
        """
        sizes = {"batch_size": self.schedule.batch_size}
        if text_stream:
            sizes["text_batch_size"] = self.schedule.text_batch_size
        for name, samples in sizes.items():
            if samples % world_size:
                raise ValueError(
                    f"Trainer.{name} = {samples} samples (over all processes) does not split evenly between {world_size} processes; "
                    + _even_split_hint(sizes, self.schedule.accumulation_steps, world_size)
                )
        return sizes["batch_size"] // world_size, sizes.get("text_batch_size", 0) // world_size

    def schedule_for(self, max_steps: Optional[int] = None) -> Schedule:
        """The recipe's schedule, cut to `max_steps` when given (e.g. `--max-steps`)."""
        schedule = self.schedule
        if max_steps is not None:
            schedule = Schedule(
                max_steps, schedule.batch_size, schedule.text_batch_size, schedule.accumulation_steps, min(schedule.warmup_steps, max_steps)
            )
        return schedule

    def build_optimizer(self, task: torch.nn.Module, lr: float, schedule: Schedule):
        """The optimiser and its LR schedule, as the recipe asks."""
        if self.optimizer == "sgd":
            optimizer = build_sgd(task, lr, self.momentum, self.weight_decay, self.decay_biases_and_norms, self.fused_optimizer)
        else:
            official = self.optimizer == "adamw"
            optimizer = build_adamw(task, lr, self.betas, self.eps, self.weight_decay, self.decay_biases_and_norms, official, self.fused_optimizer)
        if self.lr_milestones is not None:
            return optimizer, warmup_step_schedule(optimizer, schedule.warmup_steps, self.lr_milestones, self.lr_gamma)
        return optimizer, warmup_linear_schedule(optimizer, schedule.warmup_steps, schedule.total_steps)

    def optimizer_step(
        self,
        task: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: Optional[torch.amp.GradScaler],
        loss: Optional[Tensor] = None,
        processes: Processes = Processes(),
    ) -> Optional[str]:
        """Clip the gradients and step. Returns None when the step was taken, else why it was
        skipped: 'overflow' (fp16: the scaled gradients overflowed while the step's `loss` was
        finite in every process; the scaler backs its scale off) or 'nonfinite' (a NaN or
        infinite loss or gradient, with `nonfinite = 'skip'`). Waits for the
        device once, to learn whether the gradient norm (the same in every process) is finite;
        only when it is not, the processes also agree on whether every loss was.

        Raises:
            NonFiniteGradients: a NaN or infinite loss or gradient with `nonfinite = 'stop'`
                (in fp16 too: a loss that is not finite is no overflow of the scaled gradients).
                The caller names the step.
        """
        if scaler is not None:
            scaler.unscale_(optimizer)
        gradients = [parameter for parameter in task.parameters() if parameter.grad is not None]
        if self.clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(gradients, self.clip_norm)
        else:
            norm = torch.nn.utils.get_total_norm([parameter.grad for parameter in gradients])
        skipped = None
        if bool(torch.isfinite(local_value(norm))):  # the step's one wait for the device
            optimizer.step()  # the gradients are unscaled and finite: what `scaler.step` would do, without its own wait
        elif scaler is not None and not processes.any(loss is not None and not bool(torch.isfinite(loss))):
            skipped = "overflow"
        else:
            skipped = "nonfinite"
        if scaler is not None:
            scaler.update()  # from the checks `unscale_` recorded on the device: the scale backs off after infinite gradients
        if skipped == "nonfinite" and self.nonfinite == "stop":
            raise NonFiniteGradients("the loss or a gradient is not finite (NaN or infinite)")
        return skipped

    def train_step(
        self,
        task: Task,
        model: nn.Module,
        micro: list[tuple[VLBatch, Optional[VLBatch]]],
        optimizer: torch.optim.Optimizer,
        scaler: Optional[torch.amp.GradScaler],
        metrics: TaskMetrics,
        precision: Precision,
        processes: Processes = Processes(),
        pin: bool = False,
    ) -> Optional[str]:
        """One optimiser step over its micro-batches (`task.prepare`d on the host): their forward
        and backward passes through `model` (the task, or its DDP/FSDP wrapper), the metrics'
        update on the device, clipping and the update; returns what `optimizer_step` returns.
        Reads one value back from the device (whether the gradient norm is finite)."""
        device = next(task.parameters()).device
        shares = step_shares(task, micro, processes, device, self.loss_normalization)
        step_total = torch.zeros((), device=device)  # the step's loss; averaged over processes it is the global batch's
        for index, (batch, text_batch) in enumerate(micro):
            batch = batch.to(device, non_blocking=pin)
            text_batch = text_batch.to(device, non_blocking=pin) if text_batch is not None else None
            with gradient_sync(model, index == len(micro) - 1), precision.autocast():
                output = model(batch, text_batch)
                loss = step_loss(output, shares[index] if shares is not None else None, len(micro))
                (scaler.scale(loss) if scaler is not None else loss).backward()
            step_total += loss.detach().float()
            metrics.update({key: value for key, value in output.metrics.items() if key != "loss"})
        metrics.update({"loss": step_total})
        return self.optimizer_step(model, optimizer, scaler, step_total, processes)

    def fit(
        self,
        task: Task,
        data: RunData,
        out_dir: str | Path,
        recipe_text: str = "",
        max_steps: Optional[int] = None,
        echo: Echo = print,
        precision: Optional[Precision] = None,
        resume_from: Optional[str | Path] = None,
        processes: Processes = Processes(),
    ) -> dict[str, float]:
        """Train on the device the task is on, log to `out_dir/metrics.jsonl`, checkpoint to
        `out_dir/checkpoints/step-XXXXXXX/`; returns the last validation metrics.

        `precision` (e.g. from `--precision`) overrides the recipe's `Trainer.precision`.
        `resume_from` (a checkpoint folder of this run, see `claim_run_folder`) continues the run
        exactly where that checkpoint was written: weights, optimiser, schedule, loss scale, data
        position and every random generator; the log keeps its records up to that step.
        Under several `processes` (torchrun), each trains on its share of every global batch
        (DDP or FSDP, `Trainer.distributed`); rank 0 alone prints, logs and writes checkpoints.

        Raises:
            TrainingInterrupted: SIGINT or SIGTERM arrived; the last finished step was checkpointed.
            NonFiniteGradients: a NaN or infinite loss or gradient with `nonfinite = 'stop'`.
        """
        out_dir = Path(out_dir)
        schedule = self.schedule_for(max_steps)
        text_stream = reads_text_stream(task, data)
        samples = schedule.batch_size + (schedule.text_batch_size if text_stream else 0)
        world = processes.world_size
        process_batch, process_text_batch = self.per_process_batches(world, text_stream)
        lr = scaled_learning_rate(self.lr_per_sample, samples, schedule.accumulation_steps)
        echo(data.description)
        echo(
            f"schedule: {schedule.total_steps} steps of {schedule.batch_size} image-text"
            + (f" + {schedule.text_batch_size} text-only" if text_stream else "")
            + f" samples x {schedule.accumulation_steps} accumulation"
            + (f" ({process_batch}{f' + {process_text_batch}' if text_stream else ''} in each of {world} processes)" if world > 1 else "")
            + f"; lr = {self.lr_per_sample:g} per sample x {samples * schedule.accumulation_steps} = {lr:g}, {self.optimizer}, "
            f"warm-up {schedule.warmup_steps} steps then "
            + (f"x{self.lr_gamma:g} after steps {self.lr_milestones}" if self.lr_milestones is not None else "linear decay to 0")
        )
        device = next(task.parameters()).device
        precision = precision or self.resolve_precision(device, echo)
        echo(
            f"computing on {device} in {precision.name}" + (", large linear layers on oneDNN" if precision.routes_linears_to_onednn else "")
            + (f", {world} processes ({self.distributed})" if world > 1 else "")
        )
        torch.manual_seed(self.seed)
        pin = pins_memory(device)
        saved = None
        if resume_from is not None:  # the training state is read and checked before any weight is loaded
            saved = load_training_state(resume_from, _RunState.SAVED)
            load_checkpoint(task, resume_from, recipe_text or None)
        if self.compile is not None:
            task.compile(backend=self.compile)  # in place: the parameters and their names stay the task's
            echo(f"compiling the task's forward with torch.compile (backend {self.compile!r}); each new batch shape compiles once")
        model = wrap(task, self.distributed, processes)
        optimizer, scheduler = self.build_optimizer(model, lr, schedule)
        workers = self.num_workers if self.num_workers is not None else default_workers(device, processes.local_world_size)
        streams = dict(num_workers=workers, pin_memory=pin, rank=processes.rank, world_size=world)
        lengths = None
        if self.length_bucketing and hasattr(data.train, "length"):
            lengths = run_lengths(data.train, workers, processes, out_dir / LENGTHS, reuse=resume_from is not None, echo=echo)
        run = _RunState(
            model=model,
            strategy=self.distributed,
            processes=processes,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=precision.grad_scaler(),
            precision=precision.name,
            metrics=TaskMetrics(device),
            batches=BatchStream(data.train, process_batch, data.collate, self.seed, self.length_bucketing, lengths=lengths, **streams),
            # The text stream's own seed, so text sample i and caption sample i never share masking draws.
            texts=BatchStream(data.text, process_text_batch, collate_text, mix_seed(self.seed, TEXT_STREAM), **streams) if text_stream else None,
        )
        log = self._log(out_dir) if processes.is_main else NullLog()
        checkpoints = out_dir / CHECKPOINTS
        last_checkpoint: Optional[Path] = None
        if saved is not None:
            self._resume(run, saved, Path(resume_from), echo)
            log.keep_until(run.step)
            last_checkpoint = Path(resume_from)
        progress = ProgressLine(schedule.total_steps) if processes.is_main else NullProgress()
        interval_start = time.perf_counter()
        shown: dict[str, float] = {}  # the progress line shows the last logged averages
        validation: dict[str, float] = {}
        evaluate = lambda: self._validate(task, model, data, process_batch, precision, processes)  # noqa: E731
        model.train()
        with StopSignals() as signals:
            while run.step < schedule.total_steps:
                run.step += 1
                step = run.step
                micro = [
                    task.prepare(next(run.batches), next(run.texts) if run.texts is not None else None)
                    for _ in range(schedule.accumulation_steps)
                ]
                run.interval_samples += sum(batch.batch_size for batch, _ in micro) * world
                try:
                    skipped = self.train_step(task, model, micro, optimizer, run.scaler, run.metrics, precision, processes, pin)
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
                    skipped_records = {"data/skipped": float(sum(processes.gather(run.batches.skipped)))} if getattr(data.train, "skip_bad_records", False) else {}
                    log.write({
                        "step": step, "lr": scheduler.get_last_lr()[0], "samples_per_second": throughput, **averages,
                        **skipped_records, **({"skipped_steps": run.skipped_steps} if run.skipped_steps else {}),
                    })
                    run.metrics, run.interval_samples, interval_start = TaskMetrics(device), 0, time.perf_counter()
                progress.update(step, shown, throughput)
                if (self.eval_every and step % self.eval_every == 0) or step == schedule.total_steps:
                    validation = evaluate()
                    log.write({"step": step, "split": "val", **validation})
                stopping = processes.any(signals.received is not None) and step < schedule.total_steps
                if (self.checkpoint_every and step % self.checkpoint_every == 0) or step == schedule.total_steps or stopping:
                    last_checkpoint = self._save(run, task, checkpoints, step, recipe_text, processes)
                if stopping:
                    progress.close()
                    raise TrainingInterrupted(
                        f"{signals.received or 'a signal to another process'} after step {step}: checkpoint written to {last_checkpoint}; "
                        "continue with --resume"
                    )
        progress.close()
        if resume_from is not None and not validation:  # the run had already reached its last step
            validation = evaluate()
        return validation

    def _resume(self, run: _RunState, saved: dict[str, Any], folder: Path, echo: Echo) -> None:
        """Continue `run` from a checkpoint's training state, saying where and what differs.

        The same number of processes continues exactly. Another number (the batch sizes count
        every process, so the global batches and the learning rate stay the same) continues the
        weights, optimiser, schedule and data position, but each process's random generators
        (dropout) restart from (seed, step, rank) and its metric interval from empty.

        Raises:
            CheckpointError: the state does not fit this run (naming the file).
        """
        exact = run.load_state_dict(saved, folder / STATE_FILE)
        echo(f"resumed from {folder} at step {run.step}")
        if not exact:
            seed = mix_seed(self.seed, run.step, run.processes.rank)
            torch.manual_seed(seed)
            random.seed(seed)
            written_by = len(saved["processes"])
            echo(
                f"the checkpoint was written by {written_by} process{'es' if written_by > 1 else ''} and this run has "
                f"{run.processes.world_size}: the weights, optimiser, schedule and data continue where they were, the random "
                "draws (dropout) start afresh, so the run no longer repeats an uninterrupted one bit for bit"
            )
        if saved.get("precision", run.precision) != run.precision:
            echo(f"the checkpoint was trained in {saved['precision']} and this run computes in {run.precision}")

    def _log(self, out_dir: Path) -> JsonLinesLog | Logs:
        """metrics.jsonl, and TensorBoard's event files when the recipe asks."""
        records = JsonLinesLog(out_dir / METRICS)
        return Logs(records, TensorBoardLog(out_dir / TENSORBOARD)) if self.tensorboard else records

    def _validate(
        self, task: Task, model: nn.Module, data: RunData, batch_size: int, precision: Precision, processes: Processes
    ) -> dict[str, float]:
        """Validation metrics, each process evaluating its share of the split in batches of
        `batch_size` (FSDP runs the sharded `model` itself, so every process must take part)."""
        with precision.autocast():
            return evaluate_run(
                model if self.distributed == "fsdp" else task, data, batch_size, self.eval_batches, self.seed,
                (processes.rank, processes.world_size),
            )

    def _save(self, run: _RunState, task: Task, checkpoints: Path, step: int, recipe: str, processes: Processes) -> Path:
        """Write the checkpoint of `step` (every process takes part in gathering sharded state;
        rank 0 writes) and keep the newest `keep_last`."""
        weights = full_weights(run.model, processes) if run.strategy == "fsdp" and processes.distributed else None
        state = run.state_dict()
        folder = checkpoint_folder(checkpoints, step)
        if processes.is_main:
            folder = save_checkpoint(task, checkpoints, step, recipe, state, weights)
            if self.keep_last is not None:
                keep_last(checkpoints, self.keep_last)
        processes.barrier()
        return folder


def _even_split_hint(sizes: dict[str, int], accumulation: int, world_size: int) -> str:
    """What to bind instead: every stream's samples per step (size x accumulation) unchanged, in
    micro-batches the processes share evenly, where there are such; else multiples."""
    for fewer in range(accumulation, 0, -1):
        per_step = {name: samples * accumulation for name, samples in sizes.items()}
        if all(total % fewer == 0 and (total // fewer) % world_size == 0 for total in per_step.values()):
            bindings = [f"--bind 'Trainer.{name} = {total // fewer}'" for name, total in per_step.items()]
            return f"the same samples per step split as {' '.join(bindings)} --bind 'Trainer.accumulation_steps = {fewer}'"
    return f"bind multiples of {world_size}"


def reads_text_stream(task: Task, data: RunData) -> bool:
    """Whether a run trains on a text-only stream beside the image-text batches."""
    return data.text is not None and task.reads_text_only


def step_shares(
    task: Task, micro: list[tuple[VLBatch, Optional[VLBatch]]], processes: Processes, device: torch.device, normalization: str = "step"
) -> Optional[list[dict[str, Tensor]]]:
    """For a step split into micro-batches (or processes) with `normalization` 'step': each
    micro-batch's share of each loss term, its count over the step's total count (summed over
    the processes), times the number of processes (their gradients are averaged). None with
    'micro_batch', when the step is one batch, or when the task does not count
    (`Task.loss_counts`): each batch's loss is then its own mean, and the step averages them."""
    if normalization == "micro_batch" or (len(micro) == 1 and not processes.distributed):
        return None
    counts = [task.loss_counts(batch, text_batch) for batch, text_batch in micro]
    if any(count is None for count in counts):
        return None
    names = sorted({name for count in counts for name in count})
    local = torch.tensor([[count.get(name, 0.0) for name in names] for count in counts], dtype=torch.float32)
    totals = all_sum(local.sum(0).to(device), processes).clamp(min=1.0)
    shares = local.to(device) / totals * processes.world_size
    return [dict(zip(names, row)) for row in shares]


def step_loss(output: TaskOutput, shares: Optional[dict[str, Tensor]], micro_batches: int) -> Tensor:
    """The loss a micro-batch backpropagates: its terms weighted by their share of the step, or
    (without shares) its own mean over the micro-batches."""
    if shares is None or output.terms is None:
        return output.loss / micro_batches
    return sum((term.weight * term.mean * shares[name] for name, term in output.terms.items()), output.loss.new_zeros(()))


@dataclass
class _RunState:
    """What a training run carries from step to step, and saves in every checkpoint."""

    model: nn.Module
    strategy: str
    processes: Processes
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    metrics: TaskMetrics
    batches: BatchStream
    texts: Optional[BatchStream]
    precision: str = "fp32"
    step: int = 0
    skipped_steps: int = 0
    interval_samples: int = 0

    SAVED: ClassVar[tuple[str, ...]] = (
        "step", "optimizer", "scheduler", "scaler", "batches", "texts", "skipped_steps", "processes",
    )  # what a checkpoint's training state must hold

    def state_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "step": self.step,
            "optimizer": optimizer_state(self.model, self.optimizer, self.strategy),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "batches": self.batches.state_dict(),
            "texts": self.texts.state_dict() if self.texts is not None else None,
            "skipped_steps": self.skipped_steps,
            # each process's own: its metrics' interval so far, its generators (dropout) and the bad records it skipped
            "processes": self.processes.gather(
                {"metrics": self.metrics.state_dict(), "random": capture_random_state(), "skipped_records": self.batches.skipped}
            ),
        }

    def load_state_dict(self, state: dict[str, Any], source: Path) -> bool:
        """Restore a checkpoint's state (read from `source`); the random generators last, after
        the data streams have drawn what restarting their epoch draws. Returns whether each
        process's own state (random generators, metric interval) was restored: only a run of as
        many processes has it. The throughput restarts with the resumed run.

        Raises:
            CheckpointError: the state does not fit this run, or comes from a multi-process run
                of before batch sizes counted every process.
            DataError: a bad record read while the data streams find their place again.
        """
        written_by = len(state["processes"])
        if "precision" not in state and written_by > 1:  # saved since batch sizes count every process
            raise CheckpointError(
                f"{source}: written by {written_by} processes when batch sizes counted one process's samples; resuming it would "
                "train smaller global batches. Start a new run from its weights (experiment.pretrained) instead"
            )
        try:
            load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.strategy)
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state["scaler"] is not None:
                self.scaler.load_state_dict(state["scaler"])
            self.step, self.skipped_steps = state["step"], state["skipped_steps"]
            self.batches.load_state_dict(state["batches"])  # reading data again: a DataError is the data's
            if self.texts is not None and state["texts"] is not None:
                self.texts.load_state_dict(state["texts"])
            # Bad records each process skipped (a one-process state from before they were kept per process has its stream's).
            skipped = [own.get("skipped_records", state["batches"].get("skipped", 0) if written_by == 1 else 0) for own in state["processes"]]
            if written_by != self.processes.world_size:
                self.batches.skipped = sum(skipped) if self.processes.is_main else 0
                return False
            own = state["processes"][self.processes.rank]
            self.batches.skipped = skipped[self.processes.rank]
            self.metrics.load_state_dict(own["metrics"])
            restore_random_state(own["random"])
        except DataError:
            raise
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as error:
            raise CheckpointError(f"{source}: does not fit this run ({error_summary(error)})") from None
        return True
