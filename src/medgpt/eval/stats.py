"""Is a difference real? Paired bootstrap intervals over items and McNemar's exact test.

Two results on the same items (the same questions, the same references) are paired by item id. The
bootstrap draws the items with replacement (the same draw for both), recomputes each metric as it is
defined (a mean for accuracy and ROUGE, corpus BLEU from the summed n-gram counts, perplexity from the
summed log-likelihood and token counts), and takes the 2.5 and 97.5 percentiles of after - before.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from medgpt.errors import UserError

RESAMPLES = 2000
SEED = 0


def resamples(n: int, count: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(count, n) item indices drawn with replacement; the same seed gives the same draws."""
    return np.random.default_rng(seed).integers(0, n, size=(count, n))


def paired_interval(statistic: Callable[[np.ndarray, np.ndarray], np.ndarray], before: np.ndarray,
                    after: np.ndarray, count: int = RESAMPLES, seed: int = SEED) -> list[float]:
    """95% percentile interval of statistic(after) - statistic(before) over paired bootstrap draws.

    `before` and `after` are (n, k) per-item arrays in the same item order; statistic(data, idx) turns the
    (count, n) draws into (count,) metric values."""
    if len(before) != len(after) or not len(before):
        raise ValueError(f"paired items: {len(before)} before, {len(after)} after")
    idx = resamples(len(before), count, seed)
    diffs = statistic(after, idx) - statistic(before, idx)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return [float(lo), float(hi)]


def mean_of(scale: float = 1.0) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The mean of column 0 (times `scale`): accuracy from 0/1, ROUGE from per-item scores."""
    return lambda data, idx: scale * data[idx, 0].mean(axis=1)


def perplexity(data: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """exp(summed NLL / summed tokens): columns (nll_sum, tokens)."""
    return np.exp(data[idx, 0].sum(axis=1) / data[idx, 1].sum(axis=1))


def token_nll(data: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Summed NLL / summed tokens (nats per token): columns (nll_sum, tokens)."""
    return data[idx, 0].sum(axis=1) / data[idx, 1].sum(axis=1)


def corpus_bleu(data: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """sacrebleu's corpus BLEU-4 from summed sentence statistics: columns sys_len, ref_len, 4 correct, 4 total."""
    from sacrebleu.metrics import BLEU

    sums = data[idx].sum(axis=1)  # (count, 10)
    return np.array([BLEU.compute_bleu(list(s[2:6]), list(s[6:10]), int(s[0]), int(s[1])).score for s in sums])


def bleu_stats(hypothesis: str, reference: str) -> list[int]:
    """One pair's BLEU-4 sufficient statistics (pre-tokenized, space-joined text), for `corpus_bleu`."""
    from sacrebleu.metrics import BLEU

    score = BLEU(tokenize="none").corpus_score([hypothesis], [[reference]])
    return [score.sys_len, score.ref_len, *score.counts, *score.totals]


def mcnemar_exact(before: list[bool], after: list[bool]) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs against Binomial(b + c, 1/2)."""
    b = sum(x and not y for x, y in zip(before, after))
    c = sum(y and not x for x, y in zip(before, after))
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def standard_error(correct: int, total: int) -> float:
    """Binomial standard error of an accuracy, in points: sqrt(p(1-p)/n) * 100."""
    if total <= 0:
        raise UserError("no items")
    p = correct / total
    return 100 * math.sqrt(p * (1 - p) / total)


def item_columns(metric: str, items: list[dict]) -> tuple[np.ndarray, Callable] | None:
    """Per-item columns of a metric and the statistic that computes the metric from them; None for a metric
    that has no per-item form (a subject's accuracy, a subject average)."""
    if metric == "accuracy" and all("correct" in i for i in items):
        return np.array([[float(i["correct"])] for i in items]), mean_of(100.0)
    if metric in ("rouge-l", "rouge-1", "rouge-2") and all(metric in i for i in items):
        return np.array([[float(i[metric])] for i in items]), mean_of()
    if metric in ("bleu", "bleu-4") and all("bleu_stats" in i for i in items):
        return np.array([i["bleu_stats"] for i in items], dtype=float), corpus_bleu
    if metric in ("ppl", "nll") and all("nll_sum" in i for i in items):
        return (np.array([[i["nll_sum"], i["tokens"]] for i in items], dtype=float),
                perplexity if metric == "ppl" else token_nll)
    return None


def interval(metric: str, items: list[dict]) -> list[float] | None:
    """The 95% bootstrap interval of one result's metric (its items drawn with replacement)."""
    columns = item_columns(metric, items) if items else None
    if columns is None:
        return None
    data, statistic = columns
    return [float(v) for v in np.percentile(statistic(data, resamples(len(data))), [2.5, 97.5])]


def item_key(item: dict) -> str:
    """What pairs an item across two results: subject and id for questions, else id, else location."""
    if "subject" in item and "id" in item:
        return f"{item['subject']}/{item['id']}"
    return str(item["id"] if "id" in item else item.get("loc"))


def paired(metric: str, before: list[dict], after: list[dict]) -> dict[str, Any] | None:
    """ci95 of after - before over the items both results hold (paired by `item_key`), whether it excludes 0,
    and McNemar's exact p for accuracy; None when the metric has no per-item form or no item is shared."""
    a_items = {item_key(i): i for i in after}
    pairs = [(b, a_items[item_key(b)]) for b in before if item_key(b) in a_items]
    if not pairs:
        return None
    b_cols, a_cols = item_columns(metric, [b for b, _ in pairs]), item_columns(metric, [a for _, a in pairs])
    if b_cols is None or a_cols is None:
        return None
    lo, hi = paired_interval(b_cols[1], b_cols[0], a_cols[0])
    out: dict[str, Any] = {"ci95": [lo, hi], "significant": bool(lo > 0 or hi < 0), "n": len(pairs)}
    if metric == "accuracy":
        out["p_mcnemar"] = mcnemar_exact([bool(b["correct"]) for b, _ in pairs], [bool(a["correct"]) for _, a in pairs])
    return out
