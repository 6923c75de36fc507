"""Read every supported input format into one canonical record per kind, validated and counted.

Canonical records are TRL's conversational forms, so nothing downstream knows the source format:

- `pt`:   `{"text": str}`
- `sft`:  `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...], "tools": [...]}`
- `pref`: `{"prompt": [... ending with a user turn], "chosen": [assistant turns], "rejected": [...], "tools": [...]}`

Tool calling (function calling) uses OpenAI's shapes, with the arguments parsed: `tools` (only when the row
declares some) is `[{"type": "function", "function": {"name", "description", "parameters"}}]`; an assistant turn
that calls tools has `"tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}}]` (its
`content` may be ""); each call is answered by a `{"role": "tool", "content": str, "name": str}` turn (`name`
when it is known: given, found through `tool_call_id`, or the only call of the turn it answers). ShareGPT's
`function_call` / `observation` turns with a `tools` string (LLaMA-Factory's format), OpenAI's `tool_calls` and
`role: "tool"` (and the older `function_call` / `role: "function"`), and OpenAI content given as a list of text
parts (joined as they are, as chat templates render them) all read into these.

Reasoning (a reasoning model's thinking before its reply) is an assistant message's `reasoning` (non-empty, else
absent), read from OpenAI-style `reasoning_content` (or `reasoning`) on the message (or on an Alpaca row), from a
`<think>...</think>` block opening the reply (ShareGPT, OpenAI, Alpaca), and from separate-field layouts:
HuatuoGPT-o1's `{"Question", "Complex_CoT", "Response"}` (`REASONING_LAYOUTS`). The answer is then the text after
`</think>`. Two forms on one message that differ are an error ("conflicting fields"), and so is a think block
that is not one `<think>...</think>` at the start of the reply ("invalid think block").

Each record also carries `"_loc": "path:N"` so later steps (token-length filtering, error messages)
can point at the source; callers strip it. N is the physical line for .txt/.jsonl/.csv (blank lines
count), the element index for a JSON array, the row index for parquet and hub data sets.

Callers with record kinds of their own read through the same loop: `read_records(..., normalize=fn)`.
The public helpers (`as_object`, `message_list`, `turns`, `check_order`, `with_system`, `query_messages`,
`to_sft`, `to_pref`) are the validation rules a normalizer builds on; `medgpt.data.rows` gives the raw rows of
every source, `medgpt.data.convert` writes canonical records back out in the exchange formats.

A record that cannot be used either stops the read with `UserError("path:N: reason: detail")`
(`on_error="fail"`) or is dropped and counted under its reason (`on_error="skip"`); reasons are the
short stable strings in `REASONS`. A file that cannot be read at all is always an error. Files in a
folder with an extension this kind cannot read are not ignored silently: they are logged as a warning
and listed in `DataStats.skipped_files`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from medgpt.data.messages import split_think
from medgpt.data.rows import RecordError, check_choice, expand, item_rows, iter_rows
from medgpt.data.stats import DataStats
from medgpt.errors import UserError

logger = logging.getLogger(__name__)

KINDS = ("pt", "sft", "pref")
ON_ERROR = ("fail", "skip")
OVERLONG = ("drop", "truncate")
REASONS = (
    "invalid JSON", "not an object", "missing field", "wrong type", "empty conversation", "empty message",
    "unknown role", "roles out of order", "identical chosen and rejected", "not UTF-8", "empty text",
    "invalid CSV", "longer than max_length", "conflicting fields", "too many options", "invalid think block",
)
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool"}
# separate-field reasoning layouts: reasoning field -> (question field, answer field)
REASONING_LAYOUTS = {"Complex_CoT": ("Question", "Response")}


def _type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---- raw objects -> canonical records ----------------------------------------------------------


def as_object(raw: Any) -> dict:
    """`raw` when it is a JSON object; every record format is one."""
    if not isinstance(raw, dict):
        raise RecordError("not an object", f"got {_type(raw)}")
    return raw


def _field(obj: dict, key: str, kind: type | tuple[type, ...] = str) -> Any:
    value = obj.get(key)
    if value is None:
        raise RecordError("missing field", f'"{key}"')
    if not isinstance(value, kind):
        raise RecordError("wrong type", f'"{key}" is {_type(value)}')
    return value


def text_message(obj: dict, key: str, role: str) -> dict:
    """A required non-empty string field as one message."""
    content = _field(obj, key)
    if not content.strip():
        raise RecordError("empty message", f'"{key}"')
    return {"role": role, "content": content}


def _reasoning(obj: dict, text: str, where: str) -> tuple[str | None, str]:
    """An assistant reply's reasoning (None: none) and its answer: from the `reasoning_content` / `reasoning`
    field of `obj` and from a `<think>...</think>` block opening `text`; two that differ are an error."""
    given = _one_of(obj, ("reasoning_content", "reasoning"), where)
    if given is not None and not isinstance(given, str):
        raise RecordError("wrong type", f'{where} "reasoning_content" is {_type(given)}')
    inline = None
    if "<think>" in text or "</think>" in text:
        parsed = split_think(text)
        if parsed is None or not text.lstrip().startswith("<think>") or text.count("<think>") != 1 \
                or text.count("</think>") != 1:
            raise RecordError("invalid think block", f"{where}: reasoning is one <think>...</think> block that opens "
                                                     f"the reply, got {text!r:.60}")
        inline, text = parsed
    if given is not None and inline is not None and given.strip("\n") != inline.strip("\n"):
        raise RecordError("conflicting fields", f'{where} has "reasoning_content" {given!r:.60} and a different '
                                                f"<think> block {inline!r:.60}; keep one")
    reasoning = given if given is not None else inline
    return (reasoning if reasoning and reasoning.strip() else None), text


def assistant_reply(obj: dict, text: str, where: str) -> dict:
    """An assistant message from a reply text, with its reasoning (`_reasoning`) where it has some."""
    reasoning, text = _reasoning(obj, text, where)
    if not text.strip():
        raise RecordError("empty message", f"{where} has reasoning but no answer")
    return {"role": "assistant", "content": text, **({"reasoning": reasoning} if reasoning else {})}


def _system(obj: dict) -> list[dict]:
    """The optional `system` field; empty means none (the seed format writes `"system": ""`)."""
    system = obj.get("system") or ""
    if not isinstance(system, str):
        raise RecordError("wrong type", f'"system" is {_type(system)}')
    return [{"role": "system", "content": system}] if system.strip() else []


def _history(obj: dict) -> list[dict]:
    """Earlier turns as `[user, assistant]` pairs (Alpaca / MedicalGPT convention)."""
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise RecordError("wrong type", f'"history" is {_type(history)}, expected a list of [user, assistant] pairs')
    messages: list[dict] = []
    for index, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise RecordError("wrong type", f'"history[{index}]" is not a [user, assistant] pair of strings')
        if not all(t.strip() for t in pair):
            raise RecordError("empty message", f'"history[{index}]"')
        messages += [{"role": "user", "content": pair[0]},
                     assistant_reply({}, pair[1], f'"history[{index}]" reply')]
    return messages


def with_system(obj: dict, messages: list[dict]) -> list[dict]:
    """Prepend the top-level `system` field unless the messages start with their own system turn."""
    return messages if messages and messages[0]["role"] == "system" else _system(obj) + messages


def _one_of(turn: dict, keys: tuple[str, str], where: str, same: Callable[[Any], Any] = lambda v: v) -> Any:
    """The value of whichever of two synonymous fields is set; both set to different values is an error."""
    values = [(k, turn[k]) for k in keys if turn.get(k) is not None]
    if len(values) == 2 and same(values[0][1]) != same(values[1][1]):
        raise RecordError("conflicting fields", f'{where} has "{values[0][0]}" {values[0][1]!r:.60} and '
                                                f'"{values[1][0]}" {values[1][1]!r:.60}; keep one')
    return values[0][1] if values else None


def _role_name(value: Any) -> Any:
    return ROLES.get(value.lower(), value) if isinstance(value, str) else value


def _text(content: Any, where: str) -> str:
    """Message content: a string, or OpenAI's list of text parts (joined as they are, as chat templates do)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RecordError("wrong type", f"{where} content is {_type(content)}")
    texts = []
    for index, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else _type(part)
            raise RecordError("wrong type", f"{where} content[{index}] is {kind!r:.40}, expected a "
                                            '{"type": "text", "text": ...} part (only text can be read)')
        texts.append(part["text"])
    return "".join(texts)


def _json(value: Any, where: str) -> Any:
    """A field that may hold JSON text (OpenAI's `arguments`, ShareGPT's `tools` and `function_call` values)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise RecordError("invalid JSON", f"{where}: {exc.msg} at column {exc.colno}") from None


def _call(call: Any, where: str) -> tuple[dict, str | None]:
    """One tool call (OpenAI's `{"type": "function", "function": {...}}` or a bare `{"name", "arguments"}`) in the
    canonical form with parsed arguments, and its `id` if it has one."""
    if not isinstance(call, dict):
        raise RecordError("wrong type", f"{where} is {_type(call)}, expected a tool call object")
    if call.get("type") not in (None, "function"):
        raise RecordError("wrong type", f'{where} is a {call["type"]!r:.40} call; only function calls can be read')
    function = call.get("function", call)
    if not isinstance(function, dict):
        raise RecordError("wrong type", f'{where} "function" is {_type(function)}')
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RecordError("missing field", f'{where} needs the function\'s "name"')
    arguments = function.get("arguments")
    arguments = {} if arguments is None or arguments == "" else _json(arguments, f"{where} arguments")
    if not isinstance(arguments, dict):
        raise RecordError("wrong type", f"{where} arguments are {_type(arguments)}, expected an object")
    call_id = call.get("id")
    return {"type": "function", "function": {"name": name, "arguments": arguments}}, \
        call_id if isinstance(call_id, str) and call_id else None


def _calls(turn: dict, where: str) -> tuple[list[dict], list[str | None]]:
    """The tool calls of an OpenAI assistant turn (`tool_calls`, or the older single `function_call`)."""
    calls = turn.get("tool_calls") or None
    if calls is not None and turn.get("function_call") is not None:
        raise RecordError("conflicting fields", f'{where} has both "tool_calls" and "function_call"; keep one')
    if calls is None:
        calls = [turn["function_call"]] if turn.get("function_call") is not None else []
    if not isinstance(calls, list):
        raise RecordError("wrong type", f'{where} "tool_calls" is {_type(calls)}, expected a list')
    parsed = [_call(call, f"{where} tool_calls[{index}]") for index, call in enumerate(calls)]
    return [call for call, _ in parsed], [call_id for _, call_id in parsed]


def _sharegpt_calls(value: Any, where: str) -> list[dict]:
    """ShareGPT's `function_call` turn: JSON of one `{"name", "arguments"}` call or of a list of them."""
    value = _json(value, f"{where} value")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RecordError("empty message", f"{where} (function_call)")
    return [_call(item, f"{where} call {index}")[0] for index, item in enumerate(items)]


def _message(turn: Any, where: str) -> tuple[dict | None, list[str | None], str | None]:
    """One ShareGPT (`from`/`value`) or OpenAI (`role`/`content`) turn, with the ids of the tool calls it makes
    and the `tool_call_id` it answers. An empty system turn is no turn."""
    if not isinstance(turn, dict):
        raise RecordError("wrong type", f"{where} is {_type(turn)}, expected an object")
    name = _one_of(turn, ("from", "role"), where, _role_name)
    content = _one_of(turn, ("value", "content"), where,
                      lambda v: _text(v, where) if isinstance(v, (str, list)) else v)
    if name is None:
        raise RecordError("missing field", f'{where} needs "from" and "value" (or "role" and "content")')
    if not isinstance(name, str) or name.lower() not in ROLES:
        raise RecordError("unknown role", f"{where}: {name!r} (expected one of {', '.join(ROLES)})")
    role, ids = ROLES[name.lower()], []
    if name.lower() == "function_call":
        if content is None:
            raise RecordError("missing field", f'{where} needs "value" (the call as JSON)')
        return {"role": "assistant", "content": "", "tool_calls": _sharegpt_calls(content, where)}, [], None
    calls: list[dict] = []
    if role == "assistant":
        calls, ids = _calls(turn, where)
    elif turn.get("tool_calls") or turn.get("function_call"):
        raise RecordError("wrong type", f"{where} is a {role} turn with tool calls; only assistant turns make them")
    if content is None and not calls:
        raise RecordError("missing field", f'{where} needs "from" and "value" (or "role" and "content")')
    text = _text("" if content is None else content, where)
    reasoning = None
    if role == "assistant":
        reasoning, text = _reasoning(turn, text, where)
    if not text.strip() and not calls:
        if role == "system":
            return None, [], None
        raise RecordError("empty message", f"{where} ({role})")
    message: dict = {"role": role, "content": text}
    if calls:
        message["tool_calls"] = calls
    if reasoning:
        message["reasoning"] = reasoning
    answers = None
    if role == "tool":
        tool_name, answers = turn.get("name"), turn.get("tool_call_id")
        if tool_name is not None and (not isinstance(tool_name, str) or not tool_name.strip()):
            raise RecordError("wrong type", f'{where} "name" is {_type(tool_name)}, expected the function\'s name')
        if tool_name:
            message["name"] = tool_name
        answers = answers if isinstance(answers, str) and answers else None
    return message, ids, answers


def _name_results(messages: list[dict], answers: list[str | None], ids: dict[str, str], where: list[str]) -> None:
    """Give each tool result the name of the function it answers: through its `tool_call_id`, else when the turn
    it answers made a single call. A name that contradicts its `tool_call_id` is an error."""
    calls: list[dict] = []
    for message, answer, place in zip(messages, answers, where):
        if message.get("tool_calls"):
            calls = message["tool_calls"]
        if message["role"] != "tool":
            continue
        if answer is not None:
            if answer not in ids:
                raise RecordError("roles out of order", f"{place} answers tool call {answer!r:.40}, which no earlier "
                                                        "assistant turn made")
            if message.setdefault("name", ids[answer]) != ids[answer]:
                raise RecordError("conflicting fields", f'{place} "name" {message["name"]!r:.40} is not the function '
                                                        f"of its tool_call_id ({ids[answer]!r:.40})")
        elif "name" not in message and len(calls) == 1:
            message["name"] = calls[0]["function"]["name"]


def message_list(value: Any, key: str) -> list[dict]:
    """A list of messages (or one message object, as ShareGPT-style preference data writes `chosen`)."""
    if not isinstance(value, (list, dict)):
        raise RecordError("wrong type", f'"{key}" is {_type(value)}, expected a list of messages')
    items = [value] if isinstance(value, dict) else value
    messages, answers, where, ids = [], [], [], {}
    for index, turn in enumerate(items):
        place = f'"{key}[{index}]"'
        message, call_ids, answer = _message(turn, place)
        if message is None:
            continue
        for call, call_id in zip(message.get("tool_calls", []), call_ids):
            if call_id is not None:
                ids[call_id] = call["function"]["name"]
        messages.append(message)
        answers.append(answer)
        where.append(place)
    _name_results(messages, answers, ids, where)
    return messages


def tools_field(obj: dict) -> list[dict]:
    """The row's `tools` (OpenAI's list, or ShareGPT's JSON string of one) as OpenAI-form function tools."""
    value = _json(obj.get("tools"), '"tools"') if obj.get("tools") not in (None, "") else []
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise RecordError("wrong type", f'"tools" is {_type(items)}, expected a list of tools')
    tools = []
    for index, tool in enumerate(items):
        where = f'"tools[{index}]"'
        if not isinstance(tool, dict):
            raise RecordError("wrong type", f"{where} is {_type(tool)}, expected a tool object")
        if tool.get("type") not in (None, "function"):
            raise RecordError("wrong type", f'{where} is a {tool["type"]!r:.40} tool; only function tools can be read')
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not function["name"].strip():
            raise RecordError("missing field", f'{where} needs the function\'s "name"')
        function = {k: v for k, v in function.items() if k != "type" or "function" in tool}
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise RecordError("wrong type", f'{where} "description" is {_type(function["description"])}')
        if function.get("parameters") is not None:
            function["parameters"] = _json(function["parameters"], f"{where} parameters")
            if not isinstance(function["parameters"], dict):
                raise RecordError("wrong type", f'{where} "parameters" is {_type(function["parameters"])}, '
                                                "expected a JSON schema object")
        tools.append({"type": "function", "function": function})
    return tools


def turns(obj: dict, key: str, role: str) -> list[dict]:
    """A preference field: a string (one message with `role`) or messages."""
    value = _field(obj, key, (str, dict, list))
    return [text_message(obj, key, role)] if isinstance(value, str) else message_list(value, key)


def check_order(messages: list[dict], key: str, first: str = "user", last: str | None = None,
                system: bool = True) -> None:
    """After an optional leading system message, turns start with `first` and follow the chat order: user and
    assistant alternate, except that an assistant turn calling tools is answered by tool turns (at least one,
    at most one per call) before the assistant speaks again. `last` is the role the turns must end with; a
    tool result ends them as a user turn does (the assistant answers both next)."""
    body = messages[1:] if system and messages and messages[0]["role"] == "system" else messages
    if not body:
        raise RecordError("empty conversation", f'"{key}" has no {first} message')
    expected, calls, results, caller = (first,), 0, 0, 0
    for index, message in enumerate(body, len(messages) - len(body)):
        role = message["role"]
        if role not in expected:
            why = f" (the results of message {caller}'s tool calls)" if expected == ("tool",) else ""
            raise RecordError("roles out of order",
                              f'"{key}" message {index} is {role}, expected {" or ".join(expected)}{why}')
        if role == "tool":
            results += 1
            expected = ("tool", "assistant") if results < calls else ("assistant",)
        elif role == "assistant" and message.get("tool_calls"):
            expected, calls, results, caller = ("tool",), len(message["tool_calls"]), 0, index
        else:
            expected = ("assistant",) if role == "user" else ("user",)
    end = body[-1]["role"]
    if last and end != last and not (last == "user" and end == "tool"):
        raise RecordError("roles out of order", f'"{key}" ends with a {end} message, expected {last}')


def query_messages(obj: dict, key: str = "instruction") -> list[dict]:
    """The prompt of a one-question row: the `system` field, the `history` pairs and the string field `key`
    as the user turn; an `instruction` is followed by the row's `input` (the Alpaca rule)."""
    question = _field(obj, key)
    extra = (obj.get("input") or "") if key == "instruction" else ""
    if not isinstance(extra, str):
        raise RecordError("wrong type", f'"input" is {_type(extra)}')
    query = "\n".join(part for part in (question, extra) if part.strip())
    if not query:
        raise RecordError("empty message", f'"{key}"')
    return _system(obj) + _history(obj) + [{"role": "user", "content": query}]


def to_pt(raw: Any) -> dict:
    """A `text` row as a pt record."""
    text = _field(as_object(raw), "text")
    if not text.strip():
        raise RecordError("empty text")
    return {"text": text}


def _conversation_key(obj: dict, keys: tuple[str, ...]) -> str | None:
    """Which of `keys` holds the conversation; two holding different conversations is an error, not a choice."""
    present = [k for k in keys if obj.get(k) is not None]
    if any(obj[k] != obj[present[0]] for k in present[1:]):
        raise RecordError("conflicting fields", f"{' and '.join(repr(k) for k in present)} hold different "
                                                "conversations; keep one")
    return present[0] if present else None


def _with_tools(record: dict, obj: dict) -> dict:
    tools = tools_field(obj)
    return {**record, "tools": tools} if tools else record


def to_sft(raw: Any) -> dict:
    """A ShareGPT, OpenAI or Alpaca row as an sft record: a conversation ending with an assistant turn (which may
    be a tool call), with the row's `tools` when it declares some."""
    obj = as_object(raw)
    key = _conversation_key(obj, ("conversations", "messages"))
    if key:
        messages = with_system(obj, message_list(obj[key], key))
    elif "instruction" in obj:
        key = "instruction"
        messages = query_messages(obj, key) + [assistant_reply(obj, text_message(obj, "output", "assistant")["content"],
                                                               '"output"')]
    elif layout := next((k for k in REASONING_LAYOUTS if k in obj), None):
        key, answer = REASONING_LAYOUTS[layout]
        reasoning = text_message(obj, layout, "assistant")["content"]
        messages = _system(obj) + [text_message(obj, key, "user"), {
            **text_message(obj, answer, "assistant"), "reasoning": reasoning}]
    else:
        layouts = " or ".join(f'"{q}"/"{r}"/"{a}"' for r, (q, a) in REASONING_LAYOUTS.items())
        raise RecordError("missing field", f'"conversations" or "messages" or "instruction" or {layouts}')
    check_order(messages, key, last="assistant")
    return _with_tools({"messages": messages}, obj)


def to_pref(raw: Any) -> dict:
    """A seed-format (`question`/`response_chosen`) or TRL-form (`prompt`/`chosen`) row as a pref record."""
    obj = as_object(raw)
    if "question" in obj or "response_chosen" in obj:
        prompt = _system(obj) + _history(obj) + [text_message(obj, "question", "user")]
        chosen, rejected = ([text_message(obj, f"response_{k}", "assistant")] for k in ("chosen", "rejected"))
    elif "chosen" in obj or "rejected" in obj:
        key = _conversation_key(obj, ("prompt", "conversations", "messages"))
        if key is None:
            raise RecordError("missing field", '"prompt" or "conversations"')
        prompt = with_system(obj, turns(obj, key, "user"))
        chosen, rejected = (turns(obj, k, "assistant") for k in ("chosen", "rejected"))
    else:
        raise RecordError("missing field", '"question", "response_chosen", "response_rejected" '
                                           'or "prompt", "chosen", "rejected"')
    check_order(prompt, "prompt", last="user")
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        check_order(messages, key, first="assistant", last="assistant", system=False)
    if [(m["content"].strip(), m.get("tool_calls")) for m in chosen] == \
            [(m["content"].strip(), m.get("tool_calls")) for m in rejected]:
        raise RecordError("identical chosen and rejected")
    return _with_tools({"prompt": prompt, "chosen": chosen, "rejected": rejected}, obj)


NORMALIZERS: dict[str, Callable[[Any], dict]] = {"pt": to_pt, "sft": to_sft, "pref": to_pref}


# ---- public API --------------------------------------------------------------------------------


def iter_records(source: str | list[str], kind: str, stats: DataStats, on_error: str = "fail",
                 subset: str | None = None, split: str = "train", max_samples: int | None = None,
                 normalize: Callable[[Any], dict | list[dict]] | None = None) -> Iterator[dict]:
    """The canonical `kind` records of `source` (file, folder, comma-separated list, or hub data set name), each
    with its `_loc`, as they are read; `stats` counts them. Reading stops once `max_samples` records are kept.

    `normalize(raw row)` replaces the kind's own normalizer for records a caller defines: it returns one
    record or several (a preference pair as two unpaired rows) or raises `RecordError`. `kind` then only
    names the records in logs and errors, and any kind but pt, sft and pref is read from the sft file types."""
    if normalize is None:
        normalize = NORMALIZERS[check_choice("kind", kind, KINDS)]
    check_choice("on_error", on_error, ON_ERROR)
    rows = iter_rows(source, kind, stats, subset, split)
    kept = 0
    for loc, raw in rows if max_samples is None or max_samples > 0 else ():
        if raw is None:
            stats.blank += 1
            continue
        stats.read += 1
        try:
            if isinstance(raw, RecordError):
                raise raw
            out = normalize(raw)
        except RecordError as exc:
            if on_error == "fail":
                raise UserError(f"{loc}: {exc}") from None
            logger.debug("dropped %s: %s", loc, exc)
            stats.drop(exc.reason, loc)
            continue
        for record in out if isinstance(out, list) else [out]:
            kept += 1
            yield {**record, "_loc": loc}
        if max_samples is not None and kept >= max_samples:
            break
    label = ",".join(map(str, source)) if isinstance(source, (list, tuple)) else str(source)
    logger.log(logging.WARNING if stats.dropped else logging.INFO, "%s (%s): %s", label, kind, stats.summary())


def read_records(source: str | list[str], kind: str, on_error: str = "fail", subset: str | None = None,
                 split: str = "train", max_samples: int | None = None,
                 normalize: Callable[[Any], dict | list[dict]] | None = None) -> tuple[list[dict], DataStats]:
    """`iter_records` as a list, with its counts."""
    stats = DataStats()
    records = list(iter_records(source, kind, stats, on_error, subset, split, max_samples, normalize))
    return records, stats


def detect_kind(source: str | list[str], subset: str | None = None, split: str = "train") -> str:
    """Guess the kind from the fields of the first record, so `medgpt data check PATH` needs no --kind."""
    for item in expand(source, "pt", DataStats()):
        if isinstance(item, Path) and item.suffix.lower() == ".txt":
            return "pt"
        for loc, raw in item_rows(item, subset, split):
            if not isinstance(raw, dict):
                continue
            if raw.keys() & REASONING_LAYOUTS.keys():
                return "sft"
            if {"question", "a", "b"} <= {str(key).lower() for key in raw}:
                return "mcq"
            if raw.keys() & {"question", "response_chosen", "chosen", "rejected"}:
                return "pref"
            if raw.keys() & {"conversations", "messages", "instruction"}:
                return "sft"
            if "text" in raw:
                return "pt"
            raise UserError(f"{loc}: cannot tell the kind from the fields {sorted(raw)}; pass --kind")
    raise UserError(f"{source}: no record to guess the kind from; pass --kind")
