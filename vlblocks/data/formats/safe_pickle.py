"""Load plain-data pickles (such as RefCOCO's Python 2 `refs(unc).p`) without running any code.

A pickle can name any importable callable and call it while loading (`__reduce__`), so loading an
untrusted pickle with `pickle.load` can run arbitrary code. `safe_load_pickle` uses an unpickler
that refuses every global: only plain containers (list, tuple, dict, set, frozenset) and str,
bytes, bytearray, int, float, bool and None can come out of it.

Python 2 pickles store 8-bit `str` values as raw bytes. They are loaded as bytes (the unpickler's
`encoding="bytes"` mode, so Python 2 `unicode` values stay distinct) and then decoded as UTF-8,
falling back to Latin-1 for bytes that are not valid UTF-8. For the ASCII text of the RefCOCO
files this equals the usual `encoding="latin1"` load; for non-ASCII UTF-8 text it avoids mojibake.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

from vlblocks.data.errors import DataError

MAX_DEPTH = 200


class _RestrictedUnpickler(pickle._Unpickler):  # noqa: SLF001 - the pure-Python unpickler
    """An unpickler that refuses to look up any global (class or function).

    It builds on the pure-Python unpickler: the C one grows its memo table to the largest index
    a PUT opcode names, so a few crafted bytes (`LONG_BINPUT 0x7fffffff`) make it allocate and
    clear tens of gigabytes. The pure-Python memo is a dict. Loading is ~2.5x slower (about 2.5 s
    for a 12 MB refs pickle), which `convert_refs_to_json` makes a one-time cost.
    """

    def __init__(self, file: io.BytesIO, name: str) -> None:
        super().__init__(file, encoding="bytes")
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        """Refuses every global, so no constructor or function can be called while loading."""
        module_text = module.decode("latin-1") if isinstance(module, bytes) else str(module)
        name_text = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        raise DataError(
            f"pickle {self._name} refers to the global {module_text}.{name_text}; "
            "only plain data (containers, strings, numbers) is loaded, never code"
        )


def safe_load_pickle(path: str | Path, decode_bytes: bool = True) -> Any:
    """Loads a pickle of plain data without running code.

    Args:
        path: the pickle file (any protocol, Python 2 or 3).
        decode_bytes: decode bytes values (Python 2 `str`) to str as UTF-8, or Latin-1 where the
            bytes are not valid UTF-8. Dict keys, tuple, set and frozenset members are decoded too.

    Returns:
        The loaded object: nested list / tuple / dict / set / frozenset of str, bytes, int, float,
        bool and None.

    Raises:
        DataError: the file cannot be read, is not a valid pickle, refers to a global (the message
            names the refused `module.name`), or holds a self-referencing or too deeply nested
            structure (checked when decoding).
    """
    loaded = load_restricted(path, _RestrictedUnpickler)
    if not decode_bytes:
        return loaded
    return _Decoder(str(path)).decode(loaded, 0)


def load_restricted(path: str | Path, unpickler: type[pickle.Unpickler]) -> Any:
    """The object a restricted `unpickler` class (built with the file object and the file's name)
    loads from `path`, undecoded; every failure is a `DataError` naming the file."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"cannot read pickle {name}: {error.strerror or error}") from error
    try:
        return unpickler(io.BytesIO(data), name).load()
    except DataError:
        raise
    except Exception as error:  # a malformed pickle can raise almost any exception type
        raise DataError(f"pickle {name} cannot be loaded: {type(error).__name__}: {_message(error)}") from None


class _Decoder:
    """Decodes bytes to str throughout a loaded structure; shared parts are decoded once."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._done: dict[int, Any] = {}
        self._active: set[int] = set()

    def decode(self, value: Any, depth: int) -> Any:
        if isinstance(value, (bytes, bytearray)):
            return _decode_text(bytes(value))
        if not isinstance(value, (list, tuple, dict, set, frozenset)):
            return value
        key = id(value)
        if key in self._done:
            return self._done[key]
        if key in self._active:
            raise DataError(f"pickle {self._name} holds a structure that contains itself")
        if depth >= MAX_DEPTH:
            raise DataError(f"pickle {self._name} is nested more than {MAX_DEPTH} levels deep")
        self._active.add(key)
        try:
            result = self._decode_container(value, depth + 1)
        except TypeError as error:  # defensive: decoded members are hashable when the originals are
            raise DataError(f"pickle {self._name} cannot be decoded: {error}") from None
        finally:
            self._active.discard(key)
        self._done[key] = result
        return result

    def _decode_container(self, value: Any, depth: int) -> Any:
        if isinstance(value, dict):
            return {self.decode(k, depth): self.decode(v, depth) for k, v in value.items()}
        items = [self.decode(item, depth) for item in value]
        return type(value)(items)


def _message(error: Exception) -> str:
    """The error's message, or a placeholder when it cannot be printed (e.g. a huge int in it)."""
    try:
        return str(error)
    except Exception:
        return "(message cannot be printed)"


def _decode_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def convert_refs_to_json(pickle_path: str | Path, json_path: str | Path) -> Path:
    """Converts a RefCOCO `refs(*).p` pickle to JSON once, so later runs need no unpickling.

    The pickle is loaded with `safe_load_pickle` (no code runs), and the JSON is written to a
    temporary file in the target folder and renamed over `json_path`, so a crash never leaves a
    half-written file. Tuples become JSON lists. `RefCocoReader` accepts either file.

    Returns:
        `json_path`.

    Raises:
        DataError: the pickle cannot be loaded, is not a list, or holds values JSON cannot store
            (sets, non-string keys other than numbers, NaN or infinite floats).
    """
    json_path = Path(json_path)
    refs = safe_load_pickle(pickle_path)
    if not isinstance(refs, list):
        raise DataError(
            f"pickle {pickle_path} holds {type(refs).__name__}, expected a list of refs"
        )
    try:
        text = json.dumps(refs, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise DataError(f"pickle {pickle_path} cannot be written as JSON: {error}") from None
    json_path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=json_path.parent, prefix=f".{json_path.name}.", delete=False
    )
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, json_path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return json_path
