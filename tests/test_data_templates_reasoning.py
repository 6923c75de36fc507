"""Reasoning in chat templates: `qwen3` renders an assistant's `reasoning` exactly as Qwen3's official chat template
(tests/fixtures/chat_templates/qwen3.jinja, rendered by transformers' chat-template renderer) renders
`reasoning_content` or a `<think>` block in the content: last turn and history turns (whose reasoning Qwen3 drops),
`enable_thinking` true, false and unset, tool conversations. The generated Jinja renders the same, and the labels
cover exactly the rendered reply, think block included (or not, with train_on_reasoning=False)."""

from __future__ import annotations

import pytest
from _conversations import SYSTEM, TOOLS, WEATHER
from test_data_templates import FIXTURES, SPECIAL_TOKENS, labelled_runs

from medgpt.data.messages import without_reasoning
from medgpt.data.templates import get_template
from medgpt.errors import UserError

QWEN3 = get_template("qwen3")

# official form: reasoning in `reasoning_content`
THINKING = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "我发烧38.5°C，咳嗽三天了，要紧吗？"},
    {"role": "assistant", "content": "多为病毒性上呼吸道感染，可先对症处理；若高热不退或气促请就医。",
     "reasoning_content": "发热伴咳嗽三天，无气促描述。\n常见为病毒感染，需排除肺炎的警示征象。"},
    {"role": "user", "content": "Can I take ibuprofen with it?"},
    {"role": "assistant", "content": "Yes, unless you have a stomach ulcer or kidney disease; take it with food.",
     "reasoning_content": "Ibuprofen is fine for fever in adults.\nContraindications: ulcer, kidney disease."},
]
TOOL_THINKING = [
    {"role": "user", "content": "北京今天热吗？我有点发烧。"},
    {"role": "assistant", "content": "", "tool_calls": [WEATHER], "reasoning_content": "需要先查北京天气。"},
    {"role": "tool", "content": '{"temp_c": 38, "sky": "晴"}', "name": "get_weather"},
    {"role": "assistant", "content": "北京今天38°C。发烧时多喝水，避免暴晒。",
     "reasoning_content": "38°C，高温，提醒补水。"},
]
NO_REASONING_LAST = [*THINKING[:4], {"role": "assistant", "content": "Yes, with food."}]


def canonical(messages: list[dict]) -> list[dict]:
    """medgpt's form: `reasoning` instead of `reasoning_content`."""
    return [{**{k: v for k, v in m.items() if k != "reasoning_content"}, "reasoning": m["reasoning_content"]}
            if "reasoning_content" in m else m for m in messages]


def inline(messages: list[dict]) -> list[dict]:
    """The reasoning as a `<think>` block opening the content (how ShareGPT data and raw model output carry it)."""
    return [{"role": m["role"], "content": f"<think>\n{m['reasoning_content']}\n</think>\n\n{m['content']}",
             **({"tool_calls": m["tool_calls"]} if "tool_calls" in m else {})}
            if "reasoning_content" in m else m for m in messages]


def official(messages: list[dict], generation_prompt: bool, tools=None, **kwargs) -> str:
    """Qwen3's own template rendered by transformers' chat-template renderer."""
    from transformers.utils.chat_template_utils import render_jinja_template

    bos, eos = SPECIAL_TOKENS["qwen3"]
    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=(FIXTURES / "qwen3.jinja").read_text(
        encoding="utf-8"), add_generation_prompt=generation_prompt, bos_token=bos, eos_token=eos, **kwargs)
    return rendered[0]


# a user turn that only wraps a tool response is not a query (Qwen3's last_query_index skips it)
WRAPPED_RESULT = [*THINKING[1:3], {"role": "user", "content": "<tool_response>\n38°C\n</tool_response>"},
                  {"role": "assistant", "content": "好的。", "reasoning_content": "体温38°C。"}]
CASES = [THINKING, THINKING[1:], THINKING[:3], THINKING[1:3], NO_REASONING_LAST, TOOL_THINKING, TOOL_THINKING[:3],
         [*THINKING[:3], {"role": "user", "content": "谢谢"}], WRAPPED_RESULT]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_reasoning_renders_as_the_official_template(case, enable_thinking):
    messages = CASES[case]
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    for tools in (None, TOOLS) if messages is TOOL_THINKING or messages is TOOL_THINKING[:3] else (None,):
        for generation_prompt in (False, True) if messages[-1]["role"] != "assistant" else (False,):
            expected = official(messages, generation_prompt, tools, **kwargs)
            for form in (canonical(messages), inline(messages)):
                got = QWEN3.render(form, add_generation_prompt=generation_prompt, tools=tools,
                                   enable_thinking=enable_thinking)
                assert got == expected, (form, generation_prompt, tools)
                # the official template given the same form renders the same (the <think> block is read back)
                assert official(inline(messages), generation_prompt, tools, **kwargs) == expected


def test_what_the_official_template_does_with_reasoning():
    """The rules the comparison above covers, spelled out on the rendered text."""
    text = QWEN3.render(canonical(THINKING))
    assert THINKING[4]["reasoning_content"] in text and THINKING[2]["reasoning_content"] not in text  # history drops
    assert text.count("<think>") == 1
    # a reply already opening with its think block gets no second, empty one
    assert QWEN3.render(inline(THINKING[1:3])).count("<think>") == 1
    # without reasoning the final reply gets the empty think block; the non-thinking prompt ends with it
    assert QWEN3.render(NO_REASONING_LAST).endswith("<think>\n\n</think>\n\nYes, with food.<|im_end|>\n")
    assert QWEN3.render(THINKING[:2], add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # the tool-calling turn after the last query keeps its reasoning
    assert "<think>\n需要先查北京天气。\n</think>\n\n<tool_call>" in QWEN3.render(canonical(TOOL_THINKING), tools=TOOLS)


def test_templates_without_a_reasoning_format_refuse_reasoning():
    from jinja2.exceptions import TemplateError

    chatml = get_template("chatml")
    with pytest.raises(UserError, match="no reasoning format"):
        chatml.render(canonical(THINKING))
    with pytest.raises(TemplateError, match="no reasoning format"):
        _apply(chatml.chat_template(), canonical(THINKING), False)
    assert chatml.render(without_reasoning(canonical(THINKING))) == chatml.render(
        [{k: v for k, v in m.items() if k != "reasoning_content"} for m in THINKING])


def _apply(jinja: str, messages: list[dict], generation_prompt: bool, tools=None, **kwargs) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=jinja,
                                        add_generation_prompt=generation_prompt, **kwargs)
    return rendered[0]


@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_generated_jinja_renders_reasoning_like_render(enable_thinking):
    """The chat template medgpt writes into a trained model's tokenizer renders reasoning as render() (and so as
    Qwen3's own template), given `reasoning`, `reasoning_content` or a <think> block."""
    jinja = QWEN3.chat_template()
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    for messages in CASES:
        for generation_prompt in (False, True) if messages[-1]["role"] != "assistant" else (False,):
            expected = QWEN3.render(canonical(messages), add_generation_prompt=generation_prompt,
                                    enable_thinking=enable_thinking)
            for form in (canonical(messages), messages, inline(messages)):
                assert _apply(jinja, form, generation_prompt, **kwargs) == expected, form


def test_labels_cover_the_reply_with_its_think_block(tokenizer):
    """Labelled runs are exactly the rendered assistant replies after the role header, think block included; with
    train_on_reasoning=False a non-empty think block is context, the empty one stays labelled."""
    messages = canonical(THINKING)
    text = QWEN3.render(messages)
    encoded = QWEN3.encode(tokenizer, messages)
    runs = labelled_runs(tokenizer, encoded)
    assert "".join(part for _, part in runs) == text
    spans = [part for labelled, part in runs if labelled]
    assert spans == [THINKING[2]["content"] + "<|im_end|>",
                     f"<think>\n{THINKING[4]['reasoning_content']}\n</think>\n\n{THINKING[4]['content']}<|im_end|>"]
    spans = [part for labelled, part in labelled_runs(tokenizer, QWEN3.encode(tokenizer, messages,
                                                                              train_on_reasoning=False)) if labelled]
    assert spans == [THINKING[2]["content"] + "<|im_end|>", THINKING[4]["content"] + "<|im_end|>"]
    spans = [part for labelled, part in labelled_runs(tokenizer, QWEN3.encode(tokenizer, NO_REASONING_LAST,
                                                                              train_on_reasoning=False)) if labelled]
    assert spans[-1] == "<think>\n\n</think>\n\nYes, with food.<|im_end|>"
    tool_spans = [part for labelled, part in labelled_runs(tokenizer, QWEN3.encode(
        tokenizer, canonical(TOOL_THINKING), tools=TOOLS)) if labelled]
    assert tool_spans[0].startswith("<think>\n需要先查北京天气。\n</think>\n\n<tool_call>")
    assert tool_spans[1].startswith("<think>\n38°C")


def test_auto_template_passes_reasoning_to_the_tokenizers_template(tokenizer):
    """`auto` with Qwen3's own template: the same text as `qwen3`, the reasoning given as reasoning_content."""
    import copy

    qwen = copy.copy(tokenizer)
    qwen.chat_template = (FIXTURES / "qwen3.jinja").read_text(encoding="utf-8")
    auto = get_template("auto", qwen)
    for messages in (THINKING, TOOL_THINKING[:3], NO_REASONING_LAST):
        for enable_thinking in (None, False):
            generation = messages[-1]["role"] != "assistant"
            assert auto.render(canonical(messages), add_generation_prompt=generation,
                               enable_thinking=enable_thinking) == QWEN3.render(
                canonical(messages), add_generation_prompt=generation, enable_thinking=enable_thinking)
