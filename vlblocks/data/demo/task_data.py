"""Fine-tuning demo data: the demo's drawn scenes written as VQA v2, VCR and RefCOCO+ files.

Each writer lays its files out exactly as the public dataset does (the same readers parse them),
so a fine-tuning recipe runs end to end with no data configured, and tests exercise the real
formats:

- RefCOCO+: `refcoco+/refs(unc).p` (a protocol-2 pickle), `refcoco+/instances.json` (COCO
  instances, `bbox` [x, y, w, h]), the same instances as COCO's `annotations/instances_train2014.json`,
  and JPEGs in `train2014/COCO_train2014_<id:012d>.jpg`.
  Expressions name one shape by colour and shape ("the red circle"), plus its size when needed
  to make it unique; the candidates are the scene's shapes.
- VQA v2: `vqa/v2_OpenEnded_mscoco_<split>_questions.json`, `vqa/v2_mscoco_<split>_annotations.json`
  (10 human answers each), `vqa/answers_vqa.txt`, and VL-BERT precomputed features
  `vgbua_res101_precomputed/trainval2014_resnet101_faster_rcnn_genome/<image_id>.json`. The
  features come from the pixels: a 4x4 RoIAlign of each box over the RGB image in [0, 1]
  (48 numbers per box). Questions ask a shape's colour, a colour's shape, the number of shapes,
  or whether a coloured shape is present.
- VCR: `<split>.jsonl` with mixed token lists (detection references as index lists) and
  `vcr1images/demo/<name>.{jpg,json}` metadata (boxes with scores, polygons, names). The
  question asks the colour of a referenced shape; the rationale says what it looks like.
  Object names are the demo's shape names (`DEMO_CLASSES`), not COCO's.

Everything is deterministic in the seed.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from vlblocks.data.demo.scenes import (
    COLOUR_RGB,
    DEMO_CLASSES,
    SHAPES,
    TASK_SCENES,
    DemoScenes,
    Scene,
    demo_vocabulary,
    generate_scenes,
    manifest_matches,
)
from vlblocks.data.formats.conceptual_captions import b64_float32
from vlblocks.ops.roi_align import roi_align

FORMAT_VERSION = 1
TASK_NAMES = ("vqa", "vcr", "refcoco")
# Seed streams distinct from the pre-training demo's, so fine-tuning images are unseen; the
# questions, targets and answer orders draw from their own stream.
_TRAIN_STREAM, _VAL_STREAM, _CHOICE_STREAM = 10, 11, 7
_VAL_IMAGE_IDS = 500_000
_FEATURE_GRID = 4


@dataclass
class DemoTaskPaths:
    """Where the demo task data went: the dataset root, the vocabulary, and the split names."""

    root: Path
    vocab: Path
    train_split: str
    val_split: str


def write_demo_task(task: str, demo: DemoScenes) -> DemoTaskPaths:
    """Writes (once; cached by a manifest) the demo data of `task` in its public layout under
    `<demo.directory>/finetune/<task>`: `demo.train` and
    `demo.val` scenes (`TASK_SCENES` where unset).

    The vocabulary is the pre-training demo's in `demo.directory`, of whatever size is there
    (`demo_vocabulary`; written with the defaults if missing), so a model pre-trained on the demo
    fine-tunes here unchanged.
    """
    if task not in TASK_NAMES:
        raise ValueError(f"demo task must be one of {TASK_NAMES}, got {task!r}")
    demo = demo.sized(TASK_SCENES)
    directory = Path(demo.directory).expanduser()
    train, val, seed, image_size = demo.train, demo.val, demo.seed, demo.image_size
    vocab = demo_vocabulary(directory, seed=seed, image_size=image_size)
    root = directory / "finetune" / task
    manifest = {"format_version": FORMAT_VERSION, "task": task, "train": train, "val": val, "seed": seed, "image_size": image_size}
    splits = {"vqa": ("train2014", "val2014"), "vcr": ("train", "val"), "refcoco": ("train", "val")}[task]
    paths = DemoTaskPaths(root, vocab, *splits)
    manifest_path = root / "manifest.json"
    if manifest_matches(manifest_path, manifest, []):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    scenes = {
        splits[0]: generate_scenes(train, seed, image_size, _TRAIN_STREAM),
        splits[1]: generate_scenes(val, seed, image_size, _VAL_STREAM),
    }
    writer = {"vqa": _write_vqa, "vcr": _write_vcr, "refcoco": _write_refcoco}[task]
    writer(root, scenes, np.random.default_rng([seed, _CHOICE_STREAM]))
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return paths


def demo_description(task: str, paths: DemoTaskPaths, root_binding: str) -> str:
    """What a data builder prints when it falls back to the demo, and how to point it at real data."""
    return (
        f"no data configured: fine-tuning {task} on the embedded demo data ({paths.root}, in the dataset's public "
        f"layout). Point the recipe at real data with --bind \"{root_binding} = '/data/...'\" "
        "(see docs/data.md for the layout), or use the recipes in recipes/finetune/."
    )


def _image_ids(split_index: int, count: int) -> range:
    start = 1 + split_index * _VAL_IMAGE_IDS
    return range(start, start + count)


def _jpeg(scene: Scene) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(scene.image)).convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _referring_words(scene: Scene, index: int) -> list[str]:
    """'the colour shape': unique in its scene (the generator never repeats a colour-shape pair)."""
    return ["the", scene.colours[index], scene.shapes[index]]


def _xywh(box: np.ndarray) -> list[float]:
    """Pixel-edge (x1, y1, x2, y2) → COCO [x, y, w, h]."""
    return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]


# ---------------------------------------------------------------------------------------------
# RefCOCO+


def _write_refcoco(root: Path, scenes: dict[str, list[Scene]], rng: np.random.Generator) -> None:
    (root / "refcoco+").mkdir(parents=True, exist_ok=True)
    (root / "train2014").mkdir(exist_ok=True)
    images, annotations, refs = [], [], []
    for split_index, (split, split_scenes) in enumerate(scenes.items()):
        for image_id, scene in zip(_image_ids(split_index, len(split_scenes)), split_scenes):
            file_name = f"COCO_train2014_{image_id:012d}.jpg"
            (root / "train2014" / file_name).write_bytes(_jpeg(scene))
            size = Image.open(io.BytesIO(scene.image)).size
            images.append({"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]})
            for index, box in enumerate(scene.boxes):
                ann_id = image_id * 10 + index
                bbox = _xywh(box)
                annotations.append({
                    "id": ann_id, "image_id": image_id, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0,
                    "category_id": DEMO_CLASSES.index(scene.shapes[index]), "segmentation": [],
                })
            target = int(rng.integers(len(scene.shapes)))
            words = _referring_words(scene, target)
            ref_id = len(refs)
            refs.append({
                "ref_id": ref_id, "ann_id": image_id * 10 + target, "image_id": image_id, "split": split,
                "category_id": DEMO_CLASSES.index(scene.shapes[target]),
                "file_name": f"COCO_train2014_{image_id:012d}_{image_id * 10 + target}.jpg", "sent_ids": [ref_id],
                "sentences": [{"tokens": words, "raw": " ".join(words).capitalize(), "sent_id": ref_id, "sent": " ".join(words)}],
            })
    categories = [{"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(DEMO_CLASSES) if i]
    instances = json.dumps({"images": images, "annotations": annotations, "categories": categories})
    (root / "refcoco+" / "instances.json").write_text(instances)
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / "instances_train2014.json").write_text(instances)  # COCO's own file, which the RefCOCO+ recipes read
    with open(root / "refcoco+" / "refs(unc).p", "wb") as handle:
        pickle.dump(refs, handle, protocol=2)


# ---------------------------------------------------------------------------------------------
# VQA v2


def _questions(scene: Scene, rng: np.random.Generator) -> Iterator[tuple[str, str, str, str]]:
    """(question, answer, answer type, question type) tuples true for the scene: a colour and a
    shape question about a shape the question singles out, a count, and a yes/no presence."""
    index = int(rng.integers(len(scene.shapes)))
    if scene.shapes.count(scene.shapes[index]) == 1:
        yield f"What color is the {scene.shapes[index]}?", scene.colours[index], "other", "what color is the"
    if scene.colours.count(scene.colours[index]) == 1:
        yield f"What shape is the {scene.colours[index]} one?", scene.shapes[index], "other", "what"
    yield "How many shapes are there?", str(len(scene.shapes)), "number", "how many"
    colour = list(COLOUR_RGB)[int(rng.integers(len(COLOUR_RGB)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    present = any(c == colour and s == shape for c, s in zip(scene.colours, scene.shapes))
    yield f"Is there a {colour} {shape}?", "yes" if present else "no", "yes/no", "is there a"


def _region_features(scene: Scene) -> np.ndarray:
    """[N, 48] float32: a 4x4 RoIAlign of each box over the RGB pixels in [0, 1]."""
    pixels = np.asarray(Image.open(io.BytesIO(scene.image)).convert("RGB"), np.float32) / 255.0
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    rois = torch.cat([torch.zeros(len(scene.boxes), 1), torch.from_numpy(scene.boxes)], 1)
    return roi_align(image, rois, _FEATURE_GRID, 1.0, 2, True).flatten(1).numpy()


def _write_vqa(root: Path, scenes: dict[str, list[Scene]], rng: np.random.Generator) -> None:
    features = root / "vgbua_res101_precomputed" / "trainval2014_resnet101_faster_rcnn_genome"
    features.mkdir(parents=True, exist_ok=True)
    (root / "vqa").mkdir(exist_ok=True)
    answers: set[str] = set()
    for split_index, (split, split_scenes) in enumerate(scenes.items()):
        questions, annotations = [], []
        for image_id, scene in zip(_image_ids(split_index, len(split_scenes)), split_scenes):
            size = Image.open(io.BytesIO(scene.image)).size
            (features / f"{image_id}.json").write_text(json.dumps({
                "image_id": image_id, "image_w": size[0], "image_h": size[1], "num_boxes": len(scene.boxes),
                "boxes": b64_float32(scene.boxes), "features": b64_float32(_region_features(scene)),
            }))
            for number, (question, answer, answer_type, question_type) in enumerate(_questions(scene, rng)):
                question_id = image_id * 10 + number
                questions.append({"image_id": image_id, "question": question, "question_id": question_id})
                annotations.append({
                    "question_id": question_id, "image_id": image_id, "question_type": question_type,
                    "answer_type": answer_type, "multiple_choice_answer": answer,
                    "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)],
                })
                answers.add(answer)
        header = {"info": {"description": "vlblocks demo"}, "license": {}, "data_subtype": split}
        (root / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(
            json.dumps({**header, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions})
        )
        (root / "vqa" / f"v2_mscoco_{split}_annotations.json").write_text(
            json.dumps({**header, "data_type": "mscoco", "annotations": annotations})
        )
    (root / "vqa" / "answers_vqa.txt").write_text("".join(f"{answer}\n" for answer in sorted(answers)))


# ---------------------------------------------------------------------------------------------
# VCR


def _polygon(box: np.ndarray) -> list[list[float]]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]


def _write_vcr(root: Path, scenes: dict[str, list[Scene]], rng: np.random.Generator) -> None:
    images = root / "vcr1images" / "demo"
    images.mkdir(parents=True, exist_ok=True)
    colours = list(COLOUR_RGB)
    for split_index, (split, split_scenes) in enumerate(scenes.items()):
        lines = []
        for image_id, scene in zip(_image_ids(split_index, len(split_scenes)), split_scenes):
            name = f"scene_{image_id}"
            (images / f"{name}.jpg").write_bytes(_jpeg(scene))
            size = Image.open(io.BytesIO(scene.image)).size
            (images / f"{name}.json").write_text(json.dumps({
                "boxes": [[*map(float, box), 1.0] for box in scene.boxes], "segms": [[_polygon(box)] for box in scene.boxes],
                "names": scene.shapes, "width": size[0], "height": size[1],
            }))
            target = int(rng.integers(len(scene.shapes)))
            wrong = [c for c in colours if c != scene.colours[target]]
            options = [scene.colours[target], *(wrong[int(i)] for i in rng.choice(len(wrong), 3, replace=False))]
            order = [int(i) for i in rng.permutation(4)]
            answer_label = order.index(0)
            lines.append({
                "annot_id": f"{split}-{image_id}", "movie": "demo", "objects": scene.shapes,
                "img_fn": f"demo/{name}.jpg", "metadata_fn": f"demo/{name}.json",
                "question": ["What", "color", "is", [target], "?"],
                "answer_choices": [[[target], "is", options[i], "."] for i in order],
                "answer_label": answer_label,
                "rationale_choices": [[[target], "looks", options[i], "in", "the", "picture", "."] for i in order],
                "rationale_label": answer_label,
            })
        (root / f"{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
