import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlblocks.data.errors import DataError
from vlblocks.data.formats.vqa import VQAQuestion, VQAReader
from vlblocks.data.formats.vqa_answers import (
    accuracy_percent,
    answer_targets,
    build_answer_vocabulary,
    normalize_answer,
    normalize_training_answer,
    read_answer_vocabulary,
    soft_scores,
    vocabulary_index,
    vocabulary_keys,
    vqa_accuracy,
    write_answer_vocabulary,
)

QUESTIONS_NAME = "v2_OpenEnded_mscoco_val2014_questions.json"
ANNOTATIONS_NAME = "v2_mscoco_val2014_annotations.json"


def question(question_id, image_id, text):
    return {"image_id": image_id, "question": text, "question_id": question_id}


def annotation(question_id, image_id, answers, answer_type="other", question_type="what is the"):
    counts = {answer: answers.count(answer) for answer in answers}
    return {
        "question_type": question_type,
        "multiple_choice_answer": max(counts, key=counts.get),
        "answers": [
            {"answer": answer, "answer_confidence": ("yes", "maybe", "no")[i % 3], "answer_id": i + 1}
            for i, answer in enumerate(answers)
        ],
        "image_id": image_id,
        "answer_type": answer_type,
        "question_id": question_id,
    }


def questions_document(questions, subtype="val2014"):
    return {"info": {"description": "VQA v2"}, "task_type": "Open-Ended", "data_type": "mscoco",
            "license": {"name": "CC BY 4.0"}, "data_subtype": subtype, "questions": questions}


def annotations_document(annotations, subtype="val2014"):
    return {"info": {"description": "VQA v2"}, "license": {"name": "CC BY 4.0"},
            "data_subtype": subtype, "annotations": annotations}


QUESTIONS = [
    question(262148000, 262148, "Where is he looking?"),
    question(262148001, 262148, "What's on the table?"),
    question(393225000, 393225, "Is the bowl full?"),
]
ANNOTATIONS = [
    annotation(262148000, 262148, ["down"] * 7 + ["at table", "skateboard", "table"]),
    annotation(262148001, 262148, ["pizza"] * 4 + ["food"] * 3 + ["plate", "pizza box", "nothing"]),
    annotation(393225000, 393225, ["no"] * 9 + ["yes"], answer_type="yes/no", question_type="is the"),
]


def write_files(folder, questions=QUESTIONS, annotations=ANNOTATIONS):
    questions_path = folder / QUESTIONS_NAME
    questions_path.write_text(json.dumps(questions_document(questions)))
    if annotations is None:
        return questions_path, None
    annotations_path = folder / ANNOTATIONS_NAME
    annotations_path.write_text(json.dumps(annotations_document(annotations)))
    return questions_path, annotations_path


# ---------------------------------------------------------------- reader


def test_reads_questions_joined_with_annotations(tmp_path):
    questions_path, annotations_path = write_files(tmp_path)
    reader = VQAReader(questions_path, annotations_path)
    assert len(reader) == 3
    first = reader[0]
    assert first == VQAQuestion(
        record=f"{questions_path} question_id 262148000",
        question_id=262148000,
        image_id=262148,
        question="Where is he looking?",
        question_tokens=["where", "is", "he", "looking", "?"],
        answers=["down"] * 7 + ["at table", "skateboard", "table"],
        answer_type="other",
        question_type="what is the",
        multiple_choice_answer="down",
    )
    assert reader[1].question_tokens == ["what", "'", "s", "on", "the", "table", "?"]
    assert reader[-1].answer_type == "yes/no" and reader[-1].answers == ["no"] * 9 + ["yes"]
    assert [record.question_id for record in reader] == [262148000, 262148001, 393225000]
    with pytest.raises(IndexError):
        reader[3]


def test_annotations_are_joined_by_question_id_not_position(tmp_path):
    questions_path, annotations_path = write_files(tmp_path, annotations=ANNOTATIONS[::-1])
    assert [record.multiple_choice_answer for record in VQAReader(questions_path, annotations_path)] == [
        "down", "pizza", "no"]


def test_test_split_has_no_annotations(tmp_path):
    questions_path, _ = write_files(tmp_path, annotations=None)
    records = list(VQAReader(questions_path))
    assert [record.question for record in records] == [q["question"] for q in QUESTIONS]
    assert all(record.answers is None and record.answer_type is None for record in records)
    assert all(record.multiple_choice_answer is None and record.question_type is None for record in records)


def test_question_tokens_are_uncased_basic_tokens(tmp_path):
    questions_path, _ = write_files(tmp_path, [question(1, 2, "Is the CAFÉ's sign \"red\"?")], None)
    assert VQAReader(questions_path)[0].question_tokens == [
        "is", "the", "cafe", "'", "s", "sign", '"', "red", '"', "?"]


def _set(path):
    """A mutation setting a (nested) key of the first question (q) or annotation (a)."""
    def mutate(questions, annotations, value):
        target = questions[0] if path[0] == "q" else annotations[0]
        for key in path[1:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _delete(path):
    def mutate(questions, annotations, _):
        target = questions[0] if path[0] == "q" else annotations[0]
        for key in path[1:-1]:
            target = target[key]
        del target[path[-1]]
    return mutate


# (mutation, value, file named, record named, field named)
MALFORMED = {
    "question not an object": (lambda q, a, v: q.__setitem__(0, v), [1, 2], "q", "question 0", None),
    "question_id missing": (_delete(("q", "question_id")), None, "q", "question 0", "question_id"),
    "question_id a string": (_set(("q", "question_id")), "262148000", "q", "question 0", "question_id"),
    "question_id a bool": (_set(("q", "question_id")), True, "q", "question 0", "question_id"),
    "question_id repeated": (_set(("q", "question_id")), 262148001, "q", "question_id 262148001",
                             "question_id"),
    "image_id missing": (_delete(("q", "image_id")), None, "q", "question_id 262148000", "image_id"),
    "image_id a float": (_set(("q", "image_id")), 262148.0, "q", "question_id 262148000", "image_id"),
    "question missing": (_delete(("q", "question")), None, "q", "question_id 262148000", "question"),
    "question empty": (_set(("q", "question")), "  ", "q", "question_id 262148000", "question"),
    "question not a string": (_set(("q", "question")), ["where"], "q", "question_id 262148000", "question"),
    "question lone surrogate": (_set(("q", "question")), "why \ud800?", "q", "question_id 262148000",
                                "question"),
    "no annotation": (_set(("a", "question_id")), 5, "q", "question_id 262148000", "question_id"),
    "image_id differs": (_set(("a", "image_id")), 1, "a", "question_id 262148000", "image_id"),
    "nine answers": (lambda q, a, v: a[0]["answers"].pop(), None, "a", "question_id 262148000", "answers"),
    "eleven answers": (lambda q, a, v: a[0]["answers"].append(dict(a[0]["answers"][0])), None, "a",
                       "question_id 262148000", "answers"),
    "answers not a list": (_set(("a", "answers")), "down", "a", "question_id 262148000", "answers"),
    "answers missing": (_delete(("a", "answers")), None, "a", "question_id 262148000", "answers"),
    "answer not an object": (_set(("a", "answers", 3)), "down", "a", "question_id 262148000", "answers[3]"),
    "answer text missing": (_delete(("a", "answers", 3, "answer")), None, "a", "question_id 262148000",
                            "answers[3].answer"),
    "answer text a number": (_set(("a", "answers", 3, "answer")), 2, "a", "question_id 262148000",
                             "answers[3].answer"),
    "answer confidence unknown": (_set(("a", "answers", 3, "answer_confidence")), "sure", "a",
                                  "question_id 262148000", "answers[3].answer_confidence"),
    "answer id out of range": (_set(("a", "answers", 3, "answer_id")), 11, "a", "question_id 262148000",
                               "answers[3].answer_id"),
    "answer id repeated": (_set(("a", "answers", 3, "answer_id")), 1, "a", "question_id 262148000",
                           "answers[3].answer_id"),
    "answer_type unknown": (_set(("a", "answer_type")), "color", "a", "question_id 262148000",
                            "answer_type"),
    "answer_type missing": (_delete(("a", "answer_type")), None, "a", "question_id 262148000",
                            "answer_type"),
    "question_type not a string": (_set(("a", "question_type")), None, "a", "question_id 262148000",
                                   "question_type"),
    "multiple_choice_answer missing": (_delete(("a", "multiple_choice_answer")), None, "a",
                                       "question_id 262148000", "multiple_choice_answer"),
    "annotation repeated": (lambda q, a, v: a.append(copy.deepcopy(a[0])), None, "a",
                            "question_id 262148000", "question_id"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_record_raises_data_error_naming_file_record_and_field(tmp_path, case):
    mutate, value, file_key, record, field = MALFORMED[case]
    questions, annotations = copy.deepcopy(QUESTIONS), copy.deepcopy(ANNOTATIONS)
    mutate(questions, annotations, value)
    questions_path, annotations_path = write_files(tmp_path, questions, annotations)
    reader = VQAReader(questions_path, annotations_path)
    bad_index = 1 if case == "question_id repeated" else 0
    with pytest.raises(DataError) as raised:
        reader[bad_index]
    message = str(raised.value)
    assert str(questions_path if file_key == "q" else annotations_path) in message
    assert record in message
    if field is not None:
        assert f"field {field!r}" in message
    with pytest.raises(DataError):
        list(reader)


def test_skip_mode_collects_bad_records_and_indexing_still_raises(tmp_path):
    questions, annotations = copy.deepcopy(QUESTIONS), copy.deepcopy(ANNOTATIONS)
    questions[0]["question"] = ""
    annotations[2]["answers"].pop()
    questions_path, annotations_path = write_files(tmp_path, questions, annotations)
    reader = VQAReader(questions_path, annotations_path, skip_bad_records=True)
    assert [record.question_id for record in reader] == [262148001]
    assert len(reader.skipped) == 2
    assert "question_id 262148000, field 'question'" in reader.skipped[0]
    assert "question_id 393225000, field 'answers'" in reader.skipped[1]
    list(reader)
    assert len(reader.skipped) == 2  # reset on each pass
    with pytest.raises(DataError):
        reader[0]


def test_annotation_without_usable_question_id(tmp_path):
    annotations = copy.deepcopy(ANNOTATIONS) + [{"question_id": "x"}, 7]
    questions_path, annotations_path = write_files(tmp_path, annotations=annotations)
    with pytest.raises(DataError, match=r"annotation 3, field 'question_id'"):
        VQAReader(questions_path, annotations_path)
    reader = VQAReader(questions_path, annotations_path, skip_bad_records=True)
    assert len(list(reader)) == 3
    assert [message.split(", ")[0] for message in reader.skipped] == [
        f"{annotations_path} annotation 3", f"{annotations_path} annotation 4"]


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "cannot read questions file"),
        (b"{\"questions\": [", ": not valid JSON"),
        (b"\xff\xfe\x00", ": not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b"{\"annotations\": []}", "field 'questions': missing"),
        (b"{\"questions\": {}}", "field 'questions': expected a list, got dict"),
    ],
)
def test_bad_questions_file(tmp_path, content, expected):
    path = tmp_path / QUESTIONS_NAME
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=expected) as raised:
        VQAReader(path)
    assert str(path) in str(raised.value)


def test_bad_annotations_file(tmp_path):
    questions_path, _ = write_files(tmp_path, annotations=None)
    bad = tmp_path / ANNOTATIONS_NAME
    bad.write_text(json.dumps({"questions": []}))
    with pytest.raises(DataError, match="field 'annotations': missing"):
        VQAReader(questions_path, bad)


# ---------------------------------------------------------------- normalisation
# Expectations worked out by hand from vqaEval.py (current revision): PUNCTUATION covers "-", "!",
# "{" and "}" but not "'" or ":"; restored apostrophes are ASCII.


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("yes.", "yes"),
        ("Yes", "yes"),
        ("2.5", "2.5"),  # a period before a digit stays
        ("a dog", "dog"),
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("the one", "1"),  # number word mapped, article dropped
        ("ten", "10"),
        ("none", "0"),
        ("one", "1"),
        ("Two dogs", "2 dogs"),
        ("dont", "don't"),
        ("dont know", "don't know"),
        ("isnt", "isn't"),
        ("cant", "can't"),
        ("Im", "im"),  # the key "Im" has a capital, so it never matches a lower-cased word
        ("don't", "don't"),  # "'" is not punctuation
        ("yes, it is", "yes it is"),  # ", " occurs: the comma is removed
        ("1,000", "1000"),  # digit-comma-digit: every mark is removed, none spaced
        ("3,5 t-shirts", "35 tshirts"),  # ... including the hyphen
        ("red/white", "red white"),
        ("red / white", "red white"),
        ("10:00", "10:00"),  # ":" is not punctuation
        ("t-shirt", "t shirt"),
        ("Frisbee!", "frisbee"),
        ("wow !", "wow"),
        ("{cat}", "cat"),
        ("what?", "what"),
        ("Dr. Pepper", "dr pepper"),
        ("5.", "5"),  # the misspelt lookbehind: a period after a digit goes too
        ("  yes\n", "yes"),
        ("two\tdogs", "2 dogs"),
        ("." * 40 + "x", "." * 8 + "x"),  # only 32 periods are removed, as in vqaEval.py
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("dont", "don't"),
        ("don't know", "don't know"),
        ("10:00", "10:00"),
        ("t-shirt", "t shirt"),
        ("1,000", "1000"),
        ("yes, it is", "yes it is"),
        ("wow!", "wow"),
        ("A Red Car.", "red car"),
        ("three", "3"),
        ("2.5", "2.5"),
    ],
)
def test_normalize_training_answer(raw, expected):
    assert normalize_training_answer(raw) == expected


def test_vocabulary_keys_lower_case_and_process_punctuation_but_keep_unk():
    # VL-BERT vqa.py reads each line as w.lower().strip() then processPunctuation (not for '<unk>').
    lines = ["<unk>", "T-Shirt ", "yes", "don't know", "10:00", "st. louis", "a/b"]
    assert vocabulary_keys(lines) == ["<unk>", "t shirt", "yes", "don't know", "10:00", "st louis", "a b"]


# ---------------------------------------------------------------- scores and accuracy


def explicit_leave_one_out(candidate, answers):
    accuracies = []
    for left_out in range(len(answers)):
        others = answers[:left_out] + answers[left_out + 1:]
        accuracies.append(min(1.0, sum(other == candidate for other in others) / 3))
    return sum(accuracies) / len(accuracies)


@pytest.mark.parametrize("matches", range(11))
def test_soft_scores_equal_explicit_leave_one_out(matches):
    answers = ["cat"] * matches + [f"animal {i}" for i in range(10 - matches)]
    scores = soft_scores(answers)
    expected = explicit_leave_one_out("cat", answers)
    assert scores.get("cat", 0.0) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx([0.0, 0.3, 0.6, 0.9][matches] if matches < 4 else 1.0)


def test_soft_scores_compare_raw_strings_by_default():
    answers = ["Two", "2", "two.", "a dog", "dog", "dogs"] + ["x"] * 4
    # VL-BERT: no normalisation, so each of the first six is one answer of ten (0.3).
    raw = {"Two": 0.3, "2": 0.3, "two.": 0.3, "a dog": 0.3, "dog": 0.3, "dogs": 0.3, "x": 1.0}
    assert soft_scores(answers) == pytest.approx(raw)
    # bottom-up-attention's option: Two, 2, two. -> "2" (3 answers: 0.9); a dog, dog -> "dog" (0.6).
    normalised = soft_scores(answers, normalize_training_answer)
    assert normalised == pytest.approx({"2": 0.9, "dog": 0.6, "dogs": 0.3, "x": 1.0})
    assert soft_scores([]) == {}


@pytest.mark.parametrize(
    "predicted, answers, expected",
    [
        # Human answers differ, so all are normalised. n human answers match: 0.3 n (n < 4), else 1.
        ("Two", ["2"] * 3 + ["3"] * 7, 0.9),
        ("three.", ["2"] * 3 + ["3"] * 7, 1.0),
        ("4", ["2"] * 3 + ["3"] * 7, 0.0),
        ("Frisbee!", ["frisbee"] * 9 + ["disc"], 1.0),  # "!" is punctuation
        ("dont know", ["don't know"] * 2 + ["no"] * 8, 0.6),  # ASCII apostrophe restored
        ("t-shirt", ["t shirt"] * 3 + ["shirt"] * 7, 0.9),
        ("2.5", ["2.5"] * 4 + ["2"] * 6, 1.0),
        ("the dog", ["dog"] * 5 + ["a dog"] + ["cat"] * 4, 1.0),  # dog and a dog: 6 matches
        # Human answers that differ only by punctuation become one answer: red white x 4.
        ("red-white", ["red/white"] * 2 + ["red white"] * 2 + ["red"] * 6, 1.0),
        ("YES", ["yes."] * 2 + ["yes"] * 8, 1.0),
        # Human answers get the number and article steps too: "two", "two", "2" are 3 x "2".
        ("2", ["two", "two", "2", "three"] + ["3"] * 6, 0.9),
        ("one", ["1"] * 9 + ["one"], 1.0),
        ("cat", ["cat"] + ["dog"] * 9, 0.3),
        # All human answers identical: only whitespace is cleaned, on both sides.
        ("yes", ["yes"] * 10, 1.0),
        (" yes\n", ["yes"] * 10, 1.0),
        ("Yes", ["yes"] * 10, 0.0),
        ("yes.", ["yes"] * 10, 0.0),
        ("one", ["1"] * 10, 0.0),
        ("red white", ["red/white"] * 10, 0.0),
        ("red/white", ["red/white\t"] * 10, 1.0),
    ],
)
def test_vqa_accuracy_as_vqa_eval(predicted, answers, expected):
    assert vqa_accuracy(predicted, answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_accuracy_percent_rounds_as_python_2():
    # 100 x 1/800 = 0.125 exactly: Python 2 rounds the half away from zero (0.13; Python 3 gives 0.12).
    assert accuracy_percent([1.0] + [0.0] * 799) == 0.13
    assert accuracy_percent([1.0, 0.0, 0.0]) == 33.33
    # 100 x 0.02675 is 2.67499999... in binary, so 2.67 (in Python 2 as well).
    assert accuracy_percent([0.02675]) == 2.67
    assert accuracy_percent([1.0, 0.3], digits=1) == 65.0
    with pytest.raises(ValueError):
        accuracy_percent([])


def test_answer_targets_put_soft_scores_on_vocabulary_entries():
    index = vocabulary_index(["<unk>", "pizza", "food", "plate"])
    answers = ["pizza"] * 4 + ["food"] * 3 + ["plate", "pizza box", "<unk>"]
    target = answer_targets(answers, index)
    assert target.dtype == np.float32 and target.shape == (4,)
    np.testing.assert_allclose(target, [0.0, 1.0, 0.9, 0.3], rtol=1e-6)
    assert not answer_targets(["unseen"] * 10, index).any()
    assert not answer_targets(["<unk>"] * 10, index).any()  # VL-BERT never sets <unk>


def test_answer_targets_match_raw_strings_unless_asked_to_normalise():
    index = vocabulary_index(["<unk>", "pizza", "food"])
    answers = ["Pizza"] * 2 + ["pizza"] * 2 + ["food"] * 6
    # raw: "pizza" 2 of 10 -> 0.6, "Pizza" is not in the vocabulary; normalised: 4 of 10 -> 1.0.
    np.testing.assert_allclose(answer_targets(answers, index), [0.0, 0.6, 1.0], rtol=1e-6)
    np.testing.assert_allclose(answer_targets(answers, index, normalize_training_answer), [0.0, 1.0, 1.0], rtol=1e-6)


# ---------------------------------------------------------------- vocabulary


def records(*multiple_choice_answers, answers=None):
    return [SimpleNamespace(record=f"r{i}", multiple_choice_answer=answer, answers=answers)
            for i, answer in enumerate(multiple_choice_answers)]


def test_vocabulary_counts_multiple_choice_answers_with_threshold_and_tie_order():
    annotations = records(*(["yes"] * 5 + ["Two", "2", "2."] + ["cat", "bat"] * 2 + ["dog"] + ["a"] * 9))
    assert build_answer_vocabulary(annotations, min_count=2) == ["yes", "2", "bat", "cat"]
    assert build_answer_vocabulary(annotations, size=2, min_count=2) == ["yes", "2"]
    assert build_answer_vocabulary(annotations, size=None, min_count=1) == ["yes", "2", "bat", "cat", "dog"]
    assert build_answer_vocabulary(annotations) == []  # the default threshold is 9


def test_vocabulary_from_all_human_answers(tmp_path):
    questions_path, annotations_path = write_files(tmp_path)
    reader = VQAReader(questions_path, annotations_path)
    vocabulary = build_answer_vocabulary(reader, min_count=3, count_all_answers=True)
    assert vocabulary == ["no", "down", "pizza", "food"]
    assert build_answer_vocabulary(reader, min_count=1) == ["down", "no", "pizza"]
    with pytest.raises(ValueError, match="r0 has no answers"):
        build_answer_vocabulary(records("x"), count_all_answers=True)


def test_vocabulary_file_round_trip(tmp_path):
    answers = ["<unk>", "yes", "don't know", "10:00", "t shirt", "café"]
    path = write_answer_vocabulary(tmp_path / "answers_vqa.txt", answers)
    assert path.read_bytes().decode("utf-8") == "".join(answer + "\n" for answer in answers)
    assert read_answer_vocabulary(path) == answers
    for bad in (["a\nb"], [" yes"], [""], ["yes", "yes"]):
        with pytest.raises(ValueError):
            write_answer_vocabulary(tmp_path / "bad.txt", bad)


def test_reading_a_bad_vocabulary_file(tmp_path):
    path = tmp_path / "answers.txt"
    path.write_bytes(b"yes\r\n\nno\nyes\n")
    with pytest.raises(DataError, match=r"line 4: 'yes' already on line 1"):
        read_answer_vocabulary(path)
    path.write_bytes(b"\xff")
    with pytest.raises(DataError, match="not UTF-8"):
        read_answer_vocabulary(path)
    with pytest.raises(DataError, match="cannot read"):
        read_answer_vocabulary(tmp_path / "missing.txt")


# ---------------------------------------------------------------- fuzzing

KEYS = ["questions", "annotations", "question_id", "image_id", "question", "answers", "answer",
        "answer_confidence", "answer_id", "answer_type", "question_type", "multiple_choice_answer"]
LEAVES = (st.none() | st.booleans() | st.integers(-3, 12) | st.integers() | st.floats()
          | st.text(max_size=6) | st.sampled_from(["yes", "other", "yes/no", "", "\ud800"]))
JSON_VALUES = st.recursive(
    LEAVES,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=3), children, max_size=5),
    max_leaves=15,
)
IDS = st.integers(0, 2) | JSON_VALUES
ANSWER = st.fixed_dictionaries({}, optional={
    "answer": st.text(max_size=4) | JSON_VALUES,
    "answer_confidence": st.sampled_from(["yes", "maybe", "no"]) | JSON_VALUES,
    "answer_id": st.integers(0, 11) | JSON_VALUES,
})
QUESTION_ENTRY = st.fixed_dictionaries({}, optional={
    "question_id": IDS, "image_id": IDS, "question": st.text(max_size=8) | JSON_VALUES,
}) | JSON_VALUES
ANNOTATION_ENTRY = st.fixed_dictionaries({}, optional={
    "question_id": IDS, "image_id": IDS, "answers": st.lists(ANSWER, min_size=9, max_size=11) | JSON_VALUES,
    "answer_type": st.sampled_from(["yes/no", "number", "other"]) | JSON_VALUES,
    "question_type": st.text(max_size=4) | JSON_VALUES,
    "multiple_choice_answer": st.text(max_size=4) | JSON_VALUES,
}) | JSON_VALUES
QUESTIONS_DOC = st.fixed_dictionaries({"questions": st.lists(QUESTION_ENTRY, max_size=4)}) | JSON_VALUES
ANNOTATIONS_DOC = st.fixed_dictionaries({"annotations": st.lists(ANNOTATION_ENTRY, max_size=4)}) | JSON_VALUES


@st.composite
def mutated_fixture(draw):
    """The valid fixture documents with up to 4 random edits (replace, delete) at random depths."""
    documents = [questions_document(copy.deepcopy(QUESTIONS)),
                 annotations_document(copy.deepcopy(ANNOTATIONS))]
    for _ in range(draw(st.integers(0, 4))):
        index = draw(st.integers(0, 1))
        parent, key = documents[index], ("questions", "annotations")[index]
        if not isinstance(parent, dict) or key not in parent or not draw(st.integers(0, 7)):
            parent, key = documents, index  # now and then (or when edited away) the top level
        while isinstance(parent[key], (dict, list)) and parent[key] and draw(st.integers(0, 5)):
            parent = parent[key]
            key = draw(st.sampled_from(sorted(parent) if isinstance(parent, dict) else range(len(parent))))
        action = draw(st.sampled_from(["replace", "delete"]))
        if action == "delete" and parent is not documents:
            del parent[key]
        else:
            parent[key] = draw(JSON_VALUES)
    return documents


def read_everything(questions_path, annotations_path):
    """Reads every record in both modes; only DataError may escape."""
    for skip in (False, True):
        try:
            reader = VQAReader(questions_path, annotations_path, skip_bad_records=skip)
        except DataError:
            continue
        for index in range(len(reader)):
            try:
                reader[index]
            except DataError:
                pass
        try:
            list(reader)
        except DataError:
            assert not skip


@settings(deadline=None, max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(questions=QUESTIONS_DOC, annotations=st.none() | ANNOTATIONS_DOC)
def test_fuzz_json_structures_raise_only_data_error(tmp_path, questions, annotations):
    questions_path = tmp_path / QUESTIONS_NAME
    questions_path.write_text(json.dumps(questions))
    annotations_path = None
    if annotations is not None:
        annotations_path = tmp_path / ANNOTATIONS_NAME
        annotations_path.write_text(json.dumps(annotations))
    read_everything(questions_path, annotations_path)


@settings(deadline=None, max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(questions=st.binary(max_size=64), annotations=st.none() | st.binary(max_size=64))
def test_fuzz_bytes_raise_only_data_error(tmp_path, questions, annotations):
    questions_path = tmp_path / QUESTIONS_NAME
    questions_path.write_bytes(questions)
    annotations_path = None
    if annotations is not None:
        annotations_path = tmp_path / ANNOTATIONS_NAME
        annotations_path.write_bytes(annotations)
    read_everything(questions_path, annotations_path)
    read_everything(tmp_path / QUESTIONS_NAME, None)


@settings(deadline=None, max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(documents=mutated_fixture(), with_annotations=st.booleans())
def test_fuzz_edited_valid_files_raise_only_data_error(tmp_path, documents, with_annotations):
    questions_path = tmp_path / QUESTIONS_NAME
    questions_path.write_text(json.dumps(documents[0]))
    annotations_path = None
    if with_annotations:
        annotations_path = tmp_path / ANNOTATIONS_NAME
        annotations_path.write_text(json.dumps(documents[1]))
    read_everything(questions_path, annotations_path)
