"""Tool calls in a template's own format, by the format's name (`Template.tool_format`): a reply read back into
OpenAI `tool_calls`, the grammar that makes a model write one call, and a new call id. The formats themselves
are in `medgpt.data.tool_formats`; an unknown name is a ValueError.

Standard library only at import time (xgrammar is imported where a grammar is built).
"""

from __future__ import annotations

from medgpt.data.tool_formats import ToolCall, get_tool_format

__all__ = ["ToolCall", "call_id", "parse_tool_calls", "tool_call_grammar"]


def parse_tool_calls(text: str, tool_format: str, tools: list[dict]) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a reply; a reply whose calls do not parse, or name no given tool, is all content."""
    return get_tool_format(tool_format).parse(text, tools)


def tool_call_grammar(tool_format: str, tools: list[dict]) -> str:
    """EBNF text (xgrammar) of one call of any of `tools` in the template's call syntax.

    Raises ValueError when a tool's parameters are not a JSON schema xgrammar can compile."""
    return get_tool_format(tool_format).grammar(tools)


def call_id(tool_format: str) -> str:
    """A new tool-call id in the format's style (Mistral's 9 letters and digits, else OpenAI's `call_...`)."""
    return get_tool_format(tool_format).call_id()
