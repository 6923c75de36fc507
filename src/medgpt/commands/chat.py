"""`medgpt chat --model M [--adapter A] [--template T] [--system S]`: streaming multi-turn terminal chat."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medgpt.infer.options import add_engine_arguments, add_generation_arguments
    from medgpt.rag import add_kb_arguments

    add_engine_arguments(parser)
    add_generation_arguments(parser)
    add_kb_arguments(parser)
    parser.epilog = "In the chat: /clear forgets the conversation, /system TEXT sets the system prompt, /exit quits."


def run(args: argparse.Namespace) -> int:
    from medgpt.infer.chat import ChatSession, describe_engine, describe_params, run_chat
    from medgpt.infer.options import engine_from_args, engine_params, params_from_args
    from medgpt.rag import kb_from_args

    params_from_args(args)  # a bad flag fails before the model loads
    augment = kb_from_args(args)
    with engine_from_args(args) as engine:
        params, origins = engine_params(args, engine)
        print(describe_engine(engine))
        print(describe_params(params, origins))
        run_chat(ChatSession(engine, params, system=args.system, augment=augment))
    return 0
