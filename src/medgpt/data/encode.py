"""Records -> what a trainer takes, measured in tokens: every stage drops (and counts) or keeps for
truncation the records longer than max_length by the same rule, `filter_by_length`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from medgpt.data.messages import with_system, without_reasoning
from medgpt.data.readers import OVERLONG
from medgpt.data.rows import check_choice
from medgpt.data.stats import DataStats

if TYPE_CHECKING:
    from medgpt.config import Config

logger = logging.getLogger(__name__)


def filter_by_length(rows: list[dict], lengths: list[int], max_length: int, overlong: str,
                     stats: DataStats) -> list[int]:
    """Indices of `rows` to keep given their token `lengths`. "drop" counts each overlong row as a drop
    ("longer than max_length"); "truncate" keeps it (the trainer cuts it) and counts it in
    `stats.truncated`, which is not a drop."""
    check_choice("overlong", overlong, OVERLONG)
    if len(rows) != len(lengths):
        raise ValueError(f"{len(rows)} rows but {len(lengths)} lengths")
    keep = []
    for index, (row, length) in enumerate(zip(rows, lengths)):
        if length > max_length and overlong == "drop":
            stats.drop("longer than max_length", row.get("_loc", f"#{index}"))
            continue
        stats.truncated += int(length > max_length)
        keep.append(index)
    if len(keep) < len(rows) or stats.truncated:
        logger.info("max_length %d: %s", max_length, stats.summary())
    return keep


def encode_conversations(records: list[dict], tokenizer, template, cfg: Config, stats: DataStats) -> list[dict]:
    """Messages -> input_ids/labels with labels on assistant turns; overlong records dropped or truncated.
    `enable_thinking: false` trains without the records' reasoning (each reply as the template writes one without),
    `train_on_reasoning: false` leaves the reasoning unlabelled."""
    drop = cfg.data.enable_thinking is False
    encoded = [template.encode(tokenizer, without_reasoning(r["messages"]) if drop else r["messages"],
                               system=cfg.data.system, train_on_all=cfg.data.train_on_all, tools=r.get("tools"),
                               enable_thinking=cfg.data.enable_thinking,
                               train_on_reasoning=cfg.data.train_on_reasoning) for r in records]
    max_length = cfg.train.max_length or 10**9
    keep = filter_by_length(records, [len(e["input_ids"]) for e in encoded], max_length, cfg.data.overlong, stats)
    rows = []
    for i in keep:
        ids, labels = encoded[i]["input_ids"][:max_length], encoded[i]["labels"][:max_length]
        if any(label != -100 for label in labels):
            rows.append({"input_ids": ids, "labels": labels})
        else:
            stats.drop("no assistant tokens after truncation", records[i].get("_loc", "?"))
    return rows


def to_rows(records: list[dict], tokenizer, template, cfg: Config, stats: DataStats, responses: tuple[str, ...],
            carry: tuple[str, ...] = ()) -> list[dict]:
    """Records -> TRL conversational rows (prompt with the system prompt, the `responses` fields and the
    `carry` fields). `enable_thinking` goes on every row with responses as TRL's `chat_template_kwargs`, which
    its preference trainers render with (false also drops the responses' reasoning, as SFT does; GRPO takes it
    from its config). A row whose longest prompt+response, rendered as the trainer renders that row, is over
    max_length tokens is dropped (counted) or left to the trainer to truncate, as `overlong` says."""
    think = cfg.data.enable_thinking
    settings = {} if think is None or not responses else {"chat_template_kwargs": {"enable_thinking": think}}
    rows = [{"prompt": with_system(r["prompt"], cfg.data.system),
             **{key: without_reasoning(r[key]) if think is False else r[key] for key in responses},
             **{key: r[key] for key in carry}, **settings} for r in records]
    if not (max_length := getattr(cfg.train, "max_length", None)) or not responses:
        return rows
    lengths = [max(len(template.encode(tokenizer, row["prompt"] + row[key], enable_thinking=think)["input_ids"])
                   for key in responses) for row in rows]
    return [rows[i] for i in filter_by_length(records, lengths, max_length, cfg.data.overlong, stats)]
