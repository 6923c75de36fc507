"""`medgpt webui --model M [--port 7860]`: a Gradio chat page."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medgpt.infer.options import add_engine_arguments, add_generation_arguments
    from medgpt.rag import add_kb_arguments

    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes the page to the network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    add_engine_arguments(parser)
    add_generation_arguments(parser)
    add_kb_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from medgpt.infer.options import engine_from_args, engine_params, params_from_args
    from medgpt.infer.webui import build_demo
    from medgpt.rag import kb_from_args

    params_from_args(args)  # a bad flag fails before the model loads
    augment = kb_from_args(args)
    engine = engine_from_args(args)
    params, origins = engine_params(args, engine)
    demo = build_demo(engine, params, system=args.system, augment=augment, origins=origins)
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0
