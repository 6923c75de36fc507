"""The Jinja chat template (for tokenizer.chat_template) of a `medgpt.data.templates.Template`: it renders exactly
what Template.render() does, and refuses what render() refuses. The tool format's pieces come from its
`jinja_` methods (`medgpt.data.tool_formats`).

The generated text is one run of `{%- ... -%}` statements and `{{- ... -}}` outputs, so no whitespace outside
them is ever written. Standard library only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medgpt.data.templates import Template

_NAMESPACE = ("namespace(system={}, first_user=-1, last_user=-1, last_query=-1, calls=[], count=0, results=0, "
              "text='', reply='', reasoning=none, think='')")
_NO_THINKING = "enable_thinking is defined and enable_thinking is false"


def literal(text: str) -> str:
    """A Jinja string literal (Jinja unescapes literals like Python does)."""
    return repr(text)


def terms(fmt: str, expr: str = "content") -> list[str]:
    """A format string as Jinja terms to join with +: literals around `expr` where {content} is."""
    before, found, after = fmt.partition("{content}")
    out = [literal(before)] if before else []
    if found:
        out.append(expr)
    return out + ([literal(after)] if after else [])


def expression(fmt: str, expr: str = "content") -> str:
    """A format string as one Jinja expression."""
    return " + ".join(terms(fmt, expr)) or "''"


def write(*formats: str) -> str:
    """Output the format strings, whose {content} stands for `content`."""
    parts = [t for fmt in formats for t in terms(fmt)]
    return "{{- " + " + ".join(parts) + " -}}" if parts else ""


def when(test: str, *body: str) -> str:
    """The body under the test (nothing where the body is empty)."""
    return "{%- if " + test + " -%}" + "".join(body) + "{%- endif -%}" if "".join(body) else ""


def let(name: str, expr: str) -> str:
    return "{%- set " + name + " = " + expr + " -%}"


def chat_template(template: Template) -> str:
    """The Jinja text of `template`; a leading system message plays render()'s `system`, `tools` is
    the tools."""
    return "".join([
        _setup(template), _refusals(template), template.tool_syntax.jinja_call_ids() if template.tool_syntax else "",
        write(template.prefix), _system_turn(template),
        "{%- for message in loop_messages -%}", let("content", "message['content']"),
        when("message['role'] in " + repr(list(template.strip)), let("content", "content | trim"))
        if template.strip else "",
        "{%- if message['role'] == 'user' -%}", _user_turn(template),
        "{%- elif message['role'] == 'assistant' -%}", _assistant_turn(template),
        "{%- elif message['role'] == 'tool' -%}" + template.tool_syntax.jinja_result() if template.tool_syntax else "",
        "{%- endif -%}{%- endfor -%}",
        "{%- if add_generation_prompt -%}" + write(template.assistant_start)
        + (when(_NO_THINKING, write(template.final_reply_prefix)) if template.think else "")
        + ("{%- else -%}" + write(template.suffix) if template.suffix else "") + "{%- endif -%}",
    ])


def _fail(template: Template, message: str) -> str:
    return "{{- raise_exception(" + literal(f"template {template.name!r}: {message}") + ") -}}"


def _setup(template: Template) -> str:
    """ns.system (a leading system message, else the default), loop_messages, tool_list, the first and last user
    turns."""
    return "".join([
        let("ns", _NAMESPACE.format(literal(template.default_system or ""))),
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        let("ns.system", "messages[0]['content']"), let("loop_messages", "messages[1:]"),
        "{%- else -%}" + let("loop_messages", "messages") + "{%- endif -%}",
        let("tool_list", "tools if tools is defined and tools else none"),
        "{%- for message in loop_messages -%}{%- if message['role'] == 'user' -%}",
        when("ns.first_user < 0", let("ns.first_user", "loop.index0")), let("ns.last_user", "loop.index0"),
        "{%- endif -%}{%- endfor -%}",
        let("ns.system", "ns.system | trim") if "system" in template.strip else "",
        _last_query() if template.think else "",
    ])


def _last_query() -> str:
    """ns.last_query: the last user turn that is not a tool response in disguise (else the last turn)."""
    return "".join([
        "{%- for message in loop_messages -%}",
        when("message['role'] == 'user' and not (message['content'].startswith('<tool_response>') and "
             "message['content'].endswith('</tool_response>'))", let("ns.last_query", "loop.index0")),
        "{%- endfor -%}", when("ns.last_query < 0", let("ns.last_query", "loop_messages | length - 1"))])


def _reasoning(template: Template) -> str:
    """ns.think: an assistant turn's think block (its `reasoning` or `reasoning_content`, else a think block
    opening its content), and its content without it; templates without a reasoning format refuse reasoning."""
    given = "message['reasoning'] is defined and message['reasoning'] is not none"
    if not template.think:
        return when(f"{given} and message['reasoning']",
                    _fail(template, "it has no reasoning format, and a message has reasoning"))
    split = "content.split('</think>')"
    return "".join([
        let("ns.reasoning", "none"),
        "{%- if " + given + " -%}" + let("ns.reasoning", "message['reasoning']"),
        "{%- elif message['reasoning_content'] is defined and message['reasoning_content'] is not none -%}",
        let("ns.reasoning", "message['reasoning_content']"),
        "{%- elif '</think>' in content -%}",
        let("ns.reasoning", f"{split}[0].rstrip('\n').split('<think>')[-1].lstrip('\n')"),
        let("content", f"{split}[-1].lstrip('\n')"), "{%- endif -%}",
        let("ns.think", "''"),
        when("loop.index0 > ns.last_query and (loop.last or ns.reasoning)",
             let("ns.think", f"{literal(template.think[0])} + (ns.reasoning or '').strip('\n') + "
                             f"{literal(template.think[1])}"), let("content", "content.lstrip('\n')")),
    ])


def _refusals(template: Template) -> str:
    """What render() refuses before writing anything: a system prompt the format cannot hold, tools it cannot
    place."""
    syntax = template.tool_syntax
    out = [when("ns.system", _fail(template, "the format has no system prompt")) if template.no_system else "",
           when("ns.system and ns.first_user < 0", _fail(template, "the system prompt opens a user turn, and there "
                                                                   "is none")) if template.fold_system else ""]
    if syntax is None:
        out.append(when("tool_list or loop_messages | selectattr('role', 'equalto', 'tool') | list "
                        "or loop_messages | selectattr('tool_calls') | list", _fail(template, "it has no tool format")))
    elif syntax.tools_in != "system":
        test = "ns.first_user != 0" if syntax.tools_in == "first" else "ns.last_user < 0"
        out.append(when("tool_list and " + test,
                        _fail(template, "the tools go in a user message: the conversation must start with one")))
    return "".join(out)


def _system_turn(template: Template) -> str:
    """The system block, with the tools where the format puts them there; none where the prompt opens a user turn."""
    if template.fold_system:
        return ""
    syntax = template.tool_syntax
    tools = when("tool_list", syntax.jinja_system_text(template.default_system is not None)) if syntax else ""
    block = when("tool_list", syntax.jinja_system_block()) if syntax else ""
    return let("ns.text", "ns.system") + tools + when("true" if template.system_always else "ns.text", let(
        "ns.text", expression(template.system, "ns.text")), block, "{{- ns.text -}}")


def _user_turn(template: Template) -> str:
    """A user turn: the system prompt where it opens this turn, the tools where they go here."""
    out = []
    if template.fold_system:
        fold_at = "ns.first_user" if template.fold_system == "first" else "ns.last_user"
        out.append(when("ns.system and loop.index0 == " + fold_at,
                        let("content", expression(template.system, "ns.system") + " + content")))
    syntax = template.tool_syntax
    if syntax and syntax.tools_in != "system":
        out.append(when(f"tool_list and loop.index0 == ns.{syntax.tools_in}_user", syntax.jinja_user_tools()))
    user = write(template.user)
    if template.first_user is not None:
        user = "{%- if loop.first -%}" + write(template.first_user) + "{%- else -%}" + user + "{%- endif -%}"
    return "".join(out) + user


def _assistant_turn(template: Template) -> str:
    """An assistant turn: its reply (or its tool calls) between the role header and the separator."""
    syntax = template.tool_syntax
    reply = let("ns.reply", expression(template.assistant))
    if syntax is not None:
        reply = "".join([
            "{%- if message['tool_calls'] -%}",
            "" if syntax.text_before_calls else when("content", _fail(
                template, "an assistant turn with tool calls is written as the calls alone")),
            "" if syntax.parallel_calls else when("message['tool_calls'] | length != 1", _fail(
                template, "it takes one tool call per assistant turn")),
            syntax.jinja_calls(), let("ns.reply", expression(syntax.calls_reply or template.assistant, "ns.text")),
            "{%- else -%}", reply, "{%- endif -%}"])
    if template.final_reply_prefix and not template.think:
        reply += when("loop.last", let("ns.reply", literal(template.final_reply_prefix) + " + ns.reply"))
    think = ["ns.think"] if template.think else []
    return _reasoning(template) + reply + "{{- " + " + ".join([*terms(template.assistant_start, ""), *think, "ns.reply",
                                        *terms(template.assistant_sep, "")]) + " -}}"
