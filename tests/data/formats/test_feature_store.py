import json
import os
import pickle

import numpy as np
import pytest

from vlblocks.data.errors import DataError
from vlblocks.data.formats.butd_features import RegionFeatures
from vlblocks.data.formats.feature_store import FeatureStore, pack_features

FINAL_NAMES = {"index.json", "features.bin", "boxes.bin", "class_scores.bin",
               "image_box_features.bin"}


def make_records(count=5, dim=16, classes=None, whole=False, seed=0, prefix="img"):
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        n = int(rng.integers(1, 7))
        corners = rng.uniform(0, 50, (n, 2)).astype(np.float32)
        boxes = np.concatenate([corners, corners + rng.uniform(0, 40, (n, 2))], axis=1)
        records.append(RegionFeatures(
            record=f"test {i}",
            image_id=f"{prefix}{i}",
            image_width=100 + i,
            image_height=90 + i,
            boxes=boxes.astype(np.float32),
            features=rng.standard_normal((n, dim)).astype(np.float32),
            class_scores=None if classes is None else rng.random((n, classes)).astype(np.float32),
            image_box_feature=rng.standard_normal(dim).astype(np.float32) if whole else None,
        ))
    return records


def assert_equal_records(got, want, tolerance=0.0):
    assert got.image_id == want.image_id
    assert (got.image_width, got.image_height) == (want.image_width, want.image_height)
    np.testing.assert_array_equal(got.boxes, want.boxes)
    for name in ("features", "class_scores", "image_box_feature"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == np.float32 and a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance)


def test_pack_then_read_is_exact_in_float32(tmp_path):
    records = make_records(classes=7, whole=True)
    assert pack_features(iter(records), tmp_path / "store") == tmp_path / "store"
    store = FeatureStore(tmp_path / "store")
    assert len(store) == 5 and store.image_ids() == [r.image_id for r in records]
    assert list(store) == store.image_ids()
    assert store.feature_dim == 16 and store.class_dim == 7 and store.dtype == "float32"
    for record in reversed(records):
        got = store[record.image_id]
        assert_equal_records(got, record)
        assert got.record == f"{tmp_path / 'store'} image_id {record.image_id}"
    assert {p.name for p in (tmp_path / "store").iterdir()} == FINAL_NAMES
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    total = sum(len(r.boxes) for r in records)
    assert index["total_regions"] == total
    assert os.path.getsize(tmp_path / "store" / "features.bin") == total * 16 * 4


def test_float16_store_is_within_tolerance_and_half_size(tmp_path):
    records = make_records(classes=3)
    pack_features(records, tmp_path / "half", dtype="float16")
    pack_features(records, tmp_path / "full")
    store = FeatureStore(tmp_path / "half")
    for record in records:
        assert_equal_records(store[record.image_id], record, tolerance=4e-3)
    half = os.path.getsize(tmp_path / "half" / "features.bin")
    assert 2 * half == os.path.getsize(tmp_path / "full" / "features.bin")
    assert not (tmp_path / "half" / "image_box_features.bin").exists()


def test_float16_overflow_and_bad_dtype_are_rejected(tmp_path):
    records = make_records(count=2)
    records[1].features[0, 0] = 1e6
    with pytest.raises(DataError, match=r"test 1, field 'features': .*float16"):
        pack_features(records, tmp_path / "s", dtype="float16")
    with pytest.raises(ValueError, match="dtype"):
        pack_features(records, tmp_path / "s", dtype="int8")


def test_access_by_id_is_a_lookup_without_opening_files(tmp_path, monkeypatch):
    records = make_records(count=50)
    pack_features(records, tmp_path)
    store = FeatureStore(tmp_path)
    store[records[0].image_id]  # maps the files

    def no_open(*args, **kwargs):
        raise AssertionError("a file was opened on access")

    monkeypatch.setattr("builtins.open", no_open)
    monkeypatch.setattr(np, "memmap", no_open)
    for record in records[::-1]:
        assert_equal_records(store[record.image_id], record)


def test_missing_id_is_key_error_and_int_ids_match_text(tmp_path):
    records = make_records(count=3, prefix="")
    pack_features(records, tmp_path)
    store = FeatureStore(tmp_path)
    assert "1" in store and 1 in store and np.int64(2) in store
    assert "9" not in store and None not in store and [1] not in store
    assert_equal_records(store[1], records[1])
    with pytest.raises(KeyError):
        store["nope"]
    with pytest.raises(KeyError):
        store[3.0]


def test_inconsistent_records_are_rejected(tmp_path):
    records = make_records(count=3, classes=4)
    records[2].class_scores = None
    with pytest.raises(DataError, match=r"test 2, field 'class_scores': got none"):
        pack_features(records, tmp_path / "a")
    records = make_records(count=3)
    records[1].features = records[1].features[:, :5]
    with pytest.raises(DataError, match=r"test 1, field 'features': D = 5"):
        pack_features(records, tmp_path / "b")
    records = make_records(count=3)
    records[2].image_id = records[0].image_id
    with pytest.raises(DataError, match="already packed"):
        pack_features(records, tmp_path / "c")


def failing_after(records, count):
    for index, record in enumerate(records):
        if index == count:
            raise RuntimeError("reader died")
        yield record


def test_interrupted_pack_leaves_nothing_under_final_names(tmp_path):
    with pytest.raises(RuntimeError, match="reader died"):
        pack_features(failing_after(make_records(classes=2), 3), tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []  # not even temporary files


def test_interrupted_repack_keeps_the_existing_store(tmp_path):
    old = make_records(count=4, seed=1, classes=2)
    pack_features(old, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError):
        pack_features(failing_after(make_records(count=6, seed=2), 4), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    store = FeatureStore(tmp_path)
    for record in old:
        assert_equal_records(store[record.image_id], record)


def test_repack_replaces_store_and_drops_stale_files(tmp_path):
    pack_features(make_records(count=4, seed=1, classes=2, whole=True), tmp_path)
    new = make_records(count=2, seed=3, prefix="new")
    pack_features(new, tmp_path, dtype="float16")
    assert {p.name for p in tmp_path.iterdir()} == {"index.json", "features.bin", "boxes.bin"}
    store = FeatureStore(tmp_path)
    assert store.image_ids() == ["new0", "new1"] and store.class_dim is None


def test_empty_store(tmp_path):
    pack_features([], tmp_path)
    store = FeatureStore(tmp_path)
    assert len(store) == 0 and store.image_ids() == [] and "x" not in store


def test_works_after_pickling(tmp_path):
    records = make_records(dim=256, classes=3, whole=True)
    pack_features(records, tmp_path)
    store = FeatureStore(tmp_path)
    store[records[0].image_id]  # memory maps open before pickling
    data = pickle.dumps(store)
    features_bytes = os.path.getsize(tmp_path / "features.bin")
    assert len(data) < min(4096, features_bytes)  # the maps are not pickled, only the index
    copy = pickle.loads(data)
    for record in records:
        assert_equal_records(copy[record.image_id], record)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "index.json").unlink(), "no index.json"),
    (lambda d: (d / "index.json").write_text("{not json"), "index.json is corrupt"),
    (lambda d: (d / "index.json").write_text("[]"), "not a JSON object"),
    (lambda d: edit_index(d, version=99), "version 99"),
    (lambda d: edit_index(d, images={"a": [0, 1]}), "not \\[offset, count"),
    (lambda d: edit_index(d, images={"a": [0, 10_000, 5, 5, 0]}), "outside the stored regions"),
    (lambda d: edit_index(d, file_bytes={"features.bin": 8}), "disagree"),
    (lambda d: truncate(d / "features.bin"), "features.bin holds"),
    (lambda d: (d / "boxes.bin").unlink(), "boxes.bin is missing"),
])
def test_corrupt_store_is_data_error_naming_it(tmp_path, damage, message):
    pack_features(make_records(), tmp_path / "store")
    damage(tmp_path / "store")
    with pytest.raises(DataError, match=message) as raised:
        FeatureStore(tmp_path / "store")
    assert f"feature store {tmp_path / 'store'}" in str(raised.value)


def edit_index(directory, **changes):
    path = directory / "index.json"
    index = json.loads(path.read_text())
    index.update(changes)
    path.write_text(json.dumps(index))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:-4])
