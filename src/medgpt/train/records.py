"""Readers for the record kinds only some stages take, built on the data layer's file handling and
validation (same sources, `path:line` errors and counted drops as `read_records`):

- `unpaired` (KTO): `{"prompt": [... user], "completion": [assistant turns], "label": bool}`. A preference
  pair in any format `read_records` takes gives two rows (chosen: True, rejected: False); rows that already
  hold `prompt`, `completion` and `label` are read as they are.
- `prompts` (GRPO): `{"prompt": [... user], "answer": "B" | None, "options": "ABCD" | None,
  "reference": str | None}` from C-Eval-form
  multiple-choice rows (`question`, option columns `A`..`D`, `answer`: the prompt lists the options and asks
  for the letter), SFT conversations (the last assistant turn is the reference answer), `{"question",
  "answer"}` rows (the answer is the reference) and prompt-only rows (`{"query"}` or `{"prompt"}`).
- `scored` (`medgpt score`): `{"prompt", "response"}` pairs (also `question`/`query` and `answer`/`completion`)
  or preference pairs, whose chosen and rejected responses are both scored.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from medgpt.data import readers
from medgpt.data.readers import DataStats, RecordError
from medgpt.errors import UserError

log = logging.getLogger(__name__)

OPTION_LETTERS = "ABCDEFGH"
_CJK = re.compile(r"[\u3400-\u9fff]")
MCQ_INSTRUCTION = {"zh": "请直接给出正确选项的字母。", "en": "Answer with the letter of the correct option."}
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")

Normalizer = Callable[[Any], list[dict]]


def read_with(normalize: Normalizer) -> Callable[..., tuple[list[dict], DataStats]]:
    """A reader with `read_records`' signature whose records come from `normalize(raw row) -> records`."""

    def read(source: str | list[str], kind: str, on_error: str = "fail", subset: str | None = None,
             split: str = "train", max_samples: int | None = None) -> tuple[list[dict], DataStats]:
        stats, records = DataStats(), []
        for item in readers._expand(source, "sft", stats):
            if max_samples is not None and len(records) >= max_samples:
                break
            stats.files.append(str(item))
            for loc, raw in readers._rows(item, subset, split):
                if raw is None:
                    stats.blank += 1
                    continue
                stats.read += 1
                try:
                    if isinstance(raw, RecordError):
                        raise raw
                    rows = normalize(raw)
                except RecordError as exc:
                    if on_error == "fail":
                        raise UserError(f"{loc}: {exc}") from None
                    stats.drop(exc.reason, loc)
                    continue
                records += [{**row, "_loc": loc} for row in rows]
                if max_samples is not None and len(records) >= max_samples:
                    break
        log.log(logging.WARNING if stats.dropped else logging.INFO, "%s (%s): %s", source, kind, stats.summary())
        return records, stats

    return read


def _prompt(obj: dict, key: str) -> list[dict]:
    """A prompt field (a string or messages ending with a user turn), with the row's `system` if any."""
    prompt = readers._with_system(obj, readers._turns(obj, key, "user"))
    readers._check_order(prompt, key, last="user")
    return prompt


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, str)) and str(value).strip().lower() in _TRUE + _FALSE:
        return str(value).strip().lower() in _TRUE
    raise RecordError("wrong type", f'"label" is {value!r}, expected true or false')


def to_unpaired(raw: Any) -> list[dict]:
    """One unpaired row as it is, or a preference pair as a desirable and an undesirable row."""
    obj = readers._object(raw)
    if "label" not in obj:
        pair = readers._to_pref(obj)
        return [{"prompt": pair["prompt"], "completion": pair[key], "label": key == "chosen"}
                for key in ("chosen", "rejected")]
    completion = readers._turns(obj, "completion", "assistant")
    readers._check_order(completion, "completion", first="assistant", last="assistant", system=False)
    return [{"prompt": _prompt(obj, "prompt"), "completion": completion, "label": _label(obj["label"])}]


def mcq_prompt(question: str, options: dict[str, str]) -> str:
    """The question, its lettered options and an instruction to answer with the letter (in the question's language)."""
    lines = [question.strip(), *(f"{letter}. {text.strip()}" for letter, text in options.items())]
    return "\n".join([*lines, MCQ_INSTRUCTION["zh" if _CJK.search(question) else "en"]])


def _options(obj: dict) -> dict[str, str]:
    return {k: str(obj[k]) for k in OPTION_LETTERS if isinstance(obj.get(k), (str, int, float)) and str(obj[k]).strip()}


def to_prompt(raw: Any) -> list[dict]:
    """A GRPO prompt with its multiple-choice answer letter or reference answer, when the row has one."""
    obj = readers._object(raw)
    options = _options(obj)
    if "question" in obj and len(options) >= 2:
        answer = str(obj.get("answer") or "").strip().upper()
        if answer not in options:
            raise RecordError("wrong type", f'"answer" is {obj.get("answer")!r}, expected one of {", ".join(options)}')
        question = readers._text(obj, "question", "user")["content"]
        return [{"prompt": [{"role": "user", "content": mcq_prompt(question, options)}], "answer": answer,
                 "options": "".join(options), "reference": None}]
    if obj.keys() & {"conversations", "messages", "instruction"}:
        messages = readers._to_sft(obj)["messages"]
        return [{"prompt": messages[:-1], "answer": None, "options": None, "reference": messages[-1]["content"]}]
    key = next((k for k in ("question", "query", "prompt") if k in obj), None)
    if key is None:
        raise RecordError("missing field", '"question" with options A-D, "conversations"/"messages", "query" or "prompt"')
    reference = obj.get("answer") if key == "question" else None
    return [{"prompt": _prompt(obj, key), "answer": None, "options": None,
             "reference": reference if isinstance(reference, str) and reference.strip() else None}]


def to_scored(raw: Any) -> list[dict]:
    """A (prompt, response) pair to score, or a preference pair whose two responses are both scored."""
    obj = readers._object(raw)
    if obj.keys() & {"chosen", "rejected", "response_chosen", "response_rejected"}:
        return [readers._to_pref(obj)]
    prompt_key = next((k for k in ("prompt", "question", "query") if k in obj), None)
    response_key = next((k for k in ("response", "answer", "completion") if k in obj), None)
    if prompt_key is None or response_key is None:
        raise RecordError("missing field", '"prompt" and "response" (or "chosen" and "rejected")')
    response = readers._turns(obj, response_key, "assistant")
    readers._check_order(response, response_key, first="assistant", last="assistant", system=False)
    return [{"prompt": _prompt(obj, prompt_key), "response": response}]


read_unpaired = read_with(to_unpaired)
read_prompts = read_with(to_prompt)
read_scored = read_with(to_scored)
