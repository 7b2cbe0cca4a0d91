"""BLEU and ROUGE-L against hand-computed values and the values NLTK documents for Papineni's example."""

from __future__ import annotations

import json
import math

import pytest

from medalign.evaluation.textmetrics import bleu, lcs_length, rouge_l, text_metrics, tokenize

# Papineni et al. (2002), Example 1, as tokenised in NLTK's documentation (no final period).
H1 = "It is a guide to action which ensures that the military always obeys the commands of the party"
R1A = "It is a guide to action that ensures that the military will forever heed Party commands"
R1B = "It is the guiding principle which guarantees the military forces always being under the command of the Party"
R1C = "It is the practical guide for the army always to heed the directions of the party"
H2 = "he read the book because he was interested in world history"
R2A = "he was interested in world history because he read the book"


def test_tokenize_lowercases_and_splits_punctuation() -> None:
    tokens = ["a", "3", ".", "5", "cm", "cyst", ",", "left", "-", "side", "."]
    assert tokenize("A 3.5 cm Cyst, left-side.") == tokens


def test_bleu_papineni_example_matches_nltk_documented_value() -> None:
    # Clipped n-gram precisions by hand: 17/18, 10/17, 7/16, 4/15; hypothesis length 18 equals the
    # closest reference length (R1B has 18 tokens), so the brevity penalty is 1.
    scores = bleu([[R1A, R1B, R1C]], [H1])
    p = [17 / 18, 10 / 17, 7 / 16, 4 / 15]
    for n in range(1, 5):
        assert scores[f"bleu_{n}"] == pytest.approx(math.prod(p[:n]) ** (1 / n), rel=1e-12)
    assert scores["bleu_4"] == pytest.approx(0.5045666840058485, rel=1e-12)  # nltk sentence_bleu docs


def test_corpus_bleu_sums_counts_before_dividing_nltk_documented_value() -> None:
    # H2 adds 11/11 unigrams, 9/10 bigrams ("book because" is missing), 6/9 trigrams, 4/8 4-grams.
    scores = bleu([[R1A, R1B, R1C], [R2A]], [H1, H2])
    p = [28 / 29, 19 / 27, 13 / 25, 8 / 23]
    assert scores["bleu_4"] == pytest.approx(math.prod(p) ** 0.25, rel=1e-12)
    assert scores["bleu_4"] == pytest.approx(0.5920778868801042, rel=1e-12)  # nltk corpus_bleu docs
    assert scores["bleu_1"] == pytest.approx(28 / 29)


def test_bleu_brevity_penalty_and_clipping() -> None:
    # "the the the" vs "the cat is on the mat": clipped unigram matches 2 of 3; c = 3 < r = 6.
    scores = bleu(["the cat is on the mat"], ["the the the"], max_n=1)
    assert scores["bleu_1"] == pytest.approx(math.exp(1 - 6 / 3) * 2 / 3)
    # closest reference length: 3 tokens hypothesis, references of 2 and 4 tokens tie -> shorter (2)
    assert bleu([["a b", "a b c d"]], ["a b c"], max_n=1)["bleu_1"] == pytest.approx(1.0)


def test_bleu_without_higher_order_matches_is_zero_not_smoothed() -> None:
    scores = bleu(["a b c d"], ["d c b a"])
    assert scores["bleu_1"] == pytest.approx(1.0)
    assert scores["bleu_2"] == scores["bleu_3"] == scores["bleu_4"] == 0.0
    assert bleu(["a b"], [""])["bleu_1"] == 0.0


def test_rouge_l_lin_examples_and_beta() -> None:
    # Lin (2004): LCS("police killed the gunman", "police kill the gunman") = 3 of 4 words each way.
    assert rouge_l(["police killed the gunman"], ["police kill the gunman"]) == pytest.approx(0.75)
    assert rouge_l(["police killed the gunman"], ["the gunman kill police"]) == pytest.approx(0.5)
    # P = 3/3, R = 3/6: F = (1 + 1.44) * 1 * 0.5 / (0.5 + 1.44 * 1) = 1.22 / 1.94
    assert rouge_l(["a b c d e f"], ["a c e"]) == pytest.approx(1.22 / 1.94)
    # mean over the corpus; several references take the max precision and recall
    assert rouge_l(["a b", "x y"], ["a b", "z"]) == pytest.approx(0.5)
    assert rouge_l([["x y", "a b c"]], ["a b"]) == pytest.approx(2.44 * 1 * (2 / 3) / (2 / 3 + 1.44))
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # CLRS


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="pair up"):
        bleu(["a"], ["a", "b"])
    with pytest.raises(TypeError, match="single string"):
        rouge_l("a", "a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no reference"):
        text_metrics([[]], ["a"])


def test_real_reports_identity_and_shuffle(real_dataset) -> None:
    """IU X-ray reports: a corpus scored against itself is perfect; a shifted pairing is not."""
    data = json.loads((real_dataset("iu_xray_reports") / "annotation.json").read_text(encoding="utf-8"))
    reports = [case["report"] for case in data["test"][:200] if case["report"].strip()]
    assert text_metrics(reports, reports) == pytest.approx(
        {**{f"bleu_{n}": 1.0 for n in range(1, 5)}, "rouge_l": 1.0}
    )
    shifted = text_metrics(reports, reports[1:] + reports[:1])
    assert 0.0 < shifted["bleu_4"] < shifted["bleu_1"] < 1.0
    assert 0.0 < shifted["rouge_l"] < 1.0
