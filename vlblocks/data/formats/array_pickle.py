"""Load pickles of numeric numpy arrays (such as detectron's `R-101.pkl`) without running any code.

A pickled ndarray names numpy functions (`numpy.core.multiarray._reconstruct`, `numpy.dtype`,
`numpy.core.numeric._frombuffer` for protocol 5, and `_codecs.encode` for Python 3 protocol-2
bytes). The restricted unpickler of `safe_pickle` refuses every global; this one answers those few
names with inert stand-ins that only record their arguments, and builds each array afterwards with
`numpy.frombuffer` from its raw bytes, dtype and shape, checked against each other. Numeric dtypes
only (bool, signed/unsigned integers, floats): an object array could hold anything, so it is
refused. Every other global is refused as `safe_load_pickle` refuses it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from vlblocks.data.errors import DataError
from vlblocks.data.formats.safe_pickle import _Decoder, _RestrictedUnpickler, load_restricted

NUMERIC_KINDS = "biuf"  # bool, signed int, unsigned int, float
_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
_FROMBUFFER = {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}


def _text(value: Any) -> Any:
    return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else value


class _DtypeSpec:
    """Stands in for `numpy.dtype(code, align, copy)`; BUILD hands it the byte order."""

    def __init__(self, name: str, code: Any, *_: Any) -> None:
        self._name = name
        self.code = _text(code)
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1:
            self.byteorder = _text(state[1])

    def dtype(self) -> np.dtype:
        """The numeric dtype it names, or a DataError naming the pickle."""
        if not isinstance(self.code, str) or self.byteorder not in ("<", ">", "=", "|"):
            raise DataError(f"pickle {self._name} holds an array of an unreadable dtype {self.code!r}")
        try:
            dtype = np.dtype(("" if self.byteorder == "|" else self.byteorder) + self.code)
        except TypeError:
            raise DataError(f"pickle {self._name} holds an array of an unknown dtype {self.code!r}") from None
        if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise DataError(f"pickle {self._name} holds an array of dtype {dtype}; only numeric arrays are loaded")
        return dtype


class _ArraySpec:
    """Stands in for `_reconstruct(ndarray, (0,), b'b')`; BUILD hands it (version, shape, dtype, fortran, raw)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise DataError(f"pickle {self._name} holds an array whose state is not (version, shape, dtype, order, data)")
        shape, dtype, fortran, raw = state[-4:]
        self.array = _array(self._name, raw, dtype, shape, bool(fortran))


def _array(name: str, raw: Any, dtype: Any, shape: Any, fortran: bool) -> np.ndarray:
    """The array of `shape` read from `raw`; its size must match the shape and dtype exactly."""
    if not isinstance(dtype, _DtypeSpec):
        raise DataError(f"pickle {name} holds an array without a dtype")
    numpy_dtype = dtype.dtype()
    if not isinstance(raw, (bytes, bytearray)):
        raise DataError(f"pickle {name} holds an array that is not raw numeric data")
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise DataError(f"pickle {name} holds an array of shape {shape!r}, expected a tuple of sizes")
    if math.prod(shape) * numpy_dtype.itemsize != len(raw):
        raise DataError(f"pickle {name} holds an array of shape {shape} and dtype {numpy_dtype} but {len(raw)} bytes of data")
    return np.frombuffer(bytes(raw), numpy_dtype).reshape(shape, order="F" if fortran else "C").copy()


def _latin1_encode(name: str, text: Any, encoding: Any = "latin1") -> bytes:
    """`_codecs.encode(text, 'latin1')`, how Python 3 writes bytes in a protocol-2 pickle."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise DataError(f"pickle {name} calls _codecs.encode with {encoding!r}; only latin1 bytes are loaded")
    return text.encode("latin-1")


class _ArrayUnpickler(_RestrictedUnpickler):
    """The restricted unpickler, with inert stand-ins for the globals a pickled ndarray names."""

    def find_class(self, module: Any, name: Any) -> Any:
        key = (_text(module), _text(name))
        if key in _RECONSTRUCT:
            return lambda cls, *_: _ArraySpec(self._name) if cls is _ArraySpec else self._refuse("_reconstruct", cls)
        if key == ("numpy", "ndarray"):
            return _ArraySpec
        if key == ("numpy", "dtype"):
            return lambda *args: _DtypeSpec(self._name, *args)
        if key in _FROMBUFFER:
            return lambda raw, dtype, shape, order: _array(self._name, raw, dtype, shape, _text(order) == "F")
        if key == ("_codecs", "encode"):
            return lambda *args: _latin1_encode(self._name, *args)
        return super().find_class(module, name)

    def _refuse(self, function: str, value: Any) -> Any:
        raise DataError(f"pickle {self._name} calls numpy {function} on {type(value).__name__}; only plain ndarrays are loaded")


def _materialise(name: str, value: Any) -> Any:
    """Replace every array stand-in in nested dicts, lists and tuples by its numpy array."""
    if isinstance(value, _ArraySpec):
        if value.array is None:
            raise DataError(f"pickle {name} holds an array with no data (its state was never set)")
        return value.array
    if isinstance(value, dict):
        return {key: _materialise(name, item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_materialise(name, item) for item in value)
    return value


def safe_load_array_pickle(path: str | Path) -> Any:
    """Loads a pickle of plain data and numeric numpy arrays without running code.

    Args:
        path: the pickle file (any protocol, Python 2 or 3; numpy 1 or 2 names).

    Returns:
        The loaded object: plain containers (bytes keys and values decoded to str as
        `safe_load_pickle` does), with each pickled ndarray as a `numpy.ndarray` of its dtype.

    Raises:
        DataError: the file cannot be read or is not a valid pickle, names a global other than
            the ndarray ones, or holds a non-numeric array or one whose data does not match its
            shape and dtype; the message names the file.
    """
    name = str(path)
    return _Decoder(name).decode(_materialise(name, load_restricted(path, _ArrayUnpickler)), 0)
