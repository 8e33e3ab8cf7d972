"""Malformed Conceptual Captions input yields DataError, never another exception or a hang."""

import base64
import json
import zipfile

from hypothesis import given, settings
from hypothesis import strategies as st

from vlblocks.data.errors import DataError
from vlblocks.data.formats.conceptual_captions import ConceptualCaptionsReader

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
frcnn_records = st.fixed_dictionaries(
    {}, optional={
        "image_w": json_values, "image_h": json_values, "num_boxes": json_values,
        "boxes": st.one_of(json_values, st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())),
        "classes": json_values, "features": json_values,
    },
)


def read_all(path):
    try:
        reader = ConceptualCaptionsReader(path)
        for index in range(len(reader)):
            try:
                reader[index]
            except DataError:
                pass
    except DataError:
        pass


@settings(deadline=None, max_examples=60)
@given(lines=st.lists(st.one_of(st.binary(max_size=60), json_values.map(lambda v: json.dumps(v).encode())), max_size=5))
def test_arbitrary_annotation_lines(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("cc") / "train_frcnn.json"
    path.write_bytes(b"\n".join(lines))
    read_all(path)


@settings(deadline=None, max_examples=60)
@given(frcnn=frcnn_records, caption=json_values)
def test_arbitrary_per_image_records(tmp_path_factory, frcnn, caption):
    folder = tmp_path_factory.mktemp("cc")
    with zipfile.ZipFile(folder / "train_frcnn.zip", "w") as archive:
        archive.writestr("00000000.json", json.dumps(frcnn))
    record = {"image": "train_image.zip@/00000000.jpg", "caption": caption, "frcnn": "train_frcnn.zip@/00000000.json"}
    (folder / "train_frcnn.json").write_text(json.dumps(record) + "\n")
    read_all(folder / "train_frcnn.json")
