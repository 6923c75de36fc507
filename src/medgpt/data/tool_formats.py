"""Tool-call formats: how a chat template writes the tools, an assistant's tool calls and the tool results (as
text and as pieces of its generated Jinja), how a model's reply is read back into calls (the inverse of writing
one), and the grammar that makes a model write one call.

One class per format, one entry in `TOOL_FORMATS`; a template names its format in `Template.tool_format`.
Each format is checked against its family's official template in tests/test_data_templates.py.

Standard library only at import time (xgrammar is imported where a grammar is built).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

from medgpt.data.template_jinja import let, literal, when


def tojson(value: Any, indent: int | None = None) -> str:
    """JSON as the `tojson` filter of transformers' chat-template renderer writes it."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


@dataclass
class ToolCall:
    """A call read back from a reply, as OpenAI returns it."""

    name: str
    arguments: str  # JSON text of the arguments object
    id: str

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call_json(name: str, arguments_key: str, arguments: dict) -> str:
    """One call as the official templates write it: the name as is, the arguments as tojson."""
    return '{"name": "' + name + '", "' + arguments_key + '": ' + tojson(arguments) + "}"


def _jinja_call_json(function: str, arguments_key: str) -> str:
    """_call_json as a Jinja expression of `function` ({"name", "arguments"})."""
    return ("'{\"name\": \"' + " + function + "['name'] + '\", \"" + arguments_key + "\": ' + " + function
            + "['arguments'] | tojson + '}'")


class ToolFormat:
    """How one family writes tools, calls and results. Text methods have a `jinja_` twin that writes the same
    text in the generated chat template (variables there: `content`, `message`, `tool_list`, `loop_messages`,
    and `ns.text` as scratch)."""

    name = ""
    tools_in = "system"  # where the tool list goes: "system" (the system turn), or the "first" / "last" user turn
    text_before_calls = False  # a reply may hold text before its calls (else: the calls alone)
    parallel_calls = True  # several calls in one reply
    calls_reply: str | None = None  # the reply around the calls text (None: the template's assistant format)
    arguments_key = "arguments"  # the key of a call's arguments in the written JSON
    grammar_open = ""  # text before and after the JSON of one forced call
    grammar_close = ""

    # -- the tools ----------------------------------------------------------------------------------

    def system_text(self, text: str, tools: list[dict], has_default: bool) -> str:
        """The system turn's content, with the tools where the format puts them there."""
        return text

    def jinja_system_text(self, has_default: bool) -> str:
        return ""

    def system_block(self, block: str) -> str:
        """The written system turn of a conversation with tools."""
        return block

    def jinja_system_block(self) -> str:
        return ""

    def user_tools(self, tools: list[dict]) -> tuple[str, str]:
        """(text before the user turn, text opening its content) of the turn the tools go in."""
        return "", ""

    def jinja_user_tools(self) -> str:
        return ""

    # -- calls and results --------------------------------------------------------------------------

    def call_ids(self, turns: list[dict]) -> list[str]:
        """The id each call of the conversation is written with, in order (formats that write ids)."""
        return []

    def jinja_call_ids(self) -> str:
        return ""

    def write_calls(self, content: str, calls: list[dict], ids: list[str]) -> str:
        """An assistant's calls (and its text, where the format takes one) as the reply writes them."""
        raise NotImplementedError

    def jinja_calls(self) -> str:
        """Sets ns.text to write_calls() of `content` and message['tool_calls']."""
        raise NotImplementedError

    def write_result(self, turns: list[dict], i: int, content: str, number: int, ids: list[str]) -> str:
        """The tool result turns[i], the conversation's `number`th, with text `content`."""
        raise NotImplementedError

    def jinja_result(self) -> str:
        raise NotImplementedError

    # -- reading replies ----------------------------------------------------------------------------

    def parse(self, text: str, tools: list[dict]) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a reply; a reply whose calls do not parse, or name no given tool, is all content."""
        raise NotImplementedError

    def call_id(self) -> str:
        """A new id for a call read back (OpenAI's `call_...`)."""
        return "call_" + secrets.token_hex(12)

    def _call(self, obj: object, names: set[str]) -> ToolCall | None:
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return None
        arguments = obj.get(self.arguments_key, obj.get("arguments", {}))
        if not isinstance(arguments, dict):
            return None
        return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False), self.call_id())

    def read_calls(self, items: list, tools: list[dict]) -> list[ToolCall] | None:
        """Each item read as a call of one of `tools`; None unless all are."""
        names = {t["function"]["name"] for t in tools}
        calls = [self._call(item, names) for item in items]
        return calls if calls and None not in calls else None  # type: ignore[return-value]

    # -- forcing a call -----------------------------------------------------------------------------

    def call_schema(self, tool: dict) -> dict:
        """The JSON schema of one written call of `tool`."""
        function = tool["function"]
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        return {"type": "object", "properties": {"name": {"const": function["name"]}, self.arguments_key: parameters},
                "required": ["name", self.arguments_key], "additionalProperties": False}

    def grammar(self, tools: list[dict]) -> str:
        """EBNF text (xgrammar) of one call of any of `tools` as the format writes it.

        Raises ValueError when a tool's parameters are not a JSON schema xgrammar can compile."""
        import xgrammar

        calls = [xgrammar.Grammar.from_json_schema(json.dumps(self.call_schema(t)), any_whitespace=False)
                 for t in tools]
        opening, closing = ([xgrammar.Grammar.from_ebnf("root ::= " + json.dumps(text, ensure_ascii=False))] if text
                            else [] for text in (self.grammar_open, self.grammar_close))
        parts = [*opening, calls[0] if len(calls) == 1 else xgrammar.Grammar.union(*calls), *closing]
        return str(parts[0] if len(parts) == 1 else xgrammar.Grammar.concat(*parts))


# -- Qwen2.5 / Qwen3 (Hermes-style) ------------------------------------------------------------------

_QWEN_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_QWEN_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                    "<args-json-object>}\n</tool_call>")
_QWEN_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_EMPTY_THINK = re.compile(r"^\s*<think>\s*</think>\s*")  # Qwen3's empty reasoning before a call


class QwenTools(ToolFormat):
    """The tools open the system turn; calls are <tool_call> JSON lines, after the reply's text; consecutive
    results are <tool_response> blocks in one user turn."""

    name = "qwen"
    text_before_calls = True
    grammar_open, grammar_close = "<tool_call>\n", "\n</tool_call>"

    def system_text(self, text: str, tools: list[dict], has_default: bool) -> str:
        lead = text + "\n\n" if text or has_default else ""
        return lead + _QWEN_TOOLS_HEAD + "".join("\n" + tojson(t) for t in tools) + _QWEN_TOOLS_TAIL

    def jinja_system_text(self, has_default: bool) -> str:
        lead = "ns.system + '\\n\\n'" if has_default else "(ns.system + '\\n\\n' if ns.system else '')"
        return (let("ns.text", lead + " + " + literal(_QWEN_TOOLS_HEAD)) + "{%- for t in tool_list -%}"
                + let("ns.text", "ns.text + '\\n' + t | tojson") + "{%- endfor -%}"
                + let("ns.text", "ns.text + " + literal(_QWEN_TOOLS_TAIL)))

    def write_calls(self, content: str, calls: list[dict], ids: list[str]) -> str:
        lines = ["<tool_call>\n" + _call_json(c["function"]["name"], "arguments", c["function"]["arguments"])
                 + "\n</tool_call>" for c in calls]
        return content + ("\n" if content else "") + "\n".join(lines)

    def jinja_calls(self) -> str:
        return (let("ns.text", "content + ('\\n' if content else '')") + "{%- for c in message['tool_calls'] -%}"
                + when("not loop.first", let("ns.text", "ns.text + '\\n'"))
                + let("ns.text", "ns.text + '<tool_call>\\n' + " + _jinja_call_json("c['function']", "arguments")
                      + " + '\\n</tool_call>'") + "{%- endfor -%}")

    def write_result(self, turns: list[dict], i: int, content: str, number: int, ids: list[str]) -> str:
        first = i == 0 or turns[i - 1]["role"] != "tool"
        last = i == len(turns) - 1 or turns[i + 1]["role"] != "tool"
        return (("<|im_start|>user" if first else "") + "\n<tool_response>\n" + content + "\n</tool_response>"
                + ("<|im_end|>\n" if last else ""))

    def jinja_result(self) -> str:
        return (when("loop.first or loop_messages[loop.index0 - 1]['role'] != 'tool'", "{{- '<|im_start|>user' -}}")
                + "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}"
                + when("loop.last or loop_messages[loop.index0 + 1]['role'] != 'tool'", "{{- '<|im_end|>\\n' -}}"))

    def parse(self, text: str, tools: list[dict]) -> tuple[str | None, list[ToolCall]]:
        start = text.find("<tool_call>")
        bodies = _QWEN_CALL.findall(text[start:]) if start >= 0 else []
        calls = self.read_calls([_json(body) for body in bodies], tools)
        if calls is None:
            return text, []
        return _EMPTY_THINK.sub("", text[:start]).rstrip("\n") or None, calls


# -- Llama-3.1 (tools in the first user turn, the default of its template) ------------------------------

_HEADER_END = "<|end_header_id|>\n\n"
_LLAMA31_TOOLS = ("Given the following functions, please respond with a JSON for a function call with its proper "
                  "arguments that best answers the given prompt.\n\n"
                  'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
                  'value}.Do not use variables.\n\n')
_ENVIRONMENT = _HEADER_END + "Environment: ipython\n"  # opens the system turn of a conversation with tools


class Llama31Tools(ToolFormat):
    """The tools open the first user turn; a reply is one JSON call with "parameters"; results are ipython
    turns."""

    name = "llama3.1"
    tools_in = "first"
    parallel_calls = False
    arguments_key = "parameters"

    def system_block(self, block: str) -> str:
        return block.replace(_HEADER_END, _ENVIRONMENT, 1)

    def jinja_system_block(self) -> str:
        return let("ns.text", f"ns.text | replace({literal(_HEADER_END)}, {literal(_ENVIRONMENT)}, 1)")

    def user_tools(self, tools: list[dict]) -> tuple[str, str]:
        return "", _LLAMA31_TOOLS + "".join(tojson(t, indent=4) + "\n\n" for t in tools)

    def jinja_user_tools(self) -> str:
        return (let("ns.text", literal(_LLAMA31_TOOLS)) + "{%- for t in tool_list -%}"
                + let("ns.text", "ns.text + t | tojson(indent=4) + '\\n\\n'") + "{%- endfor -%}"
                + let("content", "ns.text + content"))

    def write_calls(self, content: str, calls: list[dict], ids: list[str]) -> str:
        function = calls[0]["function"]
        return _call_json(function["name"], "parameters", function["arguments"])

    def jinja_calls(self) -> str:
        return let("ns.text", _jinja_call_json("message['tool_calls'][0]['function']", "parameters"))

    def write_result(self, turns: list[dict], i: int, content: str, number: int, ids: list[str]) -> str:
        return "<|start_header_id|>ipython<|end_header_id|>\n\n" + tojson(content) + "<|eot_id|>"

    def jinja_result(self) -> str:
        return "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + content | tojson + '<|eot_id|>' -}}"

    def parse(self, text: str, tools: list[dict]) -> tuple[str | None, list[ToolCall]]:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        calls = self.read_calls([_json(body)], tools) if body.startswith("{") else None
        return (None, calls) if calls else (text, [])


# -- Mistral v0.3 -------------------------------------------------------------------------------------------

_ID_CHARS = string.ascii_letters + string.digits
_JINJA_MISTRAL_ID = "{0} is string and {0} | length == 9 and {0}.isalnum()"


def _mistral_id(value: Any) -> bool:
    """Mistral's format takes tool-call ids of exactly 9 letters and digits."""
    return isinstance(value, str) and len(value) == 9 and value.isalnum()


def _mistral_tool(tool: dict) -> str:
    """One tool in [AVAILABLE_TOOLS] (Mistral's template writes string values unescaped)."""
    fields = [f'"{key}": "{val}"' if isinstance(val, str) else f'"{key}": {tojson(val)}'
              for key, val in tool["function"].items() if key != "return"]
    return '{"type": "function", "function": {' + ", ".join(fields) + "}}"


class MistralTools(ToolFormat):
    """[AVAILABLE_TOOLS] before the last user turn; a reply is the calls alone, `[TOOL_CALLS] [...]` with 9-character
    ids; results are [TOOL_RESULTS] blocks naming the call they answer."""

    name = "mistral"
    tools_in = "last"
    calls_reply = "{content}</s>"
    grammar_open, grammar_close = "[TOOL_CALLS] [", "]"

    def user_tools(self, tools: list[dict]) -> tuple[str, str]:
        return "[AVAILABLE_TOOLS] [" + ", ".join(_mistral_tool(t) for t in tools) + "][/AVAILABLE_TOOLS]", ""

    def jinja_user_tools(self) -> str:
        return ("{{- '[AVAILABLE_TOOLS] [' -}}{%- for tool in tool_list -%}"
                "{{- '{\"type\": \"function\", \"function\": {' -}}"
                "{%- for key, val in tool['function'].items() if key != 'return' -%}"
                "{%- if val is string -%}{{- '\"' + key + '\": \"' + val + '\"' -}}"
                "{%- else -%}{{- '\"' + key + '\": ' + val | tojson -}}{%- endif -%}"
                + when("not loop.last", "{{- ', ' -}}") + "{%- endfor -%}{{- '}}' -}}"
                + when("not loop.last", "{{- ', ' -}}") + "{%- endfor -%}{{- '][/AVAILABLE_TOOLS]' -}}")

    def call_ids(self, turns: list[dict]) -> list[str]:
        """Each call's own id where it is a Mistral one, else its number, zero-padded."""
        calls = [c for m in turns for c in m.get("tool_calls") or []]
        return [c["id"] if _mistral_id(c.get("id")) else f"{k:09d}" for k, c in enumerate(calls, 1)]

    def jinja_call_ids(self) -> str:
        return ("{%- for m in loop_messages -%}{%- for c in (m['tool_calls'] or []) -%}"
                + let("ns.count", "ns.count + 1")
                + "{%- if " + _JINJA_MISTRAL_ID.format("c['id']") + " -%}" + let("ns.calls", "ns.calls + [c['id']]")
                + "{%- else -%}" + let("ns.calls", "ns.calls + ['%09d' | format(ns.count)]") + "{%- endif -%}"
                + "{%- endfor -%}{%- endfor -%}" + let("ns.count", "0"))

    def write_calls(self, content: str, calls: list[dict], ids: list[str]) -> str:
        entries = [tojson(c["function"])[:-1] + ', "id": "' + call_id + '"}' for c, call_id in zip(calls, ids)]
        return "[TOOL_CALLS] [" + ", ".join(entries) + "]"

    def jinja_calls(self) -> str:
        return (let("ns.text", "''") + "{%- for c in message['tool_calls'] -%}" + let("ns.count", "ns.count + 1")
                + let("ns.text", "ns.text + (', ' if not loop.first else '') + (c['function'] | tojson)[:-1] "
                      "+ ', \"id\": \"' + ns.calls[ns.count - 1] + '\"}'") + "{%- endfor -%}"
                + let("ns.text", "'[TOOL_CALLS] [' + ns.text + ']'"))

    def write_result(self, turns: list[dict], i: int, content: str, number: int, ids: list[str]) -> str:
        call_id = turns[i].get("tool_call_id")
        if not _mistral_id(call_id):
            call_id = ids[number - 1] if number <= len(ids) else f"{number:09d}"
        return '[TOOL_RESULTS] {"content": ' + content + ', "call_id": "' + call_id + '"}[/TOOL_RESULTS]'

    def jinja_result(self) -> str:
        return (let("ns.results", "ns.results + 1") + let("call_id", "message['tool_call_id']")
                + "{%- if not (" + _JINJA_MISTRAL_ID.format("call_id") + ") -%}"
                + let("call_id", "ns.calls[ns.results - 1] if ns.results <= ns.calls | length "
                      "else '%09d' | format(ns.results)") + "{%- endif -%}"
                + "{{- '[TOOL_RESULTS] {\"content\": ' + content + ', \"call_id\": \"' + call_id + "
                  "'\"}[/TOOL_RESULTS]' -}}")

    def parse(self, text: str, tools: list[dict]) -> tuple[str | None, list[ToolCall]]:
        body = text.strip().removeprefix("[TOOL_CALLS]").strip()
        items = _json(body) if body.startswith("[") else None
        calls = self.read_calls(items, tools) if isinstance(items, list) else None
        return (None, calls) if calls else (text, [])

    def call_id(self) -> str:
        return "".join(secrets.choice(_ID_CHARS) for _ in range(9))

    def call_schema(self, tool: dict) -> dict:
        """A call may end with its id, as the format writes it."""
        schema = super().call_schema(tool)
        schema["properties"]["id"] = {"type": "string", "pattern": "^[A-Za-z0-9]{9}$"}
        return schema


TOOL_FORMATS: dict[str, ToolFormat] = {f.name: f for f in (QwenTools(), Llama31Tools(), MistralTools())}


def get_tool_format(name: str) -> ToolFormat:
    """A registered tool format by name (ValueError for another name)."""
    if name not in TOOL_FORMATS:
        raise ValueError(f"tool format {name!r}: expected one of {', '.join(TOOL_FORMATS)}")
    return TOOL_FORMATS[name]
