"""Command-line flags shared by chat, predict, serve and webui (standard library only: fast --help)."""

from __future__ import annotations

import argparse
import os

from medgpt.infer.base import Engine, GenerationParams
from medgpt.infer.engine import ENGINES, load_engine


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="model folder or hub id (default: the bundled SmolLM2-135M-Instruct)")
    group.add_argument("--adapter", help="LoRA adapter folder, applied without merging")
    group.add_argument("--template", help="chat template name (default: the one recorded with the model, else the "
                                          "tokenizer's own: auto)")
    group.add_argument("--engine", choices=ENGINES, default="transformers", help="generation engine")
    group.add_argument("--dtype", default="auto", help="auto (bf16 where fast), fp32, bf16, fp16")
    group.add_argument("--max-batch-size", type=int,
                       help="most requests generated together (default: 16 for transformers, vLLM's own for vllm)")
    group.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model (off)")
    vllm = parser.add_argument_group("vllm engine")
    vllm.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to shard the model over")
    vllm.add_argument("--quantization", help="e.g. awq, gptq, fp8 (the checkpoint must match)")
    vllm.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="share of GPU memory vLLM may use")
    vllm.add_argument("--max-model-len", type=int, help="longest prompt + answer in tokens")


def add_generation_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 512) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--system", help="system prompt (default: the template's)")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0, help="0 = off")
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--seed", type=int)


def params_from_args(args: argparse.Namespace) -> GenerationParams:
    return GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, stop=list(args.stop),
                            seed=args.seed).validate()


def engine_from_args(args: argparse.Namespace, system: str | None = None) -> Engine:
    """The engine the flags ask for; `system`: its default system prompt (for prompts that bring none)."""
    kwargs: dict = {"max_batch_size": args.max_batch_size} if args.max_batch_size else {}
    if args.engine == "vllm":
        kwargs.update(tensor_parallel_size=args.tensor_parallel_size, quantization=args.quantization,
                      gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len)
    return load_engine(model=args.model, adapter=args.adapter, template=args.template, engine=args.engine,
                       dtype=args.dtype, trust_remote_code=args.trust_remote_code, system=system, **kwargs)


def api_key(flag: str | None) -> str | None:
    """The API key from the flag, else the MEDGPT_API_KEY environment variable; None = no key required."""
    return flag or os.environ.get("MEDGPT_API_KEY") or None
