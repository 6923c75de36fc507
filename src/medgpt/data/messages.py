"""Canonical messages: what a conversation, its tools and its tool calls must look like, and the one rule for its
system prompt. Templates, encoding, preference rows, GRPO/PPO prompts, engines and the server all use these.

A conversation is a non-empty list of `{"role": system|user|assistant|tool, "content": str}`; a system message
may only come first; an assistant message may carry `tool_calls`
(`[{"type": "function", "function": {"name": str, "arguments": dict}, "id"?: str}]`) and `reasoning`, the
non-empty text it thought before its reply (a reasoning model's `<think>` block, OpenAI-style `reasoning_content`).

The system prompt, one rule for every stage and every engine: a conversation's own leading system message wins;
the configured `system` (a config's `system:`, `--system`, a server's default) fills in where it has none; where
neither is given, the template's default. An empty string means no system prompt at all.

Standard library only.
"""

from __future__ import annotations

from typing import Any

from medgpt.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages: Any, prompt: bool = False) -> list[dict]:
    """`messages` checked as a canonical conversation; `prompt=True`: one the model answers next, so it ends
    with a user turn or with tool results."""
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"message {i}: expected {{'role': system|user|assistant|tool, 'content': str}}, "
                            f"got {m!r:.120}")
        if m["role"] == "system" and i:
            raise UserError(f"message {i}: a system message may only come first")
        if m.get("tool_calls") is not None:
            check_tool_calls(i, m)
        if m.get("reasoning") is not None and (m["role"] != "assistant" or not isinstance(m["reasoning"], str)):
            raise UserError(f"message {i}: only an assistant message may carry reasoning, a string")
    if prompt and messages[-1]["role"] not in ("user", "tool"):
        raise UserError("the last message must come from the user (or be a tool result)")
    return messages


def split_think(content: str) -> tuple[str, str] | None:
    """A reply's `<think>...</think>` block read as Qwen3's chat template reads it: (reasoning, answer), the
    reasoning between the last `<think>` before the first `</think>` and that `</think>`, newlines around it
    trimmed, and the answer after the last `</think>` without its leading newlines; None without a `</think>`."""
    if "</think>" not in content:
        return None
    return (content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n"),
            content.split("</think>")[-1].lstrip("\n"))


def reply_parts(text: str, opened: bool = False) -> tuple[str | None, str, bool]:
    """A generated reply as (reasoning, answer, complete), the one reading every scorer and the server use.
    With a `</think>`: the reasoning before it (an opening `<think>` dropped) and the answer after the last one.
    A reply that opens a think block (or follows a prompt that `opened` one) and never closes it was cut inside
    its reasoning: (reasoning so far, "", False), an unanswered reply. Otherwise there is no reasoning."""
    if "</think>" in text:
        thought = text.split("</think>")[0].split("<think>")[-1].strip("\n")
        return thought, text.split("</think>")[-1].lstrip("\n"), True
    if opened or text.lstrip().startswith("<think>"):
        return text.split("<think>", 1)[-1].strip("\n"), "", False
    return None, text, True


def without_reasoning(messages: list[dict]) -> list[dict]:
    """`messages` with no assistant reasoning: no `reasoning` field, no think block opening a reply."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and (m.get("reasoning") is not None or split_think(m["content"]) is not None):
            parsed = split_think(m["content"]) if m.get("reasoning") is None else None
            m = {**{k: v for k, v in m.items() if k != "reasoning"}, "content": parsed[1] if parsed else m["content"]}
        out.append(m)
    return out


def check_tool_calls(i: int, message: dict) -> None:
    """An assistant's tool calls: [{"type": "function", "function": {"name": str, "arguments": dict}}, ...]."""
    calls = message["tool_calls"]
    if message["role"] != "assistant" or not isinstance(calls, list):
        raise UserError(f"message {i}: only an assistant message may carry tool_calls, a list of calls")
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(function, dict) or not isinstance(function.get("name"), str)
                or not isinstance(function.get("arguments"), dict) or call.get("type", "function") != "function"
                or not isinstance(call.get("id", ""), str)):
            raise UserError(f"message {i}: tool call {k}: expected {{'type': 'function', 'function': {{'name': str, "
                            f"'arguments': dict}}}}, got {call!r:.120}")


def check_tools(tools: Any) -> list[dict] | None:
    """The tools beside a conversation: [{"type": "function", "function": {"name", ...}}, ...]; empty is none."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise UserError(f"tools: expected a list of {{'type': 'function', 'function': {{...}}}}, got {tools!r:.120}")
    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise UserError(f"tools: tool {k}: expected {{'type': 'function', 'function': {{'name': str, "
                            f"'description': str, 'parameters': dict}}}}, got {tool!r:.120}")
    return tools


def split_system(messages: Any, system: str | None = None, default: str | None = None) -> tuple[str, list[dict]]:
    """The conversation's effective system prompt ("" for none) and its other turns, by the one rule: its own
    leading system message, else `system`, else `default`."""
    messages = check_messages(messages)
    if messages[0]["role"] == "system":
        return messages[0]["content"], list(messages[1:])
    return (default if system is None else system) or "", list(messages)


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """`messages` with `system` as their leading system message where they have none of their own (the same rule
    as `split_system`, written into the messages, as TRL's trainers and tokenizer chat templates take them)."""
    if not system or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]
