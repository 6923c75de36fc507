"""medgpt select at scale: resume after an interruption without re-embedding, embedding processes, the
manifest, and the approximate corpus index against exact search."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medgpt.cli import main
from medgpt.errors import UserError
from medgpt.select import embed, index, recall
from medgpt.select.sources import read_corpus, record_text


@pytest.fixture(scope="module")
def texts(sample_data):
    records, _ = read_corpus(str(sample_data / "sft" / "medical_sft.jsonl"))
    return [record_text(r, "conversation") for r in records]


def _tfidf(texts):
    return embed.get_embedder("tfidf", dim=128).fit(texts)


def test_interrupted_fill_resumes_without_reembedding(texts, tmp_path, monkeypatch):
    embedder = _tfidf(texts)
    cache = recall.EmbeddingCache(tmp_path, embedder, chunk_size=20)
    calls = []
    original = embedder.encode

    def interrupted_after_three(batch, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C or a kill leaves: three chunks on disk, the fourth never written
        calls.append(len(batch))
        return original(batch, **kwargs)

    monkeypatch.setattr(embedder, "encode", interrupted_after_three)
    with pytest.raises(KeyboardInterrupt):
        cache.fill(texts)
    finished = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.npy")}
    assert len(finished) == 3 and not list(tmp_path.glob("*.manifest.json"))
    calls.clear()
    monkeypatch.setattr(embedder, "encode", lambda batch, **kw: calls.append(len(batch)) or original(batch, **kw))
    chunks = -(-len(texts) // 20)
    assert cache.fill(texts) == chunks - 3 == len(calls)  # only the missing chunks are embedded
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # the finished ones are untouched
    manifest = json.loads(next(tmp_path.glob("*.manifest.json")).read_text())
    assert manifest["texts"] == len(texts) and len(manifest["chunks"]) == chunks
    assert manifest["embedding_space"] == embedder.fingerprint() and manifest["embedder"] == {"name": "tfidf"}
    # reference: the same texts embedded in one call, without the cache
    stored = np.concatenate([np.load(tmp_path / name) for name in manifest["chunks"]])
    assert np.allclose(stored, original(texts), atol=1e-6)


def test_embedding_processes_write_the_same_vectors(texts, tmp_path):
    embedder = _tfidf(texts)
    cache = recall.EmbeddingCache(tmp_path, embedder, chunk_size=40, workers=2,
                                  spec={"name": "tfidf", "dim": 128})
    assert cache.fill(texts) == -(-len(texts) // 40)
    assert np.allclose(cache.load(texts), embedder.encode(texts), atol=1e-6)


def test_select_command_resumes_and_reports(sample_data, tmp_path):
    corpus = str(sample_data / "sft" / "medical_sft.jsonl")
    args = ["select", "--eval", str(sample_data / "mcq"), "--corpus", corpus, "--out", str(tmp_path / "out"),
            "--embedder", "tfidf", "--cache-dir", str(tmp_path / "cache"), "--chunk-size", "30", "--index", "hnsw"]
    assert main([*args, "--shard", "0/2"]) == 0  # half the chunks, as a run stopped halfway would leave
    assert main(args) == 0
    stats = json.loads((tmp_path / "out" / "select_stats.json").read_text())
    chunks = stats["embedding"]["corpus_chunks"]
    assert stats["embedding"]["corpus_chunks_embedded"] == chunks // 2 and stats["embedding"]["index"] == "hnsw"
    assert set(stats["timings"]) == {"embed_corpus_s", "embed_eval_s", "search_s", "select_and_write_s"}
    assert main([*args, "--workers", "0"]) == 2


def test_approximate_index_against_exact():
    """Reference: FAISS exact inner-product search over the same vectors."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, 32))
    corpus = embed.normalize_rows(centers[rng.integers(0, 50, 6000)] + 0.3 * rng.normal(size=(6000, 32)))
    queries = embed.normalize_rows(centers[rng.integers(0, 50, 100)] + 0.3 * rng.normal(size=(100, 32)))
    found = {}
    for kind in ("exact", "ivf", "hnsw"):
        built = index.build(kind, 32, len(corpus))
        added = list(index.add_chunks(built, np.array_split(corpus, 6)))
        assert sum(len(c) for c in added) == built.ntotal == len(corpus)
        found[kind] = built.search(queries, 10)[1]
    brute = np.argsort(-(queries @ corpus.T), axis=1)[:, :10]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found["exact"], brute)]) > 0.99
    for kind in ("ivf", "hnsw"):
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found[kind], found["exact"])]) > 0.9
    # auto: IVF from min_corpus vectors with at least 2 x sqrt(corpus) queries
    assert index.choose("auto", 99, queries=1000, min_corpus=100) == "exact"
    assert index.choose("auto", 100, queries=20, min_corpus=100) == "ivf"
    assert index.choose("auto", 100, queries=19, min_corpus=100) == "exact"
    with pytest.raises(UserError, match="--index 'flat'"):
        index.choose("flat", 10)
