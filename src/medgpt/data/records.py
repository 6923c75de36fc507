"""The record kinds only some stages take, read by `read_records` with their own normalizers (same sources,
`path:line` errors and counted drops as the pt, sft and pref kinds):

- `unpaired` (KTO): `{"prompt": [... user], "completion": [assistant turns], "label": bool}`. A preference
  pair in any format `read_records` takes gives two rows (chosen: True, rejected: False); rows that already
  hold `prompt`, `completion` and `label` are read as they are.
- `prompts` (GRPO): `{"prompt": [... user], "answer": "B" | None, "options": "ABCD" | None,
  "reference": str | None, "rubrics": JSON text | None}` from C-Eval-form
  multiple-choice rows (`question`, option columns `A`..`D`, `answer`: the prompt lists the options and asks
  for the letter), SFT conversations (the last assistant turn is the reference answer), `{"question",
  "answer"}` rows (the answer is the reference) and prompt-only rows (`{"query"}` or `{"prompt"}`).
- `mcq` (`medgpt data check`): C-Eval/CMMLU-form multiple-choice rows (`question`, options `A`-`D`, `answer`,
  any case), kept as they are once checked by the rule `eval mcq` reads them with.
- `scored` (`medgpt score`): `{"prompt", "response"}` pairs (also `question`/`query` and `answer`/`completion`)
  or preference pairs, whose chosen and rejected responses are both scored.
"""

from __future__ import annotations

import json
import re
from typing import Any

from medgpt.data.readers import as_object, check_order, read_records, text_message, to_pref, to_sft, turns, with_system
from medgpt.data.rows import RecordError
from medgpt.data.stats import DataStats

OPTION_LETTERS = "ABCD"  # the option columns of a multiple-choice row: what `eval mcq` scores (C-Eval/CMMLU form)
_CJK = re.compile(r"[\u3400-\u9fff]")
MCQ_INSTRUCTION = {"zh": "请直接给出正确选项的字母。", "en": "Answer with the letter of the correct option."}
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _prompt(obj: dict, key: str) -> list[dict]:
    """A prompt field (a string or messages ending with a user turn), with the row's `system` if any."""
    prompt = with_system(obj, turns(obj, key, "user"))
    check_order(prompt, key, last="user")
    return prompt


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, str)) and str(value).strip().lower() in _TRUE + _FALSE:
        return str(value).strip().lower() in _TRUE
    raise RecordError("wrong type", f'"label" is {value!r}, expected true or false')


def to_unpaired(raw: Any) -> list[dict]:
    """One unpaired row as it is, or a preference pair as a desirable and an undesirable row."""
    obj = as_object(raw)
    if "label" not in obj:
        pair = to_pref(obj)
        return [{"prompt": pair["prompt"], "completion": pair[key], "label": key == "chosen"}
                for key in ("chosen", "rejected")]
    completion = turns(obj, "completion", "assistant")
    check_order(completion, "completion", first="assistant", last="assistant", system=False)
    return [{"prompt": _prompt(obj, "prompt"), "completion": completion, "label": _label(obj["label"])}]


def mcq_prompt(question: str, options: dict[str, str]) -> str:
    """The question, its lettered options and an instruction to answer with the letter (in the question's language)."""
    lines = [question.strip(), *(f"{letter}. {text.strip()}" for letter, text in options.items())]
    return "\n".join([*lines, MCQ_INSTRUCTION["zh" if _CJK.search(question) else "en"]])


def _filled(value: Any) -> str:
    return str(value).strip() if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""


def mcq_options(obj: dict) -> dict[str, str]:
    """The filled option cells of a multiple-choice row by letter (column `A` or `a`, up to `D`): the one rule of
    the GRPO reader and `eval mcq`. A filled option column past D (`E`, ...) is an error, not an option silently
    left out of the prompt."""
    extra = sorted(k for k in obj if isinstance(k, str) and len(k) == 1 and k.isascii() and k.isalpha()
                   and k.upper() not in OPTION_LETTERS and _filled(obj[k]))
    if extra:
        raise RecordError("too many options", f"option column(s) {', '.join(extra)}: multiple-choice rows have "
                          f"options {', '.join(OPTION_LETTERS)} only")
    cells = {letter: next((_filled(obj[k]) for k in (letter, letter.lower()) if _filled(obj.get(k))), "")
             for letter in OPTION_LETTERS}
    return {letter: text for letter, text in cells.items() if text}


def to_mcq(raw: Any) -> list[dict]:
    """A multiple-choice row as it is, checked: a question, options A-D and an answer among them."""
    obj = as_object(raw)
    options = mcq_options(obj)
    cells = {key.lower(): value for key, value in obj.items() if isinstance(key, str)}
    missing = [name for name in ("question", *OPTION_LETTERS, "answer")
               if not (options.get(name) if name in OPTION_LETTERS else _filled(cells.get(name)))]
    if missing:
        raise RecordError("missing field", f"{', '.join(missing)} (a multiple-choice row has question, "
                          f"{', '.join(OPTION_LETTERS)} and answer)")
    if _filled(cells["answer"]).upper() not in OPTION_LETTERS:
        raise RecordError("wrong type", f'"answer" is {cells["answer"]!r}, expected one of {", ".join(OPTION_LETTERS)}')
    return [obj]


def to_prompt(raw: Any) -> list[dict]:
    """A GRPO prompt with its multiple-choice answer letter or reference answer, when the row has one, and its
    HealthBench-style `rubrics` ([{criterion, points, tags}], kept as JSON text for the judge reward) or None."""
    obj = as_object(raw)
    rubrics = obj.get("rubrics")
    if rubrics is not None and not (isinstance(rubrics, list) and all(isinstance(r, dict) for r in rubrics)):
        raise RecordError("wrong type", f'"rubrics" is {rubrics!r:.80}, expected a list of {{criterion, points, tags}}')
    rubrics = json.dumps(rubrics, ensure_ascii=False) if rubrics else None
    return [{**row, "rubrics": rubrics} for row in _prompt_rows(obj)]


def _prompt_rows(obj: dict) -> list[dict]:
    options = mcq_options(obj)
    if "question" in obj and len(options) >= 2:
        answer = str(obj.get("answer") or "").strip().upper()
        if answer not in options:
            raise RecordError("wrong type", f'"answer" is {obj.get("answer")!r}, expected one of {", ".join(options)}')
        question = text_message(obj, "question", "user")["content"]
        return [{"prompt": [{"role": "user", "content": mcq_prompt(question, options)}], "answer": answer,
                 "options": "".join(options), "reference": None}]
    if obj.keys() & {"conversations", "messages", "instruction"}:
        messages = to_sft(obj)["messages"]
        return [{"prompt": messages[:-1], "answer": None, "options": None, "reference": messages[-1]["content"]}]
    key = next((k for k in ("question", "query", "prompt") if k in obj), None)
    if key is None:
        raise RecordError("missing field",
                          '"question" with options A-D, "conversations"/"messages", "query" or "prompt"')
    reference = obj.get("answer") if key == "question" else None
    return [{"prompt": _prompt(obj, key), "answer": None, "options": None,
             "reference": reference if isinstance(reference, str) and reference.strip() else None}]


def to_scored(raw: Any) -> list[dict]:
    """A (prompt, response) pair to score, or a preference pair whose two responses are both scored."""
    obj = as_object(raw)
    if obj.keys() & {"chosen", "rejected", "response_chosen", "response_rejected"}:
        return [to_pref(obj)]
    prompt_key = next((k for k in ("prompt", "question", "query") if k in obj), None)
    response_key = next((k for k in ("response", "answer", "completion") if k in obj), None)
    if prompt_key is None or response_key is None:
        raise RecordError("missing field", '"prompt" and "response" (or "chosen" and "rejected")')
    response = turns(obj, response_key, "assistant")
    check_order(response, response_key, first="assistant", last="assistant", system=False)
    return [{"prompt": _prompt(obj, prompt_key), "response": response}]


def read_unpaired(source: str | list[str], kind: str = "unpaired", **options: Any) -> tuple[list[dict], DataStats]:
    """`unpaired` records (KTO); `options` are `read_records`' (on_error, subset, split, max_samples)."""
    return read_records(source, kind, normalize=to_unpaired, **options)


def read_prompts(source: str | list[str], kind: str = "prompts", **options: Any) -> tuple[list[dict], DataStats]:
    """`prompts` records (GRPO, PPO, the report's prompts); `options` are `read_records`'."""
    return read_records(source, kind, normalize=to_prompt, **options)


def read_mcq(source: str | list[str], kind: str = "mcq", **options: Any) -> tuple[list[dict], DataStats]:
    """`mcq` records (`medgpt data check`); `options` are `read_records`'."""
    return read_records(source, kind, normalize=to_mcq, **options)


def read_scored(source: str | list[str], kind: str = "scored", **options: Any) -> tuple[list[dict], DataStats]:
    """`scored` records (`medgpt score`); `options` are `read_records`'."""
    return read_records(source, kind, normalize=to_scored, **options)
