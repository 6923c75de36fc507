"""`medgpt.data.templates`: chat templates' exact text, label spans, system prompt rules, BOS handling and `auto`;
each template rendered as its family's official chat template renders (tests/fixtures/chat_templates, sources in
its README.md), tools, tool calls and results included, and the templates whose families publish no Jinja against
FastChat's Conversation.get_prompt, LLaMA-Factory's alpaca template and Stanford Alpaca's prompt.

The generated Jinja is in test_data_template_jinja.py, the `medgpt template` command in test_commands_template.py,
SentencePiece tokenizers in test_data_templates_sentencepiece.py."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from _conversations import (CONVERSATION, PARALLEL_CONVERSATION, SYSTEM,  # noqa: E402
                            TOOL_CONVERSATION, TOOL_CONVERSATIONS, TOOLS)

from medgpt.data.templates import IGNORE_INDEX, TEMPLATES, get_template, list_templates  # noqa: E402
from medgpt.errors import UserError  # noqa: E402

ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


# On the bundled (ChatML) tokenizer these formats' end-of-turn markers are plain text, not special tokens, and
# byte-level BPE merges the punctuation on both sides of a turn boundary ("</s><s>" -> "><",
# "<|eot_id|><|start_header_id|>" -> "><"). The merged token starts inside the reply, so it is labelled (the
# model learns to finish the marker) and carries the next turn's first character. With each model's own
# tokenizer the markers are special tokens, which always split (tests/test_data_templates_sentencepiece.py).
MARKER_MERGES_ON_BUNDLED = {"llama2", "llama3", "llama3.1", "baichuan2"}


def labelled_runs(tokenizer, encoded: dict) -> list[tuple[bool, str]]:
    """Decoded maximal runs of labelled / unlabelled tokens."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(encoded["input_ids"], encoded["labels"]):
        labelled = label != IGNORE_INDEX
        if runs and runs[-1][0] == labelled:
            runs[-1][1].append(token)
        else:
            runs.append((labelled, [token]))
    return [(labelled, tokenizer.decode(ids)) for labelled, ids in runs]


def test_registry_names():
    names = list_templates()
    for required in ("vicuna", "alpaca", "chatml", "qwen", "llama2", "llama3", "mistral", "deepseek", "yi",
                     "baichuan2", "chatglm3", "gemma", "phi3", "auto"):
        assert required in names
    with pytest.raises(UserError, match="known: .*chatml"):
        get_template("no-such-template")


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_labels_cover_exactly_the_assistant_turns(tokenizer, name):
    template = get_template(name)
    conversation = CONVERSATION[1:] if template.no_system else CONVERSATION
    text = template.render(conversation)
    for answer in ANSWERS + [m["content"] for m in conversation if m["role"] != "assistant"]:
        assert answer in text
    encoded = template.encode(tokenizer, conversation)
    assert len(encoded["input_ids"]) == len(encoded["labels"]) == len(encoded["assistant_masks"])
    assert encoded["assistant_masks"] == [int(label != IGNORE_INDEX) for label in encoded["labels"]]

    runs = labelled_runs(tokenizer, encoded)
    assert "".join(part for _, part in runs) == text  # nothing lost or added
    spans = [part for labelled, part in runs if labelled]
    assert len(spans) == len(ANSWERS)
    end_of_turn = template.stop_words[0]
    for k, (span, answer) in enumerate(zip(spans, ANSWERS)):
        body = span.strip()
        if k == len(ANSWERS) - 1:  # Qwen3's empty think block opens the reply that ends the conversation
            body = body.removeprefix(template.final_reply_prefix)
        assert body.startswith(answer), (span, answer)
        rest = body[len(answer):].strip()  # the reply and its end-of-turn marker, no more
        merged = name in MARKER_MERGES_ON_BUNDLED and len(rest) == len(end_of_turn) + 1
        assert rest == end_of_turn or (merged and rest.startswith(end_of_turn)), span
    unlabelled = "".join(part for labelled, part in runs if not labelled)
    assert not any(answer in unlabelled for answer in ANSWERS)

    everything = template.encode(tokenizer, conversation, train_on_all=True)
    assert everything["input_ids"] == encoded["input_ids"]
    assert everything["labels"] == everything["input_ids"]
    assert all(everything["assistant_masks"])


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_encode_matches_tokenizing_the_rendered_text(tokenizer, name):
    template = get_template(name)
    conversation = CONVERSATION[1:] if template.no_system else CONVERSATION
    whole = tokenizer.encode(template.render(conversation), add_special_tokens=False)  # it adds no BOS
    assert template.encode(tokenizer, conversation)["input_ids"] == whole


@pytest.mark.parametrize("name", ["chatml", "qwen"])
def test_prompt_ids_are_a_prefix_of_training_ids(tokenizer, name):
    template = get_template(name)
    prompt = template.encode_prompt(tokenizer, CONVERSATION[:-1])
    assert prompt == template.encode(tokenizer, CONVERSATION)["input_ids"][: len(prompt)]
    assert tokenizer.decode(prompt) == template.render(CONVERSATION[:-1], add_generation_prompt=True)


def test_system_prompt_rules():
    qwen, gemma = get_template("qwen"), get_template("gemma")
    turns = CONVERSATION[1:3]
    assert qwen.default_system in qwen.render(turns)  # None: the default
    assert "<|im_start|>system" not in qwen.render(turns, system="")  # "": none
    # the conversation's own system prompt wins; the argument fills in where it has none
    assert "Other." not in qwen.render(CONVERSATION, system="Other.") and SYSTEM in qwen.render(CONVERSATION, system="Other.")
    assert qwen.render(turns, system="Other.").count("Other.") == 1 and qwen.default_system not in qwen.render(
        turns, system="Other.")
    assert SYSTEM in qwen.render(CONVERSATION) and qwen.default_system not in qwen.render(CONVERSATION)
    # Gemma has no system role: the prompt opens the first user turn
    assert gemma.render(CONVERSATION).startswith(f"<bos><start_of_turn>user\n{SYSTEM}\n\n{turns[0]['content']}")
    assert qwen.render(turns[:1], add_generation_prompt=True).endswith("<|im_start|>assistant\n")


class CharTokenizer:
    """A Llama-like stand-in: adds <s> by itself; <s> and </s> are special tokens, other characters ids."""

    bos_token, eos_token, bos_token_id, eos_token_id = "<s>", "</s>", 1, 2

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens else []
        i = 0
        while i < len(text):
            special = next((t for t in ("<s>", "</s>") if text.startswith(t, i)), None)
            ids.append({"<s>": 1, "</s>": 2}[special] if special else ord(text[i]) + 10)
            i += len(special) if special else 1
        return ids


def test_bos_is_added_once():
    tokenizer = CharTokenizer()
    turns = CONVERSATION[1:3]
    vicuna = get_template("vicuna").encode(tokenizer, turns)["input_ids"]
    assert vicuna[0] == 1 and vicuna[1] != 1  # the tokenizer's BOS, added by encode
    for name in ("llama2", "mistral"):  # these formats write <s> themselves: no second BOS
        ids = get_template(name).encode(tokenizer, turns)["input_ids"]
        assert ids[:2] != [1, 1] and ids[0] == 1
        assert ids == tokenizer.encode(get_template(name).render(turns), add_special_tokens=False)


def test_auto_matches_chatml_on_the_bundled_tokenizer(tokenizer):
    auto, chatml = get_template("auto", tokenizer), get_template("chatml")
    assert auto.stop_words[0] == "<|im_end|>"
    assert auto.default_system and "SmolLM" in auto.default_system
    for messages in (CONVERSATION, CONVERSATION[1:]):
        a, c = auto.encode(tokenizer, messages), chatml.encode(tokenizer, messages)
        spans = [part for labelled, part in labelled_runs(tokenizer, a) if labelled]
        assert spans == [part for labelled, part in labelled_runs(tokenizer, c) if labelled]
        assert a["assistant_masks"] == [int(label != IGNORE_INDEX) for label in a["labels"]]
    assert auto.encode(tokenizer, CONVERSATION) == chatml.encode(tokenizer, CONVERSATION)
    assert auto.render(CONVERSATION[1:2], add_generation_prompt=True) == tokenizer.apply_chat_template(
        CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    assert auto.encode_prompt(tokenizer, CONVERSATION[:2]) == chatml.encode_prompt(tokenizer, CONVERSATION[:2])


def test_auto_needs_a_chat_template():
    class Bare:
        chat_template = None
        name_or_path = "bare"

    with pytest.raises(UserError, match="no chat template"):
        get_template("auto", Bare())
    with pytest.raises(UserError, match="tokenizer"):
        get_template("auto")


# -- the official chat templates ---------------------------------------------------------------------------


FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
SPECIAL_TOKENS = {  # name: (bos_token, eos_token) of the family's tokenizer
    "chatml": (None, "<|im_end|>"), "qwen": (None, "<|im_end|>"), "qwen2": (None, "<|im_end|>"),
    "qwen3": (None, "<|im_end|>"), "yi": ("<|startoftext|>", "<|im_end|>"), "llama2": ("<s>", "</s>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"), "llama3.1": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ("<s>", "</s>"), "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "chatglm3": (None, "</s>"), "gemma": ("<bos>", "<eos>"), "gemma2": ("<bos>", "<eos>"),
    "phi3": ("<s>", "<|endoftext|>"),
}
OFFICIAL_CASES = [(CONVERSATION, False), (CONVERSATION[1:], False), (CONVERSATION[:-1], True),
                  (CONVERSATION[1:-1], True), (CONVERSATION[1:2], True), (CONVERSATION[:2], True)]


def official(name: str, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> str:
    """The family's own template rendered by transformers' chat-template renderer."""
    from transformers.utils.chat_template_utils import render_jinja_template

    bos, eos = SPECIAL_TOKENS[name]
    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=(FIXTURES / f"{name}.jinja").read_text(
        encoding="utf-8"), add_generation_prompt=generation_prompt, bos_token=bos, eos_token=eos)
    return rendered[0]


def with_system_on_last_user(messages: list[dict]) -> list[dict]:
    """mistral-common's rule for Mistral v0.3: the system prompt opens the last user message."""
    turns = [dict(m) for m in messages[1:]]
    last = max(i for i, m in enumerate(turns) if m["role"] == "user")
    turns[last]["content"] = messages[0]["content"] + "\n\n" + turns[last]["content"]
    return turns


def test_every_fixture_has_its_template_and_source():
    readme = (FIXTURES / "README.md").read_text(encoding="utf-8")
    for path in FIXTURES.glob("*.jinja"):
        assert path.stem in TEMPLATES and f"`{path.name}`" in readme, path.name
    assert set(SPECIAL_TOKENS) == {p.stem for p in FIXTURES.glob("*.jinja")}
    for name in set(TEMPLATES) - set(SPECIAL_TOKENS):  # no official Jinja: their reference is named instead
        assert f"`{name}`" in readme, name


@pytest.mark.parametrize("name", sorted(SPECIAL_TOKENS))
def test_renders_as_the_official_template(name):
    template = get_template(name)
    for messages, generation_prompt in OFFICIAL_CASES:
        has_system, finished = messages[0]["role"] == "system", messages[-1]["role"] == "assistant"
        if name == "gemma2" and has_system:  # Gemma-1/2 have no system role: both refuse one
            with pytest.raises(Exception, match="System role not supported"):
                official(name, messages, generation_prompt)
            with pytest.raises(UserError, match="no system prompt"):
                template.render(messages, add_generation_prompt=generation_prompt)
            continue
        got = template.render(messages, add_generation_prompt=generation_prompt)
        if name == "mistral" and has_system and finished:
            # the v0.3 Jinja writes the system prompt only when the last message is a user's (so never in a
            # conversation to train on); medgpt puts it on the last user turn as mistral-common (Mistral's
            # reference tokenizer) does, which is what the Jinja renders for that user turn's prompt
            expected = official(name, with_system_on_last_user(messages), generation_prompt)
        elif name == "chatglm3" and finished and not generation_prompt:
            # medgpt ends each reply with the next turn's tag, the end-of-turn marker it labels
            expected = official(name, messages, generation_prompt) + "<|user|>"
        elif name == "yi" and has_system:  # Yi-1.5's Jinja writes the system text bare, medgpt as a ChatML turn
            expected = official(name, messages, generation_prompt).replace(
                SYSTEM, f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", 1)
        else:
            expected = official(name, messages, generation_prompt)
        assert got == expected, (messages, generation_prompt)


def test_official_defaults_that_differ_between_families():
    """The system prompts each family's template adds by itself, and the whitespace it trims."""
    turn = CONVERSATION[1:2]
    assert "You are Qwen, created by Alibaba Cloud" in official("qwen", turn, True) == get_template("qwen").render(
        turn, add_generation_prompt=True)
    assert "<|im_start|>system\nYou are a helpful assistant.<|im_end|>" in official("qwen2", turn, True)
    assert "<|im_start|>system" not in official("qwen3", turn, True)
    assert "Cutting Knowledge Date" in official("llama3.1", turn, True)
    for name in ("qwen2", "qwen3", "llama3.1"):
        assert get_template(name).render(turn, add_generation_prompt=True) == official(name, turn, True), name
    padded = [{"role": "user", "content": "  头疼怎么办？ \n"},
              {"role": "assistant", "content": "\n多休息。  "}]
    for name in ("llama2", "llama3", "llama3.1", "gemma", "gemma2", "mistral"):  # templates that trim
        assert get_template(name).render(padded) == official(name, padded, False), name


@pytest.mark.parametrize("name", ["qwen", "qwen3", "llama3.1", "mistral"])
def test_tools_render_as_the_official_template(name):
    """Tools, tool calls and tool results, written as the family's own template writes them."""
    template = get_template(name)
    conversations = TOOL_CONVERSATIONS if name != "llama3.1" else TOOL_CONVERSATIONS[:4]
    for messages in conversations:
        if name == "mistral" and any(m.get("tool_calls") and m["content"] for m in messages):
            continue  # written as the calls alone by Mistral's template: medgpt refuses (see below)
        reference = messages
        if name == "mistral" and messages[0]["role"] == "system" and messages[-1]["role"] != "user":
            reference = with_system_on_last_user(messages)  # see test_renders_as_the_official_template
        if name == "mistral":  # Mistral's template needs call ids; medgpt numbers the calls that have none
            ids = iter(f"{k:09d}" for k in range(1, 10))
            reference = [{**m, "tool_calls": [{**c, "id": next(ids)} for c in m["tool_calls"]]}
                         if m.get("tool_calls") else m for m in reference]
            results = iter(f"{k:09d}" for k in range(1, 10))
            reference = [{**m, "tool_call_id": next(results)} if m["role"] == "tool" else m for m in reference]
        for tools in (TOOLS, None):
            for generation_prompt in (False, True):
                if generation_prompt and messages[-1]["role"] == "assistant":
                    continue
                got = template.render(messages, add_generation_prompt=generation_prompt, tools=tools)
                assert got == official(name, reference, generation_prompt, tools), (messages, tools)


def test_tool_format_refusals():
    """What a format cannot write is an error, not a silent change."""
    with pytest.raises(UserError, match="one tool call per assistant turn"):
        get_template("llama3.1").render(TOOL_CONVERSATIONS[-1])
    with pytest.raises(UserError, match="calls alone"):
        get_template("mistral").render(PARALLEL_CONVERSATION)
    for name, template in TEMPLATES.items():
        if template.tool_format is None:
            for kwargs in ({"messages": CONVERSATION[1:3], "tools": TOOLS}, {"messages": TOOL_CONVERSATION[1:]}):
                with pytest.raises(UserError, match=f"template '{name}' has no tool format"):
                    template.render(**kwargs)
    with pytest.raises(UserError, match="tool call 0"):
        get_template("qwen").render([TOOL_CONVERSATION[1], {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]}])


@pytest.mark.parametrize("name", ["qwen", "qwen3", "llama3.1", "mistral"])
def test_labels_cover_the_tool_calls(tokenizer, name):
    """The assistant's tool calls are labelled like a reply; tools and tool results are not."""
    template = get_template(name)
    encoded = template.encode(tokenizer, TOOL_CONVERSATION[1:], tools=TOOLS)
    runs = labelled_runs(tokenizer, encoded)
    labelled = [part for is_labelled, part in runs if is_labelled]
    unlabelled = "".join(part for is_labelled, part in runs if not is_labelled)
    assert len(labelled) == 3
    assert "get_weather" in labelled[0] and '"北京"' in labelled[0] and template.stop_words[0] in labelled[0]
    assert "temp_c" not in "".join(labelled) and "temp_c" in unlabelled  # the tool result
    assert "find_clinic" in unlabelled and "find_clinic" not in "".join(labelled)  # the tools
    prompt = template.encode_prompt(tokenizer, TOOL_CONVERSATION[1:4], tools=TOOLS)
    assert tokenizer.decode(prompt) == template.render(TOOL_CONVERSATION[1:4], add_generation_prompt=True,
                                                       tools=TOOLS)


def fastchat_get_prompt(messages: list[dict], system: str, roles: tuple[str, str], seps: tuple[str, str],
                        colon: bool, generation_prompt: bool) -> str:
    """FastChat's Conversation.get_prompt (lm-sys/FastChat fastchat/conversation.py), styles ADD_COLON_TWO and
    NO_COLON_SINGLE: the reference for templates whose families publish no Jinja template."""
    ret = system + (seps[0] if colon else "")
    for i, m in enumerate(messages):
        role = roles[m["role"] == "assistant"]
        ret += role + (": " if colon else "") + m["content"] + seps[i % 2]
    return ret + (roles[1] + (":" if colon else "") if generation_prompt else "")


def test_vicuna_matches_fastchat():
    vicuna = get_template("vicuna")
    for messages, generation_prompt in [(CONVERSATION[1:], False), (CONVERSATION[1:-1], True), (CONVERSATION, False)]:
        system = messages[0]["content"] if messages[0]["role"] == "system" else vicuna.default_system
        turns = [m for m in messages if m["role"] != "system"]
        expected = fastchat_get_prompt(turns, system, ("USER", "ASSISTANT"), (" ", "</s>"), True, generation_prompt)
        assert vicuna.render(messages, add_generation_prompt=generation_prompt) == expected


def test_baichuan2_is_fastchat_plus_an_eos_per_reply():
    """FastChat's baichuan2-chat (as Baichuan2's build_chat_input) writes nothing between turns; medgpt ends each
    reply with </s>, the EOS Baichuan2's fine-tuning teaches there (documented in the fixtures README)."""
    baichuan2 = get_template("baichuan2")
    for messages, generation_prompt in [(CONVERSATION[1:], False), (CONVERSATION[1:-1], True)]:
        expected = fastchat_get_prompt(messages, "", ("<reserved_106>", "<reserved_107>"), ("", ""), False,
                                       generation_prompt)
        got = baichuan2.render(messages, add_generation_prompt=generation_prompt)
        assert got.replace("</s>", "") == expected and got.count("</s>") == len(ANSWERS) - generation_prompt


def test_alpaca_matches_llamafactory_and_the_stanford_prompt():
    """LLaMA-Factory's alpaca template (src/llamafactory/data/template.py) is the multi-turn reference; the
    single-turn prompt is Stanford Alpaca's PROMPT_DICT["prompt_no_input"] plus the newline after "### Response:"
    that LLaMA-Factory and Alpaca-LoRA write."""
    alpaca = get_template("alpaca")
    system = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n")
    expected = system + "".join(f"### Instruction:\n{q['content']}\n\n### Response:\n{a['content']}</s>\n\n"
                                for q, a in zip(CONVERSATION[1::2], CONVERSATION[2::2]))
    assert alpaca.render(CONVERSATION[1:]) == expected
    stanford = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.\n\n### Instruction:\n{instruction}\n\n### Response:")
    question = CONVERSATION[1]["content"]
    assert alpaca.render([CONVERSATION[1]], add_generation_prompt=True) == stanford.format(instruction=question) + "\n"


def test_split_markers_names_the_markers_a_tokenizer_splits_and_their_pieces(tokenizer):
    from medgpt.data.templates import split_markers

    assert get_template("qwen3").markers() == ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
    assert get_template("llama2").markers() == ("<s>", "</s>")  # not <<SYS>>
    assert split_markers(get_template("chatml"), tokenizer) == {}
    split = split_markers(get_template("qwen3"), tokenizer)
    assert set(split) == {"<think>", "</think>"} and "".join(split["<think>"]) == "<think>"
    assert len(split["<think>"]) > 1
