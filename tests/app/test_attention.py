"""`vlblocks attention`'s parts: the picture from a hand-made attention matrix, the word and layer
reductions, and the one-line errors on bad input (nothing written)."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlblocks.app.attention import (
    AttentionInputError,
    attention_map,
    boxes_for,
    caption_words,
    mean_attention,
    parse_boxes,
    parse_layer,
    read_boxes_file,
    word_region_matrix,
)
from vlblocks.app.attention_figure import draw_attention
from vlblocks.app.inference import InferenceError, grid_boxes


def test_a_strongly_attended_box_is_shaded_more_than_a_weakly_attended_one():
    image = Image.new("RGB", (100, 50), (128, 128, 128))
    boxes = np.asarray([[5, 5, 45, 45], [55, 5, 95, 45]], np.float32)
    figure = draw_attention(image, boxes, ["dog"], np.asarray([[0.9, 0.1]]))
    # One panel: 240 wide + 2 margins of 8 = 256; the image scaled by 2.4 is 120 high, + a 16 px
    # title band + 2 margins = 152.
    assert figure.size == (256, 152)
    # Box centres (25, 25) and (75, 25) scale to (60, 60) and (180, 60) in the panel, which starts
    # at (8, 8 + 16): figure pixels (68, 84) and (188, 84).
    strong, weak = figure.getpixel((68, 84)), figure.getpixel((188, 84))
    # 0.9 is the figure's peak: opacity 0.6, alpha 153 -> 128 + (255 - 128) * 153/255 = 204.2 red,
    # 128 * (1 - 153/255) = 51.2 green and blue. 0.1: opacity 0.6 / 9, alpha round(17.0) = 17 ->
    # 128 + 127 * 17/255 = 136.5 red, 128 - 128 * 17/255 = 119.5 green and blue.
    assert abs(strong[0] - 204) <= 1 and abs(strong[1] - 51) <= 1 and abs(strong[2] - 51) <= 1
    assert abs(weak[0] - 136.5) <= 1 and abs(weak[1] - 119.5) <= 1
    assert strong[1] < weak[1] < 128  # more attention, redder


def test_the_figure_has_one_panel_per_word_four_to_a_row():
    image = Image.new("RGB", (60, 30), (0, 0, 0))
    figure = draw_attention(image, np.asarray([[0, 0, 10, 10]], np.float32), list("abcde"), np.full((5, 1), 0.5))
    # 4 columns: 4 * 240 + 5 * 8 = 1000; 2 rows of 16 + 120 (30 * 4) plus 3 margins: 296.
    assert figure.size == (1000, 296)


def test_words_average_their_pieces_rows_over_the_region_columns():
    # [CLS] w0 w0 w1 [SEP] | regions r0 r1 r2 | [END]: T = 9, text L = 5, regions at 5..7.
    attention = torch.zeros(9, 9)
    attention[0, 5] = 1.0  # [CLS]: no word
    attention[1, 5:8] = torch.tensor([0.2, 0.6, 0.1])
    attention[2, 5:8] = torch.tensor([0.4, 0.2, 0.3])
    attention[3, 5:9] = torch.tensor([0.0, 0.1, 0.8, 0.1])  # the [END] column is not a region
    words, matrix = word_region_matrix(attention, [-1, 0, 0, 1, -1], 3)
    assert words == [0, 1]
    # word 0: ((0.2 + 0.4) / 2, (0.6 + 0.2) / 2, (0.1 + 0.3) / 2) = (0.3, 0.4, 0.2)
    np.testing.assert_allclose(matrix, [[0.3, 0.4, 0.2], [0.0, 0.1, 0.8]], atol=1e-6)


def test_heads_are_averaged_and_layers_chosen_or_averaged():
    layer_1 = torch.tensor([0.2, 0.4]).view(1, 2, 1, 1)  # heads 0.2, 0.4 -> 0.3
    layer_2 = torch.tensor([0.6, 1.0]).view(1, 2, 1, 1)  # heads 0.6, 1.0 -> 0.8
    assert mean_attention((layer_1, layer_2), 2).item() == pytest.approx(0.8)
    assert mean_attention((layer_1, layer_2), None).item() == pytest.approx(0.55)  # (0.3 + 0.8) / 2
    assert parse_layer("all", 2) is None and parse_layer("2", 2) == 2
    with pytest.raises(AttentionInputError, match="from 1 to 2"):
        parse_layer("3", 2)


def test_grid_boxes_cover_the_image_in_the_inclusive_convention():
    boxes = grid_boxes(90, 60, 3)  # cells 30 x 20
    assert boxes.shape == (9, 4)
    assert boxes[0].tolist() == [0, 0, 29, 19] and boxes[4].tolist() == [30, 20, 59, 39] and boxes[8].tolist() == [60, 40, 89, 59]
    assert len(boxes_for("grid:2", None, (90, 60))) == 4


def test_boxes_parse_from_the_option_and_from_files(tmp_path):
    assert parse_boxes("1,2,3,4; 5,6,7,8").tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    (tmp_path / "boxes.json").write_text("[[1, 2, 3, 4]]")
    (tmp_path / "boxes.txt").write_text("# x1,y1,x2,y2\n1,2,3,4\n\n5,6,7,8\n")
    assert read_boxes_file(tmp_path / "boxes.json").tolist() == [[1, 2, 3, 4]]
    assert read_boxes_file(tmp_path / "boxes.txt").tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    (tmp_path / "bad.txt").write_text("1,2,3,4\n1,2,x,4\n")
    with pytest.raises(AttentionInputError, match="bad.txt line 2: expected four numbers"):
        read_boxes_file(tmp_path / "bad.txt")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("1,2,3", "--boxes box 1: expected four numbers"),
        ("0,0,10,10;10,10,5,20", "--boxes box 2: x2 < x1"),
        ("0,0,120,40", r"--boxes box 1 \(0,0,120,40\) lies outside the 100 x 50 image"),
        ("-1,0,10,10", "lies outside"),
        (None, "vlblocks ships no detector"),
        ("grid:0", "grid:N"),
    ],
)
def test_bad_boxes_are_one_line_errors(spec, message):
    with pytest.raises(AttentionInputError, match=message):
        boxes_for(spec, None, (100, 50))


def test_a_text_without_words_is_refused():
    assert caption_words("A dog, running.") == ["a", "dog", ",", "running", "."]
    with pytest.raises(AttentionInputError, match="has no words"):
        caption_words("   \t ")


def _call(tmp_path, image, boxes="0,0,10,10", text="a dog"):
    return attention_map(tmp_path / "no-recipe.gin", [], tmp_path / "no-checkpoint", image, text, boxes, None, tmp_path / "map.png")


def test_bad_input_fails_before_the_model_is_built_and_writes_nothing(tmp_path):
    (tmp_path / "not-an-image.png").write_text("hello")
    with pytest.raises(InferenceError, match="cannot read image .*not-an-image.png"):
        _call(tmp_path, tmp_path / "not-an-image.png")
    with pytest.raises(InferenceError, match="cannot read image .*missing.png"):
        _call(tmp_path, tmp_path / "missing.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "picture.png")
    with pytest.raises(AttentionInputError, match="outside the 20 x 20 image"):
        _call(tmp_path, tmp_path / "picture.png", boxes="0,0,30,10")
    with pytest.raises(AttentionInputError, match="has no words"):
        _call(tmp_path, tmp_path / "picture.png", text=" ")
    with pytest.raises(AttentionInputError, match="expected a .png"):
        attention_map("r.gin", [], "c", tmp_path / "picture.png", "a dog", "0,0,5,5", None, tmp_path / "map.jpg")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["not-an-image.png", "picture.png"]
