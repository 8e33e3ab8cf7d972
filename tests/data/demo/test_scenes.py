import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from vlblocks.data.demo.scenes import (
    COLOUR_RGB,
    DEMO_CLASSES,
    VISUAL_WORDS,
    DemoScenes,
    demo_vocabulary,
    generate_corpus,
    generate_scenes,
    write_demo_dataset,
)
from vlblocks.data.demo.task_data import write_demo_task
from vlblocks.data.formats.conceptual_captions import ConceptualCaptionsReader
from vlblocks.data.pipeline.wordpiece import WordPieceTokenizer

NUMBERS = {"one": 1, "two": 2, "three": 3}


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(300, seed=7)


def pixels(scene) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(scene.image)).convert("RGB"))


def centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def resolve(scene, phrase: list[str]) -> int:
    """The index of the one shape a noun phrase ('a [size] colour shape') describes."""
    assert phrase[0] in {"a", "an", "the"}, phrase
    *size, colour, shape = phrase[1:]
    assert len(size) <= 1 and colour in VISUAL_WORDS["colour"] and shape in VISUAL_WORDS["shape"], phrase
    assert phrase[0] != "an" or phrase[1][0] in "aeiou"
    matches = [
        i for i in range(len(scene.shapes))
        if scene.colours[i] == colour and scene.shapes[i] == shape and (not size or scene.sizes[i] == size[0])
    ]
    assert len(matches) == 1, (phrase, scene.colours, scene.shapes, scene.sizes)
    return matches[0]


def check_relation(scene, words: list[str]) -> None:
    verb = words.index("is")
    subject, rest = words[:verb], words[verb + 1:]
    if rest[:2] == ["to", "the"]:
        rest = rest[2:]
    relation = rest[0]
    obj = rest[2:] if relation in ("left", "right") else rest[1:]
    if relation in ("left", "right"):
        assert rest[1] == "of"
    (ax, ay), (bx, by) = centre(scene.boxes[resolve(scene, subject)]), centre(scene.boxes[resolve(scene, obj)])
    assert {"left": ax < bx, "right": ax > bx, "above": ay < by, "below": ay > by}[relation], (words, scene.boxes)


def split_list(words: list[str]) -> list[list[str]]:
    phrases, current = [], []
    for word in words:
        if word in (",", "and"):
            phrases.append(current)
            current = []
        else:
            current.append(word)
    return phrases + [current]


def check_caption(scene) -> dict:
    """Checks every claim of the caption against the scene; returns what kinds of claims it made."""
    words = scene.caption
    assert words[-1] == "." and all(w == w.lower() and " " not in w for w in words)
    sentences, current = [], []
    for word in words:
        if word == ".":
            sentences.append(current)
            current = []
        else:
            current.append(word)
    kinds = {"relation": 0, "list": 0, "count": 0}
    for sentence in sentences:
        if set(sentence) & VISUAL_WORDS["relation"]:
            check_relation(scene, sentence)
            kinds["relation"] += 1
        elif ":" in sentence or sentence[:3] == ["the", "shapes", "are"]:
            if ":" in sentence:
                colon = sentence.index(":")
                head, listed = sentence[:colon], sentence[colon + 1:]
            else:
                head, listed = None, sentence[3:]
            indices = [resolve(scene, phrase) for phrase in split_list(listed)]
            assert sorted(indices) == list(range(len(scene.shapes)))
            if head is not None:
                assert NUMBERS[head[2]] == len(scene.shapes)
            kinds["list"] += 1
        else:
            assert sentence[-1] in ("shape", "shapes")
            number = next(w for w in sentence if w in NUMBERS)
            colour = [w for w in sentence if w in COLOUR_RGB]
            expected = scene.colours.count(colour[0]) if colour else len(scene.shapes)
            assert NUMBERS[number] == expected, (sentence, scene.colours)
            assert (sentence[-1] == "shape") == (expected == 1)
            kinds["count"] += 1
    return kinds


def test_same_seed_gives_identical_bytes_and_other_seeds_differ():
    first, again = generate_scenes(20, seed=3), generate_scenes(20, seed=3)
    for a, b in zip(first, again):
        assert a.image == b.image and a.caption == b.caption
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.class_scores, b.class_scores)
    other = generate_scenes(20, seed=4)
    assert [s.image for s in other] != [s.image for s in first]
    assert generate_corpus(5, seed=3) == generate_corpus(5, seed=3)


def test_captions_are_true_for_their_scene(scenes):
    totals = {"relation": 0, "list": 0, "count": 0}
    for scene in scenes:
        assert len(scene.shapes) in (2, 3)
        kinds = check_caption(scene)
        if len(scene.shapes) == 3:
            assert kinds["relation"] >= 2 or kinds["list"] >= 1
        assert kinds["relation"] >= 1
        for kind in totals:
            totals[kind] += kinds[kind]
        mentioned = set(scene.caption)
        assert mentioned & VISUAL_WORDS["colour"] <= set(scene.colours)
        assert mentioned & VISUAL_WORDS["shape"] <= set(scene.shapes)
    assert all(total > 20 for total in totals.values()), totals  # every template is used
    used = {word for scene in scenes for word in scene.caption}
    for kind in ("colour", "shape", "relation", "size", "count"):
        assert VISUAL_WORDS[kind] <= used, kind


def test_scene_contents_vary(scenes):
    assert {len(s.shapes) for s in scenes} == {2, 3}
    assert {shape for s in scenes for shape in s.shapes} == set(DEMO_CLASSES[1:])
    assert {size for s in scenes for size in s.sizes} == {"small", "large"}
    for scene in scenes:
        assert len(set(zip(scene.colours, scene.shapes))) == len(scene.shapes)


def test_boxes_are_tight_around_the_drawn_shapes(scenes):
    for scene in scenes[:100]:
        image = pixels(scene)
        assert image.shape == (64, 64, 3)
        colour_masks = {colour: (image == rgb).all(axis=-1) for colour, rgb in COLOUR_RGB.items()}
        background = ~np.any(np.stack(list(colour_masks.values())), axis=0)
        assert background.sum() > 0.4 * 64 * 64
        assert (image[background] >= 190).all()  # the background never looks like a shape colour
        for colour, mask in colour_masks.items():
            expected = sum(
                int(mask[int(b[1]):int(b[3]), int(b[0]):int(b[2])].sum())
                for b, c in zip(scene.boxes, scene.colours) if c == colour
            )
            assert mask.sum() == expected  # no pixel of a shape colour lies outside its shapes' boxes
        for box, colour in zip(scene.boxes, scene.colours):
            x1, y1, x2, y2 = (int(v) for v in box)
            assert np.array_equal(box, [x1, y1, x2, y2]) and 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            inside = colour_masks[colour][y1:y2, x1:x2]
            # the shape touches all four sides of its box
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            # and nothing of that colour in a 1-px ring around the box
            ring = colour_masks[colour][max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1].sum()
            assert ring == inside.sum()
            if colour_masks[colour][y1:y2, x1:x2].all():
                continue  # a square fills its box
            assert not background[y1:y2, x1:x2].all()


def test_large_shapes_are_larger_and_boxes_do_not_overlap(scenes):
    for scene in scenes:
        sides = scene.boxes[:, 2:] - scene.boxes[:, :2]
        for side, size in zip(sides, scene.sizes):
            assert (side.max() >= 17) == (size == "large")
        for i in range(len(scene.boxes)):
            for j in range(i + 1, len(scene.boxes)):
                a, b = scene.boxes[i], scene.boxes[j]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_class_distributions_sum_to_one_and_peak_on_the_true_class(scenes):
    peaks = []
    for scene in scenes:
        assert scene.class_scores.shape == (len(scene.shapes), len(DEMO_CLASSES))
        assert scene.class_scores.dtype == np.float32
        np.testing.assert_allclose(scene.class_scores.sum(axis=1), 1.0, atol=1e-6)
        assert (scene.class_scores > 0).all()
        for row, shape in zip(scene.class_scores, scene.shapes):
            assert DEMO_CLASSES[int(row.argmax())] == shape
            peaks.append(row.max())
    assert 0.7 <= min(peaks) and max(peaks) <= 0.9 and np.std(peaks) > 0.03


def test_demo_dataset_is_cached_and_read_back(tmp_path):
    started = time.perf_counter()
    paths = write_demo_dataset(tmp_path / "demo", train=60, val=12, seed=1)
    elapsed = time.perf_counter() - started
    print(f"demo dataset (60 + 12 scenes, corpus, vocab) written in {elapsed:.2f} s")
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    assert manifest["train"] == 60 and manifest["seed"] == 1 and "format_version" in manifest
    files = sorted(p for p in paths.root.iterdir())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    contents = {p: p.read_bytes() for p in files}
    time.sleep(0.01)
    again = write_demo_dataset(tmp_path / "demo", train=60, val=12, seed=1)
    assert again == paths
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    other = write_demo_dataset(tmp_path / "other", train=60, val=12, seed=1)
    for p in files:
        assert (other.root / p.name).read_bytes() == contents[p], p.name
    changed = write_demo_dataset(tmp_path / "demo", train=61, val=12, seed=1)  # new arguments regenerate
    assert len(ConceptualCaptionsReader(changed.train)) == 61

    paths = other
    reader = ConceptualCaptionsReader(paths.train)
    assert len(reader) == 60 and len(ConceptualCaptionsReader(paths.val)) == 12
    train_scenes = generate_scenes(60, seed=1)
    for index in (0, 17, 59):
        example, scene = reader[index], train_scenes[index]
        assert example.caption == scene.caption and example.features is None
        assert (example.image_width, example.image_height) == (64, 64)
        order = np.argsort(-scene.class_scores.max(axis=1), kind="stable")
        np.testing.assert_array_equal(example.boxes, scene.boxes[order])
        assert np.array_equal(np.asarray(example.load_image()), pixels(scene))
    val_captions = [e.caption for e in ConceptualCaptionsReader(paths.val)]
    assert val_captions != [s.caption for s in train_scenes[:12]]

    corpus = paths.corpus.read_text().splitlines()
    assert len(corpus) == 2000 and all(line.strip() for line in corpus)
    tokenizer = WordPieceTokenizer(paths.vocab)
    assert (tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) == (2, 3, 4)
    for words in (train_scenes[0].caption, corpus[0].split()):
        ids, _ = tokenizer.encode_words(words)
        assert tokenizer.unk_id not in ids
    for word in set().union(*VISUAL_WORDS.values()):  # visual words are single pieces
        assert tokenizer.token_to_id(word) >= 5


def test_generation_speed():
    started = time.perf_counter()
    generate_scenes(500, seed=0)
    per_scene = (time.perf_counter() - started) / 500
    print(f"scene generation: {per_scene * 1e3:.2f} ms per 64x64 scene")


def test_task_demo_reuses_the_pretraining_demo_of_any_size(tmp_path):
    """A task demo takes the vocabulary of the pre-training demo already there, at the size a run
    bound, instead of rewriting it at the default size under a model trained with it."""
    small = write_demo_dataset(tmp_path, train=12, val=4, seed=0)
    vocab, manifest = small.vocab.read_bytes(), (tmp_path / "manifest.json").read_bytes()
    paths = write_demo_task("vqa", DemoScenes(str(tmp_path), train=6, val=3))
    assert paths.vocab == small.vocab and small.vocab.read_bytes() == vocab
    assert (tmp_path / "manifest.json").read_bytes() == manifest
    assert demo_vocabulary(tmp_path, seed=0) == small.vocab
