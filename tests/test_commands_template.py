"""The `medgpt template` command: `list` (every template with its model family and tool format) and `render`
(exactly the text the template renders, tools and `auto` included; bad input is a one-line error)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402
from _conversations import CONVERSATION, TOOL_CONVERSATION, TOOLS  # noqa: E402

from medgpt.cli import main  # noqa: E402
from medgpt.data.templates import get_template, list_templates  # noqa: E402


def test_cli_list(capsys):
    assert main(["template", "list"]) == 0
    out = capsys.readouterr().out
    for name in list_templates():
        assert name in out
    assert "<|eot_id|>" in out and "You are Qwen" in out
    for name, family in [("qwen", "Qwen2.5-Instruct"), ("qwen3", "Qwen3"), ("llama3.1", "Llama-3.1-Instruct"),
                         ("mistral", "Mistral-7B-Instruct-v0.3"), ("gemma2", "Gemma-2"), ("phi3", "Phi-3.5")]:
        assert any(line.startswith(f"{name} ") and family in line for line in out.splitlines()), name


def test_cli_render_with_tools(capsys, tmp_path):
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"messages": TOOL_CONVERSATION[1:4], "tools": TOOLS}, ensure_ascii=False),
                    encoding="utf-8")
    assert main(["template", "render", "qwen", "--messages", str(path), "--generation-prompt"]) == 0
    expected = get_template("qwen").render(TOOL_CONVERSATION[1:4], add_generation_prompt=True, tools=TOOLS)
    assert capsys.readouterr().out == expected and "<tools>" in expected
    assert main(["template", "render", "qwen", "--messages", json.dumps(TOOL_CONVERSATION[1:2]),
                 "--tools", json.dumps(TOOLS[:1])]) == 0
    assert "get_weather" in capsys.readouterr().out
    assert main(["template", "render", "chatml", "--messages", str(path)]) == 2
    assert "has no tool format" in capsys.readouterr().err


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
