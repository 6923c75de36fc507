"""`medgpt.data.template_jinja`: the Jinja chat template generated for every template, rendered by the tokenizer's
`apply_chat_template` (transformers' renderer), gives exactly what `Template.render()` gives, tools included, and
refuses what render() refuses."""

from __future__ import annotations

import pytest
from _conversations import CONVERSATION, TOOL_CONVERSATIONS, TOOLS

from medgpt.data.templates import TEMPLATES, get_template
from medgpt.errors import UserError


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_template_renders_like_render(tokenizer, name):
    """The generated Jinja renders exactly what render() does, tools included, and refuses what render() refuses."""
    from jinja2.exceptions import TemplateError

    template = get_template(name)
    jinja = template.chat_template()
    cases = [(m, None) for m in (CONVERSATION, CONVERSATION[1:], CONVERSATION[:-1], CONVERSATION[1:2],
                                 [{"role": "system", "content": ""}, *CONVERSATION[1:3]])]
    cases += [(m, tools) for m in TOOL_CONVERSATIONS for tools in (TOOLS, None)] + [(CONVERSATION[1:3], TOOLS)]
    rendered = 0
    for messages, tools in cases:
        for generation_prompt in (False, True):
            try:
                expected = template.render(messages, add_generation_prompt=generation_prompt, tools=tools)
            except UserError:
                with pytest.raises(TemplateError):
                    tokenizer.apply_chat_template(messages, tools=tools, chat_template=jinja, tokenize=False,
                                                  add_generation_prompt=generation_prompt)
                continue
            got = tokenizer.apply_chat_template(messages, tools=tools, chat_template=jinja, tokenize=False,
                                                add_generation_prompt=generation_prompt)
            assert got == expected, (messages, tools, generation_prompt)
            rendered += bool(tools)
    assert rendered if template.tool_format else not rendered
