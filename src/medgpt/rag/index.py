"""A knowledge-base index on disk: chunks, their embeddings and a BM25 index, rebuilt incrementally.

Layout of an index folder:

    meta.json        format, embedder and its fingerprint, chunking settings, one SHA-256 per file
    chunks.jsonl     one chunk per line: file, index, location, text
    embeddings.npy   float32 [chunks, dim], L2-normalized rows in chunks.jsonl order
    embedder.npz     the embedder's fitted state, if it has one (the TF-IDF IDF weights)
    bm25/            bm25s index of the same chunks, tokenized by `bm25_tokens` (its version is in meta.json)

Re-indexing embeds only the files whose content hash changed (or that are new); the chunks and vectors
of unchanged files are copied from the old index. BM25 is rebuilt every time: its IDF depends on the
whole corpus, and building it takes milliseconds next to embedding. An index whose BM25 was built by an
older `bm25_tokens` gets its BM25 rebuilt in memory when loaded (and on disk by the next `rag index`), so
questions and chunks are always tokenized alike. The new index is written to a temporary folder and swapped
in only when complete.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from medgpt.errors import UserError
from medgpt.files import file_digest, save_atomic
from medgpt.rag import DEFAULT_CHUNK_SIZE, DEFAULT_EMBEDDER, DEFAULT_OVERLAP
from medgpt.rag.documents import EXTENSIONS, Chunk, DocumentError, read_document, split_chunks

log = logging.getLogger(__name__)

FORMAT = 1
BM25_TOKENIZER = 2  # version of `bm25_tokens`, stored in meta.json; 1 = jieba on the raw text, small stop list

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_RUNS = re.compile(rf"[{_CJK}]+|[^\W_{_CJK}]+(?:['.][^\W_{_CJK}]+)*")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# question words that bm25s's Chinese stop list lacks: they say what is asked, not what it is about
_QUESTION_WORDS_ZH = ("多久", "多长", "多长时间", "哪几", "哪几种", "几种", "请问")


@dataclass
class IndexReport:
    """What one `build_index` call did, file by file."""

    out: str
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # file -> reason
    chunks: int = 0
    embedded: int = 0  # chunks embedded by this call (the rest were reused)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class KnowledgeBase:
    """A loaded index: chunks with their vectors, the BM25 index, and the embedder settings."""

    path: Path
    meta: dict[str, Any]
    chunks: list[Chunk]
    embeddings: np.ndarray
    bm25: Any
    embedder_state: dict[str, np.ndarray]

    def embedder(self):
        """The embedder the index was built with, restored to the same embedding space."""
        from medgpt.select.embed import get_embedder

        embedder = get_embedder(self.meta["embedder"])
        embedder.load_state_dict(self.embedder_state)
        if embedder.fingerprint() != self.meta["fingerprint"]:
            raise UserError(f"{self.path}: embedder {self.meta['embedder']!r} no longer produces the vectors this "
                            "index was built with; re-index with --rebuild")
        return embedder


def bm25_tokens(text: str) -> list[str]:
    """Words for BM25, the same for chunks and questions.

    The text is NFKC-normalized (full-width digits and letters become ASCII) and lowercased, then cut
    into runs of Chinese characters and runs of other letters and digits. A Chinese run is segmented by
    jieba in search mode (each word, plus the known sub-words of a long one: 流感疫苗 -> 流感, 疫苗,
    流感疫苗); any other run is one word (7.0, 2,300 -> 2300, john's -> john). Stop words (bm25s's
    Chinese list and NLTK's English one) and Chinese question words are dropped, so a chunk is matched
    on what a question is about rather than on "what", "how" or 多久.
    """
    import jieba

    jieba.setLogLevel(logging.WARNING)
    stop = _stopwords()
    text = _THOUSANDS.sub("", unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'"))
    tokens: list[str] = []
    for run in _RUNS.findall(text):
        if re.match(rf"[{_CJK}]", run):
            tokens += [w for w in jieba.lcut_for_search(run) if w not in stop]
        elif (word := run.removesuffix("'s")) not in stop:
            tokens.append(word)
    return tokens


@lru_cache(maxsize=1)
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_CHINESE, STOPWORDS_EN, STOPWORDS_EN_PLUS

    return frozenset([*STOPWORDS_EN, *STOPWORDS_EN_PLUS, *STOPWORDS_CHINESE, *_QUESTION_WORDS_ZH])


def _build_bm25(texts: list[str]):
    import bm25s

    bm25 = bm25s.BM25()
    bm25.index([bm25_tokens(t) for t in texts], show_progress=False)
    return bm25


def search_text(chunk: Chunk, title: str) -> str:
    """What is embedded and BM25-indexed for a chunk: its text, led by the document title when the
    chunk does not already contain it (a later chunk often never names its topic)."""
    return chunk.text if title in chunk.text else f"{title}\n{chunk.text}"


def collect_files(sources: list[str | Path]) -> dict[str, Path]:
    """Name (path relative to the folder given, or the file name) -> path, for every supported file."""
    files: dict[str, Path] = {}
    for source in map(Path, sources):
        if source.is_dir():
            found = {p.relative_to(source).as_posix(): p for p in sorted(source.rglob("*"))
                     if p.is_file() and p.suffix.lower() in EXTENSIONS and not any(
                         part.startswith(".") for part in p.relative_to(source).parts)}
        elif source.is_file():
            if source.suffix.lower() not in EXTENSIONS:
                raise UserError(f"{source}: unsupported file type (expected {', '.join(EXTENSIONS)})")
            found = {source.name: source}
        else:
            raise UserError(f"{source}: no such file or folder")
        for name, path in found.items():
            if name in files and files[name].resolve() != path.resolve():
                raise UserError(f"{path}: two inputs share the name {name!r}; index them from one parent folder")
            files[name] = path
    if not files:
        raise UserError(f"{', '.join(map(str, sources))}: no {', '.join(EXTENSIONS)} files to index")
    return files


def build_index(sources: list[str | Path], out: str | Path, embedder: str = DEFAULT_EMBEDDER,
                chunk_size: int = DEFAULT_CHUNK_SIZE, overlap: int = DEFAULT_OVERLAP,
                rebuild: bool = False) -> IndexReport:
    """Index the files under `sources` into the folder `out`, re-embedding only what changed."""
    from tqdm.auto import tqdm

    from medgpt.select.embed import get_embedder

    if chunk_size < 1 or not 0 <= overlap < chunk_size:
        raise UserError(f"chunk size {chunk_size} / overlap {overlap}: need size >= 1 and 0 <= overlap < size")
    out = Path(out)
    _check_out(out)
    files = collect_files(sources)
    settings = {"embedder": embedder, "chunk_size": chunk_size, "overlap": overlap}
    encoder = get_embedder(embedder)
    old = _reusable(out, settings, encoder) if not rebuild else None
    report = IndexReport(out=str(out))

    chunks: list[Chunk] = []
    texts: list[str] = []
    vectors: list[np.ndarray | None] = []  # None: to embed
    entries: dict[str, dict[str, Any]] = {}
    for name, path in tqdm(sorted(files.items()), desc="reading", unit="file", disable=None, leave=False):
        digest = file_digest(path)
        previous = old.meta["files"].get(name) if old else None
        if previous and previous["sha256"] == digest:
            start = previous["first_chunk"]
            kept = old.chunks[start:start + previous["chunks"]]
            title = previous["title"]
            vectors += list(old.embeddings[start:start + previous["chunks"]])
            report.unchanged.append(name)
        else:
            try:
                doc = read_document(path, name)
            except DocumentError as exc:
                report.skipped[name] = str(exc)
                log.warning("%s: skipped: %s", path, exc)
                continue
            kept, title = split_chunks(doc, chunk_size, overlap), doc.title()
            vectors += [None] * len(kept)
            (report.changed if previous else report.added).append(name)
        entries[name] = {"sha256": digest, "title": title, "first_chunk": len(chunks), "chunks": len(kept)}
        chunks += kept
        texts += [search_text(c, title) for c in kept]
    report.removed = sorted(set(old.meta["files"]) - set(files)) if old else []
    if not chunks:
        raise UserError(f"{', '.join(map(str, sources))}: no text to index ({len(report.skipped)} file(s) skipped)")

    todo = [i for i, v in enumerate(vectors) if v is None]
    if todo:
        if old is None and encoder.state_dict() == {} and hasattr(encoder, "fit"):
            encoder.fit(texts)  # a corpus-fitted embedder (TF-IDF) is fitted once, on the whole first corpus
        fresh = encoder.encode([texts[i] for i in todo], show_progress=len(todo) > 64)
        for i, vector in zip(todo, fresh):
            vectors[i] = vector
    report.chunks, report.embedded = len(chunks), len(todo)
    if (old and not (todo or report.removed) and entries == old.meta["files"]
            and old.meta.get("bm25_tokenizer") == BM25_TOKENIZER):
        log.info("%s: up to date (%d files, %d chunks)", out, len(entries), len(chunks))
        return report
    meta = {"format": FORMAT, **settings, "fingerprint": encoder.fingerprint(), "dim": encoder.dim,
            "bm25_tokenizer": BM25_TOKENIZER, "files": entries}
    _write_index(out, meta, chunks, texts, np.stack(vectors).astype(np.float32), encoder.state_dict())
    log.info("indexed %d chunks from %d files into %s (%d embedded, %d reused)", len(chunks), len(entries), out,
             len(todo), len(chunks) - len(todo))
    return report


def _reusable(out: Path, settings: dict[str, Any], encoder) -> KnowledgeBase | None:
    """The existing index at `out` when its chunks and vectors can be reused with these settings."""
    if not (out / "meta.json").exists():
        return None
    try:
        old = load_index(out)
    except UserError as exc:
        log.warning("%s: rebuilding from scratch: %s", out, exc)
        return None
    if any(old.meta.get(k) != v for k, v in settings.items()):
        log.info("%s: embedder or chunking changed: rebuilding from scratch", out)
        return None
    encoder.load_state_dict(old.embedder_state)
    if encoder.fingerprint() != old.meta["fingerprint"]:
        log.info("%s: the embedder's vectors changed: rebuilding from scratch", out)
        return None
    return old


def _write_index(out: Path, meta: dict, chunks: list[Chunk], texts: list[str], embeddings: np.ndarray,
                 embedder_state: dict[str, np.ndarray]) -> None:
    def save(tmp: Path) -> None:
        with (tmp / "chunks.jsonl").open("w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(json.dumps(asdict(chunk), ensure_ascii=False) + "\n")
        np.save(tmp / "embeddings.npy", embeddings)
        if embedder_state:
            np.savez(tmp / "embedder.npz", **embedder_state)
        _build_bm25(texts).save(str(tmp / "bm25"), show_progress=False)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")

    save_atomic(out, save)


def _check_out(out: Path) -> None:
    """Refuse to replace something that is not an index (an empty folder is fine)."""
    if out.exists() and (not out.is_dir() or (not (out / "meta.json").exists() and any(out.iterdir()))):
        raise UserError(f"{out}: exists and is not a medgpt index; choose another --out")


def load_index(path: str | Path) -> KnowledgeBase:
    """Load an index folder written by `build_index`."""
    import bm25s

    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise UserError(f"{path}: not a knowledge-base index (no meta.json); build one with `medgpt rag index`")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise UserError(f"{path}: index format {meta.get('format')} is not {FORMAT}; re-index with --rebuild")
        with (path / "chunks.jsonl").open(encoding="utf-8") as f:
            chunks = [Chunk(**json.loads(line)) for line in f]
        embeddings = np.load(path / "embeddings.npy")
        state_file = path / "embedder.npz"
        state = dict(np.load(state_file)) if state_file.exists() else {}
        bm25 = bm25s.BM25.load(str(path / "bm25"), show_progress=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: damaged index ({type(exc).__name__}: {exc}); re-index with --rebuild") from exc
    if len(chunks) != len(embeddings):
        raise UserError(f"{path}: damaged index ({len(chunks)} chunks, {len(embeddings)} vectors); "
                        "re-index with --rebuild")
    if meta.get("bm25_tokenizer", 1) != BM25_TOKENIZER:
        log.warning("%s: BM25 was built by an older tokenizer; rebuilding it in memory (run `medgpt rag index` "
                    "again to store it)", path)
        bm25 = _build_bm25(_search_texts(meta, chunks))
    return KnowledgeBase(path, meta, chunks, embeddings, bm25, state)


def _search_texts(meta: dict[str, Any], chunks: list[Chunk]) -> list[str]:
    """What was indexed for each chunk, rebuilt from the chunks and the file titles in meta.json."""
    titles = {name: entry["title"] for name, entry in meta["files"].items()}
    return [search_text(c, titles.get(c.file, "")) for c in chunks]
