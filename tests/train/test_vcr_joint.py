import pytest

from vlblocks.train.vcr_joint import ChoicePrediction, joint_accuracy


def test_joint_accuracy_needs_both_answer_and_rationale_right():
    # Question a: both right; b: answer right, rationale wrong; c: answer wrong, rationale
    # right; d: both wrong. Q->A 2/4, QA->R 2/4, Q->AR 1/4 (official vcr/val.py).
    answers = {"a": ChoicePrediction(1, 1), "b": ChoicePrediction(2, 2), "c": ChoicePrediction(0, 3), "d": ChoicePrediction(0, 1)}
    rationales = {"a": ChoicePrediction(3, 3), "b": ChoicePrediction(0, 1), "c": ChoicePrediction(2, 2), "d": ChoicePrediction(1, 0)}
    assert joint_accuracy(answers, rationales) == {"q2a/accuracy": 0.5, "qa2r/accuracy": 0.5, "q2ar/accuracy": 0.25, "count": 4.0}


def test_joint_accuracy_rejects_mismatched_or_unlabelled_questions():
    with pytest.raises(ValueError, match="different questions"):
        joint_accuracy({"a": ChoicePrediction(0, 0)}, {"b": ChoicePrediction(0, 0)})
    with pytest.raises(ValueError, match="no answer or rationale label"):
        joint_accuracy({"a": ChoicePrediction(0, None)}, {"a": ChoicePrediction(0, 0)})
