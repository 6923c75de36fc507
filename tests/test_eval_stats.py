"""medgpt.eval.stats: McNemar's exact test and the paired bootstrap interval against scipy (its exact binomial
test on the discordant pairs and its paired percentile bootstrap), and the standard error of an accuracy."""

from __future__ import annotations

import math

import pytest


def test_mcnemar_and_paired_bootstrap_against_scipy():
    """References: scipy's exact binomial test (McNemar's exact test is one on the discordant pairs) and
    scipy's paired percentile bootstrap."""
    import numpy as np
    from scipy.stats import binomtest, bootstrap

    from medgpt.eval import stats

    rng = np.random.default_rng(1)
    before = rng.random(40) < 0.3
    after = before.copy()
    after[:9] = True
    after[30:32] = False
    b, c = int((before & ~after).sum()), int((~before & after).sum())
    assert stats.mcnemar_exact(list(before), list(after)) == pytest.approx(binomtest(b, b + c, 0.5).pvalue)
    lo, hi = stats.paired_interval(stats.mean_of(100.0), before[:, None].astype(float), after[:, None].astype(float))
    ref = bootstrap((before.astype(float), after.astype(float)), lambda x, y: 100 * (y.mean() - x.mean()),
                    paired=True, vectorized=False, method="percentile", n_resamples=2000, random_state=0)
    assert lo == pytest.approx(ref.confidence_interval.low, abs=3)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=3)
    assert lo > 0  # 9 gained against 2 lost on 40 items
    assert stats.standard_error(10, 40) == pytest.approx(100 * math.sqrt(0.25 * 0.75 / 40))
