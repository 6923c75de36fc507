"""Chat templates: turn canonical messages into the exact text a model sees, and into token ids whose
labels cover only the assistant turns.

A template is one row of a table (`TEMPLATES`): format strings per role, with `{content}` where the
message goes. The text of a conversation is

    prefix [system] user₁ assistant_start assistant₁ assistant_sep user₂ assistant_start ... [assistant_start]

Only `assistant` is labelled: the response and the end-of-turn marker that closes it (so the model learns
to stop); `stop_words[0]` is always that marker. Role headers, separators and prompts are not labelled.
`auto` wraps the tokenizer's own chat template and finds the assistant spans by rendering prefixes.

Only the standard library is imported here: tokenizers are passed in by the caller.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from medgpt.errors import UserError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
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


def _split_system(messages: list[dict], system: str | None, default: str | None) -> tuple[str, list[dict]]:
    """The effective system prompt and the remaining turns.

    Precedence: the `system` argument, then a leading system message, then the template default;
    an empty string means no system prompt at all.
    """
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"message {i}: expected {{'role': system|user|assistant, 'content': str}}, got {m!r:.120}")
        if m["role"] == "system" and i:
            raise UserError(f"message {i}: a system message may only come first")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if system is None:
        system = messages[0]["content"] if messages[0]["role"] == "system" else default
    return system or "", list(turns)


@dataclass(frozen=True)
class Template:
    """One chat format: a row of the table below; `{content}` in a format string is the message text."""

    name: str
    default_system: str | None = None
    stop_words: tuple[str, ...] = ()
    prefix: str = ""  # start of the text (the model's BOS text where its format writes one)
    system: str = "{content}"  # the system block; folded into the first user message when fold_system
    user: str = "{content}"
    assistant_start: str = ""  # the role header before a response; also the generation prompt
    assistant: str = "{content}"  # labelled: response + end-of-turn marker
    assistant_sep: str = ""  # unlabelled text after a response
    fold_system: bool = False  # the model has no system role: prepend the system block to the first user turn
    first_user: str | None = None  # a different format for the first user turn (chatglm3)

    # -- text ---------------------------------------------------------------------------------------

    def segments(self, messages: list[dict], system: str | None = None,
                 add_generation_prompt: bool = False) -> list[Segment]:
        """The rendered text as consecutive (text, labelled) pieces; joining them gives render()."""
        system_text, turns = _split_system(messages, system, self.default_system)
        out: list[Segment] = [(self.prefix, False)]
        if system_text and not self.fold_system:
            out.append((_fill(self.system, system_text), False))
        for i, m in enumerate(turns):
            if m["role"] == "user":
                content = m["content"]
                if i == 0 and system_text and self.fold_system:
                    content = _fill(self.system, system_text) + content
                fmt = self.first_user if i == 0 and self.first_user is not None else self.user
                out.append((_fill(fmt, content), False))
            else:
                out += [(self.assistant_start, False), (_fill(self.assistant, m["content"]), True),
                        (self.assistant_sep, False)]
        if add_generation_prompt:
            out.append((self.assistant_start, False))
        return [s for s in out if s[0]]

    def render(self, messages: list[dict], add_generation_prompt: bool = False, system: str | None = None) -> str:
        """The exact text the model sees (system=None: the default system prompt; "": none)."""
        return "".join(text for text, _ in self.segments(messages, system, add_generation_prompt))

    # -- tokens -------------------------------------------------------------------------------------

    def encode(self, tokenizer: Any, messages: list[dict], system: str | None = None,
               train_on_all: bool = False) -> dict[str, list[int]]:
        """Token ids with labels on the assistant responses (and their end-of-turn marker) only."""
        return encode_segments(tokenizer, self.segments(messages, system), train_on_all)

    def encode_prompt(self, tokenizer: Any, messages: list[dict], system: str | None = None) -> list[int]:
        """Ids of the prompt for generation: the conversation so far plus the generation prompt.

        Tokenized the same way as encode(), so a prompt's ids are a prefix of its training ids.
        """
        return encode_segments(tokenizer, self.segments(messages, system, add_generation_prompt=True))["input_ids"]

    # -- Jinja --------------------------------------------------------------------------------------

    def chat_template(self) -> str:
        """A Jinja chat template (for tokenizer.chat_template) that renders exactly what render() does.

        A leading system message plays the role of render()'s `system` argument.
        """
        def out(*pieces: str) -> str:  # pieces: format strings, whose {content} stands for `content`
            terms = [t for fmt in pieces for t in _jinja_terms(fmt)]
            return "{{- " + " + ".join(terms) + " -}}" if terms else ""

        system_expr = " + ".join(_jinja_terms(self.system, "ns.system"))
        user = out(self.user)
        if self.first_user is not None:
            user = "{%- if loop.first -%}" + out(self.first_user) + "{%- else -%}" + user + "{%- endif -%}"
        return "".join([
            "{%- set ns = namespace(system=" + _jinja(self.default_system or "") + ") -%}",
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set ns.system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
            "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}",
            out(self.prefix),
            "" if self.fold_system else "{%- if ns.system -%}{{- " + system_expr + " -}}{%- endif -%}",
            "{%- for message in loop_messages -%}{%- set content = message['content'] -%}",
            "{%- if message['role'] == 'user' -%}",
            "{%- if loop.first and ns.system -%}{%- set content = " + system_expr + " + content -%}{%- endif -%}"
            if self.fold_system else "",
            user,
            "{%- elif message['role'] == 'assistant' -%}",
            out(self.assistant_start, self.assistant, self.assistant_sep),
            "{%- endif -%}{%- endfor -%}",
            "{%- if add_generation_prompt -%}" + out(self.assistant_start) + "{%- endif -%}",
        ])


@dataclass(frozen=True)
class AutoTemplate(Template):
    """The tokenizer's own chat template; assistant spans are found by rendering message prefixes."""

    tokenizer: Any = field(default=None, compare=False, repr=False)

    def _apply(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def segments(self, messages: list[dict], system: str | None = None,
                 add_generation_prompt: bool = False) -> list[Segment]:
        _split_system(messages, None, None)  # validates
        turns = messages[1:] if messages[0]["role"] == "system" else list(messages)
        if system is None and messages[0]["role"] == "system":
            system = messages[0]["content"]
        msgs = ([{"role": "system", "content": system}] if system else []) + turns
        full = self._apply(msgs, add_generation_prompt)
        out: list[Segment] = []
        cursor = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self._apply(msgs[:i], add_generation_prompt=True) if i else None
            through = self._apply(msgs[: i + 1], add_generation_prompt=False) if i else None
            if before is not None and full.startswith(through) and through.startswith(before) and len(before) >= cursor:
                start, end = len(before), len(through)
            else:  # the template rewrites earlier turns: find the content and the end-of-turn marker after it
                start = full.find(m["content"], cursor)
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
    """Tokenize each run of same-labelled text separately and concatenate, so label spans are exact.

    Runs split at role markers, where the tokenizer's pre-tokenizer splits anyway, so the ids equal
    tokenizing the whole text for the usual tokenizers. A BOS is prepended when the tokenizer adds one
    itself and the text does not already begin with the BOS text.
    """
    runs: list[Segment] = []
    for text, labelled in segments:
        if runs and runs[-1][1] == labelled:
            runs[-1] = (runs[-1][0] + text, labelled)
        else:
            runs.append((text, labelled))
    input_ids: list[int] = []
    masks: list[int] = []
    bos = tokenizer.bos_token
    if _adds_bos(tokenizer) and not (runs and bos and runs[0][0].startswith(bos)):
        input_ids.append(tokenizer.bos_token_id)
        masks.append(0)
    for text, labelled in runs:
        ids = tokenizer.encode(text, add_special_tokens=False)
        input_ids += ids
        masks += [int(labelled)] * len(ids)
    if train_on_all:
        masks = [1] * len(input_ids)
    labels = [i if m else IGNORE_INDEX for i, m in zip(input_ids, masks)]
    return {"input_ids": input_ids, "labels": labels, "assistant_masks": masks}


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS in front of what it encodes (Llama-style) by itself."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == tokenizer.bos_token_id and ids != tokenizer.encode("a", add_special_tokens=False)


# -- the registry ---------------------------------------------------------------------------------

_CHATML = dict(system="<|im_start|>system\n{content}<|im_end|>\n", user="<|im_start|>user\n{content}<|im_end|>\n",
               assistant_start="<|im_start|>assistant\n", assistant="{content}<|im_end|>", assistant_sep="\n")
_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                  "Write a response that appropriately completes the request.")
_DEEPSEEK_BOS, _DEEPSEEK_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

TEMPLATES: dict[str, Template] = {t.name: t for t in (
    # FastChat vicuna_v1.1; the tokenizer adds <s>
    Template("vicuna", _VICUNA_SYSTEM, ("</s>",), system="{content} ", user="USER: {content} ",
             assistant_start="ASSISTANT:", assistant=" {content}</s>"),
    # Stanford Alpaca (instruction and input joined into the user message)
    Template("alpaca", _ALPACA_SYSTEM, ("</s>", "### Instruction:"), system="{content}\n\n",
             user="### Instruction:\n{content}\n\n", assistant_start="### Response:\n",
             assistant="{content}</s>", assistant_sep="\n\n"),
    Template("chatml", None, ("<|im_end|>", "<|im_start|>"), **_CHATML),
    Template("qwen", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
             ("<|im_end|>", "<|endoftext|>"), **_CHATML),
    Template("yi", None, ("<|im_end|>", "<|endoftext|>"), **_CHATML),
    # Llama-2-chat: each exchange is <s>[INST] ... [/INST] ... </s>; the system prompt opens the first [INST]
    Template("llama2", None, ("</s>",), system="<<SYS>>\n{content}\n<</SYS>>\n\n", user="<s>[INST] {content} [/INST]",
             assistant=" {content} </s>", fold_system=True),
    Template("llama3", None, ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"), prefix="<|begin_of_text|>",
             system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
             user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
             assistant_start="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant="{content}<|eot_id|>"),
    # Mistral-Instruct (v0.3 text); it has no system role, so the prompt is folded into the first [INST]
    Template("mistral", None, ("</s>",), prefix="<s>", system="{content}\n\n", user="[INST] {content}[/INST]",
             assistant=" {content}</s>", fold_system=True),
    # DeepSeek-LLM-Chat (also V2)
    Template("deepseek", None, (_DEEPSEEK_EOS,), prefix=_DEEPSEEK_BOS, system="{content}\n\n",
             user="User: {content}\n\n", assistant_start="Assistant:", assistant=" {content}" + _DEEPSEEK_EOS),
    # Baichuan2-Chat: <reserved_106>/<reserved_107> are its user/assistant tokens; replies end with </s>
    Template("baichuan2", None, ("</s>",), user="<reserved_106>{content}", assistant_start="<reserved_107>",
             assistant="{content}</s>"),
    # ChatGLM3: a role tag both opens a turn and ends the one before, so the reply's end-of-turn marker is
    # the next <|user|> (labelled, as in ChatGLM3's own fine-tuning code): later user turns start after it,
    # and a finished conversation ends with <|user|> (the original writes nothing after the last reply)
    Template("chatglm3", None, ("<|user|>", "<|observation|>", "</s>"), prefix="[gMASK]sop",
             system="<|system|>\n {content}", first_user="<|user|>\n {content}", user="\n {content}",
             assistant_start="<|assistant|>", assistant="\n {content}<|user|>"),
    # Gemma: no system role; the system prompt is prepended to the first user message
    Template("gemma", None, ("<end_of_turn>", "<eos>"), prefix="<bos>", system="{content}\n\n",
             user="<start_of_turn>user\n{content}<end_of_turn>\n", assistant_start="<start_of_turn>model\n",
             assistant="{content}<end_of_turn>", assistant_sep="\n", fold_system=True),
    Template("phi3", None, ("<|end|>", "<|endoftext|>"), system="<|system|>\n{content}<|end|>\n",
             user="<|user|>\n{content}<|end|>\n", assistant_start="<|assistant|>\n", assistant="{content}<|end|>",
             assistant_sep="\n"),
)}

# end-of-turn markers worth stopping on when they appear in a tokenizer's own template
_KNOWN_STOPS = tuple(dict.fromkeys(w for t in TEMPLATES.values() for w in t.stop_words
                                   if w not in ("<|im_start|>", "### Instruction:")))


def list_templates() -> list[str]:
    """Names get_template() accepts."""
    return [*TEMPLATES, "auto"]


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
