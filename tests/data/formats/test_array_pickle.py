"""Pickled numpy arrays read without running code (detectron's R-101.pkl format)."""

import os
import pickle

import numpy as np
import pytest

from vlblocks.data.errors import DataError
from vlblocks.data.formats.array_pickle import safe_load_array_pickle


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numeric_arrays_come_back_with_their_values(tmp_path, protocol):
    path = tmp_path / "blobs.pkl"
    fortran = np.asfortranarray(np.array([[1, 2, 3], [4, 5, 6]], dtype=">i4"))  # big-endian, column-major
    path.write_bytes(pickle.dumps({"blobs": {"w": np.array([[0.5, -1.0]], np.float32), "f": fortran}, "n": 3}, protocol=protocol))
    loaded = safe_load_array_pickle(path)
    assert loaded["n"] == 3
    assert loaded["blobs"]["w"].dtype == np.float32 and loaded["blobs"]["w"].tolist() == [[0.5, -1.0]]
    assert loaded["blobs"]["f"].tolist() == [[1, 2, 3], [4, 5, 6]]


def test_object_arrays_and_other_globals_are_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"a": np.array([1, "x"], dtype=object)}, protocol=2))
    with pytest.raises(DataError, match=r"evil\.pkl holds an array of dtype object; only numeric arrays are loaded"):
        safe_load_array_pickle(path)
    path.write_bytes(pickle.dumps(os.system, protocol=2))
    with pytest.raises(DataError, match=r"evil\.pkl refers to the global (posix|nt)\.system"):
        safe_load_array_pickle(path)


def test_data_that_does_not_match_the_shape_is_refused(tmp_path):
    path = tmp_path / "short.pkl"
    data = pickle.dumps(np.zeros((2, 2), np.float32), protocol=4)
    # the 16 raw bytes (2 x 2 float32) are written as SHORT_BINBYTES 0x10: claim 12 by cutting 4 off
    raw = b"C\x10" + bytes(16)
    assert data.count(raw) == 1
    path.write_bytes(data.replace(raw, b"C\x0c" + bytes(12)))
    with pytest.raises(DataError, match=r"short\.pkl holds an array of shape \(2, 2\) and dtype float32 but 12 bytes of data"):
        safe_load_array_pickle(path)
