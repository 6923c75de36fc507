"""Command-line subcommands; each module exposes `add_arguments(parser)` and `run(args)`.

Modules here import only the standard library at top level so that `medgpt --help` stays fast;
heavy libraries are imported inside `run`.
"""
