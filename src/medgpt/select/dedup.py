"""Duplicate removal (`medgpt data dedup`): exact copies, then near copies by MinHash LSH (datasketch).

A record's text is every string it holds (sft: each turn, with its role; pt: the text; pref: prompt, chosen
and rejected), NFKC-normalized, lowercased and with whitespace collapsed. Two records are exact duplicates
when those texts are equal; near duplicates when the Jaccard similarity of their shingle sets (character
5-grams of the letters and digits for Chinese, word 3-grams otherwise) is estimated at or above the
threshold by MinHash. The first record read is kept; later copies are dropped and counted by reason, with
`path:line (of path:line)` examples. Records stream through: what is held per kept record is a 16-byte hash
and, with near-duplicate removal, its MinHash signature (4 bytes per permutation).

Only the standard library is imported at module level: `medgpt data` registers the subcommand without
slowing `medgpt --help`.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from medgpt.errors import UserError
from medgpt.select.contamination import is_chinese, units

THRESHOLD, NUM_PERM = 0.8, 128
ZH_SHINGLE, EN_SHINGLE = 5, 3
LSH_WEIGHTS = (0.1, 0.9)  # the weights of false candidates and of missed pairs when choosing the LSH bands
EXACT = "exact duplicate"
_SPACE = re.compile(r"\s+")


def near_reason(threshold: float) -> str:
    return f"near duplicate (jaccard >= {threshold:g})"


def _messages_text(messages: list[dict]) -> list[str]:
    return [f"{m['role']}: {m['content']}" for m in messages]


def record_text(record: dict) -> str:
    """The normalized text of a canonical sft, pt or pref record (what two copies have in common)."""
    if "text" in record:
        parts = [record["text"]]
    elif "messages" in record:
        parts = _messages_text(record["messages"])
    else:
        parts = [*_messages_text(record["prompt"]), "chosen", *_messages_text(record["chosen"]),
                 "rejected", *_messages_text(record["rejected"])]
    text = unicodedata.normalize("NFKC", "\n".join(parts)).lower()
    return _SPACE.sub(" ", text).strip()


def shingles(text: str) -> set[str]:
    """The shingle set MinHash estimates the Jaccard similarity of (at least one shingle per non-empty text)."""
    chinese = is_chinese(text)
    seq = units(text, chinese)
    n = min(ZH_SHINGLE if chinese else EN_SHINGLE, len(seq))
    if not n:
        return set()
    if chinese:
        joined = "".join(seq)
        return {joined[i:i + n] for i in range(len(joined) - n + 1)}
    return {" ".join(seq[i:i + n]) for i in range(len(seq) - n + 1)}


class Deduplicator:
    """Decides, record by record, whether a record repeats one seen before (`check`), counting drops in `stats`."""

    def __init__(self, stats, threshold: float | None = THRESHOLD, num_perm: int = NUM_PERM):
        if threshold is not None and not 0 < threshold <= 1:
            raise UserError(f"--threshold {threshold}: expected a Jaccard similarity in (0, 1]")
        if num_perm < 2:
            raise UserError(f"--num-perm {num_perm}: expected at least 2")
        self.stats, self.threshold, self.num_perm = stats, threshold, num_perm
        self.first: dict[bytes, str] = {}
        self.locs: list[str] = []
        self.signatures: list = []
        if threshold is not None:
            from datasketch import MinHash, MinHashLSH

            # bands favouring recall (at 128 permutations and 0.8: a pair at 0.9 is a candidate with
            # p 0.999, at 0.85 0.975): a candidate is confirmed by its estimated Jaccard, so a false
            # candidate costs one comparison, a missed one leaves a duplicate in
            self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
            self.empty = MinHash(num_perm=num_perm)  # copied for each record: permutations made once

    def signature(self, text: str):
        minhash = self.empty.copy()
        minhash.update_batch([s.encode("utf-8", "surrogatepass") for s in shingles(text)])
        return minhash

    def check(self, record: dict) -> bool:
        """True when `record` is new (keep it); otherwise it is counted as dropped and False returned."""
        import numpy as np

        loc, text = record["_loc"], record_text(record)
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if (first := self.first.get(key)) is not None:
            self.stats.drop(EXACT, f"{loc} (of {first})")
            return False
        self.first[key] = loc
        if self.threshold is None:
            return True
        minhash = self.signature(text)
        values = minhash.hashvalues.astype(np.uint32)
        for candidate in self.lsh.query(minhash):  # LSH candidates, confirmed by their estimated Jaccard
            if float(np.mean(self.signatures[candidate] == values)) >= self.threshold:
                self.stats.drop(near_reason(self.threshold), f"{loc} (of {self.locs[candidate]})")
                return False
        self.lsh.insert(len(self.locs), minhash, check_duplication=False)
        self.locs.append(loc)
        self.signatures.append(values)
        return True


def dedup(records: Iterable[dict], stats, threshold: float | None = THRESHOLD,
          num_perm: int = NUM_PERM) -> Iterator[dict]:
    """The records that repeat none before them (`threshold` None: exact duplicates only), as they stream."""
    keeper = Deduplicator(stats, threshold, num_perm)
    return (record for record in records if keeper.check(record))


# ---- command line (wired as `medgpt data dedup`) ------------------------------------------------------


def add_dedup_arguments(parser: argparse.ArgumentParser) -> None:
    from medgpt.data.convert import FORMATS
    from medgpt.data.readers import KINDS, ON_ERROR

    parser.add_argument("input", help="file, folder, comma-separated list, or hub data set name")
    parser.add_argument("--out", required=True, help="output .jsonl file (data_stats.json is written beside it)")
    parser.add_argument("--kind", choices=KINDS, help="data kind (default: guessed from the first record)")
    parser.add_argument("--on-error", choices=ON_ERROR, default="fail",
                        help="fail: a bad record is an error; skip: drop and count it (default: fail)")
    parser.add_argument("--subset", help="hub data set configuration name")
    parser.add_argument("--split", default="train", help="hub data set split (default: train)")
    parser.add_argument("--to", choices=FORMATS,
                        help="output format of sft/pref records (default: sharegpt for sft, pref for pref); "
                             "pt records are written as {\"text\"}")
    parser.add_argument("--threshold", type=float, default=THRESHOLD,
                        help=f"near duplicate at this estimated Jaccard similarity of shingles (default {THRESHOLD})")
    parser.add_argument("--num-perm", type=int, default=NUM_PERM,
                        help=f"MinHash permutations: more is more exact and slower (default {NUM_PERM})")
    parser.add_argument("--exact-only", action="store_true", help="remove exact duplicates only (no MinHash)")


def _rows(records: Iterable[dict], kind: str, to: str) -> Iterator[dict[str, Any]]:
    from medgpt.data.convert import convert_record

    for record in records:
        yield {"text": record["text"]} if kind == "pt" else convert_record(record, to)


def run_dedup(args: argparse.Namespace) -> int:
    from medgpt.data.readers import detect_kind, iter_records
    from medgpt.data.rows import write_jsonl
    from medgpt.data.stats import DataStats

    kind = args.kind or detect_kind(args.input, args.subset, args.split)
    if kind not in ("sft", "pt", "pref"):
        raise UserError(f"{args.input}: dedup reads sft, pt or pref records, not {kind}")
    to = args.to or ("pref" if kind == "pref" else "sharegpt")
    if kind == "pt" and args.to:
        raise UserError("--to: pt records are written as {\"text\"}; leave --to out")
    stats = DataStats()
    records = iter_records(args.input, kind, stats, on_error=args.on_error, subset=args.subset, split=args.split)
    kept = dedup(records, stats, None if args.exact_only else args.threshold, args.num_perm)
    out = write_jsonl(Path(args.out), _rows(kept, kind, to))
    stats_path = stats.write(out.parent)
    print(f"wrote {stats.kept} {kind} records to {out} ({stats.summary()}); counts in {stats_path}")
    return 0
