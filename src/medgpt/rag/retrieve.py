"""Hybrid retrieval over a knowledge-base index, and the prompt that makes a model answer with citations.

Dense search (cosine similarity of embeddings) finds paraphrases, also across languages; BM25 finds exact
terms such as drug names, numbers and abbreviations. Each retriever votes only for the chunks it finds
relevant: dense for a cosine at or above the embedder's floor (`DENSE_FLOORS`), BM25 for a chunk that
holds at least `BM25_FLOOR` of the question's term weight (IDF-weighted; a word no chunk contains counts
in full). The votes are fused by reciprocal rank fusion (Cormack et al., 2009): score = sum over the
rankings that include the chunk of 1 / (60 + rank). Without the floors, BM25 ranks whatever shares a word
or two with the question (an English question against a Chinese document: "period", "disease" in the
English ones), and because 1/(60 + rank) hardly differs between ranks 1 and 10, any chunk with two votes
beats the right one with one. A chunk neither retriever finds relevant is never returned, so an
off-topic question gets no sources, and the model is told that instead of being fed unrelated passages.

`augment(messages, index)` is the hook chat, serve and `rag ask` share: it retrieves for the last user
turn and returns the messages with that turn rewritten to hold the numbered sources, plus the sources.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from medgpt.errors import UserError
from medgpt.rag import BM25_FLOOR, DENSE_FLOORS, DEFAULT_MODE, DEFAULT_TOP_K, MODES
from medgpt.rag.index import KnowledgeBase, bm25_tokens, load_index

RRF_K = 60  # the constant of reciprocal rank fusion; 60 is the value from the paper and common practice
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[^\W\d_\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_NUMBERS = r"\d+(?:\s*[-–~～]\s*\d+)?(?:\s*[,，、]\s*\d+(?:\s*[-–~～]\s*\d+)?)*"
_CITATION = re.compile(rf"[\[【［]\s*(?:sources?|资料|来源)?\s*({_NUMBERS})\s*[\]】］]", re.IGNORECASE)

PROMPTS = {
    "en": ("Answer the question using only the numbered sources below. After each sentence, cite the source it "
           "comes from by its number in square brackets, like [1] or [2]. If the sources do not contain the "
           "answer, say so. Answer in English, briefly, in your own words.\n\n"
           "Sources:\n{sources}\n\nQuestion: {question}\nAnswer (cite the sources like [1]):"),
    "zh": ("请只根据下面编号的资料回答问题，每句话后用方括号标注所依据的资料编号，例如[1]或[2]。"
           "如果资料中没有答案，请直接说明。请用中文简要回答，不要照抄资料。\n\n"
           "资料：\n{sources}\n\n问题：{question}\n回答（像[1]这样标注资料编号）："),
}
NO_SOURCES = {
    "en": ("The knowledge base has no passage relevant to this question. Say that the documents do not cover "
           "it; if you add general knowledge, say that it does not come from the documents. Answer in English."
           "\n\nQuestion: {question}"),
    "zh": ("知识库中没有与这个问题相关的资料。请先说明资料中没有涉及这个问题；如果根据一般知识补充回答，"
           "请注明这不是来自资料。请用中文回答。\n\n问题：{question}"),
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
    term_share: float  # share of the question's term weight this chunk holds (what BM25_FLOOR is checked on)

    def to_dict(self) -> dict:
        """The fields, plus `source`: the citation label chat, serve and webui show."""
        return {"n": self.n, "source": f"{self.file}, chunk {self.chunk} ({self.location})", **asdict(self)}


class Retriever:
    """Searches one loaded index; the embedder is loaded on first use."""

    def __init__(self, kb: KnowledgeBase):
        self.kb = kb
        self.dense_floor: float | None = DENSE_FLOORS.get(kb.meta.get("embedder", ""))
        self._embedder = None

    def dense_scores(self, query: str) -> np.ndarray:
        if self._embedder is None:
            self._embedder = self.kb.embedder()
        return self.kb.embeddings @ self._embedder.encode([query])[0]

    def bm25_scores(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """BM25 score of each chunk, and the share of the question's term weight (Lucene IDF per token,
        counted as often as the question has it) each chunk holds: 1.0 = every word of the question."""
        n = len(self.kb.chunks)
        scores, held, total = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.float32), 0.0
        for token, count in Counter(bm25_tokens(query)).items():
            token_id = self.kb.bm25.vocab_dict.get(token)
            column = (np.asarray(self.kb.bm25.get_scores([token_id]), dtype=np.float32) if token_id is not None
                      else np.zeros(n, dtype=np.float32))
            found = column > 0
            idf = math.log(1 + (n - found.sum() + 0.5) / (found.sum() + 0.5))
            scores += count * column
            held += count * idf * found
            total += count * idf
        return scores, held / total if total else held

    def search(self, query: str, k: int = DEFAULT_TOP_K, mode: str = DEFAULT_MODE,
               min_score: float | None = None) -> list[Source]:
        """Up to `k` chunks relevant to `query`, best first; none when no chunk is relevant.

        `min_score` replaces the embedder's dense floor (`DENSE_FLOORS`; -1 turns it off).
        """
        if mode not in MODES:
            raise UserError(f"retrieval mode {mode!r}: expected one of {', '.join(MODES)}")
        if not query.strip():
            raise UserError("the question is empty")
        if k < 1:
            raise UserError(f"top-k {k}: must be >= 1")
        n = len(self.kb.chunks)
        dense = self.dense_scores(query) if mode != "bm25" else np.zeros(n, dtype=np.float32)
        bm25, share = self.bm25_scores(query) if mode != "dense" else (np.zeros(n, dtype=np.float32),) * 2
        floor = self.dense_floor if min_score is None else min_score
        order, fused = rank_chunks(dense, bm25, share, mode, floor)
        return [Source(n=rank + 1, file=(c := self.kb.chunks[i]).file, chunk=c.index, location=c.location,
                       text=c.text, score=float(fused[i]), dense=float(dense[i]), bm25=float(bm25[i]),
                       term_share=float(share[i]))
                for rank, i in enumerate(order[:k])]


def rank_chunks(dense: np.ndarray, bm25: np.ndarray, share: np.ndarray, mode: str = DEFAULT_MODE,
                dense_floor: float | None = None, bm25_floor: float = BM25_FLOOR) -> tuple[list[int], np.ndarray]:
    """(the relevant chunks, best first; the score they are ordered by) for one question's dense cosines,
    BM25 scores and term shares. A chunk is relevant when its cosine reaches `dense_floor` (every chunk,
    for None) or its term share reaches `bm25_floor`, counting only the retrievers `mode` uses."""
    none = np.zeros(len(dense), dtype=bool)
    dense_ok = none if mode == "bm25" else dense >= dense_floor if dense_floor is not None else ~none
    bm25_ok = none if mode == "dense" else share >= bm25_floor
    if mode == "dense":
        fused = dense
    elif mode == "bm25":
        fused = bm25
    else:
        fused = reciprocal_rank_fusion(ranks(dense, dense_ok), ranks(bm25, bm25_ok))
    # ties (e.g. a chunk first by one ranking against one first by the other) go to cosine similarity
    return [int(i) for i in np.lexsort((-dense, -fused)) if dense_ok[i] or bm25_ok[i]], fused


def ranks(scores: np.ndarray, ranked: np.ndarray) -> np.ndarray:
    """1-based rank of each item by descending score among the `ranked` ones; 0 for the others."""
    out = np.zeros(len(scores), dtype=np.int64)
    order = [i for i in np.argsort(-scores, kind="stable") if ranked[i]]
    out[order] = np.arange(1, len(order) + 1)
    return out


def reciprocal_rank_fusion(*rankings: np.ndarray) -> np.ndarray:
    """Sum over rankings of 1 / (RRF_K + rank), counting only the rankings that rank the item (rank > 0)."""
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


def language(text: str) -> str:
    """"zh" when the text has at least as many Chinese characters as words in other scripts, else "en"."""
    return "zh" if len(_CJK.findall(text)) >= max(1, len(_WORD.findall(text))) else "en"


def build_prompt(question: str, sources: list[Source]) -> str:
    """The user turn the model sees: numbered sources, the question and how to cite, in the question's
    language (the sources may be in another); without sources, that the documents have nothing on it."""
    lang = language(question)
    if not sources:
        return NO_SOURCES[lang].format(question=question)
    blocks = "\n\n".join(f"[{s.n}] {s.file}, chunk {s.chunk}\n{s.text}" for s in sources)
    return PROMPTS[lang].format(sources=blocks, question=question)


def augment(messages: list[dict], index: str | Path | Retriever, k: int = DEFAULT_TOP_K,
            mode: str = DEFAULT_MODE, min_score: float | None = None) -> tuple[list[dict], list[dict]]:
    """Retrieve for the last user turn; return (messages with that turn holding the sources, sources).

    Earlier turns are left as they were, so a conversation keeps its history while each new question
    brings its own sources. The sources are empty when no chunk is relevant.
    """
    if not messages or messages[-1].get("role") != "user" or not isinstance(messages[-1].get("content"), str):
        raise UserError("the last message must be a user turn with text content")
    question = messages[-1]["content"]
    sources = open_retriever(index).search(question, k=k, mode=mode, min_score=min_score)
    augmented = copy.deepcopy(messages)
    augmented[-1]["content"] = build_prompt(question, sources)
    return augmented, [s.to_dict() for s in sources]


def cited(answer: str, count: int) -> list[int]:
    """Source numbers the answer cites ([1], [1, 2], [1-3], 【1】, [资料1], [source 2]), in order of first
    use, within 1..count; numbers outside the listed sources are not citations of them."""
    seen: list[int] = []
    for group in _CITATION.findall(answer):
        for part in re.split(r"\s*[,，、]\s*", group):
            ends = [int(x) for x in re.split(r"\s*[-–~～]\s*", part)]
            for number in range(ends[0], ends[-1] + 1) if ends[-1] - ends[0] < 100 else ends:
                if 1 <= number <= count and number not in seen:
                    seen.append(number)
    return seen


def kb_hook(index: str | Path, k: int = DEFAULT_TOP_K, mode: str = DEFAULT_MODE,
            min_score: float | None = None) -> Callable[[list[dict]], tuple[list[dict], list[dict]]]:
    """`augment` bound to one index, for chat, serve and webui. The index and its embedder are loaded now,
    so a bad path fails before the model loads and the first question is not slowed down."""
    retriever = open_retriever(index)
    retriever.search("warm-up", k=k, mode=mode, min_score=min_score)  # checks k and mode, loads the embedder
    return partial(augment, index=retriever, k=k, mode=mode, min_score=min_score)
