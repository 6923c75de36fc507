"""Chat templates: turn canonical messages into the exact text a model sees, and into token ids whose
labels cover only the assistant turns.

A template is one row of a table (`TEMPLATES`): format strings per role, with `{content}` where the
message goes. The text of a conversation is

    prefix [system] user₁ assistant_start assistant₁ assistant_sep user₂ ... (assistant_start | suffix)

with the variations a family needs as fields (a system prompt folded into a user turn, trimmed contents, a
tool format, ...); each row is checked against the family's official template in the tests.

Only `assistant` is labelled: the response and the end-of-turn marker that closes it (so the model learns
to stop); `stop_words[0]` is always that marker. In a template with a tool format an assistant's tool calls
are part of its labelled reply; the tools and the tool results are not. Role headers, separators and
prompts are not labelled.
`auto` wraps the tokenizer's own chat template and finds the assistant spans by rendering prefixes.
The ids are those of tokenizing the whole text at once; labels go by character offsets (`encode_segments`).

Only the standard library is imported here: tokenizers are passed in by the caller.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from medgpt.data.messages import check_tools, split_system
from medgpt.errors import UserError

IGNORE_INDEX = -100
Segment = tuple[str, bool]  # (text, labelled)


def _fill(fmt: str, content: str) -> str:
    # str.replace, not str.format: contents and formats may hold braces
    return fmt.replace("{content}", content)


def _jinja(text: str) -> str:
    """A Jinja string literal (Jinja unescapes literals like Python does)."""
    return repr(text)


def _jinja_terms(fmt: str, expr: str = "content") -> list[str]:
    """A format string as Jinja terms to join with +: literals around `expr` where {content} is."""
    before, found, after = fmt.partition("{content}")
    terms = [_jinja(before)] if before else []
    if found:
        terms.append(expr)
    return terms + ([_jinja(after)] if after else [])


def _jinja_expr(fmt: str, expr: str = "content") -> str:
    """A format string as one Jinja expression."""
    return " + ".join(_jinja_terms(fmt, expr)) or "''"


def _tojson(value: Any, indent: int | None = None) -> str:
    """JSON as the `tojson` filter of transformers' chat-template renderer writes it."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


# -- tool formats: how a template writes the tools, an assistant's tool calls and the tool results -------------

# Qwen2.5 / Qwen3 (Hermes-style): the tools open the system turn, calls are <tool_call> JSON lines in the reply,
# results are <tool_response> blocks in a user turn
_QWEN_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_QWEN_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                    "<args-json-object>}\n</tool_call>")
# Llama-3.1 (tools in the first user turn, the default of its template): one JSON call per reply, results in an
# ipython turn
_LLAMA3_SYSTEM_HEADER = "<|start_header_id|>system<|end_header_id|>\n\n"
_LLAMA31_DATES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
_LLAMA31_TOOLS = ("Given the following functions, please respond with a JSON for a function call with its proper "
                  "arguments that best answers the given prompt.\n\n"
                  'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
                  'value}.Do not use variables.\n\n')
TOOL_FORMATS = ("qwen", "llama3.1", "mistral")


def _mistral_tools(tools: list[dict]) -> str:
    """Mistral v0.3's [AVAILABLE_TOOLS] block (its template writes string values unescaped)."""
    def one(tool: dict) -> str:
        fields = [f'"{key}": "{val}"' if isinstance(val, str) else f'"{key}": {_tojson(val)}'
                  for key, val in tool["function"].items() if key != "return"]
        return '{"type": "function", "function": {' + ", ".join(fields) + "}}"
    return "[AVAILABLE_TOOLS] [" + ", ".join(one(t) for t in tools) + "][/AVAILABLE_TOOLS]"


def _mistral_id(value: Any) -> bool:
    """Mistral's format takes tool-call ids of exactly 9 letters and digits."""
    return isinstance(value, str) and len(value) == 9 and value.isalnum()


def _mistral_call_ids(turns: list[dict]) -> list[str]:
    """The id of each tool call in order: its own where it has a Mistral one, else its number, zero-padded."""
    calls = [c for m in turns for c in m.get("tool_calls") or []]
    return [c["id"] if _mistral_id(c.get("id")) else f"{k:09d}" for k, c in enumerate(calls, 1)]


@dataclass(frozen=True)
class Template:
    """One chat format: a row of the table below; `{content}` in a format string is the message text."""

    name: str
    default_system: str | None = None
    stop_words: tuple[str, ...] = ()
    prefix: str = ""  # start of the text (the model's BOS text where its format writes one)
    system: str = "{content}"  # the system block; opens a user turn instead when fold_system
    user: str = "{content}"
    assistant_start: str = ""  # the role header before a response; also the generation prompt
    assistant: str = "{content}"  # labelled: response + end-of-turn marker
    assistant_sep: str = ""  # unlabelled text after a response
    fold_system: str = ""  # "first" / "last": no system role; the system block opens the first / last user turn
    first_user: str | None = None  # a different format for the first user turn (chatglm3)
    strip: tuple[str, ...] = ()  # roles whose content the format trims (Jinja's `| trim`)
    system_always: bool = False  # the system block is written even without a system prompt (Llama-3.1's dates)
    no_system: bool = False  # the format has no system prompt: one is an error, as in the model's own template
    final_reply_prefix: str = ""  # labelled text opening a reply that ends the conversation (Qwen3's empty think)
    suffix: str = ""  # unlabelled text after a finished conversation, i.e. without the generation prompt
    tool_format: str | None = None  # one of TOOL_FORMATS: how tools, tool calls and tool results are written
    families: str = ""  # the model families whose official chat format this is (`medgpt template list`)

    # -- text ---------------------------------------------------------------------------------------

    def segments(self, messages: list[dict], system: str | None = None,
                 add_generation_prompt: bool = False, tools: list[dict] | None = None) -> list[Segment]:
        """The rendered text as consecutive (text, labelled) pieces; joining them gives render()."""
        system_text, turns = split_system(messages, system, self.default_system)
        tools = check_tools(tools)
        self._check_tool_use(turns, tools)
        if "system" in self.strip:
            system_text = system_text.strip()
        users = [i for i, m in enumerate(turns) if m["role"] == "user"]
        if system_text and self.no_system:
            raise UserError(f"template {self.name!r}: the format has no system prompt (the model's own template "
                            "rejects one); give the instructions in the first user message, or pass --system ''")
        fold_at = None
        if system_text and self.fold_system:
            if not users:
                raise UserError(f"template {self.name!r}: the system prompt opens a user turn, and there is none")
            fold_at = users[0] if self.fold_system == "first" else users[-1]
        tools_at = None
        if tools and self.tool_format in ("llama3.1", "mistral"):
            if not users or (self.tool_format == "llama3.1" and users[0] != 0):
                where = "first" if self.tool_format == "llama3.1" else "last"
                raise UserError(f"template {self.name!r}: the tools go in the {where} user message, and the "
                                "conversation does not start with one")
            tools_at = users[0] if self.tool_format == "llama3.1" else users[-1]
        call_ids = _mistral_call_ids(turns) if self.tool_format == "mistral" else []
        results = 0
        out: list[Segment] = [(self.prefix, False), (self._system_block(system_text, tools), False)]
        for i, m in enumerate(turns):
            content = m["content"].strip() if m["role"] in self.strip else m["content"]
            if m["role"] == "user":
                if i == fold_at:
                    content = _fill(self.system, system_text) + content
                if i == tools_at and self.tool_format == "llama3.1":
                    content = _LLAMA31_TOOLS + "".join(_tojson(t, indent=4) + "\n\n" for t in tools) + content
                if i == tools_at and self.tool_format == "mistral":
                    out.append((_mistral_tools(tools), False))
                fmt = self.first_user if i == 0 and self.first_user is not None else self.user
                out.append((_fill(fmt, content), False))
            elif m["role"] == "assistant":
                calls = m.get("tool_calls") or []
                reply = self._tool_calls(i, content, calls, call_ids) if calls else _fill(self.assistant, content)
                if i == len(turns) - 1:
                    reply = self.final_reply_prefix + reply
                call_ids = call_ids[len(calls):] if self.tool_format == "mistral" else call_ids
                out += [(self.assistant_start, False), (reply, True), (self.assistant_sep, False)]
            else:
                results += 1
                out.append((self._tool_result(turns, i, content, results), False))
        out.append((self.assistant_start if add_generation_prompt else self.suffix, False))
        return [s for s in out if s[0]]

    def render(self, messages: list[dict], add_generation_prompt: bool = False, system: str | None = None,
               tools: list[dict] | None = None) -> str:
        """The exact text the model sees (system=None: the default system prompt; "": none)."""
        return "".join(text for text, _ in self.segments(messages, system, add_generation_prompt, tools))

    def _check_tool_use(self, turns: list[dict], tools: list[dict] | None) -> None:
        uses = [m["role"] for m in turns if m["role"] == "tool" or m.get("tool_calls")]
        if (tools or uses) and self.tool_format is None:
            what = "tools" if tools else "tool results" if "tool" in uses else "tool calls"
            raise UserError(f"template {self.name!r} has no tool format, and the conversation has {what}; templates "
                            f"with one: {', '.join(n for n, t in TEMPLATES.items() if t.tool_format)}")

    def _system_block(self, system_text: str, tools: list[dict] | None) -> str:
        """The system turn, with the tools where the tool format puts them there."""
        if self.fold_system:
            return ""
        content = system_text
        if tools and self.tool_format == "qwen":
            lead = system_text + "\n\n" if system_text or self.default_system is not None else ""
            content = lead + _QWEN_TOOLS_HEAD + "".join("\n" + _tojson(t) for t in tools) + _QWEN_TOOLS_TAIL
        if not (content or self.system_always):
            return ""
        block = _fill(self.system, content)
        if tools and self.tool_format == "llama3.1":
            block = block.replace(_LLAMA3_SYSTEM_HEADER, _LLAMA3_SYSTEM_HEADER + "Environment: ipython\n", 1)
        return block

    def _tool_calls(self, i: int, content: str, calls: list[dict], call_ids: list[str]) -> str:
        """The labelled reply of an assistant turn with tool calls (and, in Qwen's format, text before them)."""
        if self.tool_format != "qwen" and content:
            raise UserError(f"message {i}: template {self.name!r} writes an assistant turn with tool calls as the "
                            "calls alone: its text would be dropped; give the text its own assistant turn")
        functions = [c["function"] for c in calls]
        if self.tool_format == "qwen":
            lines = ['<tool_call>\n{"name": "' + f["name"] + '", "arguments": ' + _tojson(f["arguments"])
                     + "}\n</tool_call>" for f in functions]
            return _fill(self.assistant, content + ("\n" if content else "") + "\n".join(lines))
        if self.tool_format == "llama3.1":
            if len(functions) != 1:
                raise UserError(f"message {i}: template {self.name!r} takes one tool call per assistant turn "
                                f"(Llama-3.1's format), got {len(functions)}")
            f = functions[0]
            return _fill(self.assistant, '{"name": "' + f["name"] + '", "parameters": ' + _tojson(f["arguments"]) + "}")
        entries = [_tojson(f)[:-1] + ', "id": "' + call_id + '"}' for f, call_id in zip(functions, call_ids)]
        return "[TOOL_CALLS] [" + ", ".join(entries) + "]</s>"

    def _tool_result(self, turns: list[dict], i: int, content: str, number: int) -> str:
        """A tool result (unlabelled); Qwen's format groups consecutive results in one user turn."""
        if self.tool_format == "qwen":
            first = i == 0 or turns[i - 1]["role"] != "tool"
            last = i == len(turns) - 1 or turns[i + 1]["role"] != "tool"
            return (("<|im_start|>user" if first else "") + "\n<tool_response>\n" + content + "\n</tool_response>"
                    + ("<|im_end|>\n" if last else ""))
        if self.tool_format == "llama3.1":
            return "<|start_header_id|>ipython<|end_header_id|>\n\n" + _tojson(content) + "<|eot_id|>"
        call_id = turns[i].get("tool_call_id")
        if not _mistral_id(call_id):
            ids = _mistral_call_ids(turns)
            call_id = ids[number - 1] if number <= len(ids) else f"{number:09d}"
        return '[TOOL_RESULTS] {"content": ' + content + ', "call_id": "' + call_id + '"}[/TOOL_RESULTS]'

    # -- tokens -------------------------------------------------------------------------------------

    def encode(self, tokenizer: Any, messages: list[dict], system: str | None = None,
               train_on_all: bool = False, tools: list[dict] | None = None) -> dict[str, list[int]]:
        """Token ids with labels on the assistant responses (and their end-of-turn marker) only."""
        return encode_segments(tokenizer, self.segments(messages, system, tools=tools), train_on_all)

    def encode_prompt(self, tokenizer: Any, messages: list[dict], system: str | None = None,
                      tools: list[dict] | None = None) -> list[int]:
        """Ids of the prompt for generation: the conversation so far plus the generation prompt.

        Tokenized as encode() does (the whole rendered text at once, the same BOS rule), so the ids are
        a prefix of the training ids wherever the tokenizer splits at the generation prompt's end.
        """
        segments = self.segments(messages, system, add_generation_prompt=True, tools=tools)
        return encode_segments(tokenizer, segments)["input_ids"]

    # -- Jinja --------------------------------------------------------------------------------------

    def chat_template(self) -> str:
        """A Jinja chat template (for tokenizer.chat_template) that renders exactly what render() does.

        A leading system message plays the role of render()'s `system` argument; `tools` is the tools.
        """
        def out(*pieces: str) -> str:  # pieces: format strings, whose {content} stands for `content`
            terms = [t for fmt in pieces for t in _jinja_terms(fmt)]
            return "{{- " + " + ".join(terms) + " -}}" if terms else ""

        def fail(message: str) -> str:
            return "{{- raise_exception(" + _jinja(f"template {self.name!r}: {message}") + ") -}}"

        def when(test: str, *body: str) -> str:
            return "{%- if " + test + " -%}" + "".join(body) + "{%- endif -%}"

        def let(name: str, expr: str) -> str:
            return "{%- set " + name + " = " + expr + " -%}"

        fmt, system_expr = self.tool_format, _jinja_expr(self.system, "ns.system")
        strip = when("message['role'] in " + repr(list(self.strip)), let("content", "content | trim")) \
            if self.strip else ""
        j = [
            let("ns", "namespace(system=" + _jinja(self.default_system or "") + ", first_user=-1, last_user=-1, "
                "calls=[], count=0, results=0, text='', reply='')"),
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            let("ns.system", "messages[0]['content']"), let("loop_messages", "messages[1:]"),
            "{%- else -%}" + let("loop_messages", "messages") + "{%- endif -%}",
            let("tool_list", "tools if tools is defined and tools else none"),
            "{%- for message in loop_messages -%}{%- if message['role'] == 'user' -%}",
            when("ns.first_user < 0", let("ns.first_user", "loop.index0")), let("ns.last_user", "loop.index0"),
            "{%- endif -%}{%- endfor -%}",
            let("ns.system", "ns.system | trim") if "system" in self.strip else "",
            when("ns.system", fail("the format has no system prompt")) if self.no_system else "",
            when("ns.system and ns.first_user < 0", fail("the system prompt opens a user turn, and there is none"))
            if self.fold_system else "",
        ]
        if fmt is None:
            j.append(when("tool_list or loop_messages | selectattr('role', 'equalto', 'tool') | list "
                          "or loop_messages | selectattr('tool_calls') | list", fail("it has no tool format")))
        elif fmt in ("llama3.1", "mistral"):
            j.append(when("tool_list and " + ("ns.first_user != 0" if fmt == "llama3.1" else "ns.last_user < 0"),
                          fail("the tools go in a user message: the conversation must start with one")))
        if fmt == "mistral":  # the call ids: their own where they are Mistral's 9 letters/digits, else the number
            mistral_id = "{0} is string and {0} | length == 9 and {0}.isalnum()"
            j += ["{%- for m in loop_messages -%}{%- for c in (m['tool_calls'] or []) -%}",
                  let("ns.count", "ns.count + 1"),
                  "{%- if " + mistral_id.format("c['id']") + " -%}" + let("ns.calls", "ns.calls + [c['id']]"),
                  "{%- else -%}" + let("ns.calls", "ns.calls + ['%09d' | format(ns.count)]") + "{%- endif -%}",
                  "{%- endfor -%}{%- endfor -%}", let("ns.count", "0")]
        j.append(out(self.prefix))
        if not self.fold_system:
            j.append(let("ns.text", "ns.system"))
            if fmt == "qwen":
                lead = "ns.system + '\\n\\n'" if self.default_system is not None else \
                    "(ns.system + '\\n\\n' if ns.system else '')"
                j.append(when("tool_list", let("ns.text", lead + " + " + _jinja(_QWEN_TOOLS_HEAD)),
                              "{%- for t in tool_list -%}" + let("ns.text", "ns.text + '\\n' + t | tojson")
                              + "{%- endfor -%}", let("ns.text", "ns.text + " + _jinja(_QWEN_TOOLS_TAIL))))
            env = when("tool_list", let("ns.text", "ns.text | replace(" + _jinja(_LLAMA3_SYSTEM_HEADER) + ", "
                                        + _jinja(_LLAMA3_SYSTEM_HEADER + "Environment: ipython\n") + ", 1)")) \
                if fmt == "llama3.1" else ""
            j.append(when("true" if self.system_always else "ns.text",
                          let("ns.text", _jinja_expr(self.system, "ns.text")), env, "{{- ns.text -}}"))
        user = out(self.user)
        if self.first_user is not None:
            user = "{%- if loop.first -%}" + out(self.first_user) + "{%- else -%}" + user + "{%- endif -%}"
        fold_at = "ns.first_user" if self.fold_system == "first" else "ns.last_user"
        j += ["{%- for message in loop_messages -%}", let("content", "message['content']"), strip,
              "{%- if message['role'] == 'user' -%}",
              when("ns.system and loop.index0 == " + fold_at, let("content", system_expr + " + content"))
              if self.fold_system else ""]
        if fmt == "llama3.1":
            j.append(when("tool_list and loop.index0 == ns.first_user", let("ns.text", _jinja(_LLAMA31_TOOLS)),
                          "{%- for t in tool_list -%}" + let("ns.text", "ns.text + t | tojson(indent=4) + '\\n\\n'")
                          + "{%- endfor -%}", let("content", "ns.text + content")))
        elif fmt == "mistral":
            j.append(when("tool_list and loop.index0 == ns.last_user", "{{- '[AVAILABLE_TOOLS] [' -}}",
                          "{%- for tool in tool_list -%}{{- '{\"type\": \"function\", \"function\": {' -}}",
                          "{%- for key, val in tool['function'].items() if key != 'return' -%}",
                          "{%- if val is string -%}{{- '\"' + key + '\": \"' + val + '\"' -}}",
                          "{%- else -%}{{- '\"' + key + '\": ' + val | tojson -}}{%- endif -%}",
                          when("not loop.last", "{{- ', ' -}}"), "{%- endfor -%}{{- '}}' -}}",
                          when("not loop.last", "{{- ', ' -}}"), "{%- endfor -%}{{- '][/AVAILABLE_TOOLS]' -}}"))
        j += [user, "{%- elif message['role'] == 'assistant' -%}"]
        reply = let("ns.reply", _jinja_expr(self.assistant))
        if fmt is None:
            j.append(reply)
        else:
            j.append("{%- if message['tool_calls'] -%}")
            if fmt == "qwen":
                j += [let("ns.text", "content + ('\\n' if content else '')"),
                      "{%- for c in message['tool_calls'] -%}",
                      when("not loop.first", let("ns.text", "ns.text + '\\n'")),
                      let("ns.text", "ns.text + '<tool_call>\\n{\"name\": \"' + c['function']['name'] + '\", "
                          "\"arguments\": ' + c['function']['arguments'] | tojson + '}\\n</tool_call>'"),
                      "{%- endfor -%}", let("ns.reply", _jinja_expr(self.assistant, "ns.text"))]
            else:
                j.append(when("content", fail("an assistant turn with tool calls is written as the calls alone")))
            if fmt == "llama3.1":
                j += [when("message['tool_calls'] | length != 1", fail("it takes one tool call per assistant turn")),
                      let("f", "message['tool_calls'][0]['function']"),
                      let("ns.reply", _jinja_expr(self.assistant, "'{\"name\": \"' + f['name'] + '\", "
                                                  "\"parameters\": ' + f['arguments'] | tojson + '}'"))]
            elif fmt == "mistral":
                j += [let("ns.text", "''"), "{%- for c in message['tool_calls'] -%}", let("ns.count", "ns.count + 1"),
                      let("ns.text", "ns.text + (', ' if not loop.first else '') + (c['function'] | tojson)[:-1] "
                          "+ ', \"id\": \"' + ns.calls[ns.count - 1] + '\"}'"), "{%- endfor -%}",
                      let("ns.reply", "'[TOOL_CALLS] [' + ns.text + ']</s>'")]
            j += ["{%- else -%}", reply, "{%- endif -%}"]
        if self.final_reply_prefix:
            j.append(when("loop.last", let("ns.reply", _jinja(self.final_reply_prefix) + " + ns.reply")))
        j.append("{{- " + " + ".join([*_jinja_terms(self.assistant_start, ""), "ns.reply",
                                      *_jinja_terms(self.assistant_sep, "")]) + " -}}")
        if fmt == "qwen":
            j += ["{%- elif message['role'] == 'tool' -%}",
                  when("loop.first or loop_messages[loop.index0 - 1]['role'] != 'tool'", "{{- '<|im_start|>user' -}}"),
                  "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}",
                  when("loop.last or loop_messages[loop.index0 + 1]['role'] != 'tool'", "{{- '<|im_end|>\\n' -}}")]
        elif fmt == "llama3.1":
            j += ["{%- elif message['role'] == 'tool' -%}",
                  "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + content | tojson + '<|eot_id|>' -}}"]
        elif fmt == "mistral":
            j += ["{%- elif message['role'] == 'tool' -%}", let("ns.results", "ns.results + 1"),
                  let("call_id", "message['tool_call_id']"),
                  "{%- if not (" + mistral_id.format("call_id") + ") -%}",
                  let("call_id", "ns.calls[ns.results - 1] if ns.results <= ns.calls | length "
                      "else '%09d' | format(ns.results)"), "{%- endif -%}",
                  "{{- '[TOOL_RESULTS] {\"content\": ' + content + ', \"call_id\": \"' + call_id + "
                  "'\"}[/TOOL_RESULTS]' -}}"]
        j += ["{%- endif -%}{%- endfor -%}",
              "{%- if add_generation_prompt -%}" + out(self.assistant_start)
              + ("{%- else -%}" + out(self.suffix) if self.suffix else "") + "{%- endif -%}"]
        return "".join(j)


@dataclass(frozen=True)
class AutoTemplate(Template):
    """The tokenizer's own chat template; assistant spans are found by rendering message prefixes."""

    tokenizer: Any = field(default=None, compare=False, repr=False)

    def _apply(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def segments(self, messages: list[dict], system: str | None = None,
                 add_generation_prompt: bool = False, tools: list[dict] | None = None) -> list[Segment]:
        system, turns = split_system(messages, system)
        tools = check_tools(tools)
        msgs = ([{"role": "system", "content": system}] if system else []) + turns
        full = self._apply(msgs, add_generation_prompt, tools)
        out: list[Segment] = []
        cursor = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self._apply(msgs[:i], True, tools) if i else None
            through = self._apply(msgs[: i + 1], False, tools) if i else None
            if before is not None and full.startswith(through) and through.startswith(before) and len(before) >= cursor:
                start, end = len(before), len(through)
            else:  # the template rewrites earlier turns: find the content and the end-of-turn marker after it
                start = full.find(m["content"], cursor) if m["content"] else -1
                if start < 0:
                    raise UserError(f"template 'auto': cannot find assistant message {i} in the rendered text")
                end = start + len(m["content"])
                end += next((len(w) for w in self.stop_words if full.startswith(w, end)), 0)
            end = start + len(full[start:end].rstrip())  # the turn's trailing newline is not a response
            out += [(full[cursor:start], False), (full[start:end], True)]
            cursor = end
        out.append((full[cursor:], False))
        return [s for s in out if s[0]]

    def chat_template(self) -> str:
        return self.tokenizer.chat_template


def encode_segments(tokenizer: Any, segments: list[Segment], train_on_all: bool = False) -> dict[str, list[int]]:
    """Token ids of the whole text, tokenized once, with labels placed by character offsets.

    The ids are those of tokenizing the rendered text in one call, which is what the model sees at
    inference: tokenizing each labelled run on its own differs wherever the tokenizer treats the start
    of a call specially (Llama-2's normalizer prepends `▁` to every call) or merges across a boundary.
    A token is labelled when its first character lies in a labelled segment, so a token that straddles
    the end of a reply (its end-of-turn marker merged with what follows) is learned, and one that
    straddles its start (header merged with the reply) is not. A BOS is prepended when the tokenizer
    adds one itself and the text does not already begin with the BOS text. Tokenizers without offsets
    (slow ones) are encoded run by run, or by prefixes, only where that gives the same ids.
    """
    text = "".join(piece for piece, _ in segments)
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(encoded["input_ids"])
        masks = _masks_by_offsets(segments, [start for start, _ in encoded["offset_mapping"]])
    else:
        input_ids, masks = _encode_without_offsets(tokenizer, segments, text)
    bos = tokenizer.bos_token
    if _adds_bos(tokenizer) and not (bos and text.startswith(bos)):
        input_ids.insert(0, tokenizer.bos_token_id)
        masks.insert(0, 0)
    if train_on_all:
        masks = [1] * len(input_ids)
    labels = [i if m else IGNORE_INDEX for i, m in zip(input_ids, masks)]
    return {"input_ids": input_ids, "labels": labels, "assistant_masks": masks}


def _masks_by_offsets(segments: list[Segment], starts: list[int]) -> list[int]:
    """1 for each token whose first character (offset `start`) lies in a labelled segment."""
    ends, labelled = list(itertools.accumulate(len(piece) for piece, _ in segments)), [lab for _, lab in segments]
    return [int(labelled[i]) if (i := bisect.bisect_right(ends, start)) < len(ends) else 0 for start in starts]


def _encode_without_offsets(tokenizer: Any, segments: list[Segment], text: str) -> tuple[list[int], list[int]]:
    """Ids of the whole text and their masks, from a tokenizer that gives no character offsets.

    Run by run where the runs' ids join to the whole text's ids; else from the ids of each prefix that
    ends at a run boundary, where each is a prefix of the whole ids; else a UserError (no exact labels).
    """
    runs: list[Segment] = []
    for piece, labelled in segments:
        if runs and runs[-1][1] == labelled:
            runs[-1] = (runs[-1][0] + piece, labelled)
        else:
            runs.append((piece, labelled))
    whole = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.encode(piece, add_special_tokens=False) for piece, _ in runs]
    if [i for ids in pieces for i in ids] == whole:
        return whole, [int(labelled) for ids, (_, labelled) in zip(pieces, runs) for _ in ids]
    masks: list[int] = []
    end = 0
    for piece, labelled in runs[:-1]:
        end += len(piece)
        prefix = tokenizer.encode(text[:end], add_special_tokens=False)
        if len(prefix) < len(masks) or whole[:len(prefix)] != prefix:
            raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} gives no character offsets (not a "
                            "fast tokenizer) and its tokens do not split at the turn boundary before "
                            f"{text[end:end + 30]!r}, so labels cannot be placed exactly: use a fast tokenizer "
                            "(one with a tokenizer.json)")
        masks += [int(labelled)] * (len(prefix) - len(masks))
    masks += [int(runs[-1][1])] * (len(whole) - len(masks)) if runs else []
    return whole, masks


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS in front of what it encodes (Llama-style) by itself."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == tokenizer.bos_token_id and ids != tokenizer.encode("a", add_special_tokens=False)


# -- the registry ---------------------------------------------------------------------------------

_CHATML = dict(system="<|im_start|>system\n{content}<|im_end|>\n", user="<|im_start|>user\n{content}<|im_end|>\n",
               assistant_start="<|im_start|>assistant\n", assistant="{content}<|im_end|>", assistant_sep="\n")
_LLAMA3 = dict(prefix="<|begin_of_text|>", system=_LLAMA3_SYSTEM_HEADER + "{content}<|eot_id|>",
               user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
               assistant_start="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant="{content}<|eot_id|>",
               strip=("system", "user", "assistant"))
_GEMMA = dict(prefix="<bos>", system="{content}\n\n", user="<start_of_turn>user\n{content}<end_of_turn>\n",
              assistant_start="<start_of_turn>model\n", assistant="{content}<end_of_turn>", assistant_sep="\n",
              strip=("user", "assistant"))
_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                  "Write a response that appropriately completes the request.")
_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_DEEPSEEK_BOS, _DEEPSEEK_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# Each row is checked against the family's own chat template in tests/test_templates.py (the official Jinja
# texts are in tests/fixtures/chat_templates/, whose README lists the sources and every known difference).
TEMPLATES: dict[str, Template] = {t.name: t for t in (
    # FastChat vicuna_v1.1; the tokenizer adds <s>
    Template("vicuna", _VICUNA_SYSTEM, ("</s>",), system="{content} ", user="USER: {content} ",
             assistant_start="ASSISTANT:", assistant=" {content}</s>",
             families="Vicuna v1.1+ (FastChat's vicuna_v1.1)"),
    # Alpaca's prompt (instruction and input joined into the user message), multi-turn as LLaMA-Factory's alpaca
    Template("alpaca", _ALPACA_SYSTEM, ("</s>", "### Instruction:"), system="{content}\n\n",
             user="### Instruction:\n{content}\n\n", assistant_start="### Response:\n",
             assistant="{content}</s>", assistant_sep="\n\n", families="Stanford Alpaca and its fine-tunes"),
    Template("chatml", None, ("<|im_end|>", "<|im_start|>"), **_CHATML,
             families="ChatML models without a default system prompt (OpenHermes-2.5, SmolLM2 with a system)"),
    Template("qwen", _QWEN_SYSTEM, ("<|im_end|>", "<|endoftext|>"), **_CHATML, tool_format="qwen",
             families="Qwen2.5-Instruct (its default system prompt; tools)"),
    Template("qwen2", "You are a helpful assistant.", ("<|im_end|>", "<|endoftext|>"), **_CHATML,
             families="Qwen2-Instruct (default system prompt 'You are a helpful assistant.')"),
    # Qwen3's template writes an empty think block in a reply that ends the conversation (non-thinking answers)
    Template("qwen3", None, ("<|im_end|>", "<|endoftext|>"), **_CHATML, final_reply_prefix="<think>\n\n</think>\n\n",
             tool_format="qwen",
             families="Qwen3 (no default system prompt; a final reply gets its empty think block; tools)"),
    Template("yi", None, ("<|im_end|>", "<|endoftext|>"), **_CHATML,
             families="Yi-1.5-Chat without a system prompt (ChatML)"),
    # Llama-2-chat: each exchange is <s>[INST] ... [/INST] ... </s>; the system prompt opens the first [INST]
    Template("llama2", None, ("</s>",), system="<<SYS>>\n{content}\n<</SYS>>\n\n", user="<s>[INST] {content} [/INST]",
             assistant=" {content} </s>", fold_system="first", strip=("user", "assistant"),
             families="Llama-2-chat"),
    Template("llama3", None, ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"), **_LLAMA3,
             families="Meta-Llama-3-Instruct"),
    # Llama-3.1's template always writes a system turn with its knowledge cut-off and a fixed date
    Template("llama3.1", None, ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
             **{**_LLAMA3, "system": _LLAMA3_SYSTEM_HEADER + _LLAMA31_DATES + "{content}<|eot_id|>"},
             system_always=True, tool_format="llama3.1",
             families="Llama-3.1-Instruct, Llama-3.3-Instruct (their fixed 'Today Date: 26 Jul 2024'; tools)"),
    # Mistral-Instruct v0.3 (tokenizer v3): no system role; as in mistral-common, the prompt opens the last [INST]
    Template("mistral", None, ("</s>",), prefix="<s>", system="{content}\n\n", user="[INST] {content}[/INST]",
             assistant=" {content}</s>", fold_system="last", strip=("assistant",), tool_format="mistral",
             families="Mistral-7B-Instruct-v0.3 (system prompt on the last user turn, as mistral-common; tools)"),
    # DeepSeek-LLM-Chat (also V2)
    Template("deepseek", None, (_DEEPSEEK_EOS,), prefix=_DEEPSEEK_BOS, system="{content}\n\n",
             user="User: {content}\n\n", assistant_start="Assistant:", assistant=" {content}" + _DEEPSEEK_EOS,
             families="DeepSeek-LLM-Chat"),
    # Baichuan2-Chat: <reserved_106>/<reserved_107> are its user/assistant tokens; replies end with </s>
    Template("baichuan2", None, ("</s>",), user="<reserved_106>{content}", assistant_start="<reserved_107>",
             assistant="{content}</s>", families="Baichuan2-Chat (no official Jinja template)"),
    # ChatGLM3: a role tag both opens a turn and ends the one before, so the reply's end-of-turn marker is
    # the next <|user|> (labelled, as in ChatGLM3's own fine-tuning code): later user turns start after it,
    # and a finished conversation ends with <|user|> (the original writes nothing after the last reply)
    Template("chatglm3", None, ("<|user|>", "<|observation|>", "</s>"), prefix="[gMASK]sop",
             system="<|system|>\n {content}", first_user="<|user|>\n {content}", user="\n {content}",
             assistant_start="<|assistant|>", assistant="\n {content}<|user|>",
             families="ChatGLM3-6B (a finished conversation ends with <|user|>)"),
    # Gemma-3 folds the system prompt into the first user turn; Gemma-1/2 have no system prompt at all
    Template("gemma", None, ("<end_of_turn>", "<eos>"), **_GEMMA, fold_system="first",
             families="Gemma-3 (system prompt folded into the first user turn); Gemma-1/2 without a system prompt"),
    Template("gemma2", None, ("<end_of_turn>", "<eos>"), **_GEMMA, no_system=True,
             families="Gemma-1, Gemma-2 (-it): a system prompt is an error, as in their templates"),
    # Phi-3/3.5: a finished conversation ends with the EOS text
    Template("phi3", None, ("<|end|>", "<|endoftext|>"), system="<|system|>\n{content}<|end|>\n",
             user="<|user|>\n{content}<|end|>\n", assistant_start="<|assistant|>\n", assistant="{content}<|end|>",
             assistant_sep="\n", suffix="<|endoftext|>", families="Phi-3.5-mini-instruct"),
)}

# end-of-turn markers worth stopping on when they appear in a tokenizer's own template
_KNOWN_STOPS = tuple(dict.fromkeys(w for t in TEMPLATES.values() for w in t.stop_words
                                   if w not in ("<|im_start|>", "### Instruction:")))


def list_templates() -> list[str]:
    """Names get_template() accepts."""
    return [*TEMPLATES, "auto"]


def template_families(name: str) -> str:
    """The model families whose official chat format a name matches (for `medgpt template list`)."""
    if name == "auto":
        return "the tokenizer's own chat template (needs --tokenizer)"
    return get_template(name).families


def get_template(name: str, tokenizer: Any = None) -> Template:
    """A registered template, or `auto`: the tokenizer's own chat template."""
    if name != "auto":
        if name not in TEMPLATES:
            raise UserError(f"unknown template {name!r}; known: {', '.join(list_templates())}")
        return TEMPLATES[name]
    if tokenizer is None:
        raise UserError("template 'auto' uses the tokenizer's own chat template: pass a tokenizer (--tokenizer MODEL)")
    chat_template = getattr(tokenizer, "chat_template", None)
    if not isinstance(chat_template, str) or not chat_template.strip():
        raise UserError(f"template 'auto': the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
                        f"template; name one of: {', '.join(TEMPLATES)}")
    stops = [w for w in _KNOWN_STOPS if w in chat_template]
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    template = AutoTemplate("auto", None, tuple(dict.fromkeys(stops)), tokenizer=tokenizer)
    return dataclasses.replace(template, default_system=_default_system(template))


def _default_system(template: AutoTemplate) -> str | None:
    """The system prompt the tokenizer's template inserts by itself, if any (for display only)."""
    marker, user = "\ue000SYSTEM\ue000", [{"role": "user", "content": "\ue001"}]
    try:
        bare = template._apply(user, False)
        with_system = template._apply([{"role": "system", "content": marker}, *user], False)
    except Exception:  # templates may reject system messages; then there is no default to show
        return None
    before, found, after = with_system.partition(marker)
    if found and bare.startswith(before) and bare.endswith(after) and len(bare) > len(before) + len(after):
        return bare[len(before):len(bare) - len(after)]
    return None
