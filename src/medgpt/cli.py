"""The `medgpt` command line. Subcommands live in `medgpt.commands.<name>` and are imported lazily."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from medgpt import __version__
from medgpt.errors import UserError

# name -> one-line help; the module medgpt.commands.<name> implements it.
COMMANDS: dict[str, str] = {
    "train": "train one stage (pt, sft, rm, ppo, dpo, orpo, kto, grpo) from a YAML config",
    "pipeline": "run several stages in order, each fed by the last (default PT -> SFT -> DPO)",
    "merge": "merge a LoRA adapter into its base model and save a standalone model",
    "export": "export a model (or base + adapter) for offline runtimes: GGUF and an Ollama Modelfile",
    "parity": "check that a fine-tune behaves the same as adapter, merged model, engine, GGUF and vLLM",
    "tokenizer": "extend a tokenizer with domain vocabulary and resize the model to match",
    "doctor": "check a (multi-node) launch before training: ranks, versions, config, data, network, memory",
    "data": "check and convert data sets (validation, counts, token lengths)",
    "template": "list and render chat templates",
    "chat": "streaming multi-turn chat in the terminal",
    "predict": "batch prediction from a jsonl file",
    "serve": "OpenAI-compatible API server (+ /chat)",
    "webui": "Gradio chat page",
    "score": "score (prompt, response) pairs with a trained reward model",
    "eval": "evaluation: multiple-choice accuracy, BLEU/ROUGE, comparisons",
    "select": "eval-driven training-data selection with a leakage guard",
    "rag": "knowledge-base question answering: index and ask",
    "plan": "estimate GPU memory for a stage and method, without loading weights",
}


def _command_module(name: str):
    return importlib.import_module(f"medgpt.commands.{name}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medgpt",
        description="Turn a general LLM into a medical assistant: train, evaluate, serve.",
    )
    parser.add_argument("--version", action="version", version=f"medgpt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only == name:
            try:
                module = _command_module(name)
            except ModuleNotFoundError as exc:
                if exc.name != f"medgpt.commands.{name}":
                    raise
                continue
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only if only in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = args._run(args)
    except UserError as exc:
        print(f"medgpt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
