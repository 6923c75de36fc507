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
TFIDF_FIT_SAMPLE = 100_000  # training texts a tfidf embedder fits its IDF on, with the eval items
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[a-z0-9]+")
_NON_ALNUM = re.compile(r"[\W_]+")  # str.isalnum is \w without "_"


def is_chinese(text: str) -> bool:
    """Chinese when at least a third of the letters are CJK characters."""
    letters = [c for c in text if c.isalnum()]
    return bool(letters) and sum(bool(_CJK.match(c)) for c in letters) * 3 >= len(letters)


def units(text: str, chinese: bool) -> list[str]:
    """Characters (letters and digits only, NFKC, lowercased) for Chinese; lowercased words otherwise."""
    text = unicodedata.normalize("NFKC", text).lower()
    return list(_NON_ALNUM.sub("", text)) if chinese else _WORD.findall(text)


def _grams(seq: list[str], n: int, chinese: bool) -> set:
    """The n-grams of `seq`: substrings of the joined characters for Chinese, word tuples otherwise
    (the same grams either way, as keys that are quick to build and hash)."""
    if chinese:
        joined = "".join(seq)
        return {joined[i:i + n] for i in range(len(joined) - n + 1)}
    return set(zip(*(seq[k:] for k in range(n)))) if n else set()


class NgramIndex:
    """The n-grams of every eval question, so a training text is checked against all of them at once."""

    def __init__(self, questions: list[str], zh_n: int = ZH_N, en_n: int = EN_N):
        self.sizes: list[int] = []
        # (chinese, n) -> gram -> eval indices
        self.index: dict[tuple[bool, int], dict[Any, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, question in enumerate(questions):
            chinese = is_chinese(question)
            seq = units(question, chinese)
            n = min(zh_n if chinese else en_n, len(seq))
            grams = _grams(seq, n, chinese) if n else set()
            self.sizes.append(len(grams))
            for gram in grams:
                self.index[(chinese, n)][gram].append(i)
        self.index = {key: dict(grams) for key, grams in self.index.items()}
        self.keys = {key: set(grams) for key, grams in self.index.items()}  # set & set runs in C

    def overlaps(self, text: str) -> dict[int, float]:
        """Eval index -> share of its n-grams present in `text` (only eval items that share any)."""
        shared: dict[int, int] = defaultdict(int)
        seqs = {}
        for (chinese, n), grams in self.index.items():
            if chinese not in seqs:
                seqs[chinese] = units(text, chinese)
            for gram in _grams(seqs[chinese], n, chinese) & self.keys[(chinese, n)]:
                for i in grams[gram]:
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


class ContaminationScan:
    """Training items fed in batches (a corpus streams through it): the (training item, eval item) pairs
    flagged by n-gram overlap or embedding similarity, holding only the flagged items' ids."""

    def __init__(self, eval_items: list, args: ContaminationArgs, eval_vectors=None):
        self.eval_items, self.args, self.eval_vectors = eval_items, args, eval_vectors
        self.ngrams = NgramIndex([e.text for e in eval_items], args.zh_ngram, args.en_ngram)
        self.pairs: dict[tuple[int, int], dict[str, Any]] = {}
        self.ids: dict[int, str] = {}
        self.count = 0

    def add(self, train_ids: list[str], train_texts: list[str], train_vectors=None) -> None:
        """Check one batch; `train_vectors` (its embeddings) when the eval vectors were given."""
        start = self.count
        self.count += len(train_texts)
        for t, text in enumerate(train_texts, start):
            for e, ratio in self.ngrams.overlaps(text).items():
                if ratio >= self.args.ngram_ratio:
                    self.pairs[(t, e)] = {"ngram_overlap": round(ratio, 3)}
                    self.ids[t] = train_ids[t - start]
        if train_vectors is not None and self.eval_vectors is not None:
            for t, e, sim in similar_pairs(train_vectors, self.eval_vectors, self.args.sim_threshold, self.args.top_k):
                self.pairs.setdefault((start + t, e), {})["similarity"] = round(sim, 4)
                self.ids[start + t] = train_ids[t]

    def report(self) -> tuple[dict[str, Any], set[int]]:
        """The report (pairs in reading order) and the running indices of the flagged training items."""
        pairs = self.pairs
        listed = [{"train": self.ids[t], "eval": self.eval_items[e].id, "subject": self.eval_items[e].subject,
                   **signals} for (t, e), signals in sorted(pairs.items())]
        summary = {
            "train_items": self.count, "eval_items": len(self.eval_items),
            "contaminated_train": len({t for t, _ in pairs}), "contaminated_eval": len({e for _, e in pairs}),
            "by_ngram": sum("ngram_overlap" in p for p in pairs.values()),
            "by_embedding": sum("similarity" in p for p in pairs.values()),
        }
        settings = {"zh_ngram": self.args.zh_ngram, "en_ngram": self.args.en_ngram,
                    "ngram_ratio": self.args.ngram_ratio,
                    "sim_threshold": self.args.sim_threshold if self.eval_vectors is not None else None}
        return {"summary": summary, "settings": settings, "pairs": listed}, {t for t, _ in pairs}


def find_contamination(train_texts: list[str], train_ids: list[str], eval_items: list, args: ContaminationArgs,
                       train_vectors=None, eval_vectors=None) -> tuple[dict[str, Any], set[int]]:
    """A report of the (training item, eval item) pairs flagged by n-gram overlap or embedding similarity,
    and the indices of the flagged training items."""
    scan = ContaminationScan(eval_items, args, eval_vectors if train_vectors is not None else None)
    scan.add(train_ids, train_texts, train_vectors)
    return scan.report()


def scan_corpus(source: str, eval_items: list, args: ContaminationArgs, text: str = "conversation",
                embedder=None, batch: int = 8192, on_error: str = "skip") -> tuple[dict[str, Any], Any]:
    """Stream the sft records of `source` through a `ContaminationScan`, `batch` at a time (never the whole
    corpus in memory); with an `embedder`, each batch is embedded and compared as well. Returns the
    report and the read's `DataStats`."""
    from itertools import islice

    from medgpt.data.readers import iter_records
    from medgpt.data.stats import DataStats
    from medgpt.select.sources import record_text

    eval_vectors = None
    if embedder is not None:
        if hasattr(embedder, "fit"):  # IDF from the eval items and the first TFIDF_FIT_SAMPLE training texts
            sample = islice(iter_records(source, "sft", DataStats(), on_error=on_error), TFIDF_FIT_SAMPLE)
            embedder.fit([e.text for e in eval_items] + [record_text(r, text) for r in sample])
        eval_vectors = embedder.encode([e.text for e in eval_items])
    scan = ContaminationScan(eval_items, args, eval_vectors)
    stats = DataStats()
    records = iter(iter_records(source, "sft", stats, on_error=on_error))
    while chunk := list(islice(records, batch)):
        texts = [record_text(r, text) for r in chunk]
        vectors = embedder.encode(texts) if embedder is not None else None
        scan.add([r["_loc"] for r in chunk], texts, vectors)
    report, _ = scan.report()
    return report, stats


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
    from medgpt.select.sources import load_eval_items

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    subjects = [s.strip() for s in args.subjects.split(",")] if args.subjects else None
    eval_items = load_eval_items(args.against, args.split, subjects)
    if not eval_items:
        raise UserError("nothing to compare: the eval set is empty")
    embedder = None
    if args.embedder != "none":
        from medgpt.select.embed import get_embedder

        embedder = get_embedder(args.embedder, base_url=args.embed_base_url)
    settings = ContaminationArgs(args.zh_ngram, args.en_ngram, args.ngram_ratio, args.sim_threshold)
    report, stats = scan_corpus(args.train, eval_items, settings, args.text, embedder)
    if not report["summary"]["train_items"]:
        raise UserError("nothing to compare: the training data is empty")
    report.update(train=args.train, against=args.against, embedder=args.embedder, read=stats.to_dict())
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
