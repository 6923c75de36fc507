"""Chat templates: exact text, Jinja equivalence, label spans, `auto`, and the `medgpt template` command."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402

from medgpt.cli import main  # noqa: E402
from medgpt.data.templates import IGNORE_INDEX, TEMPLATES, get_template, list_templates  # noqa: E402
from medgpt.errors import UserError  # noqa: E402

SYSTEM = "你是一名专业的医生 (a careful doctor)."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "我最近总是头疼，怎么办？"},
    {"role": "assistant", "content": "头疼可能与睡眠不足有关，建议规律作息、多喝水。"},
    {"role": "user", "content": "What if I also have a fever of 38.5°C?"},
    {"role": "assistant", "content": "Take paracetamol, rest, and see a doctor if it lasts over 3 days."},
    {"role": "user", "content": "谢谢 thanks!"},
    {"role": "assistant", "content": "不客气! Get well soon."},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]

# Where encode() != tokenize(render()) on the bundled (ChatML) tokenizer: these formats' end-of-turn markers
# are plain text there, not special tokens, and byte-level BPE merges the punctuation on both sides of a
# turn boundary ("</s><s>" -> "><", "<|eot_id|><|start_header_id|>" -> "|><|"). With each model's own
# tokenizer the markers are special tokens, which always split, so the ids agree.
NOT_EXACT_ON_BUNDLED = {"llama2", "llama3", "baichuan2"}


@pytest.fixture(scope="module")
def tokenizer():
    from medgpt.models import load_tokenizer

    return load_tokenizer()


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
    text = template.render(CONVERSATION)
    for answer in ANSWERS + [SYSTEM] + [m["content"] for m in CONVERSATION if m["role"] == "user"]:
        assert answer in text
    encoded = template.encode(tokenizer, CONVERSATION)
    assert len(encoded["input_ids"]) == len(encoded["labels"]) == len(encoded["assistant_masks"])
    assert encoded["assistant_masks"] == [int(label != IGNORE_INDEX) for label in encoded["labels"]]

    runs = labelled_runs(tokenizer, encoded)
    assert "".join(part for _, part in runs) == text  # nothing lost or added
    spans = [part for labelled, part in runs if labelled]
    assert len(spans) == len(ANSWERS)
    end_of_turn = template.stop_words[0]
    for span, answer in zip(spans, ANSWERS):
        body = span.strip()
        assert body.startswith(answer), (span, answer)
        assert body[len(answer):].strip() == end_of_turn, span  # the reply and its end-of-turn marker, no more
    unlabelled = "".join(part for labelled, part in runs if not labelled)
    assert not any(answer in unlabelled for answer in ANSWERS)

    everything = template.encode(tokenizer, CONVERSATION, train_on_all=True)
    assert everything["input_ids"] == encoded["input_ids"]
    assert everything["labels"] == everything["input_ids"]
    assert all(everything["assistant_masks"])


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_encode_matches_tokenizing_the_rendered_text(tokenizer, name):
    template = get_template(name)
    whole = tokenizer.encode(template.render(CONVERSATION), add_special_tokens=False)
    exact = template.encode(tokenizer, CONVERSATION)["input_ids"] == whole
    assert exact is (name not in NOT_EXACT_ON_BUNDLED)


@pytest.mark.parametrize("name", ["chatml", "qwen"])
def test_prompt_ids_are_a_prefix_of_training_ids(tokenizer, name):
    template = get_template(name)
    prompt = template.encode_prompt(tokenizer, CONVERSATION[:-1])
    assert prompt == template.encode(tokenizer, CONVERSATION)["input_ids"][: len(prompt)]
    assert tokenizer.decode(prompt) == template.render(CONVERSATION[:-1], add_generation_prompt=True)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_template_renders_like_render(tokenizer, name):
    template = get_template(name)
    jinja = template.chat_template()
    conversations = [CONVERSATION, CONVERSATION[1:], CONVERSATION[:-1], CONVERSATION[1:2],
                     [{"role": "system", "content": ""}, *CONVERSATION[1:3]]]
    for messages in conversations:
        for generation_prompt in (False, True):
            expected = template.render(messages, add_generation_prompt=generation_prompt)
            got = tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                                add_generation_prompt=generation_prompt)
            assert got == expected, (messages, generation_prompt)


def test_system_prompt_rules():
    qwen, gemma = get_template("qwen"), get_template("gemma")
    turns = CONVERSATION[1:3]
    assert qwen.default_system in qwen.render(turns)  # None: the default
    assert "<|im_start|>system" not in qwen.render(turns, system="")  # "": none
    assert qwen.render(CONVERSATION, system="Other.").count("Other.") == 1  # the argument wins
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


def test_cli_list(capsys):
    assert main(["template", "list"]) == 0
    out = capsys.readouterr().out
    for name in list_templates():
        assert name in out
    assert "<|eot_id|>" in out and "You are Qwen" in out


def test_cli_render_prints_exactly_the_text(capsys, tmp_path):
    messages = json.dumps(CONVERSATION[1:2], ensure_ascii=False)
    assert main(["template", "render", "llama3", "--messages", messages, "--generation-prompt"]) == 0
    assert capsys.readouterr().out == get_template("llama3").render(CONVERSATION[1:2], add_generation_prompt=True)
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps(CONVERSATION, ensure_ascii=False), encoding="utf-8")
    assert main(["template", "render", "qwen", "--messages", str(path), "--system", ""]) == 0
    assert capsys.readouterr().out == get_template("qwen").render(CONVERSATION, system="")


def test_cli_render_auto(capsys, tokenizer):
    messages = json.dumps(CONVERSATION[1:2])
    assert main(["template", "render", "auto", "--messages", messages, "--tokenizer",
                 tokenizer.name_or_path]) == 0
    assert capsys.readouterr().out == tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False)


@pytest.mark.parametrize("argv", [
    ["template", "render", "chatml", "--messages", '[{"role": "user"'],
    ["template", "render", "chatml", "--messages", '[{"role": "doctor", "content": "x"}]'],
    ["template", "render", "nope", "--messages", "[]"],
    ["template", "render", "auto", "--messages", '[{"role": "user", "content": "x"}]'],
])
def test_cli_user_errors(capsys, argv):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medgpt template: error:")
