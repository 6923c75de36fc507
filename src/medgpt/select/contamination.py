"""Decontamination: which training items copy or closely paraphrase which eval items.

Two signals, reported per (training item, eval item) pair:
- n-gram overlap: the share of an eval question's n-grams found in the training text; character
  n-grams (default 8) for Chinese, word n-grams (default 13, as in GPT-3's decontamination) for English.
  A question shorter than n is one n-gram of its own length, i.e. it must appear whole.
- embedding similarity: cosine between the training text and the eval item (FAISS exact search).

Only the standard library is imported at module level: `medgpt data` can register the subcommand
without slowing `medgpt --help`.
"""

from __future__ import annotations

import argparse
import logging
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgpt.errors import UserError

log = logging.getLogger(__name__)

ZH_N, EN_N = 8, 13
NGRAM_RATIO = 0.5
SIM_THRESHOLD = 0.9
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[a-z0-9]+")


def is_chinese(text: str) -> bool:
    """Chinese when at least a third of the letters are CJK characters."""
    letters = [c for c in text if c.isalnum()]
    return bool(letters) and sum(bool(_CJK.match(c)) for c in letters) * 3 >= len(letters)


def units(text: str, chinese: bool) -> list[str]:
    """Characters (letters and digits only, NFKC, lowercased) for Chinese; lowercased words otherwise."""
    text = unicodedata.normalize("NFKC", text).lower()
    return [c for c in text if c.isalnum()] if chinese else _WORD.findall(text)


def _grams(seq: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}


class NgramIndex:
    """The n-grams of every eval question, so a training text is checked against all of them at once."""

    def __init__(self, questions: list[str], zh_n: int = ZH_N, en_n: int = EN_N):
        self.sizes: list[int] = []
        # (chinese, n) -> gram -> eval indices
        self.index: dict[tuple[bool, int], dict[tuple[str, ...], list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, question in enumerate(questions):
            chinese = is_chinese(question)
            seq = units(question, chinese)
            n = min(zh_n if chinese else en_n, len(seq))
            grams = _grams(seq, n) if n else set()
            self.sizes.append(len(grams))
            for gram in grams:
                self.index[(chinese, n)][gram].append(i)

    def overlaps(self, text: str) -> dict[int, float]:
        """Eval index -> share of its n-grams present in `text` (only eval items that share any)."""
        shared: dict[int, int] = defaultdict(int)
        seqs = {}
        for (chinese, n), grams in self.index.items():
            if chinese not in seqs:
                seqs[chinese] = units(text, chinese)
            for gram in _grams(seqs[chinese], n):
                for i in grams.get(gram, ()):
                    shared[i] += 1
        return {i: count / self.sizes[i] for i, count in shared.items()}


@dataclass
class ContaminationArgs:
    zh_ngram: int = ZH_N
    en_ngram: int = EN_N
    ngram_ratio: float = NGRAM_RATIO
    sim_threshold: float = SIM_THRESHOLD
    top_k: int = 5


def similar_pairs(train_vectors, eval_vectors, threshold: float, top_k: int = 5) -> list[tuple[int, int, float]]:
    """(train, eval, cosine) for every pair at or above threshold among each training item's top_k eval items."""
    import faiss
    import numpy as np

    index = faiss.IndexFlatIP(eval_vectors.shape[1])
    index.add(np.ascontiguousarray(eval_vectors, dtype=np.float32))
    pairs = []
    step = 65536
    for start in range(0, len(train_vectors), step):
        sims, ids = index.search(np.ascontiguousarray(train_vectors[start:start + step], dtype=np.float32),
                                 min(top_k, len(eval_vectors)))
        for row, col in zip(*np.nonzero(sims >= threshold)):
            pairs.append((start + int(row), int(ids[row, col]), float(sims[row, col])))
    return pairs


def find_contamination(train_texts: list[str], train_ids: list[str], eval_items: list, args: ContaminationArgs,
                       train_vectors=None, eval_vectors=None) -> tuple[dict[str, Any], set[int]]:
    """A report of the (training item, eval item) pairs flagged by n-gram overlap or embedding similarity,
    and the indices of the flagged training items."""
    from tqdm.auto import tqdm

    ngrams = NgramIndex([e.text for e in eval_items], args.zh_ngram, args.en_ngram)
    pairs: dict[tuple[int, int], dict[str, Any]] = {}
    for t, text in enumerate(tqdm(train_texts, desc="n-gram overlap", unit="item", disable=len(train_texts) < 10000)):
        for e, ratio in ngrams.overlaps(text).items():
            if ratio >= args.ngram_ratio:
                pairs[(t, e)] = {"ngram_overlap": round(ratio, 3)}
    if train_vectors is not None and eval_vectors is not None:
        for t, e, sim in similar_pairs(train_vectors, eval_vectors, args.sim_threshold, args.top_k):
            pairs.setdefault((t, e), {})["similarity"] = round(sim, 4)
    listed = [{"train": train_ids[t], "eval": eval_items[e].id, "subject": eval_items[e].subject, **signals}
              for (t, e), signals in sorted(pairs.items())]
    summary = {
        "train_items": len(train_texts), "eval_items": len(eval_items),
        "contaminated_train": len({t for t, _ in pairs}), "contaminated_eval": len({e for _, e in pairs}),
        "by_ngram": sum("ngram_overlap" in p for p in pairs.values()),
        "by_embedding": sum("similarity" in p for p in pairs.values()),
    }
    settings = {"zh_ngram": args.zh_ngram, "en_ngram": args.en_ngram, "ngram_ratio": args.ngram_ratio,
                "sim_threshold": args.sim_threshold if train_vectors is not None else None}
    return {"summary": summary, "settings": settings, "pairs": listed}, {t for t, _ in pairs}


# ---- command line (wired as `medgpt data contamination`) ----------------------------------------------


def add_contamination_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("train", help="training data (anything `medgpt data check` reads as sft)")
    parser.add_argument("--against", required=True,
                        help="eval set: C-Eval/CMMLU CSV file or folder, hub MCQ set, {question,answer} jsonl, or sft data")
    parser.add_argument("--split", default="val", help="split of a C-Eval-style eval set (default: val)")
    parser.add_argument("--subjects", help="comma-separated subjects of a hub MCQ set")
    parser.add_argument("--text", default="conversation", choices=("user", "conversation"),
                        help="which part of a training record is compared (default: every turn)")
    parser.add_argument("--zh-ngram", type=int, default=ZH_N, help=f"character n for Chinese (default {ZH_N})")
    parser.add_argument("--en-ngram", type=int, default=EN_N, help=f"word n for English (default {EN_N})")
    parser.add_argument("--ngram-ratio", type=float, default=NGRAM_RATIO,
                        help=f"flag when this share of an eval question's n-grams is in a training item (default {NGRAM_RATIO})")
    parser.add_argument("--embedder", default="use",
                        help="embedding backend for the similarity check: use, tfidf, minilm, openai:MODEL, a "
                             "sentence-transformers name, or none (default: use)")
    parser.add_argument("--embed-base-url", help="base URL of an OpenAI-compatible embeddings API")
    parser.add_argument("--sim-threshold", type=float, default=SIM_THRESHOLD,
                        help=f"flag pairs with cosine similarity at or above this (default {SIM_THRESHOLD})")
    parser.add_argument("--output", default="contamination.json", help="report (JSON)")
    parser.add_argument("--fail", action="store_true", help="exit 1 when anything is contaminated (for CI)")


def run_contamination(args: argparse.Namespace) -> int:
    from medgpt.files import write_json
    from medgpt.select.sources import load_eval_items, read_corpus, record_text

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    subjects = [s.strip() for s in args.subjects.split(",")] if args.subjects else None
    eval_items = load_eval_items(args.against, args.split, subjects)
    records, _ = read_corpus(args.train, on_error="skip")
    if not records or not eval_items:
        raise UserError("nothing to compare: the training data or the eval set is empty")
    texts = [record_text(r, args.text) for r in records]
    train_vectors = eval_vectors = None
    if args.embedder != "none":
        from medgpt.select.embed import get_embedder

        embedder = get_embedder(args.embedder, base_url=args.embed_base_url)
        if hasattr(embedder, "fit"):
            embedder.fit([e.text for e in eval_items] + texts)
        eval_vectors = embedder.encode([e.text for e in eval_items])
        train_vectors = embedder.encode(texts, show_progress=len(texts) > 1000)
    settings = ContaminationArgs(args.zh_ngram, args.en_ngram, args.ngram_ratio, args.sim_threshold)
    report, _ = find_contamination(texts, [r["_loc"] for r in records], eval_items, settings, train_vectors,
                                   eval_vectors)
    report.update(train=args.train, against=args.against, embedder=args.embedder)
    write_json(Path(args.output), report)
    s = report["summary"]
    print(f"{s['contaminated_train']} of {s['train_items']} training items contaminate {s['contaminated_eval']} of "
          f"{s['eval_items']} eval items ({s['by_ngram']} pairs by n-gram overlap, {s['by_embedding']} by similarity)")
    for pair in report["pairs"][:20]:
        signals = ", ".join(f"{k} {v}" for k, v in pair.items() if k in ("ngram_overlap", "similarity"))
        print(f"  {pair['train']} -> {pair['eval']} ({signals})")
    if len(report["pairs"]) > 20:
        print(f"  ... {len(report['pairs']) - 20} more pairs in {args.output}")
    print(f"written: {args.output}")
    return 1 if args.fail and report["pairs"] else 0
