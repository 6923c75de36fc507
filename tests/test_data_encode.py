"""`medgpt.data.encode`: canonical records to training rows. Tool-calling conversations go from the shipped file
to training rows: read by the data layer, rendered in the template's official tool format (Qwen2.5's, checked
against its Jinja in test_data_templates.py), with labels on the assistant's tool calls and replies and none on tool
results; a template without a tool format refuses them. The length filter drops or truncates rows longer than
max_length and counts them."""

from __future__ import annotations

import pytest

from medgpt.data.encode import encode_conversations
from medgpt.data.readers import read_records
from medgpt.data.templates import IGNORE_INDEX, get_template
from medgpt.errors import UserError
from medgpt.models import load_tokenizer
from medgpt.train import build_config


def labelled_text(tokenizer, row: dict) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX])


def test_tool_conversations_train_on_calls_and_replies_not_results(sample_data):
    records, stats = read_records(str(sample_data / "sft" / "medical_tools.jsonl"), "sft")
    assert stats.kept == stats.read == 10 and all(r.get("tools") for r in records)
    tokenizer = load_tokenizer()
    cfg = build_config({"stage": "sft", "max_length": 4096})
    rows = encode_conversations(records, tokenizer, get_template("qwen", tokenizer), cfg, stats)
    assert len(rows) == len(records)
    for record, row in zip(records, rows):
        text = tokenizer.decode(row["input_ids"])
        labelled = labelled_text(tokenizer, row)
        assert "<tools>" in text  # the tool list is in the prompt (Qwen2.5's system block)
        for message in record["messages"]:
            for call in message.get("tool_calls") or []:
                name = call["function"]["name"]
                assert f'"name": "{name}"' in labelled  # the model learns to make the call
            if message["role"] == "tool":
                assert message["content"] not in labelled  # results come from the tool, not the model
                assert message["content"] in text
            if message["role"] == "assistant" and message["content"]:
                assert message["content"] in labelled


def test_a_template_without_a_tool_format_refuses_tool_data(sample_data):
    records, stats = read_records(str(sample_data / "sft" / "medical_tools.jsonl"), "sft")
    tokenizer = load_tokenizer()
    cfg = build_config({"stage": "sft"})
    with pytest.raises(UserError, match="has no tool format"):
        encode_conversations(records, tokenizer, get_template("vicuna", tokenizer), cfg, stats)


@pytest.mark.parametrize("enable_thinking", [None, False])
def test_preference_rows_render_as_the_official_qwen3_template(enable_thinking):
    """DPO/ORPO/KTO/RM rows: TRL renders each row's prompt and prompt + chosen with the tokenizer's chat template
    and the row's `chat_template_kwargs` (trl.data_utils.maybe_apply_chat_template). The reference is Qwen3's
    official template (tests/fixtures/chat_templates/qwen3.jinja) on the same conversation: with thinking off the
    prompt ends in an empty think block and the replies are rendered without their reasoning."""
    from test_data_templates_reasoning import official
    from trl.data_utils import maybe_apply_chat_template

    from medgpt.data.encode import conversation_rows
    from medgpt.data.messages import without_reasoning

    prompt = [{"role": "user", "content": "头痛三天，伴发热，该怎么办？"}]
    chosen = [{"role": "assistant", "content": "建议就医。", "reasoning": "发热伴头痛需排除感染。"}]
    rejected = [{"role": "assistant", "content": "不用管。"}]
    tokenizer = load_tokenizer()
    template = get_template("qwen3", tokenizer)
    tokenizer.chat_template = template.chat_template()
    cfg = build_config({"stage": "dpo", "template": "qwen3", "enable_thinking": enable_thinking, "max_length": 512})
    encoded, = conversation_rows([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], tokenizer, template,
                                 cfg.data, ("chosen", "rejected"), max_length=512)
    row = {key: value for key, value in encoded["row"].items() if key != "tools"}
    rendered = maybe_apply_chat_template(row, tokenizer)
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    reply = without_reasoning(chosen) if enable_thinking is False else [
        {"role": "assistant", "content": "建议就医。", "reasoning_content": "发热伴头痛需排除感染。"}]
    assert rendered["prompt"] == official(prompt, True, **kwargs)
    assert rendered["prompt"] + rendered["chosen"] == official(prompt + reply, False, **kwargs)
    assert ("发热伴头痛" in rendered["chosen"]) == (enable_thinking is None)
