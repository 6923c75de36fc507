"""`medgpt template list|render`: see the exact text a chat template gives a conversation."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from medgpt.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", help="template names, the model families each matches, default system prompts and stop "
                               "words")
    render = sub.add_parser("render", help="print the exact text a template gives a conversation",
                            description="Print exactly the text the model sees, nothing added.")
    render.add_argument("name", help="template name, or 'auto' for the tokenizer's own chat template")
    render.add_argument("--messages", required=True,
                        help='JSON list of {"role", "content"} messages, or a path to a .json file with it')
    render.add_argument("--system", help="system prompt (overrides the default; '' for none)")
    render.add_argument("--generation-prompt", action="store_true", help="end with the assistant's turn header")
    render.add_argument("--tools", help="JSON list of tools ({\"type\": \"function\", \"function\": {...}}), or a "
                        "path to a .json file with it (or with \"tools\" beside \"messages\" in --messages)")
    render.add_argument("--tokenizer", help="model or tokenizer whose chat template 'auto' uses")


def run(args: argparse.Namespace) -> int:
    from medgpt.data.templates import get_template, list_templates, template_families

    if args.action == "list":
        for name in list_templates():
            print(f"{name:<10} {template_families(name)}")
            if name == "auto":
                continue
            template = get_template(name)
            system = template.default_system
            system = json.dumps(_shorten(system), ensure_ascii=False) if system else "-"
            tools = f"  tools: {template.tool_format}" if template.tool_format else ""
            print(f"{'':<10} system: {system}  stop: {' '.join(template.stop_words)}{tools}")
        return 0
    messages, tools = _read_messages(args.messages)
    if args.tools is not None:
        tools = _read_json(args.tools, "--tools")
    tokenizer = None
    if args.tokenizer or args.name == "auto":
        if not args.tokenizer:
            raise UserError("template 'auto' needs --tokenizer MODEL (its chat template is used)")
        from medgpt.models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    template = get_template(args.name, tokenizer)
    sys.stdout.write(template.render(messages, add_generation_prompt=args.generation_prompt, system=args.system,
                                     tools=tools))
    sys.stdout.flush()
    return 0


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _read_json(value: str, option: str) -> Any:
    """An option's inline JSON, or the JSON in the .json file it names."""
    source = option
    if not value.lstrip().startswith(("[", "{")):
        path = Path(value)
        if not path.is_file():
            raise UserError(f"{option}: {value!r} is neither JSON nor an existing .json file")
        source, value = str(path), path.read_text(encoding="utf-8")
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise UserError(f"{source}: invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None


def _read_messages(value: str) -> tuple[list[dict], list[dict] | None]:
    """--messages: a list of messages, or a record with "messages" (and "tools"); inline or a .json file."""
    data, tools = _read_json(value, "--messages"), None
    if isinstance(data, dict) and "messages" in data:
        data, tools = data["messages"], data.get("tools")
    if not isinstance(data, list):
        raise UserError("--messages: expected a JSON list of {\"role\", \"content\"} messages")
    return data, tools
