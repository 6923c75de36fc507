"""Side-by-side tables of result files (eval mcq / gen / ppl / any JSON of numbers), with deltas to the first.

Where both files hold per-item results of the same items (`eval mcq`, `eval gen`, `eval ppl` write them
to `NAME.items.jsonl`), each delta comes with its 95% paired-bootstrap interval, "not significant" where
that interval crosses 0, and McNemar's exact p for accuracy (`medgpt.eval.stats`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medgpt.errors import UserError
from medgpt.eval import stats


def flatten(data: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves as "a/b/c" keys (booleans and per-item lists are left out)."""
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            if key != "items":
                out.update(flatten(value, f"{prefix}{key}/"))
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        out[prefix.rstrip("/")] = float(data)
    return out


def load_metrics(path: str | Path) -> tuple[str, dict[str, float]]:
    """(label, metrics) of one result file: its `metrics` block when it has one, else every number in it."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a JSON result file ({exc})") from None
    metrics = flatten(data["metrics"] if isinstance(data, dict) and isinstance(data.get("metrics"), dict) else data)
    if not metrics:
        raise UserError(f"{path}: no numbers to compare")
    return path.stem, metrics


def load_items(path: str | Path) -> list[dict] | None:
    """The per-item results of a result file: its `items`, else its `items_file` beside it; None if neither."""
    path = Path(path).expanduser()
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("items"), list):
        return data["items"]
    if isinstance(data.get("items_file"), str) and (path.parent / data["items_file"]).is_file():
        from medgpt.data.readers import as_object, read_records

        rows, _ = read_records(str(path.parent / data["items_file"]), "items", normalize=as_object)
        return rows
    return None


def compare(paths: list[str | Path], labels: list[str] | None = None) -> dict:
    """Rows of metric values per file and the delta of each file to the first, with the delta's paired
    95% interval where both files hold items."""
    if len(paths) < 1:
        raise UserError("give at least one result file")
    loaded = [load_metrics(p) for p in paths]
    items = [load_items(p) for p in paths]
    names = list(labels or [label for label, _ in loaded])
    if len(names) != len(loaded):
        raise UserError(f"{len(names)} labels for {len(loaded)} files")
    for i, name in enumerate(names):  # two files named result.json in different folders
        if names.count(name) > 1:
            names[i] = f"{name}#{i + 1}"
    keys: list[str] = []
    for _, metrics in loaded:
        keys += [k for k in metrics if k not in keys]
    rows = []
    for key in keys:
        values = [m.get(key) for _, m in loaded]
        base = values[0]
        deltas = [None if v is None or base is None else v - base for v in values[1:]]
        tests = [stats.paired(key, items[0], other) if d is not None and items[0] and other else None
                 for d, other in zip(deltas, items[1:])]
        rows.append({"metric": key, "values": values, "deltas": deltas, "tests": tests})
    return {"columns": names, "rows": rows}


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _delta(delta: float | None, test: dict | None) -> str:
    text = _fmt(delta, signed=True)
    if delta is None or not test:
        return text
    lo, hi = test["ci95"]
    text += f" [{lo:+.2f}, {hi:+.2f}]" + ("" if test["significant"] else " not significant")
    return text + (f", McNemar p={test['p_mcnemar']:.3g}" if "p_mcnemar" in test else "")


def _cells(table: dict) -> tuple[list[str], list[list[str]]]:
    names = table["columns"]
    head = ["metric", *names, *[f"Δ {n}" for n in names[1:]]]
    body = [[r["metric"], *[_fmt(v) for v in r["values"]],
             *[_delta(d, t) for d, t in zip(r["deltas"], r.get("tests") or [None] * len(r["deltas"]))]]
            for r in table["rows"]]
    return head, body


def markdown_table(table: dict) -> str:
    head, body = _cells(table)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def to_text(table: dict) -> str:
    head, body = _cells(table)
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)]) + "\n"
