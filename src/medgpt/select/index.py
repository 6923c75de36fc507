"""The corpus index `medgpt select` recalls from: FAISS exact inner product, IVF or HNSW.

Exact search scores every eval item against every corpus vector (one BLAS product per chunk). IVF
clusters the corpus (k-means on a sample, about sqrt(N) lists) and scans 1/32 of the lists per query;
HNSW walks a neighbour graph. Exact search costs about N x Q; IVF's build about N x sqrt(N) (each vector
assigned to a list) and its search about N x Q / 32, so IVF pays only when the eval set is large next to
sqrt(N). bench/select_scale.py measures both against exact search (time, recall@k): at 1M 512-d vectors,
1,000 queries took 14 s exact and 19 s with IVF, 5,000 queries the other way round. `auto` picks IVF from
`ANN_MIN_CORPUS` vectors when there are at least `IVF_QUERIES_PER_SQRT` x sqrt(N) eval items, exact
search otherwise. Only the standard library is imported at module level (`medgpt select --help`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from medgpt.errors import UserError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

KINDS = ("auto", "exact", "ivf", "hnsw")
# Measured crossover (bench/results/select_scale.json, "index"): about 650 queries at 100k vectors, 2,000 at 1M.
# Below 1M vectors exact search takes seconds, not worth IVF's lost recall (0.96-0.99 at k=50).
ANN_MIN_CORPUS = 1_000_000
IVF_QUERIES_PER_SQRT = 2
IVF_MIN_PROBE, IVF_PROBE_SHARE = 8, 32  # lists scanned per query: 1/32 of them, at least 8
IVF_TRAIN_PER_LIST = 40  # training vectors per list (FAISS warns below 39)
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128


def choose(kind: str, corpus_size: int, queries: int = 0, min_corpus: int = ANN_MIN_CORPUS) -> str:
    """The index kind to build: `auto` is IVF from `min_corpus` vectors when `queries` (eval items) reach
    IVF_QUERIES_PER_SQRT x sqrt(corpus_size), exact search otherwise."""
    if kind not in KINDS:
        raise UserError(f"--index {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "auto":
        pays = corpus_size >= min_corpus and queries >= IVF_QUERIES_PER_SQRT * math.sqrt(corpus_size)
        return "ivf" if pays else "exact"
    return kind


def ivf_lists(corpus_size: int) -> int:
    return max(1, min(round(math.sqrt(corpus_size)), corpus_size // IVF_TRAIN_PER_LIST or 1))


def build(kind: str, dim: int, corpus_size: int):
    """An empty inner-product index of `kind` (exact, ivf or hnsw) sized for `corpus_size` vectors."""
    import faiss

    if kind == "exact":
        return faiss.IndexFlatIP(dim)
    if kind == "ivf":
        lists = ivf_lists(corpus_size)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(lists, max(IVF_MIN_PROBE, lists // IVF_PROBE_SHARE))
        return index
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH
        return index
    raise UserError(f"index kind {kind!r}: expected exact, ivf or hnsw")


def add_chunks(index, chunks: Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    """Add vectors chunk by chunk, yielding each chunk once added (callers scan it on the way); an untrained IVF
    index is trained first on the leading chunks (IVF_TRAIN_PER_LIST vectors per list)."""
    import numpy as np

    pending: list[np.ndarray] = []
    for chunk in chunks:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        if index.is_trained:
            index.add(chunk)
            yield chunk
            continue
        pending.append(chunk)
        if sum(len(c) for c in pending) >= IVF_TRAIN_PER_LIST * index.nlist:
            yield from _train_and_add(index, pending)
            pending = []
    if pending:
        yield from _train_and_add(index, pending)


def _train_and_add(index, pending: list[np.ndarray]) -> Iterable[np.ndarray]:
    import numpy as np

    sample = np.concatenate(pending)
    if len(sample) < index.nlist:
        raise UserError(f"IVF index: {len(sample)} vectors cannot train {index.nlist} lists; use --index exact")
    index.train(sample)
    log.info("IVF index: %d lists trained on %d vectors, nprobe %d", index.nlist, len(sample), index.nprobe)
    for chunk in pending:
        index.add(chunk)
        yield chunk
