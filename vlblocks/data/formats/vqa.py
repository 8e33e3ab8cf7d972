"""VQA v2 in its public format: a questions file, joined by question_id with an annotations file.

Files (the test splits, test2015 and test-dev2015, have no annotations file)::

    v2_OpenEnded_mscoco_{split}_questions.json
        {"info", "task_type": "Open-Ended", "data_type": "mscoco", "license", "data_subtype",
         "questions": [{"image_id": int, "question": str, "question_id": int}, ...]}
    v2_mscoco_{split}_annotations.json
        {"info", "license", "data_subtype",
         "annotations": [{"question_id": int, "image_id": int, "question_type": str,
                          "answer_type": "yes/no" | "number" | "other",
                          "multiple_choice_answer": str,
                          "answers": [{"answer": str, "answer_confidence": "yes" | "maybe" | "no",
                                       "answer_id": 1..10}, ... 10 of them]}, ...]}

Only the "questions" and "annotations" lists are read; the other top-level keys are not checked.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from vlblocks.data.errors import DataError
from vlblocks.data.formats.records import (
    FieldError,
    SkippingReader,
    basic_tokenize,
    get_field,
    get_string,
    integer_field,
    is_int,
    parse_json_object,
    record_error,
    record_index,
    show,
)

NUM_ANSWERS = 10
ANSWER_TYPES = ("yes/no", "number", "other")
ANSWER_CONFIDENCES = ("yes", "maybe", "no")



@dataclass(frozen=True)
class VQAQuestion:
    """One VQA question, with its human answers when annotations were read.

    Attributes:
        record: where it came from, e.g. "v2_OpenEnded_mscoco_val2014_questions.json
            question_id 262148".
        question_id, image_id: the COCO-based ids of the question and its image.
        question: the question as written.
        question_tokens: lower-cased basic-tokenised words, punctuation split off
            ("What's on the table?" -> what ' s on the table ?).
        answers: the 10 raw human answers in answer_id order of the file, or None (test split).
        answer_type: "yes/no", "number" or "other", or None.
        question_type: e.g. "what is the", or None.
        multiple_choice_answer: the most common human answer, or None.
    """

    record: str
    question_id: int
    image_id: int
    question: str
    question_tokens: list[str]
    answers: Optional[list[str]] = None
    answer_type: Optional[str] = None
    question_type: Optional[str] = None
    multiple_choice_answer: Optional[str] = None


class VQAReader(SkippingReader[VQAQuestion]):
    """Random-access reader of a VQA v2 questions file, optionally with its annotations.

    Each file is parsed whole by the json module and held in memory once (the train2014
    annotations are about 200 MB of JSON); records are checked and built lazily, when indexed. Annotations whose question_id is
    not in the questions file are ignored.

    Args:
        questions_file: `v2_OpenEnded_mscoco_{split}_questions.json`.
        annotations_file: `v2_mscoco_{split}_annotations.json`, or None (test splits).
        skip_bad_records: when iterating, skip malformed records and append their messages to
            `skipped` instead of raising. Indexing always raises.

    Raises:
        DataError: a file cannot be read, is not JSON or lacks its list; an annotation without
            a usable question_id (unless skipping); or, on access, a record is malformed.
    """

    def __init__(
        self,
        questions_file: str | Path,
        annotations_file: Optional[str | Path] = None,
        skip_bad_records: bool = False,
    ) -> None:
        self.questions_file = Path(questions_file)
        self.annotations_file = None if annotations_file is None else Path(annotations_file)
        self.skip_bad_records = skip_bad_records
        self.skipped: list[str] = []
        self._name = str(questions_file)
        self._annotations_name = str(annotations_file)
        self._questions = _load_list(self.questions_file, "questions")
        self._repeated_questions = _repeated_ids(self._questions)
        self._annotations: list[Any] = []
        self._annotation_at: dict[int, int] = {}
        self._repeated_annotations: set[int] = set()
        self._unjoinable: list[str] = []
        if self.annotations_file is not None:
            self._annotations = _load_list(self.annotations_file, "annotations")
            self._index_annotations()

    def _index_annotations(self) -> None:
        """Maps question_id -> annotation position; notes repeated and unusable ids."""
        for position, entry in enumerate(self._annotations):
            question_id = _question_id(entry)
            if question_id is None:
                message = f"{self._annotations_name} annotation {position}, " + (
                    f"field 'question_id': expected a non-negative integer, got "
                    f"{show(entry.get('question_id'))}"
                    if isinstance(entry, dict)
                    else f"expected a JSON object, got {type(entry).__name__}"
                )
                if not self.skip_bad_records:
                    raise DataError(message)
                self._unjoinable.append(message)
            elif question_id in self._annotation_at:
                self._repeated_annotations.add(question_id)
            else:
                self._annotation_at[question_id] = position

    def __len__(self) -> int:
        return len(self._questions)

    def __getitem__(self, index: int) -> VQAQuestion:
        index = record_index(operator.index(index), len(self), f"questions in {self._name}")
        entry = self._questions[index]
        question_id = _question_id(entry)
        where = (
            f"{self._name} question {index}"
            if question_id is None
            else f"{self._name} question_id {question_id}"
        )
        try:
            question = _parse_question(entry, index, self._repeated_questions)
        except FieldError as error:
            raise record_error(where, error) from None
        question_id = question["question_id"]
        if self.annotations_file is None:
            return VQAQuestion(record=where, **question)
        if question_id not in self._annotation_at:
            raise DataError(
                f"{where}, field 'question_id': no annotation with this question_id in "
                f"{self._annotations_name}"
            )
        annotation_where = f"{self._annotations_name} annotation for question_id {question_id}"
        try:
            if question_id in self._repeated_annotations:
                raise FieldError("question_id", "more than one annotation has this question_id")
            annotation = _parse_annotation(
                self._annotations[self._annotation_at[question_id]], question["image_id"]
            )
        except FieldError as error:
            raise record_error(annotation_where, error) from None
        return VQAQuestion(record=where, **question, **annotation)

    def _skipped_at_start(self) -> list[str]:
        """Annotations that could not be joined, found when the reader was built."""
        return list(self._unjoinable)


def _load_list(path: Path, key: str) -> list[Any]:
    """The list under `key` of the JSON object in `path`."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {key} file {path}: {error.strerror or error}") from None
    document = parse_json_object(raw, str(path))
    if key not in document:
        raise DataError(f"{path}, field {key!r}: missing")
    if not isinstance(document[key], list):
        raise DataError(
            f"{path}, field {key!r}: expected a list, got {type(document[key]).__name__}"
        )
    return document[key]


def _repeated_ids(entries: list[Any]) -> set[int]:
    seen: set[int] = set()
    repeated: set[int] = set()
    for entry in entries:
        question_id = _question_id(entry)
        if question_id is not None:
            (repeated if question_id in seen else seen).add(question_id)
    return repeated


def _question_id(entry: Any) -> Optional[int]:
    """The entry's question_id if it is usable as one, else None."""
    if not isinstance(entry, dict):
        return None
    value = entry.get("question_id")
    return value if _is_id(value) else None


def _is_id(value: Any) -> bool:
    return is_int(value) and value >= 0


def _parse_question(entry: Any, index: int, repeated: set[int]) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise FieldError(None, f"expected a JSON object, got {type(entry).__name__}")
    question_id = integer_field(entry, "question_id", non_negative=True)
    if question_id in repeated:
        raise FieldError("question_id", "more than one question has this question_id")
    image_id = integer_field(entry, "image_id", non_negative=True)
    text = get_string(entry, "question")
    if not text.strip():
        raise FieldError("question", "empty question")
    try:
        tokens = basic_tokenize(text)
    except DataError as error:
        raise FieldError("question", str(error)) from None
    if not tokens:
        raise FieldError("question", f"no words after tokenisation: {show(text)}")
    return {
        "question_id": question_id,
        "image_id": image_id,
        "question": text,
        "question_tokens": tokens,
    }


def _parse_annotation(entry: dict[str, Any], image_id: int) -> dict[str, Any]:
    annotation_image_id = integer_field(entry, "image_id", non_negative=True)
    if annotation_image_id != image_id:
        raise FieldError(
            "image_id", f"{annotation_image_id} differs from the question's image_id {image_id}"
        )
    answer_type = get_string(entry, "answer_type")
    if answer_type not in ANSWER_TYPES:
        raise FieldError(
            "answer_type", f"expected one of {ANSWER_TYPES}, got {show(answer_type)}"
        )
    return {
        "answers": _answers(get_field(entry, "answers")),
        "answer_type": answer_type,
        "question_type": get_string(entry, "question_type"),
        "multiple_choice_answer": get_string(entry, "multiple_choice_answer"),
    }


def _answers(value: Any) -> list[str]:
    """The answer strings of the 10 human answers, checked."""
    if not isinstance(value, list):
        raise FieldError("answers", f"expected a list, got {type(value).__name__}")
    if len(value) != NUM_ANSWERS:
        raise FieldError("answers", f"expected {NUM_ANSWERS} answers, got {len(value)}")
    answers: list[str] = []
    seen_ids: set[int] = set()
    for position, item in enumerate(value):
        field = f"answers[{position}]"
        if not isinstance(item, dict):
            raise FieldError(field, f"expected a JSON object, got {type(item).__name__}")
        answers.append(get_string(item, "answer", field))
        confidence = get_field(item, "answer_confidence", field)
        if confidence not in ANSWER_CONFIDENCES:
            raise FieldError(
                f"{field}.answer_confidence",
                f"expected one of {ANSWER_CONFIDENCES}, got {show(confidence)}",
            )
        answer_id = get_field(item, "answer_id", field)
        if not _is_id(answer_id) or not 1 <= answer_id <= NUM_ANSWERS:
            raise FieldError(
                f"{field}.answer_id",
                f"expected an integer 1..{NUM_ANSWERS}, got {show(answer_id)}",
            )
        if answer_id in seen_ids:
            raise FieldError(f"{field}.answer_id", f"answer_id {answer_id} repeated")
        seen_ids.add(answer_id)
    return answers
