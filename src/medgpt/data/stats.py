"""Counts of what a read kept and dropped, and why, so that no record disappears silently.

`DataStats` keeps `read == kept + sum(dropped.values())` true by construction: `kept` is derived,
so a later filter (e.g. token length) only has to call `drop` on a record that was already read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from medgpt.files import write_json

MAX_EXAMPLES = 5
STATS_FILE = "data_stats.json"


def preview(items: list[str], limit: int = MAX_EXAMPLES) -> str:
    """The first few items, comma-separated, saying how many more there are (keeps logs readable)."""
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" and {more} more" if more > 0 else "")


@dataclass
class DataStats:
    """Counts for one read. Blank lines are counted apart: they are not records, so not in `read`."""

    read: int = 0
    blank: int = 0
    truncated: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.read - sum(self.dropped.values())

    def drop(self, reason: str, loc: str) -> None:
        """Count one already-read record as dropped for `reason`, remembering its first locations."""
        self.dropped[reason] += 1
        where = self.examples.setdefault(reason, [])
        if len(where) < MAX_EXAMPLES:
            where.append(loc)

    def merge(self, other: DataStats) -> DataStats:
        """The counts of two reads together (e.g. two sources feeding one training set)."""
        out = DataStats(
            read=self.read + other.read,
            blank=self.blank + other.blank,
            truncated=self.truncated + other.truncated,
            dropped=self.dropped + other.dropped,
            files=self.files + other.files,
            skipped_files=self.skipped_files + other.skipped_files,
        )
        for stats in (self, other):
            for reason, locs in stats.examples.items():
                where = out.examples.setdefault(reason, [])
                where.extend(locs[: MAX_EXAMPLES - len(where)])
        return out

    def to_dict(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "blank": self.blank,
            "dropped": dict(self.dropped.most_common()),
            "truncated": self.truncated,
            "examples": self.examples,
            "files": self.files,
            "skipped_files": self.skipped_files,
        }

    @classmethod
    def from_dict(cls, data: dict) -> DataStats:
        """The counts `to_dict` wrote (`kept` is derived again)."""
        stats = cls(read=data["read"], blank=data["blank"], truncated=data["truncated"], files=list(data["files"]),
                    skipped_files=list(data["skipped_files"]))
        stats.dropped.update(data["dropped"])
        stats.examples = {reason: list(locs) for reason, locs in data["examples"].items()}
        return stats

    def summary(self) -> str:
        """One line for logs: the counts and the drop reasons."""
        reasons = ", ".join(f"{r}: {n}" for r, n in self.dropped.most_common())
        text = f"read {self.read}, kept {self.kept}, dropped {sum(self.dropped.values())}"
        text += f" ({reasons})" if reasons else ""
        text += f", blank lines {self.blank}" if self.blank else ""
        text += f", truncated {self.truncated}" if self.truncated else ""
        return text + (f", skipped files {len(self.skipped_files)}" if self.skipped_files else "")

    def write(self, folder: str | Path) -> Path:
        """Write `folder/data_stats.json` for this read alone."""
        return write_stats(folder, self)


def has_reasoning(record: dict) -> bool:
    """Whether an sft record has an assistant turn with reasoning (what `data check` counts)."""
    return any(m.get("reasoning") for m in record.get("messages", ()))


def write_stats(folder: str | Path, stats: DataStats | Mapping[str, DataStats]) -> Path:
    """Write `folder/data_stats.json`: one read's counts, or several named reads together
    (`{"train": ..., "eval": ...}` -> `{"train": {...}, "eval": {...}}`), atomically."""
    payload = stats.to_dict() if isinstance(stats, DataStats) else {k: s.to_dict() for k, s in stats.items()}
    path = Path(folder) / STATS_FILE
    write_json(path, payload)
    return path
