"""`medgpt serve --model M [--port 8000] [--api-key KEY]`: OpenAI-compatible API (+ the seed's /chat)."""

from __future__ import annotations

import argparse

LIMITS = """limits of each request (a request over one gets a 400 OpenAI error naming the field):
  n                at most --max-n choices
  max_tokens       at most --max-tokens-cap, and the prompt plus max_tokens within the model's context
  prompt           at most --max-prompt-tokens tokens (text over 8 characters per allowed token is refused
                   before it is tokenized); /v1/completions takes at most 64 prompts
  stop             at most 8 non-empty strings of at most 256 characters
  body             at most --max-body-bytes bytes (413), JSON nested at most 32 levels
  sampling         temperature 0..2, top_p (0, 1], presence/frequency_penalty -2..2, repetition_penalty
                   0.05..20, logit_bias values -100..100 (at most 300), seed 0..2**63-1, top_logprobs 0..20
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medgpt.infer.options import add_engine_arguments, add_generation_arguments
    from medgpt.rag import add_kb_arguments

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = LIMITS
    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address (0.0.0.0 exposes the server to the network: set an API key)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every path but /health "
                                          "(default: $MEDGPT_API_KEY, else none)")
    parser.add_argument("--max-tokens-cap", type=int, default=1024,
                        help="largest max_tokens a request may ask for (larger: 400); default 1024")
    parser.add_argument("--max-prompt-tokens", type=int, default=4096, help="longer prompts are refused (400)")
    parser.add_argument("--max-n", type=int, default=8, help="most choices (n) per request; default 8")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get 429")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                        help="largest request body (larger: 413, refused while it is read); default 4 MiB")
    parser.add_argument("--docs", action="store_true",
                        help="serve the API's /docs, /redoc and /openapi.json (behind the API key; off by default)")
    parser.add_argument("--served-model-name", help="the id /v1/models reports (default: the model folder's name)")
    add_engine_arguments(parser)
    add_generation_arguments(parser, api=True)
    parser.add_argument("--chat-defaults", action="store_true",
                        help="sample with medgpt's chat defaults (temperature 0.7, top-p 0.9, repetition penalty 1.1) "
                             "where the model's generation_config sets nothing, as chat and webui do (default: "
                             "OpenAI's and vLLM's: temperature 1, no cut, no penalty)")
    add_kb_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from medgpt.errors import UserError
    from medgpt.infer.chat import describe_engine, describe_params
    from medgpt.infer.options import api_key, engine_from_args, params_from_args, serve_params
    from medgpt.infer.server import ServerSettings, create_app, serve
    from medgpt.rag import kb_from_args

    limits = {"--max-tokens-cap": args.max_tokens_cap, "--max-prompt-tokens": args.max_prompt_tokens,
              "--max-queue": args.max_queue, "--max-n": args.max_n, "--max-body-bytes": args.max_body_bytes}
    bad = [flag for flag, value in limits.items() if value < 1]
    if bad:
        raise UserError(f"{', '.join(bad)} must be >= 1")
    params_from_args(args)  # a bad flag fails before the model loads
    augment = kb_from_args(args)
    engine = engine_from_args(args, system=args.system)
    params, origins = serve_params(args, engine)
    print(describe_engine(engine))
    print("defaults for fields a request leaves out: " + describe_params(params, origins))
    settings = ServerSettings(defaults=params, defaults_from=origins, max_tokens_cap=args.max_tokens_cap,
                              max_prompt_tokens=args.max_prompt_tokens, max_queue=args.max_queue, max_n=args.max_n,
                              max_body_bytes=args.max_body_bytes, api_key=api_key(args.api_key), docs=args.docs)
    app = create_app(engine, settings, augment=augment, model_name=args.served_model_name)
    try:
        serve(app, host=args.host, port=args.port)
    finally:
        engine.close()
    return 0
