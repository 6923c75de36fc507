"""`medgpt serve --model M [--port 8000] [--api-key KEY]`: OpenAI-compatible API (+ the seed's /chat)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medgpt.infer.options import add_engine_arguments, add_generation_arguments
    from medgpt.rag import add_kb_arguments

    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes the server to the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $MEDGPT_API_KEY, else none)")
    parser.add_argument("--max-tokens-cap", type=int, default=1024, help="largest max_tokens a request gets")
    parser.add_argument("--max-prompt-tokens", type=int, default=4096, help="longer prompts are refused (400)")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get 429")
    parser.add_argument("--served-model-name", help="the id /v1/models reports (default: the model folder's name)")
    add_engine_arguments(parser)
    add_generation_arguments(parser)
    add_kb_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from medgpt.errors import UserError
    from medgpt.infer.chat import describe_engine, describe_params
    from medgpt.infer.options import api_key, engine_from_args, engine_params, params_from_args
    from medgpt.infer.server import ServerSettings, create_app, serve
    from medgpt.rag import kb_from_args

    if min(args.max_tokens_cap, args.max_prompt_tokens, args.max_queue) < 1:
        raise UserError("--max-tokens-cap, --max-prompt-tokens and --max-queue must be >= 1")
    params_from_args(args)  # a bad flag fails before the model loads
    augment = kb_from_args(args)
    engine = engine_from_args(args, system=args.system)
    params, origins = engine_params(args, engine)
    print(describe_engine(engine))
    print("defaults for fields a request leaves out: " + describe_params(params, origins))
    settings = ServerSettings(defaults=params, max_tokens_cap=args.max_tokens_cap,
                              max_prompt_tokens=args.max_prompt_tokens, max_queue=args.max_queue,
                              api_key=api_key(args.api_key))
    app = create_app(engine, settings, augment=augment, model_name=args.served_model_name)
    serve(app, host=args.host, port=args.port)
    return 0
