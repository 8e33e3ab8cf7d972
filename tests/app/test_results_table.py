"""`format_results` (the table `vlblocks train`, `eval` and `eval-vcr-joint` print) and the
atomic JSON file `vlblocks eval` writes."""

import os

import pytest

from vlblocks.app.run import format_results, results_file, write_results


def test_pretraining_results_are_a_table_with_one_column_per_ablation():
    results = {
        "full": {"mlm/accuracy": 0.123456, "mlm/count": 96.0},
        "image_blanked": {"mlm/accuracy": 0.0625, "mlm/count": 96.0},
        "caption_dropped": {"mlm/accuracy": 0.0, "mlm/count": 0.0},
    }
    # Widths: 'mlm/accuracy' (12), 'with image' (10), 'image blanked' (13), 'caption dropped' (15);
    # cells are right-aligned and joined by two spaces; accuracies with 4 decimals, counts as integers.
    expected = (
        "metric        with image  image blanked  caption dropped\n"
        "--------------------------------------------------------\n"
        "mlm/accuracy      0.1235         0.0625           0.0000\n"
        "mlm/count             96             96                0"
    )
    assert format_results(results) == expected


def test_flat_results_are_one_column_named_full_with_missing_cells_dashed():
    # Training's validation and VCR's joint accuracy are flat; a variant lacking a metric shows '-'.
    assert format_results({"vqa/accuracy": 0.5, "vqa/count": 32.0}) == (
        "metric          full\n"
        "--------------------\n"
        "vqa/accuracy  0.5000\n"
        "vqa/count         32"
    )
    assert format_results({"full": {"a/loss": 2.0}, "image_blanked": {}}).splitlines()[2] == "a/loss      2.0000              -"


def test_results_file_defaults_beside_the_checkpoint_and_refuses_what_cannot_be_written(tmp_path):
    folder = tmp_path / "step-0000003"
    folder.mkdir()
    assert results_file(folder) == folder / "eval.json"
    assert results_file(tmp_path / "model.safetensors") == tmp_path / "model.eval.json"
    assert results_file(folder, tmp_path / "mine.json") == tmp_path / "mine.json"
    with pytest.raises(OSError, match="step-0000003: cannot write the results there \\(a folder\\)"):
        results_file(tmp_path, folder)
    with pytest.raises(OSError, match="is not an existing folder"):
        results_file(folder, tmp_path / "missing" / "eval.json")


def test_write_results_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text("old")
    assert write_results({"full": {"vqa/count": 3.0}}, path) == path
    assert path.read_text() == '{\n  "full": {\n    "vqa/count": 3.0\n  }\n}\n'
    assert os.listdir(tmp_path) == ["eval.json"]


def test_write_results_failing_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    path.write_text("old")

    def refuse(source, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match=f"^{path}: cannot write the results \\(Permission denied\\)$"):
        write_results({"full": {}}, path)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["eval.json"]
    with pytest.raises(OSError, match="cannot write the results"):
        write_results({}, tmp_path / "no-folder" / "eval.json")
