"""medgpt select at scale: resume after an interruption without re-embedding, embedding processes, the
manifest, and the approximate corpus index against exact search."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from medgpt.cli import main
from medgpt.data.readers import read_records
from medgpt.errors import UserError
from medgpt.select import embed, index, recall, sources
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


class _ListTexts(list):
    def take(self, indices):
        return [self[i] for i in indices]


class _ListCorpus:
    """The corpus as a Python list of records: how select held it before it streamed to Arrow."""

    def __init__(self, records, field):
        self.rows, self.texts = records, _ListTexts(record_text(r, field) for r in records)

    def __len__(self):
        return len(self.rows)

    def record(self, index):
        return self.rows[index]

    def records(self, indices):
        return [self.rows[i] for i in indices]

    def keys(self, indices):
        return [sources.conversation_key(self.rows[i]) for i in indices]


@contextmanager
def _list_corpus(source, folder, field="user", on_error="fail", max_samples=None):
    records, stats = read_records(source, "sft", on_error=on_error, max_samples=max_samples)
    yield _ListCorpus(records, field), stats


def test_select_streams_the_corpus_through_a_memory_mapped_file(sample_data, tmp_path, monkeypatch):
    """select writes the corpus to a memory-mapped Arrow file, fetches records from it by index and removes it.
    Reference: the same selection over the records held as a Python list (read_records)."""
    from datasets.table import MemoryMappedTable

    shipped = (sample_data / "sft" / "medical_sft.jsonl").read_text(encoding="utf-8").splitlines()
    rows = []
    for i in range(3000):  # a third exact copies of a shipped conversation, the rest made distinct
        row = json.loads(shipped[i % len(shipped)])
        if i % 3:
            row["conversations"][0]["value"] += f"（第{i}例）"
        rows.append(json.dumps(row, ensure_ascii=False))
    rows.insert(7, '{"conversations": []}')  # counted as dropped, never selected
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(rows) + "\n", encoding="utf-8")
    monkeypatch.setattr(recall, "TFIDF_FIT_SAMPLE", 1000)  # the IDF from a sample, as on a large corpus

    def run(out, **kwargs):
        args = recall.SelectArgs(eval=str(sample_data / "mcq"), corpus=str(corpus), out=str(out), embedder="tfidf",
                                 cache_dir=str(tmp_path / "cache"), chunk_size=400, top_k=20, min_sim=0.2,
                                 max_sim=0.8, random_ratio=0.3, baseline="random", max_samples=2800, **kwargs)
        return recall.select(args)

    seen = {}
    opened = sources.open_corpus

    @contextmanager
    def watched(*args, **kwargs):
        with opened(*args, **kwargs) as (held, stats):
            seen["files"] = [Path(f["filename"]) for f in held.dataset.cache_files]
            seen["mapped"] = isinstance(held.dataset.data, MemoryMappedTable) and len(held) == 2800
            seen["on_disk"] = all(path.is_file() for path in seen["files"])
            yield held, stats

    monkeypatch.setattr(recall, "open_corpus", watched)
    stats = run(tmp_path / "arrow")
    assert len(seen["files"]) == 1 and seen["files"][0].parent.parent == tmp_path / "arrow"
    assert seen["mapped"] and seen["on_disk"] and not seen["files"][0].exists()
    assert not list((tmp_path / "arrow").glob(".corpus-*"))

    monkeypatch.setattr(recall, "open_corpus", _list_corpus)
    reference = run(tmp_path / "list")
    counts = stats["counts"]
    assert counts["corpus"] == 2800 and stats["corpus_read"]["dropped"]
    assert counts["recalled_kept"] and counts["random_added"] and counts["baseline"] == counts["selected"]
    assert sum(s["duplicate"] for s in stats["subjects"].values())
    for name in (recall.SELECTED, recall.RECALL, recall.BASELINE, recall.CONTAMINATION):
        assert (tmp_path / "arrow" / name).read_bytes() == (tmp_path / "list" / name).read_bytes(), name
    # the list path found every chunk file the Arrow path wrote: the same texts, chunk by chunk
    assert stats["embedding"].pop("corpus_chunks_embedded") == 7 and reference["embedding"].pop(
        "corpus_chunks_embedded") == 0
    for result in (stats, reference):
        del result["timings"], result["files"]
    assert stats == reference

    monkeypatch.setattr(recall, "open_corpus", opened)
    with pytest.raises(UserError, match="corpus.jsonl:8"):  # a bad record stops the read; no scratch is left
        run(tmp_path / "failed", on_error="fail")
    assert not list((tmp_path / "failed").glob(".corpus-*"))
