import torch

from vlblocks.blocks.task_heads import AnswerHead, ChoiceHead, RegionScoreHead


def test_answer_head_shapes_and_names():
    head = AnswerHead(hidden_size=16, num_answers=5, dropout=0.0)
    assert head(torch.randn(3, 16)).shape == (3, 5)
    assert {name for name, _ in head.named_parameters()} == {
        "transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight", "transform.LayerNorm.bias",
        "classifier.weight", "classifier.bias",
    }
    assert torch.all(head.classifier.bias == 0)


def test_answer_rows_start_at_the_mean_word_embedding_of_their_pieces():
    torch.manual_seed(0)
    head = AnswerHead(hidden_size=4, num_answers=3)
    words = torch.randn(10, 4)
    before = head.classifier.weight[2].clone()
    head.init_from_word_embeddings(words, [[1], [2, 5, 7], []])
    torch.testing.assert_close(head.classifier.weight[0], words[1])
    torch.testing.assert_close(head.classifier.weight[1], (words[2] + words[5] + words[7]) / 3)
    torch.testing.assert_close(head.classifier.weight[2], before)  # no pieces: unchanged


def test_choice_head_gives_one_logit_per_row():
    assert ChoiceHead(hidden_size=8)(torch.randn(4, 8)).shape == (4,)


def test_region_score_head_squeezes_a_single_score_and_keeps_classes():
    assert RegionScoreHead(hidden_size=8, outputs=1)(torch.randn(2, 5, 8)).shape == (2, 5)
    assert RegionScoreHead(hidden_size=8, outputs=81, xavier=False)(torch.randn(2, 5, 8)).shape == (2, 5, 81)
    assert RegionScoreHead(hidden_size=8).transform.LayerNorm is None  # the masked-region head's transform
