"""Records -> what a trainer takes, measured in tokens: every stage drops (and counts) or keeps for
truncation the records longer than max_length by the same rule (`count_encoded`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from medgpt.data.messages import with_system, without_reasoning
from medgpt.data.readers import OVERLONG
from medgpt.data.rows import check_choice
from medgpt.data.stats import DataStats
from medgpt.data.templates import encode_segments_batch

if TYPE_CHECKING:
    from medgpt.config import Config, DataArgs

logger = logging.getLogger(__name__)


LONGER = "longer than max_length"
NO_LABELS = "no assistant tokens after truncation"


def encode_conversation_batch(records: list[dict], tokenizer, template, data: DataArgs,
                              max_length: int | None) -> list[dict]:
    """Conversation records -> one {"input_ids", "labels", "length", "drop"} each, their texts tokenized in one
    call: labels on the assistant turns, `length` the untruncated token count, `drop` the reason a record is not
    trained on (None: kept; over max_length with `overlong: drop`, or no labelled token left after truncation).
    `enable_thinking: false` trains without the records' reasoning (each reply as the template writes one without),
    `train_on_reasoning: false` leaves the reasoning unlabelled."""
    segments = [template.segments(without_reasoning(r["messages"]) if data.enable_thinking is False else r["messages"],
                                  data.system, tools=r.get("tools"), enable_thinking=data.enable_thinking,
                                  train_on_reasoning=data.train_on_reasoning) for r in records]
    out, limit = [], max_length or 10**9
    for encoded in encode_segments_batch(tokenizer, segments, data.train_on_all):
        length = len(encoded["input_ids"])
        if length > limit and data.overlong == "drop":
            out.append({"input_ids": [], "labels": [], "length": length, "drop": LONGER})
            continue
        ids, labels = encoded["input_ids"][:limit], encoded["labels"][:limit]
        drop = None if any(label != -100 for label in labels) else NO_LABELS
        out.append({"input_ids": ids, "labels": labels, "length": length, "drop": drop})
    return out


def count_encoded(stats: DataStats, encoded: dict, loc: str, max_length: int | None) -> bool:
    """Count one `encode_conversation_batch` result in `stats` (a drop with its location, or a truncation); True
    when it is trained on."""
    if encoded["drop"] != LONGER:
        stats.truncated += int(encoded["length"] > (max_length or 10**9))
    if encoded["drop"]:
        stats.drop(encoded["drop"], loc)
    return not encoded["drop"]


def encode_conversations(records: list[dict], tokenizer, template, cfg: Config, stats: DataStats) -> list[dict]:
    """Messages -> input_ids/labels rows (`encode_conversation_batch`), the dropped and truncated ones counted."""
    check_choice("overlong", cfg.data.overlong, OVERLONG)
    rows = []
    encoded_all = encode_conversation_batch(records, tokenizer, template, cfg.data, cfg.train.max_length)
    for record, encoded in zip(records, encoded_all):
        if count_encoded(stats, encoded, record.get("_loc", "?"), cfg.train.max_length):
            rows.append({"input_ids": encoded["input_ids"], "labels": encoded["labels"]})
    if stats.dropped or stats.truncated:
        logger.info("max_length %s: %s", cfg.train.max_length, stats.summary())
    return rows


def conversation_rows(records: list[dict], tokenizer, template, data: DataArgs, responses: tuple[str, ...],
                      carry: tuple[str, ...] = (), max_length: int | None = None,
                      prompt_ids: bool = False) -> list[dict]:
    """Records -> TRL conversational rows, one {"row", "length", "drop"} each.

    A row is the prompt with the system prompt, the `responses` fields and the `carry` fields; with responses,
    also the record's `tools` (None without) and `enable_thinking` as TRL's per-row `chat_template_kwargs`, which
    its preference trainers render with (false also drops the responses' reasoning, as SFT does; GRPO takes it
    from its config). `length` is the token count of the longest prompt+response rendered as the trainer renders
    that row, or with `prompt_ids` that of the prompt rendered for generation (its ids, the end kept when they are
    over `max_length`, go in the row's "ids"); None when nothing is measured. `drop` is LONGER for a row over
    `max_length` with `overlong: drop` (a longer row is otherwise left to the trainer to truncate)."""
    think = data.enable_thinking
    settings = {} if think is None or not responses else {"chat_template_kwargs": {"enable_thinking": think}}
    out = []
    for r in records:
        row = {"prompt": with_system(r["prompt"], data.system),
               **{key: without_reasoning(r[key]) if think is False else r[key] for key in responses},
               **({"tools": r.get("tools")} if responses else {}), **{key: r[key] for key in carry}, **settings}
        length = None
        if prompt_ids:
            ids = template.encode_prompt(tokenizer, row["prompt"], enable_thinking=think)
            length, row["ids"] = len(ids), ids[-max_length:] if max_length else ids
        elif responses and max_length:
            length = max(len(template.encode(tokenizer, row["prompt"] + row[key], tools=row["tools"],
                                             enable_thinking=think)["input_ids"]) for key in responses)
        too_long = length is not None and max_length is not None and length > max_length
        out.append({"row": row, "length": length, "drop": LONGER if too_long and data.overlong == "drop" else None})
    return out
