"""Eval-driven data selection: recall the training items nearest to each eval item.

Steps: embed the eval set and the corpus (in chunks cached on disk, so an interrupted run continues);
find each training item's nearest eval item (the leakage guard: items at or above `max_sim` to any eval
item are never written); recall the top-k training items per eval item with FAISS exact inner product;
keep those within [min_sim, max_sim), each once (credited to the eval item it is nearest to) and each
conversation once; optionally add a share of random items; check the output for n-gram contamination;
write ShareGPT jsonl, a random baseline of the same size, and statistics.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgpt.errors import UserError
from medgpt.files import atomic_writer, write_json
from medgpt.select.contamination import ContaminationArgs, NgramIndex, find_contamination
from medgpt.select.embed import Embedder, get_embedder
from medgpt.select.index import ANN_MIN_CORPUS, add_chunks, build
from medgpt.select.index import choose as choose_index
from medgpt.select.sources import (Corpus, CorpusTexts, EvalItem, conversation_key, load_eval_items, open_corpus,
                                   record_text)

log = logging.getLogger(__name__)

HIST_EDGES = [round(x * 0.1, 1) for x in range(11)]
TFIDF_FIT_SAMPLE = 100_000
SELECTED, BASELINE, STATS, RECALL, CONTAMINATION = (
    "selected.jsonl", "baseline_random.jsonl", "select_stats.json", "recall.jsonl", "contamination.json")
Texts = list[str] | CorpusTexts  # texts read a slice at a time


@dataclass
class SelectArgs:
    eval: str
    corpus: str
    out: str
    split: str = "val"
    subjects: list[str] | None = None
    embedder: str = "use"
    embed_base_url: str | None = None
    batch_size: int = 64
    cache_dir: str | None = None
    chunk_size: int = 8192
    corpus_text: str = "user"
    top_k: int = 50
    min_sim: float = 0.5
    max_sim: float = 0.9
    random_ratio: float = 0.0
    baseline: str | None = None  # "random"
    seed: int = 42
    max_samples: int | None = None
    on_error: str = "skip"
    shard: tuple[int, int] | None = None  # embed only chunk i of every n, then stop
    workers: int = 1  # embedding processes
    device: str | None = None  # sentence-transformers models: None picks CUDA when there is one
    index: str = "auto"  # exact, ivf, hnsw, or auto (see select.index.choose)
    ann_min_corpus: int = ANN_MIN_CORPUS
    keep_contaminated: bool = False
    contamination: ContaminationArgs = field(default_factory=ContaminationArgs)

    def check(self) -> None:
        if not 0 <= self.random_ratio < 1:
            raise UserError(f"--random-ratio {self.random_ratio}: expected a share in [0, 1)")
        if self.min_sim >= self.max_sim:
            raise UserError(f"--min-sim {self.min_sim} must be below --max-sim {self.max_sim}")
        if self.top_k < 1 or self.chunk_size < 1 or self.workers < 1:
            raise UserError("--top-k, --chunk-size and --workers must be at least 1")
        choose_index(self.index, 0)
        if self.baseline not in (None, "random"):
            raise UserError(f"--baseline {self.baseline!r}: only 'random' is supported")


def default_cache_dir() -> Path:
    from medgpt.models import cache_dir

    return cache_dir() / "embeddings"


class EmbeddingCache:
    """Embeddings stored per chunk under a name derived from the embedding space and the chunk's texts.

    Each chunk is written to a temporary file and renamed, so a chunk on disk is complete; a rerun (or
    another shard) finds the finished chunks and embeds only the rest. Changing the texts of one chunk
    re-embeds that chunk only. Once every chunk of a text list is on disk, a manifest names them with the
    embedder, its settings and a fingerprint of the texts. With `workers` > 1, chunks are embedded by that
    many processes, each writing its own chunks.
    """

    def __init__(self, folder: str | Path, embedder: Embedder, chunk_size: int = 8192, batch_size: int = 64,
                 workers: int = 1, spec: dict | None = None):
        self.folder = Path(folder).expanduser()
        self.embedder, self.chunk_size, self.batch_size = embedder, chunk_size, batch_size
        self.workers, self.spec = workers, spec or {"name": embedder.name}
        self.space = "".join(c if c.isalnum() or c in "-_." else "_" for c in embedder.fingerprint())

    def path(self, texts: list[str]) -> Path:
        digest = hashlib.sha1("\x00".join(texts).encode("utf-8", "surrogatepass")).hexdigest()[:24]
        return self.folder / f"{self.space}-{len(texts)}-{digest}.npy"

    def part(self, texts: Texts, i: int) -> list[str]:
        """The texts of chunk `i`."""
        return list(texts[i * self.chunk_size:(i + 1) * self.chunk_size])

    def chunks(self, texts: Texts) -> Iterator[tuple[list[str], Path]]:
        """Each chunk's texts and file, read one chunk at a time."""
        for i in range(-(-len(texts) // self.chunk_size)):
            part = self.part(texts, i)
            yield part, self.path(part)

    def fill(self, texts: Texts, shard: tuple[int, int] | None = None, desc: str = "embed") -> int:
        """Embed the chunks not on disk yet (only shard i of n when given); returns how many were embedded."""
        from tqdm.auto import tqdm

        self.folder.mkdir(parents=True, exist_ok=True)
        paths = [path for _, path in self.chunks(texts)]
        todo = [i for i, path in enumerate(paths)
                if not path.exists() and (shard is None or i % shard[1] == shard[0])]
        if len(todo) < len(paths):
            log.info("%s: %d of %d chunks already embedded in %s", desc, len(paths) - len(todo), len(paths),
                     self.folder)
        progress = tqdm(total=len(todo), desc=f"{desc} ({self.embedder.name})", unit="chunk", disable=len(todo) < 2)
        if self.workers > 1 and len(todo) > 1:
            self._fill_in_processes(texts, [(i, paths[i]) for i in todo], progress)
        else:
            for i in todo:
                save_chunk(paths[i], self.embedder.encode(self.part(texts, i), batch_size=self.batch_size))
                progress.update()
        progress.close()
        if all(path.exists() for path in paths):
            self.write_manifest(paths, len(texts))
        return len(todo)

    def _fill_in_processes(self, texts: Texts, todo: list[tuple[int, Path]], progress) -> None:
        """Chunks embedded by `workers` processes, at most two chunks per process read ahead."""
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        state = self.embedder.state_dict()
        context = multiprocessing.get_context("spawn")  # no forked copies of loaded models or BLAS threads
        workers = min(self.workers, len(todo))
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                 initargs=(self.spec, state)) as pool:
            pending: set = set()

            def finish(most: int) -> None:  # wait until at most `most` chunks are pending
                nonlocal pending
                while len(pending) > most:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()
                        progress.update()

            try:
                for i, path in todo:
                    finish(2 * workers - 1)
                    pending.add(pool.submit(_embed_chunk, self.part(texts, i), str(path), self.batch_size))
                finish(0)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise

    def write_manifest(self, paths: list[Path], count: int) -> Path:
        """`<space>-<texts digest>.manifest.json`: the embedder, its settings and the chunk files, in order."""
        names = [path.name for path in paths]
        digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:24]
        path = self.folder / f"{self.space}-{digest}.manifest.json"
        if not path.exists():
            write_json(path, {"embedder": self.spec, "embedding_space": self.embedder.fingerprint(),
                              "dim": self.embedder.dim, "texts": count,
                              "chunk_size": self.chunk_size, "texts_fingerprint": digest, "chunks": names})
        return path

    def iter_vectors(self, texts: Texts):
        """Vectors chunk by chunk (each complete on disk), without holding them all in memory twice."""
        for part, path in self.chunks(texts):
            vectors = np.load(path)
            if vectors.shape != (len(part), self.embedder.dim):
                raise UserError(f"{path}: cached embeddings have shape {vectors.shape}; delete the file to redo it")
            yield vectors

    def load(self, texts: Texts) -> np.ndarray:
        self.fill(texts)
        parts = list(self.iter_vectors(texts))
        return np.concatenate(parts) if parts else np.zeros((0, self.embedder.dim), np.float32)


def save_chunk(path: Path, vectors: np.ndarray) -> None:
    with atomic_writer(path, "wb") as handle:
        np.save(handle, vectors)


_WORKER: dict[str, Embedder] = {}


def _start_worker(spec: dict, state: dict) -> None:
    """In an embedding process: the same embedder, in the same space (its fitted state restored)."""
    embedder = get_embedder(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    embedder.load_state_dict(state)
    _WORKER["embedder"] = embedder


def _embed_chunk(texts: list[str], path: str, batch_size: int) -> None:
    save_chunk(Path(path), _WORKER["embedder"].encode(texts, batch_size=batch_size))


def embedder_options(args: SelectArgs) -> dict:
    """What builds the same embedder in another process (the name and its options)."""
    return {"base_url": args.embed_base_url, "device": args.device}


def build_embedder(args: SelectArgs, eval_texts: list[str], corpus_texts: CorpusTexts) -> Embedder:
    """The embedder; a TF-IDF one gets its IDF from the eval texts plus a fixed sample of the corpus."""
    embedder = get_embedder(args.embedder, **embedder_options(args))
    fit = getattr(embedder, "fit", None)
    if fit is not None:
        n = len(corpus_texts)
        if n > TFIDF_FIT_SAMPLE:  # the rows random.sample(texts, TFIDF_FIT_SAMPLE) would pick
            sample = corpus_texts.take(random.Random(0).sample(range(n), TFIDF_FIT_SAMPLE))
        else:
            sample = corpus_texts[0:n]
        fit(eval_texts + sample)
    return embedder


def search_corpus(cache: EmbeddingCache, texts: Texts, eval_vectors: np.ndarray, top_k: int,
                  index_kind: str = "exact"):
    """Each eval item's top-k training items (sims, ids), and each training item's best eval similarity.

    The corpus index (`index_kind`: exact, ivf or hnsw) is built chunk by chunk; the nearest-eval pass
    (always exact) runs on each chunk as it is added.
    """
    import faiss

    dim = eval_vectors.shape[1]
    corpus_index, eval_index = build(index_kind, dim, len(texts)), faiss.IndexFlatIP(dim)
    eval_index.add(eval_vectors)
    best = []
    for vectors in add_chunks(corpus_index, cache.iter_vectors(texts)):
        sims, _ = eval_index.search(vectors, 1)
        best.append(sims[:, 0])
    sims, ids = corpus_index.search(eval_vectors, min(top_k, len(texts)))
    return sims, ids, np.concatenate(best) if best else np.zeros(0, np.float32)


def _subject_stats(eval_items: list[EvalItem]) -> dict[str, dict[str, Any]]:
    stats: dict[str, dict[str, Any]] = {}
    for item in eval_items:
        s = stats.setdefault(item.subject, {"eval_items": 0, "recalled": 0, "kept": 0, "below_min_sim": 0,
                                            "too_similar": 0, "duplicate": 0, "contaminated": 0, "_sims": []})
        s["eval_items"] += 1
    return stats


def recall(eval_items: list[EvalItem], corpus: Corpus, sims: np.ndarray, ids: np.ndarray,
           leaking: np.ndarray, args: SelectArgs) -> tuple[list[tuple[int, int, float]], dict]:
    """(train index, eval index, similarity) of the kept items, best first, and per-subject counts.

    A pair is dropped as too similar when its similarity reaches max_sim, or when the training item
    reaches max_sim with any other eval item (it would leak that one).
    """
    stats = _subject_stats(eval_items)
    candidates = []
    for e, (row_sims, row_ids) in enumerate(zip(sims, ids)):
        s = stats[eval_items[e].subject]
        for sim, t in zip(row_sims.tolist(), row_ids.tolist()):
            if t < 0:
                continue
            s["recalled"] += 1
            s["_sims"].append(sim)
            if sim >= args.max_sim or leaking[t]:
                s["too_similar"] += 1
            elif sim < args.min_sim:
                s["below_min_sim"] += 1
            else:
                candidates.append((t, e, sim))
    candidates.sort(key=lambda c: -c[2])
    taken_items: set[int] = set()
    taken_keys: set[str] = set()
    kept = []
    for (t, e, sim), key in zip(candidates, corpus.keys(t for t, _, _ in candidates)):
        if t in taken_items or key in taken_keys:
            stats[eval_items[e].subject]["duplicate"] += 1
            continue
        taken_items.add(t)
        taken_keys.add(key)
        kept.append((t, e, sim))
    return kept, stats


def draw_random(corpus: Corpus, count: int, exclude: set[int], ngrams: NgramIndex, ratio: float,
                rng: random.Random) -> list[int]:
    """`count` random conversations, none in `exclude`, none twice, none copying an eval question."""
    order = np.setdiff1d(np.arange(len(corpus)), np.fromiter(exclude, np.int64, len(exclude)))
    rng.shuffle(order)  # the order random.shuffle gives a list of these indices
    keys = set(corpus.keys(sorted(exclude)))
    chosen: list[int] = []
    for i in map(int, order):
        if len(chosen) >= count:
            break
        record = corpus.record(i)
        key = conversation_key(record)
        overlaps = ngrams.overlaps(record_text(record, "conversation"))
        if key in keys or (overlaps and max(overlaps.values()) >= ratio):
            continue
        keys.add(key)
        chosen.append(i)
    if len(chosen) < count:
        log.warning("only %d clean items left to draw from (wanted %d)", len(chosen), count)
    return chosen


def decontaminate(kept: list[tuple[int, int, float]], corpus: Corpus, eval_items: list[EvalItem],
                  subjects: dict[str, dict], args: SelectArgs) -> tuple[list[tuple[int, int, float]], set[int], dict]:
    """The leakage guard's second signal: drop recalled items that copy an eval question's n-grams."""
    chosen = [t for t, _, _ in kept]
    records = corpus.records(chosen)
    report, hits = find_contamination([record_text(r, "conversation") for r in records],
                                      [r["_loc"] for r in records], eval_items, args.contamination)
    flagged = {chosen[i] for i in hits}
    if not args.keep_contaminated:
        for t, e, _ in kept:
            if t in flagged:
                subjects[eval_items[e].subject]["contaminated"] += 1
        kept = [k for k in kept if k[0] not in flagged]
    for _, e, _ in kept:
        subjects[eval_items[e].subject]["kept"] += 1
    return kept, flagged, report


def _histogram(values: list[float]) -> dict[str, list]:
    counts, _ = np.histogram(np.clip(values, 0, 1), bins=HIST_EDGES)
    return {"edges": HIST_EDGES, "counts": counts.tolist()}


def select(args: SelectArgs) -> dict[str, Any]:
    """Run the whole selection; returns the statistics (also written to out/select_stats.json).

    The corpus is streamed once into an Arrow file in a scratch folder under `out` (removed at the end);
    records are fetched from it by index where needed."""
    args.check()
    eval_items = load_eval_items(args.eval, args.split, args.subjects)
    with open_corpus(args.corpus, args.out, args.corpus_text, args.on_error, args.max_samples) as (corpus, read):
        return _select(args, eval_items, corpus, read)


def _select(args: SelectArgs, eval_items: list[EvalItem], corpus: Corpus, read_stats) -> dict[str, Any]:
    """`select` on an open corpus."""
    from medgpt.data.convert import convert
    from medgpt.data.rows import write_jsonl

    texts = corpus.texts
    eval_texts = [e.text for e in eval_items]
    embedder = build_embedder(args, eval_texts, texts)
    cache = EmbeddingCache(args.cache_dir or default_cache_dir(), embedder, args.chunk_size, args.batch_size,
                           args.workers, {"name": args.embedder, **embedder_options(args)})
    clock = time.perf_counter()
    embedded = cache.fill(texts, args.shard, desc="corpus")
    timings = {"embed_corpus_s": time.perf_counter() - clock}
    if args.shard is not None:
        return {"shard": list(args.shard), "embedded_chunks": embedded, "cache": str(cache.folder)}
    clock = time.perf_counter()
    eval_vectors = cache.load(eval_texts)
    timings["embed_eval_s"], clock = time.perf_counter() - clock, time.perf_counter()
    index_kind = choose_index(args.index, len(texts), len(eval_texts), args.ann_min_corpus)
    sims, ids, best = search_corpus(cache, texts, eval_vectors, args.top_k, index_kind)
    timings["search_s"], clock = time.perf_counter() - clock, time.perf_counter()
    leaking = best >= args.max_sim
    kept, subjects = recall(eval_items, corpus, sims, ids, leaking, args)

    kept, flagged, report = decontaminate(kept, corpus, eval_items, subjects, args)

    rng = random.Random(args.seed)
    ngrams = NgramIndex([e.text for e in eval_items], args.contamination.zh_ngram, args.contamination.en_ngram)
    unsafe = set(np.nonzero(leaking)[0].tolist()) | flagged
    n_random = round(len(kept) * args.random_ratio / (1 - args.random_ratio))
    extra = draw_random(corpus, n_random, unsafe | {t for t, _, _ in kept}, ngrams,
                        args.contamination.ngram_ratio, rng) if n_random else []
    selected = [t for t, _, _ in kept] + extra
    records = corpus.records(selected)

    out = Path(args.out).expanduser()
    write_jsonl(out / SELECTED, convert(records, "sharegpt"))
    locs = [r["_loc"] for r in records]
    write_jsonl(out / RECALL, [{"train": loc, "eval": eval_items[e].id, "subject": eval_items[e].subject,
                                "similarity": round(sim, 4), "source": "recall"} for loc, (_, e, sim) in zip(locs, kept)]
                + [{"train": loc, "source": "random"} for loc in locs[len(kept):]])
    baseline: list[int] = []
    if args.baseline == "random":
        baseline = draw_random(corpus, len(selected), unsafe, ngrams, args.contamination.ngram_ratio,
                               random.Random(args.seed + 1))
        write_jsonl(out / BASELINE, convert(corpus.records(baseline), "sharegpt"))
    final, _ = find_contamination([record_text(r, "conversation") for r in records], locs, eval_items,
                                  args.contamination)
    write_json(out / CONTAMINATION, final)
    timings["select_and_write_s"] = time.perf_counter() - clock

    for s in subjects.values():
        s["histogram"] = _histogram(s.pop("_sims"))
    stats = {
        "eval": args.eval, "corpus": args.corpus, "embedder": embedder.name, "embedding_space": cache.space,
        "settings": {k: getattr(args, k) for k in ("split", "corpus_text", "top_k", "min_sim", "max_sim",
                                                   "random_ratio", "baseline", "seed")},
        "counts": {"eval_items": len(eval_items), "corpus": len(corpus), "corpus_too_similar": int(leaking.sum()),
                   "recalled_kept": len(kept), "contaminated_dropped": 0 if args.keep_contaminated else len(flagged),
                   "random_added": len(extra), "selected": len(selected), "baseline": len(baseline)},
        "subjects": subjects,
        "embedding": {"corpus_chunks": -(-len(texts) // args.chunk_size), "corpus_chunks_embedded": embedded,
                      "workers": args.workers, "index": index_kind, "cache": str(cache.folder)},
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "contamination": {"recalled": report["summary"], "written": final["summary"]},
        "corpus_read": read_stats.to_dict(),
        "files": {"selected": str(out / SELECTED), "recall": str(out / RECALL),
                  "baseline": str(out / BASELINE) if baseline else None, "contamination": str(out / CONTAMINATION)},
    }
    write_json(out / STATS, stats)
    return stats
