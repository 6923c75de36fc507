"""Chat templates: turn canonical messages into the exact text a model sees, and into token ids whose
labels cover only the assistant turns.

A template is one row of a table (`TEMPLATES`): format strings per role, with `{content}` where the
message goes. The text of a conversation is

    prefix [system] user₁ assistant_start assistant₁ assistant_sep user₂ ... (assistant_start | suffix)

with the variations a family needs as fields (a system prompt folded into a user turn, trimmed contents, a
tool format, ...); each row is checked against the family's official template in the tests. A tool format
(`data/tool_formats.py`) writes the tools, tool calls and tool results; `data/template_jinja.py` writes a
template as Jinja (`Template.chat_template`).

Only `assistant` is labelled: the response and the end-of-turn marker that closes it (so the model learns
to stop); `stop_words[0]` is always that marker. In a template with a tool format an assistant's tool calls
are part of its labelled reply; the tools and the tool results are not. Role headers, separators and
prompts are not labelled.
A template with a reasoning format (`think`: Qwen3's `<think>\n`, `\n</think>\n\n`) writes an assistant's
`reasoning` as its family's template does: in a think block opening the reply, for the turns after the last user
query only (the reply that ends the conversation always gets one, empty without reasoning); earlier turns drop
theirs. A reply whose content already opens with `<think>...</think>` is read as that reasoning and its answer.
The think block is labelled with the reply unless `train_on_reasoning=False` (then a non-empty one is context).
`enable_thinking=False` changes the generation prompt only, as in the family's template: it ends with the empty
think block. Templates without a reasoning format refuse messages that carry reasoning.
`auto` wraps the tokenizer's own chat template and finds the assistant spans by rendering prefixes.
The ids are those of tokenizing the whole text at once; labels go by character offsets (`encode_segments`).

Only the standard library is imported here: tokenizers are passed in by the caller.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import weakref
from dataclasses import dataclass, field
from typing import Any

from medgpt.data.messages import check_tools, split_system, split_think
from medgpt.data.template_jinja import chat_template as jinja_chat_template
from medgpt.data.tool_formats import TOOL_FORMATS, ToolFormat, get_tool_format
from medgpt.errors import UserError

IGNORE_INDEX = -100
Segment = tuple[str, bool]  # (text, labelled)
# a special-token marker in a format string: `<|im_start|>`, `<think>`, `</s>`, `<｜end▁of▁sentence｜>` (not `<<SYS>>`)
_MARKER = re.compile(r"(?<!<)<[^<>\s]+>(?!>)")


def _fill(fmt: str, content: str) -> str:
    # str.replace, not str.format: contents and formats may hold braces
    return fmt.replace("{content}", content)


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
    tool_format: str | None = None  # a name in TOOL_FORMATS: how tools, tool calls and tool results are written
    families: str = ""  # the model families whose official chat format this is (`medgpt template list`)
    think: tuple[str, str] = ()  # (opening, closing) of a reasoning block (Qwen3's think block): a reasoning format

    def __post_init__(self) -> None:
        if self.tool_format is not None:
            get_tool_format(self.tool_format)

    @property
    def tool_syntax(self) -> ToolFormat | None:
        """The tool format's definition (None: the template takes no tools)."""
        return TOOL_FORMATS[self.tool_format] if self.tool_format else None

    # -- text ---------------------------------------------------------------------------------------

    def segments(self, messages: list[dict], system: str | None = None,
                 add_generation_prompt: bool = False, tools: list[dict] | None = None,
                 enable_thinking: bool | None = None, train_on_reasoning: bool = True) -> list[Segment]:
        """The rendered text as consecutive (text, labelled) pieces; joining them gives render()."""
        system_text, turns = split_system(messages, system, self.default_system)
        tools = check_tools(tools)
        self._check_tool_use(turns, tools)
        last_query = self._last_query(turns)
        if "system" in self.strip:
            system_text = system_text.strip()
        fold_at, tools_at = self._placements(turns, system_text, tools)
        syntax = self.tool_syntax
        ids = syntax.call_ids(turns) if syntax else []
        calls_before = results = 0
        out: list[Segment] = [(self.prefix, False), (self._system_block(system_text, tools), False)]
        for i, m in enumerate(turns):
            content = m["content"].strip() if m["role"] in self.strip else m["content"]
            if m["role"] == "user":
                if i == fold_at:
                    content = _fill(self.system, system_text) + content
                before, opening = syntax.user_tools(tools) if syntax and i == tools_at else ("", "")
                fmt = self.first_user if i == 0 and self.first_user is not None else self.user
                out += [(before, False), (_fill(fmt, opening + content), False)]
            elif m["role"] == "assistant":
                content, think = self._reasoning(i, m, content, i == len(turns) - 1, i > last_query)
                calls = m.get("tool_calls") or []
                reply = self._calls_reply(i, content, calls, ids[calls_before:calls_before + len(calls)]) \
                    if calls else _fill(self.assistant, content)
                calls_before += len(calls)
                if i == len(turns) - 1 and not self.think:
                    reply = self.final_reply_prefix + reply
                labelled = train_on_reasoning or think == self.final_reply_prefix
                out += [(self.assistant_start, False), (think, labelled), (reply, True), (self.assistant_sep, False)]
            else:
                results += 1
                out.append((syntax.write_result(turns, i, content, results, ids), False))  # type: ignore[union-attr]
        out.append((self.assistant_start if add_generation_prompt else self.suffix, False))
        if add_generation_prompt and enable_thinking is False and self.think:
            out.append((self.final_reply_prefix, False))
        return [s for s in out if s[0]]

    def render(self, messages: list[dict], add_generation_prompt: bool = False, system: str | None = None,
               tools: list[dict] | None = None, enable_thinking: bool | None = None) -> str:
        """The exact text the model sees (system=None: the default system prompt; "": none)."""
        return "".join(text for text, _ in self.segments(messages, system, add_generation_prompt, tools,
                                                         enable_thinking))

    @staticmethod
    def _last_query(turns: list[dict]) -> int:
        """The index of the last user turn that is not a tool response in disguise (Qwen3's `last_query_index`)."""
        for i in range(len(turns) - 1, -1, -1):
            content = turns[i]["content"]
            if turns[i]["role"] == "user" and not (content.startswith("<tool_response>")
                                                   and content.endswith("</tool_response>")):
                return i
        return len(turns) - 1

    def _reasoning(self, i: int, message: dict, content: str, last: bool, after_query: bool) -> tuple[str, str]:
        """Assistant turn i's content and the think block before it ("" for none), as the family's template writes
        them."""
        reasoning = message.get("reasoning")
        if self.think and reasoning is None and (parsed := split_think(content)) is not None:
            reasoning, content = parsed
        if not self.think:
            if reasoning:
                raise UserError(f"message {i}: template {self.name!r} has no reasoning format, and the message has "
                                "reasoning; use a template with one (qwen3), or train with enable_thinking: false to "
                                "leave the reasoning out")
            return content, ""
        if not (after_query and (last or reasoning)):
            return content, ""
        return content.lstrip("\n"), self.think[0] + (reasoning or "").strip("\n") + self.think[1]

    def _check_tool_use(self, turns: list[dict], tools: list[dict] | None) -> None:
        uses = [m["role"] for m in turns if m["role"] == "tool" or m.get("tool_calls")]
        if (tools or uses) and self.tool_format is None:
            what = "tools" if tools else "tool results" if "tool" in uses else "tool calls"
            raise UserError(f"template {self.name!r} has no tool format, and the conversation has {what}; templates "
                            f"with one: {', '.join(n for n, t in TEMPLATES.items() if t.tool_format)}")

    def _placements(self, turns: list[dict], system_text: str,
                    tools: list[dict] | None) -> tuple[int | None, int | None]:
        """The index of the user turn the system prompt opens (fold_system) and of the one the tools open (None:
        no such turn)."""
        users = [i for i, m in enumerate(turns) if m["role"] == "user"]
        if system_text and self.no_system:
            raise UserError(f"template {self.name!r}: the format has no system prompt (the model's own template "
                            "rejects one); give the instructions in the first user message, or pass --system ''")
        fold_at = None
        if system_text and self.fold_system:
            if not users:
                raise UserError(f"template {self.name!r}: the system prompt opens a user turn, and there is none")
            fold_at = users[0] if self.fold_system == "first" else users[-1]
        tools_in = self.tool_syntax.tools_in if tools and self.tool_syntax else "system"
        if tools_in == "system":
            return fold_at, None
        if not users or (tools_in == "first" and users[0] != 0):
            raise UserError(f"template {self.name!r}: the tools go in the {tools_in} user message, and the "
                            "conversation does not start with one")
        return fold_at, users[0] if tools_in == "first" else users[-1]

    def _system_block(self, system_text: str, tools: list[dict] | None) -> str:
        """The system turn, with the tools where the tool format puts them there."""
        if self.fold_system:
            return ""
        syntax = self.tool_syntax if tools else None
        content = syntax.system_text(system_text, tools, self.default_system is not None) if syntax else system_text
        if not (content or self.system_always):
            return ""
        block = _fill(self.system, content)
        return syntax.system_block(block) if syntax else block

    def _calls_reply(self, i: int, content: str, calls: list[dict], ids: list[str]) -> str:
        """The labelled reply of assistant turn i with tool calls (and its text, where the format takes one)."""
        syntax = self.tool_syntax
        assert syntax is not None  # _check_tool_use refuses tool calls without a format
        if content and not syntax.text_before_calls:
            raise UserError(f"message {i}: template {self.name!r} writes an assistant turn with tool calls as the "
                            "calls alone: its text would be dropped; give the text its own assistant turn")
        if len(calls) > 1 and not syntax.parallel_calls:
            raise UserError(f"message {i}: template {self.name!r} takes one tool call per assistant turn (tool "
                            f"format {syntax.name!r}), got {len(calls)}")
        return _fill(syntax.calls_reply or self.assistant, syntax.write_calls(content, calls, ids))

    # -- tokens -------------------------------------------------------------------------------------

    def encode(self, tokenizer: Any, messages: list[dict], system: str | None = None,
               train_on_all: bool = False, tools: list[dict] | None = None, enable_thinking: bool | None = None,
               train_on_reasoning: bool = True) -> dict[str, list[int]]:
        """Token ids with labels on the assistant responses (and their end-of-turn marker) only."""
        segments = self.segments(messages, system, tools=tools, enable_thinking=enable_thinking,
                                 train_on_reasoning=train_on_reasoning)
        return encode_segments(tokenizer, segments, train_on_all)

    def encode_prompt(self, tokenizer: Any, messages: list[dict], system: str | None = None,
                      tools: list[dict] | None = None, enable_thinking: bool | None = None) -> list[int]:
        """Ids of the prompt for generation: the conversation so far plus the generation prompt.

        Tokenized as encode() does (the whole rendered text at once, the same BOS rule), so the ids are
        a prefix of the training ids wherever the tokenizer splits at the generation prompt's end.
        """
        segments = self.segments(messages, system, add_generation_prompt=True, tools=tools,
                                 enable_thinking=enable_thinking)
        return encode_segments(tokenizer, segments)["input_ids"]

    def markers(self) -> tuple[str, ...]:
        """The special-token markers the format writes: the `<...>` pieces of its role formats, prefixes and
        suffixes (Qwen3's think tags included) and its end-of-turn marker."""
        fields = (self.prefix, self.system, self.user, self.first_user or "", self.assistant_start, self.assistant,
                  self.assistant_sep, self.final_reply_prefix, self.suffix, *self.stop_words[:1])
        return tuple(dict.fromkeys(m for text in fields for m in _MARKER.findall(text)))

    def chat_template(self) -> str:
        """A Jinja chat template (for tokenizer.chat_template) that renders exactly what render() does.

        A leading system message plays the role of render()'s `system` argument; `tools` is the tools.
        """
        return jinja_chat_template(self)


@dataclass(frozen=True)
class AutoTemplate(Template):
    """The tokenizer's own chat template; assistant spans are found by rendering message prefixes."""

    tokenizer: Any = field(default=None, compare=False, repr=False)

    def _apply(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None,
               enable_thinking: bool | None = None) -> str:
        """The tokenizer's template on `messages`, their reasoning as `reasoning_content` (the key chat templates
        read)."""
        messages = [{**{k: v for k, v in m.items() if k != "reasoning"}, "reasoning_content": m["reasoning"]}
                    if m.get("reasoning") else m for m in messages]
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def segments(self, messages: list[dict], system: str | None = None,
                 add_generation_prompt: bool = False, tools: list[dict] | None = None,
                 enable_thinking: bool | None = None, train_on_reasoning: bool = True) -> list[Segment]:
        system, turns = split_system(messages, system)
        tools = check_tools(tools)
        if not train_on_reasoning and any(m.get("reasoning") for m in turns):
            raise UserError("template 'auto' labels each assistant turn as a whole: train_on_reasoning: false needs "
                            "a named template with a reasoning format (qwen3)")
        msgs = ([{"role": "system", "content": system}] if system else []) + turns
        full = self._apply(msgs, add_generation_prompt, tools, enable_thinking)
        out: list[Segment] = []
        cursor = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            # the reply starts after the plain generation prompt (a non-thinking one ends with a think block that
            # belongs to the reply in a finished conversation)
            before = self._apply(msgs[:i], True, tools) if i else None
            through = self._apply(msgs[: i + 1], False, tools, enable_thinking) if i else None
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
    return encode_segments_batch(tokenizer, [segments], train_on_all)[0]


def encode_segments_batch(tokenizer: Any, batch: list[list[Segment]],
                          train_on_all: bool = False) -> list[dict[str, list[int]]]:
    """`encode_segments` of many texts, a fast tokenizer called once for all of them."""
    texts = ["".join(piece for piece, _ in segments) for segments in batch]
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else {}
        pairs = [(list(ids), _masks_by_offsets(segments, offsets)) for segments, ids, offsets
                 in zip(batch, encoded.get("input_ids", []), encoded.get("offset_mapping", []))]
    else:
        pairs = [_encode_without_offsets(tokenizer, segments, text) for segments, text in zip(batch, texts)]
    bos, adds_bos = tokenizer.bos_token, _adds_bos(tokenizer)
    out = []
    for text, (input_ids, masks) in zip(texts, pairs):
        if adds_bos and not (bos and text.startswith(bos)):
            input_ids.insert(0, tokenizer.bos_token_id)
            masks.insert(0, 0)
        if train_on_all:
            masks = [1] * len(input_ids)
        labels = [i if m else IGNORE_INDEX for i, m in zip(input_ids, masks)]
        out.append({"input_ids": input_ids, "labels": labels, "assistant_masks": masks})
    return out


def _masks_by_offsets(segments: list[Segment], offsets: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose first character (its offset's start) lies in a labelled segment."""
    import numpy as np

    ends = np.fromiter(itertools.accumulate(len(piece) for piece, _ in segments), dtype=np.int64)
    labelled = np.array([int(lab) for _, lab in segments] + [0], dtype=np.int8)  # past the end: unlabelled
    starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
    return labelled[np.searchsorted(ends, starts, side="right")].tolist()


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


_ADDS_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS in front of what it encodes (Llama-style) by itself (asked once per
    tokenizer and BOS setting)."""
    if tokenizer.bos_token_id is None:
        return False
    key = (tokenizer.bos_token_id, getattr(tokenizer, "add_bos_token", None))
    try:
        known = _ADDS_BOS.get(tokenizer)
    except TypeError:  # not weakly referable: ask every time
        known = None
    if known and known[0] == key:
        return known[1]
    ids = tokenizer.encode("a", add_special_tokens=True)
    adds = bool(ids) and ids[0] == tokenizer.bos_token_id and ids != tokenizer.encode("a", add_special_tokens=False)
    try:
        _ADDS_BOS[tokenizer] = (key, adds)
    except TypeError:
        pass
    return adds


# -- the registry ---------------------------------------------------------------------------------

_LLAMA3_SYSTEM_HEADER = "<|start_header_id|>system<|end_header_id|>\n\n"
_CHATML = dict(system="<|im_start|>system\n{content}<|im_end|>\n", user="<|im_start|>user\n{content}<|im_end|>\n",
               assistant_start="<|im_start|>assistant\n", assistant="{content}<|im_end|>", assistant_sep="\n")
_LLAMA3 = dict(prefix="<|begin_of_text|>", system=_LLAMA3_SYSTEM_HEADER + "{content}<|eot_id|>",
               user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
               assistant_start="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant="{content}<|eot_id|>",
               strip=("system", "user", "assistant"))
_GEMMA = dict(prefix="<bos>", system="{content}\n\n", user="<start_of_turn>user\n{content}<end_of_turn>\n",
              assistant_start="<start_of_turn>model\n", assistant="{content}<end_of_turn>", assistant_sep="\n",
              strip=("user", "assistant"))
_LLAMA31_DATES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                  "Write a response that appropriately completes the request.")
_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_DEEPSEEK_BOS, _DEEPSEEK_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# Each row is checked against the family's own chat template in tests/test_data_templates.py (the official Jinja
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
             tool_format="qwen", think=("<think>\n", "\n</think>\n\n"),
             families="Qwen3 (no default system prompt; reasoning in think blocks, a final reply's empty without; "
                      "tools)"),
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


def split_markers(template: Template, tokenizer: Any) -> dict[str, list[str]]:
    """The template's markers (`Template.markers`) that are not one token of the tokenizer, each with the
    pieces the tokenizer splits it into: a model trained on them learns them as plain text."""
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    out = {}
    for marker in template.markers():
        ids = tokenizer.encode(marker, add_special_tokens=False)
        if len(ids) != 1 and marker not in added:
            out[marker] = [tokenizer.decode([i]) for i in ids]
    return out


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
