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


def add_kb_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("knowledge base")
    group.add_argument("--kb", metavar="INDEX", help="answer from this index (medgpt rag index) and cite its sources")
    group.add_argument("--kb-top-k", type=int, default=DEFAULT_TOP_K,
                       help=f"chunks put in each prompt (default: {DEFAULT_TOP_K})")
    group.add_argument("--kb-mode", choices=MODES, default="hybrid", help="retrieval: hybrid (default), dense or bm25")


def kb_from_args(args: argparse.Namespace) -> Callable[[list[dict]], tuple[list[dict], list[dict]]] | None:
    """The retrieval hook for `--kb INDEX`, or None without it."""
    if not getattr(args, "kb", None):
        return None
    from medgpt.rag.retrieve import kb_hook

    return kb_hook(args.kb, k=args.kb_top_k, mode=args.kb_mode)
