"""VQA answers: normalisation, soft-score targets, the official accuracy and the answer vocabulary.

Three procedures touch answer strings, and exactness needs each as its source wrote it:

- The official evaluation (`vqaEval.py` of GT-Vision-Lab/VQA, current revision): `vqa_accuracy`.
  Newlines and tabs become spaces and both ends are stripped, for the prediction and the ten
  human answers. Only when the human answers are not all the same string are all eleven
  normalised further (`normalize_answer`: punctuation, periods not inside numbers,
  lower-casing, number words to digits, articles dropped, missing apostrophes restored).
- VL-BERT's training target (`vqa/data/datasets/vqa.py`, `get_soft_target`): the ten raw
  human answers are looked up as they are in the answer vocabulary, whose lines were
  lower-cased and put through the same punctuation step (`vocabulary_keys`); no other
  normalisation. `soft_scores` / `answer_targets` do this by default.
- bottom-up-attention's `compute_softscore.py`, which built the 3,129-answer `answers_vqa.txt`
  that VL-BERT reads: punctuation, digits and articles, contractions, then every comma removed
  (`normalize_training_answer`). `build_answer_vocabulary` uses it; `soft_scores` and
  `answer_targets` take it as the `normalize` option (more human answers then reach a class).

The punctuation list and contraction table are the same in all three sources.
"""

from __future__ import annotations

import re
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Protocol, Sequence

import numpy as np

from vlblocks.data.errors import DataError

UNKNOWN_ANSWER = "<unk>"

# The contraction table of vqaEval.py (ASCII apostrophes; the keys with capitals never match
# because words are lower-cased first).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# Apostrophes, colons and periods are not in it (periods have their own rule).
PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
    "?", "!",
)
# The lookbehind is misspelt in the original ("(?!<=" is a lookahead), so a period is removed
# whenever no digit follows it, even after a digit ("5." -> "5"). Kept as is for exactness.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The original passes re.UNICODE (= 32) in `sub`'s `count` position: at most 32 periods go.
_PERIOD_LIMIT = 32


class VQAAnnotation(Protocol):
    """Anything with the human answers of one question (e.g. a `VQAQuestion` with annotations)."""

    @property
    def answers(self) -> Optional[Sequence[str]]: ...

    @property
    def multiple_choice_answer(self) -> Optional[str]: ...


def clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, both ends stripped: the evaluation's first step on every answer."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """The official evaluation's full normalisation of an answer (see the module docstring)."""
    return process_digits_and_articles(process_punctuation(clean_whitespace(text)))


def normalize_training_answer(text: str) -> str:
    """The normalisation that built VL-BERT's `answers_vqa.txt` (see the module docstring)."""
    return process_digits_and_articles(process_punctuation(text)).replace(",", "")


def process_punctuation(text: str) -> str:
    """Drops marks next to a space (all marks if a digit-comma-digit occurs), spaces the rest;
    then drops periods not followed by a digit (at most 32)."""
    has_grouped_number = _COMMA_STRIP.search(text) is not None
    result = text
    for mark in PUNCTUATION:
        # The conditions look at the input text, not at the partly processed result.
        if has_grouped_number or mark + " " in text or " " + mark in text:
            result = result.replace(mark, "")
        else:
            result = result.replace(mark, " ")
    return _PERIOD_STRIP.sub("", result, count=_PERIOD_LIMIT)


def process_digits_and_articles(text: str) -> str:
    """Lower-cased words, number words as digits, articles dropped, contractions restored."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vocabulary_keys(answers: Sequence[str]) -> list[str]:
    """The strings VL-BERT matches human answers against: each vocabulary line lower-cased,
    stripped and put through `process_punctuation` (`<unk>` is left as it is)."""
    keys = []
    for answer in answers:
        key = answer.lower().strip()
        keys.append(key if key == UNKNOWN_ANSWER else process_punctuation(key))
    return keys


def soft_scores(
    answers: Sequence[str], normalize: Optional[Callable[[str], str]] = None
) -> dict[str, float]:
    """The VQA accuracy of each distinct human answer, used as a soft target.

    For an answer a, the mean over the leave-one-out subsets (each human answer left out once)
    of min(1, matches of a among the others / 3). With 10 answers and n of them equal to a this
    is 0.3, 0.6, 0.9 and 1.0 for n = 1, 2, 3 and 4 or more.

    Args:
        answers: the human answers.
        normalize: applied to each answer before counting; None (VL-BERT's default) compares
            the raw strings; `normalize_training_answer` is bottom-up-attention's choice.

    Returns:
        answer -> score, in order of first occurrence; empty for no answers.
    """
    keys = list(answers) if normalize is None else [normalize(answer) for answer in answers]
    return {answer: _leave_one_out(answer, keys) for answer in dict.fromkeys(keys)}


def _leave_one_out(candidate: str, answers: Sequence[str]) -> float:
    """Mean over the answers left out of min(1, matches among the others / 3), summed in order."""
    matches = sum(answer == candidate for answer in answers)
    total = 0.0
    for answer in answers:
        total += min(1.0, (matches - (answer == candidate)) / 3)
    return total / len(answers)


def vqa_accuracy(predicted: str, answers: Sequence[str]) -> float:
    """The official accuracy of one predicted answer against the human answers of a question.

    As `vqaEval.py` does it: `clean_whitespace` on all; then, only if the cleaned human answers
    are not all identical, `normalize_answer` on the prediction and on every human answer
    (otherwise the prediction must equal them as it is: "Yes" scores 0 against ten "yes").

    Raises:
        ValueError: no human answers.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    truths = [clean_whitespace(truth) for truth in answers]
    prediction = clean_whitespace(predicted)
    if len(set(truths)) > 1:
        truths = [process_digits_and_articles(process_punctuation(truth)) for truth in truths]
        prediction = process_digits_and_articles(process_punctuation(prediction))
    return _leave_one_out(prediction, truths)


def accuracy_percent(accuracies: Sequence[float], digits: int = 2) -> float:
    """The official overall accuracy: 100 x the mean of the per-question accuracies, rounded to
    `digits` decimals as Python 2's `round` does (the exact binary value, halves away from zero).

    Raises:
        ValueError: no accuracies.
    """
    if not accuracies:
        raise ValueError("accuracy_percent needs at least one accuracy")
    percent = 100 * float(sum(accuracies)) / len(accuracies)
    return float(Decimal(percent).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def answer_targets(
    answers: Sequence[str],
    vocabulary_index: Mapping[str, int],
    normalize: Optional[Callable[[str], str]] = None,
) -> np.ndarray:
    """The soft-score target over the answer vocabulary, float32 [len(vocabulary_index)].

    Answers outside the vocabulary get no target, as in VL-BERT (which maps them to `<unk>` and
    then leaves `<unk>` at zero); `<unk>` stays zero even when a human answered "<unk>".

    Args:
        answers: the human answers.
        vocabulary_index: answer -> class (for VL-BERT's matching, keys from `vocabulary_keys`).
        normalize: see `soft_scores` (None: raw strings, as VL-BERT).

    Raises:
        ValueError: a vocabulary index outside [0, len(vocabulary_index)).
    """
    target = np.zeros(len(vocabulary_index), dtype=np.float32)
    for answer, score in soft_scores(answers, normalize).items():
        index = vocabulary_index.get(answer)
        if index is None or answer == UNKNOWN_ANSWER:
            continue
        if not 0 <= index < len(target):
            raise ValueError(
                f"vocabulary index {index} of {answer!r} is outside [0, {len(target)})"
            )
        target[index] = score
    return target


def build_answer_vocabulary(
    annotations: Iterable[VQAAnnotation],
    size: Optional[int] = 3129,
    min_count: int = 9,
    normalize: Callable[[str], str] = normalize_training_answer,
    count_all_answers: bool = False,
) -> list[str]:
    """The answers frequent enough to be classes, most frequent first.

    The convention of bottom-up-attention (whose list VL-BERT uses): over the train2014 and
    val2014 annotations, count each question's normalised `multiple_choice_answer` and keep the
    answers seen at least 9 times, which gives 3,129 answers. With `count_all_answers`, every
    one of the 10 human answers is counted instead (a larger list for the same threshold).
    Ties in count are ordered alphabetically, so the list is reproducible; answers that
    normalise to the empty string are left out. `<unk>` is not added.

    Args:
        annotations: records with `multiple_choice_answer` and `answers`.
        size: the most answers to keep (None: no cap).
        min_count: the least count of a kept answer.
        normalize: the normalisation applied before counting.
        count_all_answers: count the 10 human answers instead of the multiple-choice answer.

    Raises:
        ValueError: a record without annotations, or a negative size or min_count below 1.
    """
    if size is not None and size < 0:
        raise ValueError(f"size must be None or >= 0, got {size}")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    counts: Counter[str] = Counter()
    for position, record in enumerate(annotations):
        if count_all_answers:
            if record.answers is None:
                raise ValueError(f"{_describe(record, position)} has no answers (a test split?)")
            counts.update(normalize(answer) for answer in record.answers)
        else:
            if record.multiple_choice_answer is None:
                raise ValueError(
                    f"{_describe(record, position)} has no multiple_choice_answer (a test split?)"
                )
            counts[normalize(record.multiple_choice_answer)] += 1
    counts.pop("", None)
    kept = sorted((answer for answer, count in counts.items() if count >= min_count),
                  key=lambda answer: (-counts[answer], answer))
    return kept if size is None else kept[:size]


def _describe(record: object, position: int) -> str:
    return str(getattr(record, "record", f"annotation {position}"))


def vocabulary_index(answers: Sequence[str]) -> dict[str, int]:
    """Answer -> class index (its position in the list).

    Raises:
        ValueError: an answer appears twice.
    """
    index: dict[str, int] = {}
    for position, answer in enumerate(answers):
        if answer in index:
            raise ValueError(
                f"answer {answer!r} appears at positions {index[answer]} and {position}"
            )
        index[answer] = position
    return index


def write_answer_vocabulary(path: str | Path, answers: Sequence[str]) -> Path:
    """Writes one answer per line (UTF-8, "\\n"), like `answers_vqa.txt`; line order = class index.

    Raises:
        ValueError: an answer that would not read back as itself (empty, spaces at either
            end, a line break inside) or a repeated answer.
    """
    vocabulary_index(answers)
    for position, answer in enumerate(answers):
        if not answer or answer != answer.strip() or "\n" in answer or "\r" in answer:
            raise ValueError(f"answer {position} {answer!r} cannot be written as one line")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(answer + "\n" for answer in answers)
    return path


def read_answer_vocabulary(path: str | Path) -> list[str]:
    """Reads an answer list written one per line; blank lines are skipped, ends stripped.

    Raises:
        DataError: the file cannot be read, is not UTF-8, or repeats an answer.
    """
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as error:
        raise DataError(
            f"cannot read answer vocabulary {path}: {error.strerror or error}"
        ) from None
    except UnicodeDecodeError as error:
        raise DataError(f"answer vocabulary {path} is not UTF-8 ({error})") from None
    answers: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        answer = line.strip()
        if not answer:
            continue
        if answer in first_line:
            raise DataError(
                f"answer vocabulary {path} line {number}: {answer!r} already on line "
                f"{first_line[answer]}"
            )
        first_line[answer] = number
        answers.append(answer)
    return answers
