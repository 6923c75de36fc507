"""Tool-call formats (`medgpt.data.tool_formats`): each one reads back what it writes, its grammar takes what it
writes and nothing malformed, its ids are in its style, each is compared with an official template, and a newly
registered format is picked up everywhere without other edits."""

from __future__ import annotations

import dataclasses
import json

import pytest

from medgpt.cli import main
from medgpt.data.template_jinja import let
from medgpt.data.templates import TEMPLATES, Template, get_template
from medgpt.data.tool_formats import TOOL_FORMATS, ToolFormat, tojson
from medgpt.errors import UserError
from medgpt.infer.tool_calls import call_id, parse_tool_calls, tool_call_grammar

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "查询城市天气",
                                      "parameters": {"type": "object", "required": ["city"], "properties": {
                                          "city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "dose", "parameters": {"type": "object", "properties": {
        "drug": {"type": "string"}, "mg": {"type": "integer"}, "with_food": {"type": "boolean"}}}}},
]
CALLS = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京 \"center\""}}},
         {"type": "function", "function": {"name": "dose", "arguments": {"drug": "aspirin", "mg": 100,
                                                                         "with_food": True}}}]
FORMATS = sorted(TOOL_FORMATS)


def calls_of(parsed: list) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed]


def named(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def written(syntax: ToolFormat, content: str, calls: list[dict]) -> str:
    """The calls as the format writes them in a conversation (with the ids the conversation gives them)."""
    return syntax.write_calls(content, calls, syntax.call_ids([{"role": "assistant", "tool_calls": calls}]))


@pytest.mark.parametrize("name", FORMATS)
def test_parse_reads_back_what_the_format_writes(name):
    syntax = TOOL_FORMATS[name]
    for calls in ([CALLS[0]], [CALLS[1]], *([CALLS] if syntax.parallel_calls else [])):
        for content in ("", "我先查一下。") if syntax.text_before_calls else ("",):
            text = written(syntax, content, calls)
            got_content, parsed = syntax.parse(text, TOOLS)
            assert (got_content, calls_of(parsed)) == (content or None, named(calls)), text
            assert parse_tool_calls(text, name, TOOLS)[0] == got_content
            assert syntax.parse(text, TOOLS[::-1])[1] != []  # any order of the tools
            assert syntax.parse(text, [t for t in TOOLS if t["function"]["name"] != calls[0]["function"]["name"]]) \
                == (text, [])  # a tool not offered is not a call
    assert syntax.parse("It is sunny.", TOOLS) == ("It is sunny.", [])
    assert syntax.parse("", TOOLS) == ("", [])


def accepts(grammar: str, text: str) -> bool:
    """Whether xgrammar's matcher takes all of `text` and ends there."""
    import xgrammar

    compiled = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo(["a"])).compile_grammar(grammar)
    matcher = xgrammar.GrammarMatcher(compiled, terminate_without_stop_token=True)
    return matcher.accept_string(text) and matcher.is_completed()


@pytest.mark.parametrize("name", FORMATS)
def test_grammar_takes_a_written_call_and_refuses_malformed_ones(name):
    pytest.importorskip("xgrammar")
    syntax = TOOL_FORMATS[name]
    grammar = tool_call_grammar(name, TOOLS)
    assert grammar == syntax.grammar(TOOLS)
    for call in CALLS:
        text = written(syntax, "", [call])
        assert accepts(grammar, text), text
        assert accepts(syntax.grammar([t for t in TOOLS if t["function"]["name"] == call["function"]["name"]]), text)
        assert not accepts(grammar, text[:-1]), text  # cut short
        assert not accepts(grammar, text.replace(call["function"]["name"], "other_tool")), text
        assert not accepts(grammar, text.replace(syntax.arguments_key, "args")), text
    wrong_type = written(syntax, "", [{"function": {"name": "dose", "arguments": {"mg": "a lot"}}}])
    assert not accepts(grammar, wrong_type)
    assert not accepts(grammar, "It is sunny.")


def test_mistral_grammar_takes_a_call_with_or_without_its_id():
    pytest.importorskip("xgrammar")
    grammar = TOOL_FORMATS["mistral"].grammar(TOOLS)
    assert accepts(grammar, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}]')
    assert not accepts(grammar, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}, "id": "abc"}]')


def test_ids_are_in_each_formats_style():
    for name in FORMATS:
        syntax = TOOL_FORMATS[name]
        calls = CALLS if syntax.parallel_calls else CALLS[:1]
        ids = [call_id(name) for _ in range(20)] + [c.id for c in syntax.parse(written(syntax, "", calls), TOOLS)[1]]
        assert len(set(ids)) == len(ids) == 20 + len(calls), name
        if name == "mistral":
            assert all(len(i) == 9 and i.isalnum() for i in ids)
        else:
            assert all(i.startswith("call_") and len(i) == 29 for i in ids), name
    assert TOOL_FORMATS["mistral"].call_ids([{"role": "assistant", "tool_calls": [
        {**CALLS[0], "id": "abcDEF123"}, {**CALLS[1], "id": "call_1"}]}]) == ["abcDEF123", "000000002"]
    with pytest.raises(ValueError, match="tool format 'hermes'"):
        call_id("hermes")


def test_every_format_is_compared_with_an_official_template():
    """tests/test_data_templates.py renders tools, calls and results against a family's official Jinja: each
    registered format is among those compared."""
    import test_data_templates

    compared = test_data_templates.test_tools_render_as_the_official_template.pytestmark[0].args[1]
    assert {TEMPLATES[name].tool_format for name in compared} == set(TOOL_FORMATS)
    assert set(compared) <= set(test_data_templates.SPECIAL_TOKENS)  # each has its official Jinja fixture


class LinesTools(ToolFormat):
    """A format defined here only: tools as lines after the system prompt, `CALL {...}` lines after the text,
    results as `RESULT ...` lines."""

    name = "lines"
    text_before_calls = True
    grammar_open = "CALL "

    def system_text(self, text: str, tools: list[dict], has_default: bool) -> str:
        return text + "".join("\nTOOL " + tojson(t) for t in tools)

    def jinja_system_text(self, has_default: bool) -> str:
        return "{%- for t in tool_list -%}" + let("ns.text", "ns.text + '\\nTOOL ' + t | tojson") + "{%- endfor -%}"

    def write_calls(self, content: str, calls: list[dict], ids: list[str]) -> str:
        return "\n".join(([content] if content else []) + ["CALL " + tojson(c["function"]) for c in calls])

    def jinja_calls(self) -> str:
        return (let("ns.text", "content") + "{%- for c in message['tool_calls'] -%}"
                + let("ns.text", "ns.text + ('\\n' if ns.text else '') + 'CALL ' + c['function'] | tojson")
                + "{%- endfor -%}")

    def write_result(self, turns: list[dict], i: int, content: str, number: int, ids: list[str]) -> str:
        return "RESULT " + content + "\n"

    def jinja_result(self) -> str:
        return "{{- 'RESULT ' + content + '\\n' -}}"

    def parse(self, text: str, tools: list[dict]) -> tuple[str | None, list]:
        content, found, lines = text.partition("CALL ")
        calls = self.read_calls([json.loads(line) for line in lines.split("\nCALL ")], tools) if found else None
        return (content.removesuffix("\n") or None, calls) if calls else (text, [])


@pytest.fixture
def lines_template(monkeypatch):
    monkeypatch.setitem(TOOL_FORMATS, "lines", LinesTools())
    template = dataclasses.replace(get_template("chatml"), name="lines-chat", tool_format="lines")
    monkeypatch.setitem(TEMPLATES, template.name, template)
    return template


def test_a_registered_format_is_picked_up_everywhere(lines_template, capsys):
    from transformers.utils.chat_template_utils import render_jinja_template

    assert main(["template", "list"]) == 0
    assert "tools: lines" in capsys.readouterr().out
    with pytest.raises(UserError, match="templates with one: .*lines-chat"):
        get_template("chatml").render([{"role": "user", "content": "hi"}], tools=TOOLS)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rome?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": CALLS},
                {"role": "tool", "content": "sunny", "name": "get_weather"},
                {"role": "tool", "content": "ok", "name": "dose"}, {"role": "assistant", "content": "Sunny."}]
    text = lines_template.render(messages, tools=TOOLS)
    assert "\nTOOL " in text and "Checking.\nCALL " in text and "RESULT sunny\nRESULT ok\n" in text
    rendered, _ = render_jinja_template([messages], tools=TOOLS, chat_template=lines_template.chat_template())
    assert rendered[0] == text
    reply = "".join(piece for piece, labelled in lines_template.segments(messages[:3], tools=TOOLS) if labelled)
    content, parsed = parse_tool_calls(reply.removesuffix("<|im_end|>"), "lines", TOOLS)
    assert content == "Checking." and calls_of(parsed) == named(CALLS)
    assert call_id("lines").startswith("call_")
    pytest.importorskip("xgrammar")
    assert accepts(tool_call_grammar("lines", TOOLS), LinesTools().write_calls("", CALLS[:1], []))


def test_a_template_names_a_registered_format():
    with pytest.raises(ValueError, match="tool format 'hermes'"):
        Template("bad", tool_format="hermes")
