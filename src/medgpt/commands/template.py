"""`medgpt template list|render`: see the exact text a chat template gives a conversation."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medgpt.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", help="template names, default system prompts and stop words")
    render = sub.add_parser("render", help="print the exact text a template gives a conversation",
                            description="Print exactly the text the model sees, nothing added.")
    render.add_argument("name", help="template name, or 'auto' for the tokenizer's own chat template")
    render.add_argument("--messages", required=True,
                        help='JSON list of {"role", "content"} messages, or a path to a .json file with it')
    render.add_argument("--system", help="system prompt (overrides the default; '' for none)")
    render.add_argument("--generation-prompt", action="store_true", help="end with the assistant's turn header")
    render.add_argument("--tokenizer", help="model or tokenizer whose chat template 'auto' uses")


def run(args: argparse.Namespace) -> int:
    from medgpt.data.templates import get_template, list_templates

    if args.action == "list":
        for name in list_templates():
            if name == "auto":
                print(f"{'auto':<10} the tokenizer's own chat template (needs --tokenizer)")
                continue
            template = get_template(name)
            system = template.default_system
            system = json.dumps(_shorten(system), ensure_ascii=False) if system else "-"
            print(f"{name:<10} system: {system}  stop: {' '.join(template.stop_words)}")
        return 0
    messages = _read_messages(args.messages)
    tokenizer = None
    if args.tokenizer or args.name == "auto":
        if not args.tokenizer:
            raise UserError("template 'auto' needs --tokenizer MODEL (its chat template is used)")
        from medgpt.models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    template = get_template(args.name, tokenizer)
    sys.stdout.write(template.render(messages, add_generation_prompt=args.generation_prompt, system=args.system))
    sys.stdout.flush()
    return 0


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _read_messages(value: str) -> list[dict]:
    """--messages: inline JSON, or a .json file; a list of messages or an object with "messages"."""
    source = "--messages"
    if not value.lstrip().startswith(("[", "{")):
        path = Path(value)
        if not path.is_file():
            raise UserError(f"--messages: {value!r} is neither JSON nor an existing .json file")
        source, value = str(path), path.read_text(encoding="utf-8")
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise UserError(f"{source}: invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    if not isinstance(data, list):
        raise UserError(f"{source}: expected a JSON list of {{\"role\", \"content\"}} messages")
    return data
