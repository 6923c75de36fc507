"""Canonical records -> the formats users exchange: ShareGPT, OpenAI messages, Alpaca (SFT) and the seed
preference format (`medgpt data convert`, `medgpt select`). An assistant's reasoning is written as OpenAI-style
`reasoning_content` (openai) or as a `<think>` block opening the reply (the other formats). Standard library
only."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from medgpt.data.rows import check_choice
from medgpt.errors import UserError

FORMATS = ("sharegpt", "openai", "alpaca", "pref")
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}


def _kind_of(record: dict) -> str:
    return "sft" if "messages" in record else "pref" if "prompt" in record else "pt" if "text" in record else "?"


def with_think(message: dict) -> str:
    """An assistant message's content with its reasoning as the `<think>` block that opens it (as Qwen3 writes it)."""
    reasoning = message.get("reasoning")
    if not reasoning:
        return message["content"]
    return "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + message["content"]


def _plain(messages: list[dict], loc: str, to: str) -> list[dict]:
    """`messages`, refused when they hold tool calls or results, which `to` has no place for."""
    if any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        raise UserError(f"{loc}: {to} cannot hold tool calls or results; convert to sharegpt or openai")
    return messages


def _split_turns(messages: list[dict], loc: str, to: str) -> tuple[str, list[list[str]], list[dict]]:
    """Leading system text, the [user, assistant] pairs, and a trailing unpaired message if any."""
    messages = _plain(messages, loc, to)
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    body = messages[1:] if system else messages
    pairs = [[body[i]["content"], with_think(body[i + 1])] for i in range(0, len(body) - 1, 2)]
    return system, pairs, body[2 * len(pairs):]


def _single(messages: list[dict], loc: str, key: str) -> str:
    if len(messages) != 1:
        raise UserError(f"{loc}: {key} has {len(messages)} messages; this format holds exactly one")
    return with_think(_plain(messages, loc, "this format")[0])


def _bare_call(call: dict) -> dict:
    return {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}


def _sharegpt(messages: list[dict], loc: str) -> list[dict]:
    """ShareGPT turns; tool calls as LLaMA-Factory's `function_call` turns (one call as an object, several as a
    list) and results as `observation` turns, which have no field for the function's name."""
    out = []
    for index, m in enumerate(messages):
        if m.get("tool_calls"):
            if m["content"].strip() or m.get("reasoning"):
                what = "text" if m["content"].strip() else "reasoning"
                raise UserError(f"{loc}: message {index} has {what} and tool calls; a sharegpt function_call turn "
                                "holds only the calls (convert to openai)")
            calls = [_bare_call(c) for c in m["tool_calls"]]
            out.append({"from": "function_call",
                        "value": json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)})
        else:
            out.append({"from": SHAREGPT_ROLES[m["role"]], "value": with_think(m)})
    return out


def _sharegpt_tools(record: dict) -> dict:
    """ShareGPT's `tools`: a JSON string of the function definitions."""
    tools = record.get("tools")
    return {"tools": json.dumps([t["function"] for t in tools], ensure_ascii=False)} if tools else {}


def _openai(messages: list[dict]) -> list[dict]:
    """OpenAI messages: tool call arguments as JSON strings, as the API writes them; reasoning as
    `reasoning_content`."""
    messages = [{**{k: v for k, v in m.items() if k != "reasoning"}, "reasoning_content": m["reasoning"]}
                if m.get("reasoning") else m for m in messages]
    return [{**m, "tool_calls": [{"type": "function", "function": {
        "name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False)}}
        for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]


def _with_openai_tools(record: dict) -> dict:
    return {"tools": record["tools"]} if record.get("tools") else {}


def _sft_alpaca(record: dict, loc: str) -> dict:
    system, pairs, _ = _split_turns(record["messages"], loc, "alpaca")
    if record.get("tools"):
        raise UserError(f"{loc}: alpaca cannot hold tools; convert to sharegpt or openai")
    return {"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1], "system": system, "history": pairs[:-1]}


def _pref_seed(record: dict, loc: str) -> dict:
    system, history, (question, *_) = _split_turns(record["prompt"], loc, "the pref format")
    if record.get("tools"):
        raise UserError(f"{loc}: the pref format cannot hold tools; convert to sharegpt or openai")
    return {"system": system, "history": history, "question": question["content"],
            "response_chosen": _single(record["chosen"], loc, "chosen"),
            "response_rejected": _single(record["rejected"], loc, "rejected")}


_CONVERTERS: dict[tuple[str, str], Callable[[dict, str], dict]] = {
    ("sft", "sharegpt"): lambda r, loc: {"conversations": _sharegpt(r["messages"], loc), **_sharegpt_tools(r)},
    ("sft", "openai"): lambda r, loc: {"messages": _openai(r["messages"]), **_with_openai_tools(r)},
    ("sft", "alpaca"): _sft_alpaca,
    ("pref", "openai"): lambda r, loc: {**{k: _openai(r[k]) for k in ("prompt", "chosen", "rejected")},
                                        **_with_openai_tools(r)},
    ("pref", "sharegpt"): lambda r, loc: {"conversations": _sharegpt(r["prompt"], loc), **{
        k: {"from": "gpt", "value": _single(r[k], loc, k)} for k in ("chosen", "rejected")}, **_sharegpt_tools(r)},
    ("pref", "pref"): _pref_seed,
}


def convert(records: Iterable[dict], to: str) -> list[dict]:
    """`convert_record` of each record."""
    check_choice("to", to, FORMATS)
    return [convert_record(record, to) for record in records]


def convert_record(record: dict, to: str) -> dict:
    """A canonical record -> `sharegpt`, `openai`, `alpaca` (sft, with `history`) or `pref` (the seed
    preference format); `_loc` is used in errors and not copied. Tool conversations go to sharegpt
    (LLaMA-Factory's `function_call`/`observation` turns and `tools` string) or openai (JSON-string arguments);
    the formats that cannot hold them refuse them."""
    check_choice("to", to, FORMATS)
    kind, loc = _kind_of(record), record.get("_loc", "record")
    converter = _CONVERTERS.get((kind, to))
    if converter is None:
        raise UserError(f"{loc}: cannot convert {kind} records to {to} "
                        f"(possible: {', '.join(t for k, t in _CONVERTERS if k == kind) or 'none'})")
    return converter(record, loc)
