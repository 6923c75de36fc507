"""`medgpt predict --model M --input q.jsonl --output a.jsonl`: batched answers, in order, resumable."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medgpt.infer.options import add_engine_arguments, add_generation_arguments

    parser.add_argument("--input", required=True, help="jsonl rows with query (+system, history), question, "
                                                       "instruction (+input), messages or conversations")
    parser.add_argument("--output", required=True,
                        help="jsonl: each input row plus `response`, in input order (and `reasoning`, the think "
                             "block, where the template has a reasoning format: qwen3)")
    parser.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    add_engine_arguments(parser)
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from medgpt.infer.chat import describe_params
    from medgpt.infer.options import engine_from_args, engine_params, params_from_args
    from medgpt.infer.predict import predict_file, read_inputs

    params_from_args(args)  # a bad flag or row fails before the model loads
    rows = read_inputs(args.input)
    with engine_from_args(args) as engine:
        params, origins = engine_params(args, engine)
        print(describe_params(params, origins))
        chunk = 4 * engine.max_batch_size
        stats = predict_file(engine, args.input, args.output, params, system=args.system, chunk_size=chunk,
                             overwrite=args.overwrite, rows=rows)
    print(f"{args.output}: {stats['rows']} rows ({stats['generated']} answered now, {stats['resumed']} before), "
          f"{stats['completion_tokens']} tokens generated")
    return 0
