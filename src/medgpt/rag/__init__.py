"""Knowledge-base question answering: index documents (`index`), retrieve and cite them (`retrieve`).

This module holds only defaults and the `--kb` flags that chat, serve and webui share (standard library
only), so the command line stays fast; retrieval itself is imported when a knowledge base is used.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

DEFAULT_EMBEDDER = "use"
DEFAULT_CHUNK_SIZE = 160  # approximate tokens: one per CJK character, one per word of other scripts
DEFAULT_OVERLAP = 32
DEFAULT_TOP_K = 4
MODES = ("hybrid", "dense", "bm25")
DEFAULT_MODE = "hybrid"  # measured against dense and BM25 alone by bench/retrieval.py (docs/rag_plan.md)
# Cosine similarity below which a chunk is not about the question, per embedder; other embedders have
# none. For use, bench/retrieval.py puts the best chunk of the sample off-topic questions at <= 0.12 and
# the right chunk of every sample question at >= 0.33; short Chinese keyword queries against English
# documents (储雾罐, 维生素K和华法林) reach only 0.14-0.18, and chit-chat up to 0.16 (docs/rag_plan.md).
DENSE_FLOORS = {"use": 0.15}
BM25_FLOOR = 0.4  # share of the question's term weight a chunk must hold for BM25 to vote for it


def add_kb_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("knowledge base")
    group.add_argument("--kb", metavar="INDEX", help="answer from this index (medgpt rag index) and cite its sources")
    group.add_argument("--kb-top-k", type=int, default=DEFAULT_TOP_K,
                       help=f"chunks put in each prompt (default: {DEFAULT_TOP_K})")
    group.add_argument("--kb-mode", choices=MODES, default=DEFAULT_MODE,
                       help=f"retrieval: hybrid, dense or bm25 (default: {DEFAULT_MODE})")
    group.add_argument("--kb-min-score", type=float, metavar="COSINE",
                       help="cosine similarity below which a chunk is not about the question (default: the "
                            f"embedder's floor: {DENSE_FLOORS[DEFAULT_EMBEDDER]} for {DEFAULT_EMBEDDER}, "
                            "none for others)")


def kb_from_args(args: argparse.Namespace) -> Callable[[list[dict]], tuple[list[dict], list[dict]]] | None:
    """The retrieval hook for `--kb INDEX`, or None without it."""
    if not getattr(args, "kb", None):
        return None
    from medgpt.rag.retrieve import kb_hook

    return kb_hook(args.kb, k=args.kb_top_k, mode=args.kb_mode, min_score=getattr(args, "kb_min_score", None))
