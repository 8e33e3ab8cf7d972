"""A packed, memory-mapped store of region features: O(1) access by image id.

Reading one image is a dict lookup and a slice of memory-mapped arrays: no file is opened per
sample and nothing is decoded, so DataLoader workers spend their time on collation, not on I/O.

Layout of a store directory (R regions in all, pack order)::

    index.json              {"version": 1, "dtype": "float32" or "float16", "feature_dim": D,
                             "class_dim": C or null, "image_box_feature": true/false,
                             "total_regions": R, "file_bytes": {file name: size},
                             "images": {image_id: [offset, count, image_w, image_h, ordinal]}}
    features.bin            [R, D] dtype, every image's regions back to back
    boxes.bin               [R, 4] float32 (x1, y1, x2, y2) pixels
    class_scores.bin        [R, C] dtype, only when the records have class scores
    image_box_features.bin  [num_images, D] dtype, row = ordinal; only when records have them

Why not LMDB: LMDB is not installed and would be a new dependency (a C library plus its Python
binding); it would also need a serialisation per value (decoded per read). The memmap store needs
nothing beyond NumPy, reads zero-copy from the page cache, and pickles cheaply to DataLoader
workers (each process maps the files again on its first read).

Writing streams (each record is appended to open files; only the small index stays in memory)
to temporary names that are renamed onto the final ones at the end, `index.json` last. A pack
that fails or is interrupted while reading its records leaves an existing store untouched and
creates nothing under the final names. The index records every file's size, so a store whose
files do not match its index (e.g. a crash during the final renames) is rejected on opening.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Optional

import numpy as np

from vlblocks.data.errors import DataError
from vlblocks.data.formats.butd_features import RegionFeatures

VERSION = 1
INDEX = "index.json"
FEATURES, BOXES, CLASS_SCORES, IMAGE_BOX = (
    "features.bin",
    "boxes.bin",
    "class_scores.bin",
    "image_box_features.bin",
)
_DATA_FILES = (FEATURES, BOXES, CLASS_SCORES, IMAGE_BOX)
_DTYPES = ("float16", "float32")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def pack_features(
    records: Iterable[RegionFeatures], directory: str | Path, dtype: str = "float32"
) -> Path:
    """Packs region features into a store directory (see the module docstring).

    Args:
        records: images to store; ids must be unique, and D, C and the presence of
            class scores and whole-image features must agree across records.
        directory: the store folder (created if missing; an existing store there is replaced
            only once every record has been written).
        dtype: "float32" (exact) or "float16" (half the size) for features, class scores and
            whole-image features; boxes are always float32.

    Returns:
        The directory.

    Raises:
        ValueError: unknown dtype.
        DataError: a record is inconsistent with the first one, repeats an id, or (float16)
            holds values beyond the float16 range.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    temporary = {name: directory / f"{name}{suffix}" for name in (*_DATA_FILES, INDEX)}
    writer = _PackWriter(temporary, np.dtype(dtype))
    try:
        for record in records:
            writer.add(record)
        index = writer.finish()
        with open(temporary[INDEX], "w", encoding="utf-8") as handle:
            json.dump(index, handle)
            handle.flush()
            os.fsync(handle.fileno())
        _publish(directory, temporary, set(index["file_bytes"]))
    except BaseException:
        writer.close()
        for path in temporary.values():
            path.unlink(missing_ok=True)
        raise
    return directory


class _PackWriter:
    """Appends records to the temporary data files and builds the index."""

    def __init__(self, paths: dict[str, Path], dtype: np.dtype) -> None:
        self.paths = paths
        self.dtype = dtype
        self.files: dict[str, BinaryIO] = {}
        self.images: dict[str, list[int]] = {}
        self.total = 0
        self.feature_dim: Optional[int] = None
        self.class_dim: Optional[int] = None
        self.has_image_box: Optional[bool] = None

    def add(self, record: RegionFeatures) -> None:
        where = getattr(record, "record", repr(record))
        image_id = str(record.image_id)
        if image_id in self.images:
            raise DataError(f"{where}: image_id {image_id} was already packed")
        boxes = np.asarray(record.boxes, dtype=np.float32)
        features = np.asarray(record.features)
        count = boxes.shape[0] if boxes.ndim == 2 else 0
        if boxes.shape != (count, 4) or count == 0:
            raise DataError(
                f"{where}, field 'boxes': expected [N >= 1, 4], got {list(boxes.shape)}"
            )
        if features.ndim != 2 or features.shape[0] != count or features.shape[1] == 0:
            raise DataError(
                f"{where}, field 'features': expected [{count}, D], got {list(features.shape)}"
            )
        scores = None if record.class_scores is None else np.asarray(record.class_scores)
        whole = None if record.image_box_feature is None else np.asarray(record.image_box_feature)
        if self.feature_dim is None:
            self._start(features.shape[1], scores, whole)
        if features.shape[1] != self.feature_dim:
            raise DataError(
                f"{where}, field 'features': D = {features.shape[1]}, earlier records have "
                f"{self.feature_dim}"
            )
        if (scores is None) != (self.class_dim is None) or (
            scores is not None and scores.shape != (count, self.class_dim)
        ):
            got = "none" if scores is None else list(scores.shape)
            wanted = "none" if self.class_dim is None else f"[{count}, {self.class_dim}]"
            raise DataError(
                f"{where}, field 'class_scores': got {got}, expected {wanted} "
                "like the first record"
            )
        if (whole is None) == self.has_image_box or (
            whole is not None and whole.shape != (self.feature_dim,)
        ):
            got = "none" if whole is None else list(whole.shape)
            wanted = f"[{self.feature_dim}]" if self.has_image_box else "none"
            raise DataError(
                f"{where}, field 'image_box_feature': got {got}, expected {wanted} "
                "like the first record"
            )
        self._write(FEATURES, features, "features", where)
        self._write(BOXES, boxes, "boxes", where)
        if scores is not None:
            self._write(CLASS_SCORES, scores, "class_scores", where)
        if whole is not None:
            self._write(IMAGE_BOX, whole, "image_box_feature", where)
        self.images[image_id] = [
            self.total, count, int(record.image_width), int(record.image_height), len(self.images)
        ]
        self.total += count

    def _start(
        self, feature_dim: int, scores: Optional[np.ndarray], whole: Optional[np.ndarray]
    ) -> None:
        """Fixes D, C and what is stored from the first record; opens the files it needs."""
        self.feature_dim = feature_dim
        self.class_dim = None if scores is None or scores.ndim != 2 else int(scores.shape[1])
        self.has_image_box = whole is not None
        for name in self._names():
            self.files[name] = open(self.paths[name], "wb")

    def _names(self) -> list[str]:
        names = [FEATURES, BOXES]
        if self.class_dim is not None:
            names.append(CLASS_SCORES)
        if self.has_image_box:
            names.append(IMAGE_BOX)
        return names

    def _write(self, name: str, array: np.ndarray, field: str, where: str) -> None:
        dtype = np.dtype(np.float32) if name == BOXES else self.dtype
        if dtype == np.float16 and np.abs(array).max() > _FLOAT16_MAX:
            raise DataError(f"{where}, field {field!r}: values beyond the float16 range")
        self.files[name].write(memoryview(np.ascontiguousarray(array, dtype=dtype)).cast("B"))

    def finish(self) -> dict[str, Any]:
        """Flushes and closes the files; returns the index."""
        for handle in self.files.values():
            handle.flush()
            os.fsync(handle.fileno())
        self.close()
        names = self._names() if self.feature_dim is not None else []
        return {
            "version": VERSION,
            "dtype": self.dtype.name,
            "feature_dim": self.feature_dim,
            "class_dim": self.class_dim,
            "image_box_feature": bool(self.has_image_box),
            "total_regions": self.total,
            "file_bytes": {name: self.paths[name].stat().st_size for name in names},
            "images": self.images,
        }

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


def _publish(directory: Path, temporary: dict[str, Path], written: set[str]) -> None:
    """Renames the written files onto their final names, index last; drops stale files."""
    (directory / INDEX).unlink(missing_ok=True)  # meanwhile the store is absent, never mixed
    for name in _DATA_FILES:
        if name in written:
            os.replace(temporary[name], directory / name)
        else:
            temporary[name].unlink(missing_ok=True)
            (directory / name).unlink(missing_ok=True)
    os.replace(temporary[INDEX], directory / INDEX)
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class FeatureStore:
    """Read-only access to a packed store by image id.

    `store[image_id]` returns a `RegionFeatures` with float32 copies of the stored rows:
    boxes [N, 4], features [N, D], class_scores [N, C] or None, image_box_feature [D] or None.
    Integer ids are looked up as their decimal text. Pickles without its memory maps; each
    process maps the files on its first read.

    Raises:
        DataError: the directory has no index, or the index is corrupt or does not match the
            data files.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = _read_index(self.directory)
        self.dtype: str = index["dtype"]
        self.feature_dim: Optional[int] = index["feature_dim"]
        self.class_dim: Optional[int] = index["class_dim"]
        self.has_image_box_feature: bool = index["image_box_feature"]
        self.total_regions: int = index["total_regions"]
        self._ids: list[str] = list(index["images"])
        self._rows: dict[str, int] = {image_id: row for row, image_id in enumerate(self._ids)}
        self._table: np.ndarray = index["table"]  # [num_images, 5] int64
        self._arrays: Optional[dict[str, np.ndarray]] = None
        self._pid: Optional[int] = None

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, image_id: object) -> bool:
        key = _key(image_id)
        return key is not None and key in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def image_ids(self) -> list[str]:
        """Every image id, in pack order."""
        return list(self._ids)

    def __getitem__(self, image_id: str | int) -> RegionFeatures:
        key = _key(image_id)
        row = self._rows.get(key) if key is not None else None
        if row is None:
            raise KeyError(image_id)
        offset, count, width, height, ordinal = (int(value) for value in self._table[row])
        arrays = self._mapped()
        regions = slice(offset, offset + count)
        scores = arrays.get(CLASS_SCORES)
        whole = arrays.get(IMAGE_BOX)
        return RegionFeatures(
            record=f"{self.directory} image_id {key}",
            image_id=key,
            image_width=width,
            image_height=height,
            boxes=np.array(arrays[BOXES][regions], dtype=np.float32),
            features=np.array(arrays[FEATURES][regions], dtype=np.float32),
            class_scores=None if scores is None else np.array(scores[regions], dtype=np.float32),
            image_box_feature=None if whole is None else np.array(whole[ordinal], dtype=np.float32),
        )

    def _mapped(self) -> dict[str, np.ndarray]:
        """The memory-mapped arrays of this process (mapped on first use)."""
        if self._arrays is None or self._pid != os.getpid():
            self._arrays = _map_arrays(self)
            self._pid = os.getpid()
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = None
        state["_pid"] = None
        return state


def _key(image_id: object) -> Optional[str]:
    if isinstance(image_id, str):
        return image_id
    if isinstance(image_id, (int, np.integer)) and not isinstance(image_id, bool):
        return str(int(image_id))
    return None


def _map_arrays(store: FeatureStore) -> dict[str, np.ndarray]:
    """Read-only memory maps of the store's data files: name -> array."""
    if store.total_regions == 0:
        return {}
    shapes = {
        FEATURES: ((store.total_regions, store.feature_dim), store.dtype),
        BOXES: ((store.total_regions, 4), "float32"),
    }
    if store.class_dim is not None:
        shapes[CLASS_SCORES] = ((store.total_regions, store.class_dim), store.dtype)
    if store.has_image_box_feature:
        shapes[IMAGE_BOX] = ((len(store), store.feature_dim), store.dtype)
    arrays = {}
    for name, (shape, dtype) in shapes.items():
        path = store.directory / name
        try:
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", shape=shape)
        except (OSError, ValueError) as error:
            raise DataError(
                f"feature store {store.directory}: cannot map {name} ({error})"
            ) from None
    return arrays


def _read_index(directory: Path) -> dict[str, Any]:
    """Loads and checks `index.json`; adds "table" [num_images, 5] int64."""
    path = directory / INDEX
    where = f"feature store {directory}"
    if not path.is_file():
        raise DataError(f"{where}: no {INDEX} (not a feature store, or its pack did not finish)")
    try:
        index = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as error:
        raise DataError(f"{where}: {INDEX} is corrupt ({error})") from None
    try:
        index["table"] = _check_index(index)
    except _IndexError as error:
        raise DataError(f"{where}: {INDEX} is corrupt ({error})") from None
    try:
        _check_files(index, directory, index["total_regions"], len(index["table"]))
    except _IndexError as error:
        raise DataError(f"{where}: data files do not match {INDEX} ({error})") from None
    return index


class _IndexError(Exception):
    """What is wrong with an index."""


def _check_index(index: Any) -> np.ndarray:
    """Checks the index's keys and entries; returns the entries as [num_images, 5] int64."""
    def natural(value: Any, name: str, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _IndexError(f"{name} must be an integer >= {minimum}, got {value!r}")
        return value

    if not isinstance(index, dict):
        raise _IndexError("not a JSON object")
    if index.get("version") != VERSION:
        raise _IndexError(f"version {index.get('version')!r}, this reader knows {VERSION}")
    for key in ("dtype", "feature_dim", "class_dim", "image_box_feature", "total_regions",
                "file_bytes", "images"):
        if key not in index:
            raise _IndexError(f"missing {key!r}")
    if index["dtype"] not in _DTYPES:
        raise _IndexError(f"dtype {index['dtype']!r}")
    images = index["images"]
    if not isinstance(images, dict):
        raise _IndexError("images is not an object")
    total = natural(index["total_regions"], "total_regions")
    if images:
        natural(index["feature_dim"], "feature_dim", 1)
    if index["class_dim"] is not None:
        natural(index["class_dim"], "class_dim", 1)
    if not isinstance(index["image_box_feature"], bool):
        raise _IndexError("image_box_feature is not true/false")
    entries = list(images.values())
    if not all(
        isinstance(entry, list) and len(entry) == 5
        and all(isinstance(value, int) and not isinstance(value, bool) for value in entry)
        for entry in entries
    ):
        raise _IndexError("an images entry is not [offset, count, image_w, image_h, ordinal]")
    table = np.asarray(entries, dtype=np.int64).reshape(len(entries), 5)
    if len(table) and (
        (table[:, 0] < 0).any() or (table[:, 1] < 1).any() or (table[:, 2:4] < 1).any()
        or (table[:, 0] + table[:, 1] > total).any()
        or (table[:, 4] != np.arange(len(table))).any()
    ):
        raise _IndexError("an images entry lies outside the stored regions")
    return table


def _check_files(index: dict[str, Any], directory: Path, total: int, num_images: int) -> None:
    """Each data file exists with the size its shape implies and the index recorded."""
    if not total:
        return
    itemsize = np.dtype(index["dtype"]).itemsize
    expected = {
        FEATURES: total * index["feature_dim"] * itemsize,
        BOXES: total * 4 * 4,
    }
    if index["class_dim"] is not None:
        expected[CLASS_SCORES] = total * index["class_dim"] * itemsize
    if index["image_box_feature"]:
        expected[IMAGE_BOX] = num_images * index["feature_dim"] * itemsize
    if index["file_bytes"] != expected:
        raise _IndexError(f"file_bytes {index['file_bytes']} disagree with the shapes {expected}")
    for name, size in expected.items():
        path = directory / name
        if not path.is_file():
            raise _IndexError(f"{name} is missing")
        if path.stat().st_size != size:
            raise _IndexError(f"{name} holds {path.stat().st_size} bytes, expected {size}")
