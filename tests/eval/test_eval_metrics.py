"""Pass@K, Recall@K, F1 and accuracy against hand-computed cases (duplicates, invalid items, K past the list)."""
import pytest

from megatron_onereason.eval.metrics import choice_accuracy, pass_at_k, recall_at_k, selection_f1

PREDICTIONS = ["a", "b", "a", None, "c"]  # ranked; "a" repeats, None is an undecodable pattern
TARGETS = {"a", "c", "d"}


@pytest.mark.parametrize("k, want_pass, want_recall", [
    (1, 1.0, 1 / 3),
    (2, 1.0, 1 / 3),
    (3, 1.0, 1 / 3),  # the duplicate "a" takes position 3 and recovers nothing new
    (4, 1.0, 1 / 3),  # None never hits
    (5, 1.0, 2 / 3),
    (64, 1.0, 2 / 3),  # K larger than the list: the whole list
])
def test_pass_and_recall_by_hand(k, want_pass, want_recall):
    assert pass_at_k(PREDICTIONS, TARGETS, k) == want_pass
    assert recall_at_k(PREDICTIONS, TARGETS, k) == pytest.approx(want_recall)


def test_misses_and_duplicate_targets():
    assert pass_at_k(["x", "y"], ["y", "y"], 1) == 0.0  # position-1 pass: the best item is not a target
    assert pass_at_k(["x", "y"], ["y", "y"], 2) == 1.0
    assert recall_at_k(["x", "y"], ["y", "y"], 2) == 1.0  # duplicate targets collapse to one
    assert recall_at_k(["y", "y", "y"], ["y", "z"], 3) == 0.5
    assert pass_at_k([], {"a"}, 8) == 0.0 and recall_at_k([], {"a"}, 8) == 0.0


@pytest.mark.parametrize("call", [
    lambda: pass_at_k(["a"], {"a"}, 0),
    lambda: recall_at_k(["a"], set(), 1),
    lambda: pass_at_k(["a"], [None], 1),
    lambda: choice_accuracy(["A"], ["A", "B"]),
    lambda: choice_accuracy([], []),
])
def test_undefined_inputs_are_errors(call):
    with pytest.raises(ValueError):
        call()


def test_selection_f1_by_hand():
    assert selection_f1({"a", "b", "c"}, {"b", "c", "d", "e"}) == pytest.approx(2 * 2 / (3 + 4))
    assert selection_f1(["a", "a"], ["a"]) == 1.0  # sets: repeats do not count twice
    assert selection_f1([], ["a"]) == 0.0
    assert selection_f1([], []) == 1.0


def test_choice_accuracy_by_hand():
    assert choice_accuracy(["A", "B", None, "D"], ["A", "C", "C", "D"]) == 0.5
