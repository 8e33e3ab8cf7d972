import json
import shutil
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlblocks.app.recipes import RecipeError
from vlblocks.app.run import build_run, train_from_recipe
from vlblocks.data.demo.scenes import write_demo_dataset
from vlblocks.models.task import LossTerm, TaskOutput
from vlblocks.train.adamw import VLBertAdamW
from vlblocks.train.batches import BatchStream
from vlblocks.train.checkpoint import CheckpointError, load_pretrained, save_checkpoint
from vlblocks.train.distributed import Processes
from vlblocks.train.loop import Trainer, step_loss, step_shares
from vlblocks.train.optim import build_adamw, scaled_learning_rate, warmup_linear_schedule


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_short_run_lowers_the_loss_and_is_repeatable(demo_recipe, small_demo_bindings, tmp_path):
    started = time.time()
    train_from_recipe(demo_recipe, small_demo_bindings, tmp_path / "a", echo=lambda *_: None)
    records = [r for r in read_log(tmp_path / "a" / "metrics.jsonl") if "split" not in r]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert records[-1]["mlm/loss"] < records[0]["mlm/loss"]
    assert {"mvrc/accuracy", "mlm_text/loss", "lr", "samples_per_second"} <= set(records[-1])
    assert (tmp_path / "a" / "checkpoints" / "step-0000030" / "model.safetensors").is_file()
    assert (tmp_path / "a" / "recipe.gin").read_text().strip()
    validation = [r for r in read_log(tmp_path / "a" / "metrics.jsonl") if r.get("split") == "val"]
    assert validation and validation[-1]["mlm/count"] > 0

    train_from_recipe(demo_recipe, small_demo_bindings, tmp_path / "b", echo=lambda *_: None)
    again = [r for r in read_log(tmp_path / "b" / "metrics.jsonl") if "split" not in r]
    assert all(started <= record["time"] <= time.time() for record in read_log(tmp_path / "a" / "metrics.jsonl")), "wall-clock time"
    strip = lambda r: {k: v for k, v in r.items() if k not in ("samples_per_second", "time")}
    assert [strip(r) for r in again] == [strip(r) for r in records], "same seed, same numbers on CPU"


def test_pretraining_continues_from_the_checkpoint_the_recipe_names(demo_recipe, small_demo_bindings, tmp_path):
    """`experiment.pretrained` goes through the task protocol for pre-training too: every tensor
    of the checkpoint, tied word embeddings included, replaces the seeded initialisation."""
    trained, _, _ = build_run(demo_recipe, small_demo_bindings, echo=lambda *_: None)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(1.0)
    path = save_checkpoint(trained, tmp_path, 3, "recipe")
    lines = []
    started, _, _ = build_run(demo_recipe, [*small_demo_bindings, f"experiment.pretrained = '{path}'"], echo=lines.append)
    assert any(line.startswith(f"loaded {len(trained.state_dict()) - 1} tensors from {path}") for line in lines)  # the tied decoder once
    for (name, expected), (_, loaded) in zip(trained.state_dict().items(), started.state_dict().items()):
        assert torch.equal(expected, loaded), name


def test_a_pretrained_checkpoint_that_maps_onto_nothing_is_refused(demo_recipe, small_demo_bindings, tmp_path):
    task, _, _ = build_run(demo_recipe, small_demo_bindings, echo=lambda *_: None)
    path = save_checkpoint(task, tmp_path, 1, "recipe")
    with pytest.raises(CheckpointError, match="none of its tensors maps onto PretrainingTask"):
        load_pretrained(task, path, {"nowhere.": "model."})


def test_segment_b_from_a_needs_a_task_with_a_vlbert(demo_recipe, small_demo_bindings):
    with pytest.raises(RecipeError, match="PretrainingTask has no `vlbert`"):
        build_run(demo_recipe, [*small_demo_bindings, "experiment.segment_b_from_a = True"], echo=lambda *_: None)


def test_batch_sizes_are_global_and_split_evenly_between_processes(demo_recipe, small_demo_bindings, tmp_path, monkeypatch):
    """A recipe's batch sizes count every process's samples: each of N processes takes 1/N, and
    a size N does not divide is refused before the run folder is touched."""
    _, _, trainer = build_run(demo_recipe, small_demo_bindings, echo=lambda *_: None)  # 16 image-text + 8 text-only
    assert trainer.per_process_batches(1) == (16, 8)
    assert trainer.per_process_batches(4) == (4, 2)
    assert trainer.per_process_batches(16, text_stream=False) == (1, 0)
    with pytest.raises(ValueError, match=r"Trainer.text_batch_size = 8 samples \(over all processes\) does not split evenly between 16"):
        trainer.per_process_batches(16)
    two_streams = Trainer(batch_size=8, text_batch_size=4, accumulation_steps=2)  # 16 + 8 samples a step
    with pytest.raises(ValueError, match="as --bind 'Trainer.batch_size = 16' --bind 'Trainer.text_batch_size = 8' --bind 'Trainer.accumulation_steps = 1'"):
        two_streams.per_process_batches(8)

    monkeypatch.setattr("vlblocks.app.run.join_processes", lambda device: Processes(rank=0, world_size=3))
    monkeypatch.setattr("torch.distributed.barrier", lambda group=None: None)
    (tmp_path / "metrics.jsonl").write_text("another run's log\n")
    with pytest.raises(RecipeError, match=r"Trainer.batch_size = 16 samples \(over all processes\) does not split evenly between 3 processes"):
        train_from_recipe(demo_recipe, small_demo_bindings, tmp_path, echo=lambda *_: None)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert (tmp_path / "metrics.jsonl").read_text() == "another run's log\n"


def test_tensorboard_without_its_package_is_refused_before_the_run_folder_is_touched(demo_recipe, small_demo_bindings, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules["vlblocks.train.loop"], "tensorboard_available", lambda: False)  # `vlblocks.train` is also a function
    (tmp_path / "metrics.jsonl").write_text("another run's log\n")
    with pytest.raises(RecipeError, match=r'Trainer.tensorboard needs the tensorboard package: pip install "vlblocks\[tensorboard\]"'):
        train_from_recipe(demo_recipe, [*small_demo_bindings, "demo/Trainer.tensorboard = True"], tmp_path, echo=lambda *_: None)
    assert (tmp_path / "metrics.jsonl").read_text() == "another run's log\n"
    build_run(demo_recipe, [*small_demo_bindings, "demo/Trainer.tensorboard = True"], echo=lambda *_: None)  # evaluation writes no events


def test_a_run_on_real_format_data_logs_the_bad_records_it_skipped(demo_recipe, small_demo_bindings, tmp_path):
    """`pretraining_data.skip_bad_records`: two Conceptual Captions records with an empty caption
    are skipped, and the training records of metrics.jsonl count them in `data/skipped`."""
    demo = write_demo_dataset(tmp_path / "demo", train=48, val=16, seed=0)
    lines = demo.train.read_text().splitlines()
    for number in (1, 5):
        broken = json.loads(lines[number])
        broken["caption"] = []
        lines[number] = json.dumps(broken)
    for name in ("train_image.zip", "train_frcnn.zip"):
        shutil.copy(demo.train.parent / name, tmp_path / name)
    annotations = tmp_path / "train_frcnn.json"
    annotations.write_text("\n".join(lines) + "\n")
    bindings = [
        *small_demo_bindings, f"pretraining_data.train_annotations = '{annotations}'", f"pretraining_data.val_annotations = '{demo.val}'",
        f"pretraining_data.corpus = '{demo.corpus}'", f"pretraining_data.vocab = '{demo.vocab}'", "pretraining_data.skip_bad_records = True",
        "ImageTransform.shorter_side = 64", "ImageTransform.longer_side = 64", "Trainer.total_steps = 3", "Trainer.batch_size = 16",
        "Trainer.text_batch_size = 8", "Trainer.warmup_steps = 1", "Trainer.log_every = 1", "Trainer.eval_batches = 1",
    ]
    train_from_recipe(demo_recipe, [*bindings, "Trainer.checkpoint_every = 1"], tmp_path / "run", echo=lambda *_: None)
    logged = [record for record in read_log(tmp_path / "run" / "metrics.jsonl") if "loss" in record and "split" not in record]
    counts = [record["data/skipped"] for record in logged]  # so far: each bad record counts when its shuffled turn comes
    assert counts == sorted(counts) and counts[-1] == 2.0, counts  # 3 batches of 16 read all 48 records
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000003")  # the checkpoint keeps the count
    train_from_recipe(demo_recipe, [*bindings, "Trainer.checkpoint_every = 1"], tmp_path / "run", echo=lambda *_: None, resume=True)
    resumed = [record["data/skipped"] for record in read_log(tmp_path / "run" / "metrics.jsonl") if "loss" in record and "split" not in record]
    assert resumed == counts


def test_learning_rate_scaling_and_triangle_schedule():
    assert scaled_learning_rate(1e-7, 128 + 128, 1) == pytest.approx(2.56e-5)
    assert scaled_learning_rate(1e-7, 64 + 64, 2) == pytest.approx(2.56e-5)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    schedule = warmup_linear_schedule(optimizer, warmup_steps=4, total_steps=12)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0, 0.25, 0.5, 0.75, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_gradient_accumulation_consumes_more_samples_per_step(demo_recipe, small_demo_bindings, tmp_path):
    bindings = [*small_demo_bindings, "demo/Trainer.accumulation_steps = 2", "demo/Trainer.total_steps = 5"]
    train_from_recipe(demo_recipe, bindings, tmp_path, echo=lambda *_: None)
    records = [r for r in read_log(tmp_path / "metrics.jsonl") if "split" not in r]
    # 5 steps x 2 micro-batches x 16 samples; counts of masked tokens add up over 10 micro-batches
    assert records[-1]["step"] == 5
    assert records[-1]["mlm/count"] > 5 * 16 * 2  # more than one masked token per caption on average


class MeanSquaredErrorTask(torch.nn.Module):
    """y = w x with w starting at 0, loss = mean over the batch of (w x - y)^2, no `loss_counts`:
    the trainer then divides each micro-batch's mean by the number of micro-batches."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def loss_counts(self, batch, text_batch=None):
        return None

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> TaskOutput:
        x, y = batch
        return TaskOutput(((self.w * x - y) ** 2).mean(), {}, None)


def accumulated_gradients(task: torch.nn.Module, micro: list, normalization: str = "step") -> list[torch.Tensor]:
    """The loop's arithmetic for one step (`step_shares`, `step_loss`): each micro-batch's loss backward, summed."""
    task.zero_grad(set_to_none=True)
    shares = step_shares(task, micro, Processes(), torch.device("cpu"), normalization)
    for index, (batch, text_batch) in enumerate(micro):
        output = task(batch, text_batch) if text_batch is not None else task(batch)
        step_loss(output, shares[index] if shares is not None else None, len(micro)).backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in task.parameters()]


def test_two_micro_batches_of_a_mean_loss_give_the_gradient_of_one_double_batch():
    task = MeanSquaredErrorTask()
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.ones(4)
    # dL/dw at w = 0: mean(-2 x y) = -2 x 2.5 = -5 over all 4; micro-batches: (-3 + -7) / 2 = -5 (without the / 2: -10)
    (whole,) = accumulated_gradients(task, [((x, y), None)])
    (split,) = accumulated_gradients(task, [((x[:2], y[:2]), None), ((x[2:], y[2:]), None)])
    assert whole.item() == -5.0 and split.item() == -5.0


class TokenMeanTask(MeanSquaredErrorTask):
    """The same loss as a mean over tokens (x > 0; x = 0 is padding) that counts its tokens, as
    the masked-word loss does."""

    def loss_counts(self, batch, text_batch=None):
        return {"tokens": float((batch[0] > 0).sum())}

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> TaskOutput:
        x, y = batch
        real = x > 0
        mean = ((self.w * x - y) ** 2)[real].mean()
        return TaskOutput(mean, {}, None, {"tokens": LossTerm(mean)})


def test_micro_batches_average_their_own_means_as_the_official_code_or_share_one_step_mean():
    task = TokenMeanTask()
    y = torch.ones(3)
    # micro-batch A has 1 token (x = 1), B has 3 (x = 2, 3, 4); dL/dw at w = 0 is mean(-2 x y)
    micro = [((torch.tensor([1.0, 0.0, 0.0]), y), None), ((torch.tensor([2.0, 3.0, 4.0]), y), None)]
    # official (common/trainer.py): each micro-batch's mean / 2 = (-2 + -6) / 2 = -4
    assert accumulated_gradients(task, micro, "micro_batch")[0].item() == pytest.approx(-4.0)
    # 'step': the mean over the step's 4 tokens = -2 x (1 + 2 + 3 + 4) / 4 = -5
    assert accumulated_gradients(task, micro, "step")[0].item() == pytest.approx(-5.0)


def test_the_official_loss_normalization_is_the_default_and_checked(demo_recipe, small_demo_bindings):
    _, _, trainer = build_run(demo_recipe, small_demo_bindings, echo=lambda *_: None)
    assert trainer.loss_normalization == "micro_batch"
    with pytest.raises(ValueError, match="loss_normalization"):
        build_run(demo_recipe, [*small_demo_bindings, "demo/Trainer.loss_normalization = 'tokens'"], echo=lambda *_: None)


def test_two_micro_batches_of_pre_training_give_the_gradients_of_one_double_batch(demo_recipe, small_demo_bindings):
    task, data, _ = build_run(demo_recipe, small_demo_bindings, echo=lambda *_: None)
    task.eval()  # no dropout, so both ways run the same network
    whole = task.prepare(next(BatchStream(data.train, 16, data.collate, seed=0)))
    halves = BatchStream(data.train, 8, data.collate, seed=0)
    split = [task.prepare(next(halves)), task.prepare(next(halves))]  # the same 16 samples and masks, 8 + 8
    assert torch.equal(torch.cat([split[0][0].text_ids[:, :5], split[1][0].text_ids[:, :5]]), whole[0].text_ids[:, :5])
    expected, accumulated = accumulated_gradients(task, [whole]), accumulated_gradients(task, split)
    assert sum(g.abs().sum() for g in expected) > 0
    for one, two in zip(expected, accumulated):
        torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-6)


def tied_toy_model() -> torch.nn.Sequential:
    """Embedding(5, 2) tied to a Linear(2, 5) head, a Linear(2, 2) and a LayerNorm(2): 6 distinct
    parameters (embedding = head weight, linear weight and bias, LayerNorm weight and bias, head bias)."""
    embedding = torch.nn.Embedding(5, 2)
    head = torch.nn.Linear(2, 5)
    head.weight = embedding.weight
    return torch.nn.Sequential(embedding, torch.nn.Linear(2, 2), torch.nn.LayerNorm(2), head)


def step_with_zero_gradients(optimizer: torch.optim.Optimizer) -> None:
    """One step where Adam's own update is 0 (m = v = 0), so only the weight decay moves parameters."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()


def test_weight_decay_reaches_every_parameter_by_default_and_tied_weights_once():
    # VL-BERT's */function/train.py: one group of model.named_parameters() (tied weights once), WD on all
    model = tied_toy_model()
    optimizer = build_adamw(model, 0.5, weight_decay=0.1)
    (group,) = optimizer.param_groups
    assert group["weight_decay"] == 0.1 and len(group["params"]) == 6
    layer_norm = model[2]
    torch.nn.init.ones_(layer_norm.bias)
    step_with_zero_gradients(optimizer)
    # decoupled decay: 1 x (1 - lr x wd) = 1 - 0.5 x 0.1 = 0.95, on the LayerNorm weight and bias alike
    assert layer_norm.weight.tolist() == pytest.approx([0.95, 0.95]) and layer_norm.bias.tolist() == pytest.approx([0.95, 0.95])


def test_biases_and_layer_norms_can_be_exempt_from_weight_decay():
    model = tied_toy_model()
    optimizer = build_adamw(model, 0.5, weight_decay=0.1, decay_biases_and_norms=False)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and len(decayed["params"]) == 2  # embedding (= head weight), linear weight
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 4  # 2 biases, LayerNorm weight and bias
    linear, layer_norm = model[1], model[2]
    torch.nn.init.ones_(linear.weight)
    step_with_zero_gradients(optimizer)
    assert layer_norm.weight.tolist() == [1.0, 1.0]  # untouched
    assert linear.weight.flatten().tolist() == pytest.approx([0.95] * 4)  # 1 - 0.5 x 0.1


def test_the_weight_decay_exemption_is_a_recipe_binding(demo_recipe, small_demo_bindings):
    bindings = [*small_demo_bindings, "demo/Trainer.decay_biases_and_norms = False"]
    task, _, trainer = build_run(demo_recipe, bindings, echo=lambda *_: None)
    optimizer, _ = trainer.build_optimizer(task, 1e-3, trainer.schedule)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [trainer.weight_decay, 0.0]


def test_the_official_adamw_adds_epsilon_before_the_bias_correction_and_decays_after_the_update():
    # VL-BERT's common/nlp/bert/optimization.py AdamW with lr 0.1, betas (0.9, 0.999), eps 0.1, wd 0.5,
    # one weight w = 1 with gradient g = 2:
    #   m = 0.1 x 2 = 0.2, v = 0.001 x 4 = 0.004, denom = sqrt(0.004) + 0.1 = 0.16324555
    #   step size = 0.1 x sqrt(1 - 0.999) / (1 - 0.9) = 0.031622777
    #   w = 1 - 0.031622777 x 0.2 / 0.16324555 = 0.96125741, then x (1 - 0.1 x 0.5) = 0.91319454
    weight = torch.nn.Parameter(torch.ones(1))
    weight.grad = torch.full((1,), 2.0)
    optimizer = VLBertAdamW([weight], lr=0.1, betas=(0.9, 0.999), eps=0.1, weight_decay=0.5)
    optimizer.step()
    assert weight.item() == pytest.approx(0.91319454, abs=1e-7)
    # torch.optim.AdamW decays first and adds epsilon after the correction: 0.95 - 0.1 x 2 / (2 + 0.1) = 0.85476190
    other = torch.nn.Parameter(torch.ones(1))
    other.grad = torch.full((1,), 2.0)
    torch.optim.AdamW([other], lr=0.1, betas=(0.9, 0.999), eps=0.1, weight_decay=0.5).step()
    assert other.item() == pytest.approx(0.85476190, abs=1e-7)
    # a second step: m = 0.9 x 0.2 + 0.2 = 0.38, v = 0.999 x 0.004 + 0.004 = 0.007996,
    # step size = 0.1 x sqrt(1 - 0.999^2) / (1 - 0.81) = 0.23532721..., denom = sqrt(0.007996) + 0.1
    optimizer.step()
    expected = (0.91319454 - 0.1 * (1 - 0.999**2) ** 0.5 / 0.19 * 0.38 / (0.007996**0.5 + 0.1)) * 0.95
    assert weight.item() == pytest.approx(expected, abs=1e-6)
    assert optimizer.state[weight]["step"].device.type == "cpu"  # a host counter: reading it waits for no device


def test_recipes_choose_the_official_or_torchs_adamw(demo_recipe, small_demo_bindings):
    for name, kind in (("adamw", VLBertAdamW), ("torch_adamw", torch.optim.AdamW)):
        task, _, trainer = build_run(demo_recipe, [*small_demo_bindings, f"demo/Trainer.optimizer = '{name}'"], echo=lambda *_: None)
        optimizer, _ = trainer.build_optimizer(task, 1e-4, trainer.schedule_for(2))
        assert type(optimizer) is kind


def test_length_bucketing_reads_the_demo_records_lengths_and_trains(demo_recipe, small_demo_bindings, tmp_path):
    said = []
    bindings = [*small_demo_bindings, "demo/Trainer.length_bucketing = True", "demo/Trainer.total_steps = 10", "demo/Trainer.num_workers = 1"]
    train_from_recipe(demo_recipe, bindings, tmp_path, echo=said.append)
    assert "length bucketing: reading the length of each of the 240 training samples once, in 1 worker process" in said
    records = [r for r in read_log(tmp_path / "metrics.jsonl") if "split" not in r]
    assert [r["step"] for r in records] == [5, 10] and all(r["loss"] > 0 for r in records)


def test_a_bucketed_run_resumes_exactly_with_the_lengths_it_kept(demo_recipe, small_demo_bindings, tmp_path):
    bindings = [*small_demo_bindings, "demo/Trainer.length_bucketing = True", "demo/Trainer.total_steps = 6",
                "demo/Trainer.checkpoint_every = 3", "demo/Trainer.log_every = 3"]
    train_from_recipe(demo_recipe, bindings, tmp_path / "whole", echo=lambda *_: None)
    assert len(np.load(tmp_path / "whole" / "lengths.npy")) == 240
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-0000006")
    said = []
    train_from_recipe(demo_recipe, bindings, tmp_path / "resumed", echo=said.append, resume=True)
    kept = tmp_path / "resumed" / "lengths.npy"
    assert f"length bucketing: the lengths of the 240 training samples from {kept}, as the run read them" in said
    whole, resumed = (load_file(tmp_path / run / "checkpoints" / "step-0000006" / "model.safetensors") for run in ("whole", "resumed"))
    assert whole.keys() == resumed.keys() and all(torch.equal(resumed[name], whole[name]) for name in whole)
