"""Pieces shared by the dataset readers: field errors, field getters and checks, BERT's basic
tokenisation, line indexing and the skip-aware pass over a random-access reader."""

from __future__ import annotations

import json
import math
import reprlib
from pathlib import Path
from typing import Any, Generic, Iterator, Optional, TypeVar

from tokenizers import normalizers, pre_tokenizers

from vlblocks.data.errors import DataError

RecordT = TypeVar("RecordT")
_NORMALIZER = normalizers.BertNormalizer(lowercase=True)
_PRE_TOKENIZER = pre_tokenizers.BertPreTokenizer()


class FieldError(Exception):
    """A problem with one field of one record; `record_error` adds where the record is."""

    def __init__(self, field: Optional[str], message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def record_error(where: str, error: FieldError) -> DataError:
    """The DataError "<where>, field '<name>': <message>" (no field part when field is None)."""
    field = f", field {error.field!r}" if error.field else ""
    return DataError(f"{where}{field}: {error.message}")


def field_path(key: str, parent: Optional[str] = None) -> str:
    """The field name `key`, or `parent.key` inside a nested object."""
    return key if parent is None else f"{parent}.{key}"


def get_field(mapping: dict[str, Any], key: str, parent: Optional[str] = None) -> Any:
    """`mapping[key]`; FieldError "missing" when absent."""
    if key not in mapping:
        raise FieldError(field_path(key, parent), "missing")
    return mapping[key]


def get_string(mapping: dict[str, Any], key: str, parent: Optional[str] = None) -> str:
    """`mapping[key]` when it is a str (possibly empty); FieldError otherwise."""
    value = get_field(mapping, key, parent)
    if not isinstance(value, str):
        raise FieldError(
            field_path(key, parent), f"expected a string, got {type(value).__name__}"
        )
    return value


def positive_int(value: Any, field: str, from_text: bool = False) -> int:
    """A positive whole number: an int, or a float without a fraction ("640.0" too when
    `from_text`, for text fields such as a TSV's). FieldError naming `field` otherwise."""
    number = value
    if from_text and isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                raise FieldError(field, f"expected a positive integer, got {show(value)}") from None
    whole = isinstance(number, float) and math.isfinite(number) and number.is_integer()
    if isinstance(number, bool) or not (isinstance(number, int) or whole) or number <= 0:
        raise FieldError(field, f"expected a positive integer, got {show(value)}")
    return int(number)


def basic_tokenize(text: str) -> list[str]:
    """BERT's basic tokenisation: clean, lower-case, strip accents, split on space and punctuation.

    Raises:
        DataError: `text` is not a str or holds unpaired surrogates (not encodable Unicode).
    """
    if not isinstance(text, str):
        raise DataError(f"expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"text {show(text)} holds unpaired surrogate characters") from None
    return [word for word, _ in _PRE_TOKENIZER.pre_tokenize_str(_NORMALIZER.normalize_str(text))]


class _BoundedRepr(reprlib.Repr):
    """reprlib's bounded repr, also for integers too long to print (pickles and JSON can hold them)."""

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 64:
            return f"<{x.bit_length()}-bit integer>"
        return super().repr_int(x, level)


_REPR = _BoundedRepr()
_INT64 = 1 << 63


def show(value: Any) -> str:
    """A bounded repr of a data value for error messages (a bad value may be a whole nested structure)."""
    return _REPR.repr(value)


def is_int(value: Any) -> bool:
    """An int (not bool) in int64 range: ids beyond it are malformed (and may be unprintable)."""
    return isinstance(value, int) and not isinstance(value, bool) and -_INT64 <= value < _INT64


def integer_field(mapping: dict[str, Any], key: str, non_negative: bool = False) -> int:
    """`mapping[key]` when it is an integer (`is_int`), and >= 0 if `non_negative`; FieldError otherwise."""
    value = get_field(mapping, key)
    if not is_int(value) or (non_negative and value < 0):
        raise FieldError(key, f"expected a{' non-negative' if non_negative else 'n'} integer, got {show(value)}")
    return value


def finite_number(value: Any, limit: float) -> Optional[float]:
    """The value as a float when it is a finite int or float (not bool) with |value| <= limit."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    if not math.isfinite(number) or abs(number) > limit:
        return None
    return number


def index_by_id(entries: list[Any], where: str, integer_keys: tuple[str, ...] = ("id",)) -> dict[int, dict[str, Any]]:
    """JSON objects by their unique integer "id" (COCO's images, annotations); DataError
    "<where>[i], field 'k': ..." for an entry that is no object, lacks an integer in one of
    `integer_keys`, or repeats an id."""
    indexed: dict[int, dict[str, Any]] = {}
    for position, entry in enumerate(entries):
        for key in integer_keys:
            if not isinstance(entry, dict) or not is_int(entry.get(key)):
                raise DataError(f"{where}[{position}], field {key!r}: expected an object with an integer {key}")
        if entry["id"] in indexed:
            raise DataError(f"{where}[{position}], field 'id': duplicate id {entry['id']}")
        indexed[entry["id"]] = entry
    return indexed


def parse_json(data: bytes, name: str) -> Any:
    """The JSON document in `data`; DataError "<name>: not valid JSON (...)" otherwise."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, depth
        raise DataError(f"{name}: not valid JSON ({error})") from None


def parse_json_object(data: bytes, name: str) -> dict[str, Any]:
    """The JSON object in `data`; DataError naming `name` when it is not valid JSON or not an object."""
    document = parse_json(data, name)
    if not isinstance(document, dict):
        raise DataError(f"{name}: expected a JSON object, got {type(document).__name__}")
    return document


def load_json(path: Path) -> Any:
    """The parsed JSON document in `path`; DataError when unreadable or not JSON."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from error
    return parse_json(data, str(path))


def index_lines(path: Path, name: str) -> tuple[list[int], list[int], list[int]]:
    """Byte start, byte end and 1-based line number of every non-blank line of `path`."""
    starts: list[int] = []
    ends: list[int] = []
    numbers: list[int] = []
    try:
        with open(path, "rb") as handle:
            offset = 0
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    starts.append(offset)
                    ends.append(offset + len(line))
                    numbers.append(number)
                offset += len(line)
    except OSError as error:
        raise DataError(f"cannot read annotation file {name}: {error.strerror or error}") from error
    return starts, ends, numbers


def record_index(index: int, length: int, what: str) -> int:
    """`index` (negative counts from the end) as a position in 0..length-1.

    Raises:
        IndexError: "index I out of range for <length> <what>".
    """
    if not -length <= index < length:
        raise IndexError(f"index {index} out of range for {length} {what}")
    return index % length


class SkippingReader(Generic[RecordT]):
    """Base of the random-access readers: iterating yields `self[0]`, `self[1]`, ...

    With `skip_bad_records`, a record whose access raises DataError is left out and its message
    appended to `skipped`, which each pass starts afresh; without it the error propagates.
    """

    skip_bad_records: bool
    skipped: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> RecordT:
        raise NotImplementedError

    def _skipped_at_start(self) -> list[str]:
        """What `skipped` holds when a pass starts (problems found before any record)."""
        return []

    def __iter__(self) -> Iterator[RecordT]:
        self.skipped = self._skipped_at_start()
        for index in range(len(self)):
            try:
                yield self[index]
            except DataError as error:
                if not self.skip_bad_records:
                    raise
                self.skipped.append(str(error))
