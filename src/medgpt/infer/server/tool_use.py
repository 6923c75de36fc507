"""What a chat request asks of the model's output: tools (in the chat template's own format) or a response format,
the grammar that enforces it, and an answer read back into an OpenAI assistant message with `tool_calls`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from medgpt.infer.base import Completion, Engine
from medgpt.infer.reasoning import ReplyReader, read_reply
from medgpt.infer.server.errors import InvalidRequest
from medgpt.infer.server.protocol import ChatCompletionRequest, ResponseFormat
from medgpt.infer.tool_calls import parse_tool_calls, tool_call_grammar


@dataclass
class ToolUse:
    """What a chat request asks of tools: the tools shown, the template's format, and whether calls are parsed."""

    tools: list[dict]
    tool_format: str
    choice: str  # auto | required | the function name
    parallel: bool

    def message(self, result: Completion) -> tuple[dict, str]:
        """The assistant message of a result with its tool calls parsed out, and its finish reason."""
        content, calls = parse_tool_calls(result.text, self.tool_format, self.tools)
        if self.choice not in ("auto", "required"):
            calls = [c for c in calls if c.name == self.choice]
        if not calls:
            return {"role": "assistant", "content": result.text}, result.finish_reason
        calls = calls if self.parallel else calls[:1]
        return {"role": "assistant", "content": content, "tool_calls": [c.openai() for c in calls]}, "tool_calls"


def chat_message(result: Completion, use: ToolUse | None, reader: ReplyReader | None = None) -> tuple[dict, str]:
    """The assistant message of a result and its finish: with a `reader`, the reasoning apart in
    `reasoning_content` (None without one) and the answer alone in `content` ("" for a reply cut inside its
    reasoning); tool calls parsed out of the answer when the request has tools."""
    reasoning, answer, _ = read_reply(result.text, reader)
    if use is None:
        message, finish = {"role": "assistant", "content": answer}, result.finish_reason
    else:
        message, finish = use.message(dataclasses.replace(result, text=answer))
    if reader is not None:
        message["reasoning_content"] = reasoning
    return message, finish


def output_rules(body: ChatCompletionRequest, engine: Engine) -> tuple[ToolUse | None, str | None]:
    """The request's tool use and the grammar its output must follow (forced tool calls or a JSON format)."""
    use, grammar = tool_use(body, engine)
    if body.response_format is not None and body.response_format.type != "text":
        if use is not None:
            raise InvalidRequest("response_format: cannot be combined with tools (use tool_choice: none)",
                                 "response_format")
        grammar = json_grammar(body.response_format)
    return use, grammar


def tool_use(body: ChatCompletionRequest, engine: Engine) -> tuple[ToolUse | None, str | None]:
    """The request's tool use and the grammar it needs (for required / a named function)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise InvalidRequest("tool_choice: the request has no tools", "tool_choice")
        return None, None
    if choice == "none":
        return None, None
    tool_format = getattr(engine.template, "tool_format", None)
    if tool_format is None:
        from medgpt.data.templates import TEMPLATES

        with_tools = ", ".join(name for name, t in TEMPLATES.items() if t.tool_format)
        raise InvalidRequest(f"tools: the chat template {engine.template.name!r} has no tool format; serve the "
                             f"model with --template NAME of the format it was trained with: {with_tools}", "tools")
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    use = ToolUse(tools, tool_format, chosen_function(choice, tools) or "auto", body.parallel_tool_calls is not False)
    if use.choice == "auto":
        return use, None
    chosen = tools if use.choice == "required" else [t for t in tools if t["function"]["name"] == use.choice]
    try:
        return use, tool_call_grammar(tool_format, chosen)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise schema_refused("tools", "a function's parameters are ", exc) from None


def chosen_function(choice: str | dict | None, tools: list[dict]) -> str | None:
    """tool_choice as a name: auto or required as they are, `{type: function, function: {name}}` as the name."""
    if not isinstance(choice, dict):
        return choice
    names = [t["function"]["name"] for t in tools]
    function = choice.get("function") if choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if name not in names:
        raise InvalidRequest(f"tool_choice: expected {{type: function, function: {{name}}}} naming one of the "
                             f"tools ({', '.join(names)})", "tool_choice")
    return name


def json_grammar(fmt: ResponseFormat) -> str | None:
    """xgrammar EBNF text of a response_format (None for text). The JSON is written compactly (`{"a": 1, "b": 2}`,
    xgrammar's any_whitespace=False): free whitespace lets a model pad an answer with blanks until max_tokens."""
    import xgrammar

    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return str(xgrammar.Grammar.from_json_schema(json.dumps({"type": "object"}), any_whitespace=False))
    where = "response_format.json_schema.schema"
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidRequest(f"{where}: required for type json_schema", where)
    try:
        return str(xgrammar.Grammar.from_json_schema(json.dumps(fmt.json_schema.schema_), any_whitespace=False))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise schema_refused(where, "", exc) from None


def schema_refused(param: str, what: str, exc: Exception) -> InvalidRequest:
    reason = str(exc).splitlines()[0][:300]
    return InvalidRequest(f"{param}: {what}not a JSON schema this server can enforce: {reason}", param)
