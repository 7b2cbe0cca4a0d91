"""Classification and retrieval metrics on hand-made cases whose values are worked out by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medalign.evaluation.metrics import (
    as_probabilities,
    bidirectional_retrieval,
    classification_metrics,
    probability_rows,
    retrieval_metrics,
    retrieval_ranks,
    same_group_positives,
    without_rows,
)

# ----------------------------------------------------------------------------- classification


def test_binary_four_samples() -> None:
    # p(class 1) = 0.1, 0.6 | 0.4, 0.8 for truths 0, 0 | 1, 1 -> predictions 0, 1, 0, 1
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.2, 0.8]])
    m = classification_metrics([0, 0, 1, 1], probs, ["neg", "pos"])
    assert m["n"] == 4
    assert m["confusion_matrix"] == [[1, 1], [1, 1]]
    assert m["accuracy"] == 0.5
    assert m["balanced_accuracy"] == 0.5
    assert m["macro_f1"] == pytest.approx(0.5)  # each class: precision 1/2, recall 1/2
    assert m["per_class_recall"] == {"neg": 0.5, "pos": 0.5}
    # positive/negative pairs: (0.4 > 0.1) (0.4 < 0.6) (0.8 > 0.1) (0.8 > 0.6) -> 3 of 4
    assert m["auc"] == pytest.approx(0.75)
    assert m["auc_excluded_classes"] == []


def test_binary_auc_counts_tied_pair_as_half() -> None:
    # positives 0.6, 0.8 vs negatives 0.1, 0.6: 1 + 0.5 + 1 + 1 = 3.5 of 4 pairs
    p1 = np.array([0.1, 0.6, 0.6, 0.8])
    m = classification_metrics([0, 0, 1, 1], np.stack([1 - p1, p1], axis=1))
    assert m["auc"] == pytest.approx(0.875)
    assert m["class_names"] == ["0", "1"]


def test_three_classes_by_hand() -> None:
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # true 0 -> 0
            [0.3, 0.5, 0.2],  # true 0 -> 1
            [0.2, 0.6, 0.2],  # true 1 -> 1
            [0.1, 0.3, 0.6],  # true 1 -> 2
            [0.1, 0.1, 0.8],  # true 2 -> 2
            [0.2, 0.2, 0.6],  # true 2 -> 2
        ]
    )
    y = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_recall"] == {"a": 0.5, "b": 0.5, "c": 1.0}
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    # F1: a = 2*(1*.5)/1.5 = 2/3, b = 1/2, c = 2*(2/3*1)/(5/3) = 4/5
    assert m["macro_f1"] == pytest.approx(59 / 90)
    # OvR pair counts: a 8/8; b: 0.6 beats 4, 0.3 beats 3 -> 7/8; c: 0.8 beats 4, 0.6 beats 3 + tie -> 7.5/8
    assert m["per_class_auc"] == pytest.approx({"a": 1.0, "b": 7 / 8, "c": 15 / 16})
    assert m["auc"] == pytest.approx(45 / 48)
    # with every class present this is exactly sklearn's OvR macro AUC
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_absent_class_excluded_from_auc_and_reported() -> None:
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.4, 0.3], [0.1, 0.8, 0.1]])
    m = classification_metrics([0, 0, 1, 1], probs, ["x", "y", "z"])
    assert m["auc_excluded_classes"] == ["z"]
    assert m["per_class_auc"]["z"] is None
    assert m["per_class_recall"]["z"] is None
    # x: 0.6 beats 0.3, 0.1; 0.2 beats 0.1 -> 3/4; y: 0.4 beats 0.3; 0.8 beats both -> 3/4
    assert m["auc"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    # z neither present nor predicted: not scored; x = 2/3, y = 4/5
    assert m["macro_f1"] == pytest.approx(11 / 15)
    assert m["balanced_accuracy"] == pytest.approx(0.75)


def test_predicted_but_absent_class_costs_f1() -> None:
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])
    m = classification_metrics([0, 0, 1, 1], probs)
    # class 0: P 1, R 1/2 -> 2/3; class 1: P 1, R 1 -> 1; class 2 (spurious): 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_single_present_class_gives_no_auc() -> None:
    m = classification_metrics([1, 1, 1], np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]]))
    assert m["auc"] is None
    assert m["auc_excluded_classes"] == ["0"]
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_logits_are_softmaxed_before_auc() -> None:
    # raw column 0 ranks row B (3) above row A (2); softmax ranks A (0.787) above B (0.488)
    logits = np.array([[2.0, 0.0, 0.0], [3.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    m = classification_metrics([0, 1, 2], logits)
    assert m["per_class_auc"]["0"] == 1.0
    raw = classification_metrics([0, 1, 2], logits, scores_are="probabilities")
    assert raw["per_class_auc"]["0"] == 0.5
    assert as_probabilities(logits).sum(axis=1) == pytest.approx(np.ones(3))


def test_accepts_torch_and_rejects_bad_labels() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.bfloat16)
    assert classification_metrics(torch.tensor([0, 1]), probs)["accuracy"] == 1.0
    with pytest.raises(ValueError, match="missing labels"):
        classification_metrics([0, -1], np.array([[0.9, 0.1], [0.2, 0.8]]))
    with pytest.raises(ValueError, match="class names"):
        classification_metrics([0, 1], np.array([[0.9, 0.1], [0.2, 0.8]]), ["only one"])


def test_probability_rows_keep_significant_digits_and_check_shapes() -> None:
    probs = np.array([[1 - 3e-9, 3e-9], [0.1234567891, 0.8765432109]])
    rows = probability_rows(["a", "b"], np.array([0, 1]), probs, ["neg", "pos"])
    assert rows[0] == {"case_id": "a", "label": 0, "probs": {"neg": 1.0, "pos": 3e-9}}  # tiny p survives
    assert rows[1]["probs"] == {"neg": 0.123457, "pos": 0.876543}
    with pytest.raises(ValueError, match="do not match"):
        probability_rows(["a"], [0, 1], probs, ["neg", "pos"])
    with pytest.raises(ValueError, match="do not match"):
        probability_rows(["a", "b"], [0, 1], probs, ["neg", "pos", "other"])


def test_without_rows_drops_per_case_lists_at_any_depth() -> None:
    metrics = {"auc": 0.5, "per_case": [1], "zeroshot": {"n": 2, "per_case": [2]}, "r": {"examples": [3]}}
    assert without_rows(metrics) == {"auc": 0.5, "zeroshot": {"n": 2}, "r": {}}
    assert metrics["zeroshot"]["per_case"] == [2]  # the input is not modified


# ----------------------------------------------------------------------------- retrieval


def test_three_by_three_known_ranks() -> None:
    sim = np.array(
        [
            [0.9, 0.1, 0.3],  # positive c0 first -> rank 1
            [0.8, 0.5, 0.2],  # 0.8 above c1 -> rank 2
            [0.7, 0.6, 0.1],  # two above c2 -> rank 3
        ]
    )
    assert retrieval_ranks(sim).tolist() == [1.0, 2.0, 3.0]
    m = retrieval_metrics(sim, ks=(1, 2, 5))
    assert m["R@1"] == pytest.approx(1 / 3)
    assert m["R@2"] == pytest.approx(2 / 3)
    assert m["R@5"] == 1.0
    assert m["median_rank"] == 2.0
    assert m["mean_rank"] == 2.0
    assert (m["n_queries"], m["n_candidates"]) == (3, 3)
    assert set(retrieval_metrics(sim)) == {
        "R@1",
        "R@5",
        "R@10",
        "median_rank",
        "mean_rank",
        "n_queries",
        "n_candidates",
    }


def test_constant_similarity_is_chance_not_perfect() -> None:
    m = retrieval_metrics(np.zeros((10, 10)), ks=(1, 5, 10))
    assert m["R@1"] == pytest.approx(0.1)
    assert m["R@5"] == pytest.approx(0.5)
    assert m["R@10"] == 1.0
    assert m["mean_rank"] == pytest.approx(5.5)  # 1 + 9/2
    assert m["median_rank"] == pytest.approx(5.5)


def test_tie_with_a_better_candidate_above() -> None:
    # positive c1 at 0.5: one candidate above, two negatives tied -> rank 1 + 1 + 2/2 = 3
    sim = np.array([[0.9, 0.5, 0.5, 0.5]])
    pos = np.array([[False, True, False, False]])
    assert retrieval_ranks(sim, pos).tolist() == [3.0]
    m = retrieval_metrics(sim, pos, ks=(1, 2, 3, 4))
    assert [m[f"R@{k}"] for k in (1, 2, 3, 4)] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])


def test_several_positives_best_ranked_counts() -> None:
    # positives c2 (0.7) and c4 (0.1); 0.9 above, c3 ties c2 -> rank 1 + 1 + 1/(1+1) = 2.5
    sim = np.array([[0.2, 0.9, 0.7, 0.7, 0.1]])
    pos = np.array([[False, False, True, False, True]])
    m = retrieval_metrics(sim, pos, ks=(1, 2, 3))
    assert m["mean_rank"] == pytest.approx(2.5)
    assert [m["R@1"], m["R@2"], m["R@3"]] == pytest.approx([0.0, 0.5, 1.0])


def test_tied_positives_expected_first_position() -> None:
    # P P N N all tied: first positive at 1 (1/2), 2 (1/3), 3 (1/6) -> mean 5/3
    sim = np.full((1, 4), 0.5)
    pos = np.array([[True, True, False, False]])
    m = retrieval_metrics(sim, pos, ks=(1, 2, 3))
    assert m["mean_rank"] == pytest.approx(5 / 3)
    assert [m["R@1"], m["R@2"], m["R@3"]] == pytest.approx([1 / 2, 5 / 6, 1.0])


def _brute_force(sim_row: np.ndarray, pos_row: np.ndarray, ks: tuple[int, ...]) -> tuple[float, list[float]]:
    """Average over every tie-breaking order (a permutation used as secondary key)."""
    ranks, hits = [], []
    for perm in itertools.permutations(range(len(sim_row))):
        order = sorted(range(len(sim_row)), key=lambda c: (-sim_row[c], perm[c]))
        first = 1 + min(order.index(c) for c in np.flatnonzero(pos_row))
        ranks.append(first)
        hits.append([first <= k for k in ks])
    return float(np.mean(ranks)), np.mean(hits, axis=0).tolist()


def test_ties_match_brute_force_random_tie_breaking() -> None:
    rng = np.random.default_rng(0)
    ks = (1, 2, 3, 5)
    for _ in range(25):
        nc = int(rng.integers(2, 7))
        sim = rng.integers(0, 3, size=(1, nc)).astype(float)
        pos = rng.random((1, nc)) < 0.4
        pos[0, rng.integers(nc)] = True
        rank, hit = _brute_force(sim[0], pos[0], ks)
        m = retrieval_metrics(sim, pos, ks=ks)
        assert m["mean_rank"] == pytest.approx(rank)
        assert [m[f"R@{k}"] for k in ks] == pytest.approx(hit)


def test_retrieval_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="no positive"):
        retrieval_metrics(np.eye(2), np.array([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="diagonal"):
        retrieval_metrics(np.zeros((3, 2)))


def test_bidirectional_on_cosine_with_asymmetric_ties() -> None:
    img = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    txt = 7.0 * np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # scale must not matter
    out = bidirectional_retrieval(torch.tensor(img), torch.tensor(txt))
    i2t, t2i = out["image_to_text"], out["text_to_image"]
    # image->text: img0 ties txt0/txt1 (1.5), img1 ties at 0.8 (1.5), img2 first (1)
    assert i2t["mean_rank"] == pytest.approx(4 / 3)
    assert i2t["median_rank"] == 1.5
    assert i2t["R@1"] == pytest.approx(2 / 3)
    # text->image: txt0 -> img0 (1), txt1 -> img1 behind img0 (2), txt2 -> img2 (1)
    assert t2i["mean_rank"] == pytest.approx(4 / 3)
    assert t2i["median_rank"] == 1.0
    assert t2i["R@1"] == pytest.approx(2 / 3)
    # identical reports: texts 0 and 1 are both correct for images 0 and 1
    groups = ["r", "r", "s"]
    both = bidirectional_retrieval(img, txt, positives=same_group_positives(groups, groups))
    assert both["image_to_text"]["R@1"] == 1.0
    assert both["text_to_image"]["R@1"] == 1.0
