"""`vlblocks train` and `vlblocks eval`: recipe → data, task, trainer → results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import gin
import torch

from vlblocks.config import build_from_recipe, configured, experiment, parse_recipe
from vlblocks.data.finetune_data import FinetuneData
from vlblocks.data.pretraining_data import PretrainingData
from vlblocks.data.synthetic import DEMO_CLASSES, VISUAL_WORDS
from vlblocks.objectives.pretraining_task import PretrainingTask
from vlblocks.train.checkpoint import load_checkpoint, load_pretrained
from vlblocks.train.evaluate import AblatedDataset, evaluate, evaluate_task


def build_run(recipe: str | Path, bindings: Sequence[str] = (), echo=print) -> tuple[torch.nn.Module, PretrainingData | FinetuneData, object]:
    """Parse the recipe and build (task, data, trainer): the data first, then the task seeded
    by the trainer, fitted to the data (vocabulary, answer list) and started from the
    pre-trained checkpoint when the recipe names one."""
    parse_recipe(recipe, bindings)
    trainer = build_from_recipe(recipe, configured("Trainer"))
    build_task, build_data, pretrained, segment_b_from_a = build_from_recipe(recipe, experiment)
    data = build_from_recipe(recipe, build_data)
    torch.manual_seed(trainer.seed)  # the model's initialisation follows the recipe's seed
    task = build_from_recipe(recipe, build_task)
    if isinstance(task, PretrainingTask):
        fit_pretraining_to_data(task, data, echo)
    else:
        if pretrained is not None:
            echo(load_pretrained(task, pretrained, task.pretrained_prefixes))
        if segment_b_from_a:
            with torch.no_grad():
                segments = task.vlbert.embedding.token_type_embeddings.weight
                segments[1] = segments[0]
        task.fit_to_data(data, echo)
    return task, data, trainer


def fit_pretraining_to_data(task: PretrainingTask, data: PretrainingData, echo=print) -> None:
    """Fit the masking objectives to the tokenizer, and the demo's classes to the region head."""
    tokenizer = data.tokenizer
    model_vocab = task.model.vlbert.embedding.word_embeddings.num_embeddings
    if tokenizer.vocab_size > model_vocab:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} word pieces but the model's vocabulary holds {model_vocab}")
    for objective in (task.masked_lm, task.text_only.masked_lm if task.text_only is not None else None):
        if objective is not None:
            objective.use_vocabulary(tokenizer.vocab_size, tokenizer.mask_id)
    head = task.model.region_head
    if data.is_demo and head is not None and head.region_cls_pred.out_features > len(DEMO_CLASSES):
        echo(
            f"the demo detector has {len(DEMO_CLASSES)} classes; they fill the first columns of the "
            f"{head.region_cls_pred.out_features}-way region head"
        )
        data.train.class_columns = data.val.class_columns = head.region_cls_pred.out_features


def demo_word_groups(data: PretrainingData) -> dict[str, list[int]]:
    """Token ids of the demo's colour, shape and relation words (single WordPieces only)."""
    groups = {}
    for group in ("colour", "shape", "relation"):
        ids = []
        for word in VISUAL_WORDS[group]:
            pieces, _ = data.tokenizer.encode_words([word])
            if len(pieces) == 1:
                ids.append(pieces[0])
        groups[group] = ids
    return groups


def evaluate_with_ablations(task: PretrainingTask, data: PretrainingData, batch_size: int, max_batches: Optional[int], seed: int) -> dict:
    """Validation metrics as trained, with every image blanked, and with every caption dropped."""
    groups = demo_word_groups(data) if data.is_demo else None
    return {
        variant: evaluate(task, dataset, batch_size, max_batches, seed, groups)
        for variant, dataset in (
            ("full", data.val),
            ("image_blanked", AblatedDataset(data.val, blank_image=True)),
            ("caption_dropped", AblatedDataset(data.val, drop_caption=True)),
        )
    }


def train_from_recipe(recipe: str | Path, bindings: Sequence[str], out_dir: str | Path, max_steps: Optional[int] = None, echo=print) -> dict:
    task, data, trainer = build_run(recipe, bindings, echo)
    recipe_text = gin.config_str()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recipe.gin").write_text(recipe_text)
    return trainer.fit(task, data, out_dir, recipe_text, max_steps, echo)


def eval_from_recipe(
    recipe: str | Path, bindings: Sequence[str], checkpoint: str | Path, batch_size: int = 64, max_batches: Optional[int] = None,
    ablations: bool = True,
) -> dict:
    task, data, trainer = build_run(recipe, bindings)
    load_checkpoint(task, checkpoint)
    if not isinstance(task, PretrainingTask):
        return {"full": evaluate_task(task, data.val, data.collate, batch_size, max_batches)}
    if ablations:
        return evaluate_with_ablations(task, data, batch_size, max_batches, trainer.seed)
    groups = demo_word_groups(data) if data.is_demo else None
    return {"full": evaluate(task, data.val, batch_size, max_batches, trainer.seed, groups)}


def format_results(results: dict) -> str:
    return json.dumps(results, indent=2, sort_keys=True)
