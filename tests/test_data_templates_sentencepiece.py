"""SentencePiece tokenizers (Llama-2, Mistral, Baichuan, Yi style): training ids are the ids the model sees.

The reference is a real SentencePiece model, trained here with the `sentencepiece` library on the shipped
sample text (BPE, byte fallback, as Llama's) and converted to fast Llama tokenizers in the two ways model
repositories ship them: Llama-2's tokenizer.json (normalizer `Prepend("▁")` + `Replace(" ", "▁")`, no
pre-tokenizer, so every call and every stretch after a special token starts with `▁`) and the newer one
(`Metaspace` pre-tokenizer, `prepend_scheme="first"`, as Llama-2/Mistral tokenizer.json files converted with
`legacy=False` have). For every template, `encode()` must give the ids of tokenizing the whole rendered text
with that tokenizer, its labels must decode to exactly the replies and their end-of-turn marker, and
`encode_prompt()` must give the ids of the rendered generation prompt.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

import medgpt  # noqa: E402
from medgpt.data.templates import IGNORE_INDEX, Template, get_template, list_templates  # noqa: E402
from medgpt.errors import UserError  # noqa: E402

SAMPLE_DATA = Path(medgpt.__file__).parent / "sample_data"

VARIANTS = ("llama2", "metaspace")

# The chat template of meta-llama/Llama-2-7b-chat-hf (tokenizer_config.json, "chat_template"), verbatim.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# The chat template of Qwen/Qwen2-7B-Instruct (tokenizer_config.json, "chat_template"), verbatim.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_TEMPLATES = {"llama2-chat": LLAMA2_CHAT_TEMPLATE, "qwen2-instruct": QWEN2_CHAT_TEMPLATE}

# Markup that model families' tokenizers hold as special tokens: <|...|>, <｜...｜>, <name>, </name>
# (not Llama-2's <<SYS>> text, and [INST]-style markup stays text, as in Llama-2's tokenizer).
MARKER = re.compile(r"(?<!<)(<\|[^|<>\s]+\|>|<｜[^｜<>\s]+｜>|</?[A-Za-z][\w.]*>)(?!>)")


def sample_lines() -> list[str]:
    """The shipped pretraining corpus and SFT conversations, one line of text each."""
    lines = (SAMPLE_DATA / "pt" / "medical_corpus.txt").read_text(encoding="utf-8").splitlines()
    for row in (SAMPLE_DATA / "sft" / "medical_sft.jsonl").read_text(encoding="utf-8").splitlines():
        for turn in json.loads(row)["conversations"]:
            lines += turn["value"].splitlines()
    return [line for line in lines if line.strip()]


def sample_conversations() -> list[list[dict]]:
    """Shipped SFT conversations: en single-turn, zh with a system prompt, en and zh multi-turn with one."""
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    rows = [json.loads(row)["conversations"] for row in
            (SAMPLE_DATA / "sft" / "medical_sft.jsonl").read_text(encoding="utf-8").splitlines()]

    def pick(system: bool, turns: int, chinese: bool) -> list[dict]:
        for row in rows:
            replies = [t["value"] for t in row if t["from"] == "gpt"]
            has_zh = any("\u4e00" <= ch <= "\u9fff" for ch in replies[-1])
            if (row[0]["from"] == "system") == system and len(replies) == turns and has_zh == chinese:
                return [{"role": roles[t["from"]], "content": t["value"]} for t in row]
        raise AssertionError(f"no sample conversation with system={system}, turns={turns}, chinese={chinese}")

    return [pick(False, 1, False), pick(True, 1, True), pick(True, 2, False), pick(True, 3, True)]


MIXED = [  # not in the tokenizer's training text: many byte-fallback pieces
    {"role": "system", "content": "你是一名专业的医生 (a careful doctor)."},
    {"role": "user", "content": "我最近总是头疼，怎么办？"},
    {"role": "assistant", "content": "头疼可能与睡眠不足有关，建议规律作息、多喝水。"},
    {"role": "user", "content": "What if I also have a fever of 38.5°C?"},
    {"role": "assistant", "content": "Take paracetamol, rest, and see a doctor if it lasts over 3 days."},
]
CONVERSATIONS = [*sample_conversations(), MIXED]
NAMED = [name for name in list_templates() if name != "auto"]


def rendered(template: Template, messages: list[dict], **kwargs) -> str | None:
    """The rendered text, or None where the template cannot render this conversation (e.g. a system turn)."""
    try:
        return template.render(messages, **kwargs)
    except UserError:
        return None


def marker_tokens() -> list[str]:
    """Every special-token-like marker the named templates write."""
    found: dict[str, None] = {"<s>": None, "</s>": None, "<unk>": None}
    for name in NAMED:
        template = get_template(name)
        for messages in CONVERSATIONS:
            for text in (rendered(template, messages), rendered(template, messages[:2], add_generation_prompt=True)):
                found.update(dict.fromkeys(MARKER.findall(text or "")))
        found.update(dict.fromkeys(w for w in template.stop_words if MARKER.fullmatch(w)))
    return list(found)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A SentencePiece BPE model trained on the sample text, and the processor that reads it."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_lines()), model_writer=model, model_type="bpe", vocab_size=3000,
        byte_fallback=True, character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path, spm.SentencePieceProcessor(model_file=str(path))


def build_tokenizer(model_file, variant: str, chat_template: str | None = None):
    """A fast Llama tokenizer over the SentencePiece model, as Llama-2's (variant llama2) or newer tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    spm = SentencePieceExtractor(str(model_file)).extract(BPE)
    backend = Tokenizer(BPE(vocab=spm["vocab"], merges=spm["merges"], unk_token="<unk>", fuse_unk=True,
                            byte_fallback=True))
    if variant == "llama2":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in marker_tokens()])
    backend.post_processor = processors.TemplateProcessing(  # Llama's: add_bos_token=True, add_eos_token=False
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers(sp_model):
    return {variant: build_tokenizer(sp_model[0], variant) for variant in VARIANTS}


def reference_ids(tokenizer, text: str) -> list[int]:
    """The tokenizer's own ids of the text; it adds <s> itself unless the text writes it (the BOS rule)."""
    return tokenizer(text, add_special_tokens=not text.startswith(tokenizer.bos_token))["input_ids"]


def labelled_spans(tokenizer, encoded: dict) -> tuple[list[str], str]:
    """Decoded maximal runs of labelled tokens, and the decoded unlabelled rest."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(encoded["input_ids"], encoded["labels"]):
        if runs and runs[-1][0] == (label != IGNORE_INDEX):
            runs[-1][1].append(token)
        else:
            runs.append((label != IGNORE_INDEX, [token]))
    return ([tokenizer.decode(ids) for labelled, ids in runs if labelled],
            " ".join(tokenizer.decode(ids) for labelled, ids in runs if not labelled))


def runs_of(template: Template, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered text as maximal runs of labelled / unlabelled text."""
    runs: list[tuple[str, bool]] = []
    for text, labelled in template.segments(messages):
        if runs and runs[-1][1] == labelled:
            runs[-1] = (runs[-1][0] + text, labelled)
        else:
            runs.append((text, labelled))
    return runs


def per_segment_ids(tokenizer, template: Template, messages: list[dict]) -> tuple[list[int], list[list[int]]]:
    """The former encoding: each run of same-labelled text tokenized on its own, then joined (and the labelled
    runs' ids)."""
    runs = runs_of(template, messages)
    ids = [] if runs[0][0].startswith(tokenizer.bos_token) else [tokenizer.bos_token_id]
    replies = []
    for text, labelled in runs:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        if labelled:
            replies.append(piece)
    return ids, replies


def check_encoding(tokenizer, template: Template, messages: list[dict]) -> None:
    text = template.render(messages)
    encoded = template.encode(tokenizer, messages)
    assert encoded["input_ids"] == reference_ids(tokenizer, text)
    assert encoded["assistant_masks"] == [int(label != IGNORE_INDEX) for label in encoded["labels"]]
    spans, unlabelled = labelled_spans(tokenizer, encoded)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(spans) == len(answers)

    def decoded(text: str) -> str:  # as the tokenizer decodes it in place ("▁" -> " ", also inside markers)
        return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) if text else ""

    end_of_turn = decoded(template.stop_words[0])
    final_prefix = decoded(getattr(template, "final_reply_prefix", ""))  # labelled text opening a final reply
    for k, (span, answer) in enumerate(zip(spans, answers)):
        body = span.strip()
        if k == len(answers) - 1 and messages[-1]["role"] == "assistant" and final_prefix:
            assert body.startswith(final_prefix), span
            body = body[len(final_prefix):].strip()
        assert body.startswith(answer), (span, answer)
        assert body[len(answer):].strip() == end_of_turn, span  # the reply and its end-of-turn marker, no more
    assert not any(answer in unlabelled for answer in answers)

    prompt = messages[:max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
    prompt_ids = template.encode_prompt(tokenizer, prompt)
    assert prompt_ids == reference_ids(tokenizer, template.render(prompt, add_generation_prompt=True))
    assert prompt_ids == encoded["input_ids"][:len(prompt_ids)]  # what generation continues is what was trained


def test_the_fast_tokenizers_are_the_sentencepiece_model(sp_model, tokenizers):
    """Reference: sentencepiece's own encoder, on every sample line (Metaspace "first" prepends no second `▁`
    to a text that begins with a space, so those lines are left out for it)."""
    _, processor = sp_model
    lines = sample_lines() + [MIXED[3]["content"], "发烧 38.5°C ½ 🙂", "[INST] two  spaces [/INST]"]
    assert 2000 <= processor.get_piece_size() <= 4000
    for variant, tokenizer in tokenizers.items():
        for line in lines:
            if variant == "llama2" or not line.startswith(" "):
                assert tokenizer(line, add_special_tokens=False)["input_ids"] == processor.encode(line), line
    assert processor.encode("🙂", out_type=str) == ["▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]  # byte fallback


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", NAMED)
def test_encode_gives_the_ids_of_the_whole_text(tokenizers, variant, name):
    template, tokenizer = get_template(name), tokenizers[variant]
    done = [messages for messages in CONVERSATIONS if rendered(template, messages) is not None]
    assert done, f"template {name} renders none of the conversations"
    for messages in done:
        check_encoding(tokenizer, template, messages)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chat_template", list(CHAT_TEMPLATES))
def test_auto_gives_the_ids_of_the_whole_text(sp_model, variant, chat_template):
    tokenizer = build_tokenizer(sp_model[0], variant, CHAT_TEMPLATES[chat_template])
    template = get_template("auto", tokenizer)
    for messages in CONVERSATIONS:
        assert template.render(messages) == tokenizer.apply_chat_template(messages, tokenize=False)
        check_encoding(tokenizer, template, messages)


def test_the_former_per_segment_encoding_adds_a_space_piece_to_every_reply(tokenizers):
    """On Llama-2's tokenizer, tokenizing a reply on its own prepends `▁`: the defect these tests catch."""
    tokenizer, template = tokenizers["llama2"], get_template("llama2")
    space = tokenizer.convert_tokens_to_ids("▁")
    for messages in CONVERSATIONS:
        whole = template.encode(tokenizer, messages)
        former, replies = per_segment_ids(tokenizer, template, messages)
        assert len(former) == len(whole["input_ids"]) + len(replies)
        assert all(reply[0] == space for reply in replies)
        # the whole text's labelled ids are each reply's own ids without that first `▁`
        labelled = [t for t, label in zip(whole["input_ids"], whole["labels"]) if label != IGNORE_INDEX]
        assert labelled == [t for reply in replies for t in reply[1:]]
    # with every template, the former ids are right only where each turn boundary touches a special token (the
    # normalizer prepends `▁` after a special token too); elsewhere a run starts with a `▁` the whole text lacks
    markers, differs = marker_tokens(), set()
    for name in NAMED:
        named = get_template(name)
        for messages in CONVERSATIONS:
            if rendered(named, messages) is None:
                continue
            runs = runs_of(named, messages)
            at_markers = all(any(runs[i - 1][0].endswith(m) or runs[i][0].startswith(m) for m in markers)
                             for i in range(1, len(runs)))
            same = per_segment_ids(tokenizer, named, messages)[0] == named.encode(tokenizer, messages)["input_ids"]
            assert same is at_markers, (name, runs)
            if not same:
                differs.add(name)
    assert {"llama2", "mistral", "vicuna", "chatml", "qwen", "llama3"} <= differs


class NoOffsets:
    """A tokenizer as slow (Python) ones are: the same ids as the one it wraps, but no character offsets."""

    def __init__(self, tokenizer):
        self.tokenizer, self.name_or_path = tokenizer, "no-offsets"
        self.bos_token, self.bos_token_id = tokenizer.bos_token, tokenizer.bos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tokenizers_without_offsets_get_the_same_encoding(tokenizers, variant):
    tokenizer = tokenizers[variant]
    for name in NAMED:
        template = get_template(name)
        for messages in CONVERSATIONS:
            if rendered(template, messages) is not None:
                assert template.encode(NoOffsets(tokenizer), messages) == template.encode(tokenizer, messages), name


def test_tokenizers_without_offsets_that_merge_across_a_turn_are_an_error():
    from transformers import PreTrainedTokenizerFast

    from medgpt.models import resolve_model

    # the bundled model's byte-level BPE holds </s> as text and merges "</s><s>" into "</", "s", "><", ...
    bundled = PreTrainedTokenizerFast(tokenizer_file=os.path.join(resolve_model(), "tokenizer.json"))
    assert "><" in bundled.tokenize("reply.</s><s>[INST] next")
    with pytest.raises(UserError, match="fast tokenizer"):
        get_template("llama2").encode(NoOffsets(bundled), MIXED)
