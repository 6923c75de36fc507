"""`medgpt webui --model M [--port 7860] [--auth USER:PASSWORD | --auth-file FILE]`: a Gradio chat page."""

from __future__ import annotations

import argparse


def login_arg(text: str) -> tuple[str, str]:
    from medgpt.infer.webui import parse_login

    try:
        return parse_login(text)
    except ValueError as exc:  # argparse would quote the value (the password) for any other error type
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medgpt.infer.options import add_engine_arguments, add_generation_arguments
    from medgpt.rag import add_kb_arguments

    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address (default 127.0.0.1, this machine only; 0.0.0.0 exposes the page to the "
                             "network: add --auth)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    parser.add_argument("--auth", action="append", type=login_arg, default=[], metavar="USER:PASSWORD",
                        help="require a login (repeat for more users); other users on this machine can see "
                             "command lines, so prefer --auth-file")
    parser.add_argument("--auth-file", metavar="FILE", help="require a login: one USER:PASSWORD a line")
    parser.add_argument("--max-request-kb", type=int, default=1024,
                        help="largest request body the page accepts (default 1024 KiB); the page takes no uploads")
    add_engine_arguments(parser)
    add_generation_arguments(parser)
    add_kb_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from medgpt.errors import UserError
    from medgpt.infer.options import engine_from_args, engine_params, params_from_args
    from medgpt.infer.webui import build_demo, check_logins, launch_page, read_login_file
    from medgpt.rag import kb_from_args

    if args.max_request_kb < 1:
        raise UserError(f"--max-request-kb {args.max_request_kb}: must be >= 1")
    logins = check_logins(args.auth + (read_login_file(args.auth_file) if args.auth_file else []))
    params_from_args(args)  # a bad flag fails before the model loads
    augment = kb_from_args(args)
    with engine_from_args(args) as engine:  # the page runs until stopped; the engine closes with it
        params, origins = engine_params(args, engine)
        demo = build_demo(engine, params, system=args.system, augment=augment, origins=origins)
        launch_page(demo, host=args.host, port=args.port, logins=logins, share=args.share,
                    max_request_bytes=args.max_request_kb * 1024)
    return 0
