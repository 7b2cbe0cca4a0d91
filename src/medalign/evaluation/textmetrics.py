"""Text-generation metrics: corpus BLEU-1..4 and ROUGE-L, as report-generation papers compute them.

Both follow pycocoevalcap (``Bleu(4)`` and ``Rouge()``), the scorer R2Gen, the MedPix papers and
most captioning work use, so numbers are comparable in definition:

* **Tokenisation** (ours, stated because every paper's differs slightly): lowercase, then words
  are runs of letters/digits/underscore and every other non-space character is a token of its
  own (``"3.5 cm."`` -> ``3 . 5 cm .``). pycocoevalcap splits on spaces after its own PTB
  tokeniser; R2Gen feeds it reports already lowercased with punctuation split off, as here.
* **BLEU** (Papineni et al. 2002): *corpus*-level. Clipped n-gram matches and hypothesis n-gram
  counts are summed over the corpus before dividing; the brevity penalty uses the total
  hypothesis length ``c`` and the summed lengths ``r`` of the reference closest in length to
  each hypothesis (a tie takes the shorter), ``BP = 1 if c > r else exp(1 - r / c)``.
  ``bleu_n`` is ``BP * (p_1 ... p_n) ** (1 / n)``. **No smoothing**: a corpus with no matching
  n-gram of some order scores 0 for that and higher orders (pycocoevalcap adds 1e-15, which
  leaves a near-zero positive number; the difference only shows below 1e-3).
* **ROUGE-L** (Lin 2004): per hypothesis, the longest common subsequence with each reference
  gives precision ``LCS / len(hyp)`` and recall ``LCS / len(ref)``; the maxima over references
  combine as ``F = (1 + b^2) P R / (R + b^2 P)`` with ``b = 1.2``; the corpus score is the mean
  over hypotheses (``Rouge.compute_score``).

References may be one string per hypothesis or a list of strings (several references).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

TOKEN_RE = re.compile(r"\w+|[^\w\s]")
ROUGE_BETA = 1.2


def tokenize(text: str) -> list[str]:
    """Lowercased words and punctuation marks, each a token (see the module docstring)."""
    return TOKEN_RE.findall(text.lower())


def _reference_lists(references: Sequence[str | Sequence[str]], hypotheses: Sequence[str]) -> list[list[str]]:
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise TypeError("references and hypotheses must be sequences of texts, not a single string")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references for {len(hypotheses)} hypotheses; they must pair up")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    lists = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    empty = [i for i, refs in enumerate(lists) if not refs]
    if empty:
        raise ValueError(f"hypotheses {empty[:10]} have no reference")
    return lists


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(
    references: Sequence[str | Sequence[str]], hypotheses: Sequence[str], max_n: int = 4
) -> dict[str, float]:
    """Corpus BLEU-1..``max_n`` as ``{"bleu_1": .., ..}`` (see the module docstring for the protocol)."""
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    ref_lists = _reference_lists(references, hypotheses)
    matches, totals = [0] * max_n, [0] * max_n
    hyp_length = ref_length = 0
    for refs, hyp in zip(ref_lists, hypotheses, strict=True):
        hyp_tokens, ref_tokens = tokenize(hyp), [tokenize(r) for r in refs]
        hyp_length += len(hyp_tokens)
        ref_length += min((abs(len(r) - len(hyp_tokens)), len(r)) for r in ref_tokens)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(hyp_tokens, n)
            max_ref: Counter[tuple[str, ...]] = Counter()
            for r in ref_tokens:
                max_ref |= _ngrams(r, n)  # | keeps the maximum count of each n-gram
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            totals[n - 1] += sum(counts.values())
    if hyp_length == 0:
        return {f"bleu_{n}": 0.0 for n in range(1, max_n + 1)}
    penalty = 1.0 if hyp_length > ref_length else math.exp(1.0 - ref_length / hyp_length)
    scores: dict[str, float] = {}
    log_sum = 0.0
    for n in range(1, max_n + 1):
        if matches[n - 1] == 0 or log_sum == -math.inf:
            log_sum = -math.inf
            scores[f"bleu_{n}"] = 0.0
            continue
        log_sum += math.log(matches[n - 1] / totals[n - 1])
        scores[f"bleu_{n}"] = penalty * math.exp(log_sum / n)
    return scores


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_sentence(references: Sequence[str], hypothesis: str, beta: float = ROUGE_BETA) -> float:
    """ROUGE-L F of one hypothesis against its references (max precision and recall over them)."""
    hyp = tokenize(hypothesis)
    precision = recall = 0.0
    for reference in references:
        ref = tokenize(reference)
        lcs = lcs_length(ref, hyp)
        if hyp:
            precision = max(precision, lcs / len(hyp))
        if ref:
            recall = max(recall, lcs / len(ref))
    if precision == 0.0 or recall == 0.0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def rouge_l(references: Sequence[str | Sequence[str]], hypotheses: Sequence[str]) -> float:
    """Mean sentence-level ROUGE-L F (beta = 1.2) over the corpus."""
    ref_lists = _reference_lists(references, hypotheses)
    scores = [rouge_l_sentence(refs, hyp) for refs, hyp in zip(ref_lists, hypotheses, strict=True)]
    return sum(scores) / len(scores)


def text_metrics(references: Sequence[str | Sequence[str]], hypotheses: Sequence[str]) -> dict[str, float]:
    """BLEU-1..4 and ROUGE-L in one dict (the columns of every report-generation table)."""
    return {**bleu(references, hypotheses), "rouge_l": rouge_l(references, hypotheses)}
