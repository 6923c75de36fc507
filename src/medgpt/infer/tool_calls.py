"""Tool calls in a template's own format: the grammar that makes a model write one, and a reply read back into
OpenAI `tool_calls`.

The formats are those `medgpt.data.templates` writes in training (TOOL_FORMATS):
- qwen (Hermes-style): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` lines, text may come first;
- llama3.1: the whole reply is one JSON object `{"name": ..., "parameters": {...}}`;
- mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`.

Standard library only at import time (xgrammar is imported where a grammar is built).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass

from medgpt.data.templates import TOOL_FORMATS

_QWEN_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_EMPTY_THINK = re.compile(r"^\s*<think>\s*</think>\s*")  # Qwen3's empty reasoning before a call
_ID_CHARS = string.ascii_letters + string.digits


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object, as OpenAI returns it
    id: str

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_id(tool_format: str) -> str:
    """A new tool-call id: Mistral's format takes exactly 9 letters and digits, the others OpenAI's `call_...`."""
    if tool_format == "mistral":
        return "".join(secrets.choice(_ID_CHARS) for _ in range(9))
    return "call_" + secrets.token_hex(12)


def _call(obj: object, names: set[str], arguments_key: str, tool_format: str) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", {}))
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False), call_id(tool_format))


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_tool_calls(text: str, tool_format: str, tools: list[dict]) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a reply; a reply whose calls do not parse, or name no given tool, is all content."""
    names = {t["function"]["name"] for t in tools}
    if tool_format == "qwen":
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = [_call(_json(body), names, "arguments", tool_format) for body in _QWEN_CALL.findall(text[start:])]
        if not calls or None in calls:
            return text, []
        content = _EMPTY_THINK.sub("", text[:start]).rstrip("\n")
        return (content or None), calls  # type: ignore[return-value]
    if tool_format == "llama3.1":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        call = _call(_json(body), names, "parameters", tool_format) if body.startswith("{") else None
        return (None, [call]) if call else (text, [])
    if tool_format == "mistral":
        body = text.strip().removeprefix("[TOOL_CALLS]").strip()
        items = _json(body) if body.startswith("[") else None
        calls = [_call(item, names, "arguments", tool_format) for item in items] if isinstance(items, list) else []
        if not calls or None in calls:
            return text, []
        return None, calls  # type: ignore[return-value]
    raise ValueError(f"tool format {tool_format!r}: expected one of {', '.join(TOOL_FORMATS)}")


def _call_schema(tool: dict, arguments_key: str) -> dict:
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, arguments_key: parameters},
            "required": ["name", arguments_key], "additionalProperties": False}


def tool_call_grammar(tool_format: str, tools: list[dict]) -> str:
    """EBNF text (xgrammar) of one call of any of `tools` in the template's call syntax: tag + JSON of the call.

    Raises ValueError when a tool's parameters are not a JSON schema xgrammar can compile."""
    import xgrammar

    key = "parameters" if tool_format == "llama3.1" else "arguments"
    calls = [xgrammar.Grammar.from_json_schema(json.dumps(_call_schema(t, key)), any_whitespace=False) for t in tools]
    call = calls[0] if len(calls) == 1 else xgrammar.Grammar.union(*calls)
    if tool_format == "qwen":
        parts = [xgrammar.Grammar.from_ebnf('root ::= "<tool_call>\\n"'), call,
                 xgrammar.Grammar.from_ebnf('root ::= "\\n</tool_call>"')]
    elif tool_format == "mistral":
        parts = [xgrammar.Grammar.from_ebnf('root ::= "[TOOL_CALLS] ["'), call, xgrammar.Grammar.from_ebnf('root ::= "]"')]
    elif tool_format == "llama3.1":
        parts = [call]
    else:
        raise ValueError(f"tool format {tool_format!r}: expected one of {', '.join(TOOL_FORMATS)}")
    return str(parts[0] if len(parts) == 1 else xgrammar.Grammar.concat(*parts))
