"""Hybrid retrieval over a knowledge-base index, and the prompt that makes a model answer with citations.

Dense search (cosine similarity of embeddings) finds paraphrases; BM25 finds exact terms such as drug
names, numbers and abbreviations. Their rankings are fused with reciprocal rank fusion (Cormack et al.,
2009): score = sum over rankings of 1 / (60 + rank), which needs no calibration between the two scores.

`augment(messages, index)` is the hook chat, serve and `rag ask` share: it retrieves for the last user
turn and returns the messages with that turn rewritten to hold the numbered sources, plus the sources.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from medgpt.errors import UserError
from medgpt.rag import DEFAULT_TOP_K, MODES
from medgpt.rag.index import KnowledgeBase, bm25_tokens, load_index

RRF_K = 60  # the constant of reciprocal rank fusion; 60 is the value from the paper and common practice
_CJK = re.compile(r"[\u3400-\u9fff]")
_CITATION = re.compile(r"[\[【]\s*(\d+(?:\s*[,，、]\s*\d+)*)\s*[\]】]")

PROMPTS = {
    "en": ("Answer the question using the numbered sources below. After each fact, cite its source number "
           "in square brackets, like [1]. If the sources do not contain the answer, say so.\n\n"
           "Sources:\n{sources}\n\nQuestion: {question}"),
    "zh": ("请根据下面编号的资料回答问题，并在用到的内容后用方括号标注资料编号，例如[1]。"
           "如果资料中没有答案，请直接说明。\n\n资料：\n{sources}\n\n问题：{question}"),
}


@dataclass
class Source:
    """One retrieved chunk, numbered as the model is asked to cite it."""

    n: int
    file: str
    chunk: int
    location: str
    text: str
    score: float  # fused score (or the single ranking's score in dense / bm25 mode)
    dense: float  # cosine similarity to the question
    bm25: float

    def to_dict(self) -> dict:
        """The fields, plus `source`: the citation label chat, serve and webui show."""
        return {"n": self.n, "source": f"{self.file}, chunk {self.chunk} ({self.location})", **asdict(self)}


class Retriever:
    """Searches one loaded index; the embedder is loaded on first use."""

    def __init__(self, kb: KnowledgeBase):
        self.kb = kb
        self._embedder = None

    def dense_scores(self, query: str) -> np.ndarray:
        if self._embedder is None:
            self._embedder = self.kb.embedder()
        return self.kb.embeddings @ self._embedder.encode([query])[0]

    def bm25_scores(self, query: str) -> np.ndarray:
        ids = self.kb.bm25.get_tokens_ids(bm25_tokens(query))
        if not ids:
            return np.zeros(len(self.kb.chunks), dtype=np.float32)
        return np.asarray(self.kb.bm25.get_scores(ids), dtype=np.float32)

    def search(self, query: str, k: int = DEFAULT_TOP_K, mode: str = "hybrid") -> list[Source]:
        """The `k` best chunks for `query`, best first."""
        if mode not in MODES:
            raise UserError(f"retrieval mode {mode!r}: expected one of {', '.join(MODES)}")
        if not query.strip():
            raise UserError("the question is empty")
        if k < 1:
            raise UserError(f"top-k {k}: must be >= 1")
        n = len(self.kb.chunks)
        dense = self.dense_scores(query) if mode != "bm25" else np.zeros(n, dtype=np.float32)
        bm25 = self.bm25_scores(query) if mode != "dense" else np.zeros(n, dtype=np.float32)
        if mode == "dense":
            fused = dense
        elif mode == "bm25":
            fused = bm25
        else:
            fused = _rrf(_ranks(dense, np.ones(n, dtype=bool)), _ranks(bm25, bm25 > 0))
        # ties (e.g. chunks no ranking found) are broken by cosine similarity
        order = np.lexsort((-dense, -fused))[:k]
        return [Source(n=rank + 1, file=(c := self.kb.chunks[i]).file, chunk=c.index, location=c.location,
                       text=c.text, score=float(fused[i]), dense=float(dense[i]), bm25=float(bm25[i]))
                for rank, i in enumerate(order)]


def _ranks(scores: np.ndarray, ranked: np.ndarray) -> np.ndarray:
    """1-based rank of each item by descending score; 0 for items this ranking does not rank."""
    ranks = np.zeros(len(scores), dtype=np.int64)
    order = [i for i in np.argsort(-scores, kind="stable") if ranked[i]]
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks


def _rrf(*rankings: np.ndarray) -> np.ndarray:
    return sum(np.where(r > 0, 1.0 / (RRF_K + np.maximum(r, 1)), 0.0) for r in rankings)


@lru_cache(maxsize=4)
def _cached(path: str, stamp: int) -> Retriever:
    return Retriever(load_index(path))


def open_retriever(index: str | Path | Retriever) -> Retriever:
    """A retriever for an index folder, cached per process until the index is rewritten."""
    if isinstance(index, Retriever):
        return index
    path = Path(index).expanduser().resolve()
    meta = path / "meta.json"
    if not meta.exists():
        raise UserError(f"{index}: not a knowledge-base index (no meta.json); build one with `medgpt rag index`")
    return _cached(str(path), meta.stat().st_mtime_ns)


def build_prompt(question: str, sources: list[Source]) -> str:
    """The user turn the model sees: numbered sources, then the question; Chinese for a Chinese question."""
    blocks = "\n\n".join(f"[{s.n}] {s.file}, chunk {s.chunk}\n{s.text}" for s in sources)
    template = PROMPTS["zh" if _CJK.search(question) else "en"]
    return template.format(sources=blocks, question=question)


def augment(messages: list[dict], index: str | Path | Retriever, k: int = DEFAULT_TOP_K,
            mode: str = "hybrid") -> tuple[list[dict], list[dict]]:
    """Retrieve for the last user turn; return (messages with that turn holding the sources, sources).

    Earlier turns are left as they were, so a conversation keeps its history while each new question
    brings its own sources.
    """
    if not messages or messages[-1].get("role") != "user" or not isinstance(messages[-1].get("content"), str):
        raise UserError("the last message must be a user turn with text content")
    question = messages[-1]["content"]
    sources = open_retriever(index).search(question, k=k, mode=mode)
    augmented = copy.deepcopy(messages)
    augmented[-1]["content"] = build_prompt(question, sources)
    return augmented, [s.to_dict() for s in sources]


def cited(answer: str, count: int) -> list[int]:
    """Source numbers the answer cites ([1], [1, 2], 【1】), in order of first use, within 1..count."""
    seen: list[int] = []
    for group in _CITATION.findall(answer):
        for number in map(int, re.split(r"\s*[,，、]\s*", group)):
            if 1 <= number <= count and number not in seen:
                seen.append(number)
    return seen


def kb_hook(index: str | Path, k: int = DEFAULT_TOP_K,
            mode: str = "hybrid") -> Callable[[list[dict]], tuple[list[dict], list[dict]]]:
    """`augment` bound to one index, for chat, serve and webui. The index and its embedder are loaded now,
    so a bad path fails before the model loads and the first question is not slowed down."""
    retriever = open_retriever(index)
    retriever.search("warm-up", k=k, mode=mode)  # checks k and mode, loads the embedder
    return partial(augment, index=retriever, k=k, mode=mode)
