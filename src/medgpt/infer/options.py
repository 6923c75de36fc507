"""Command-line flags shared by chat, predict, serve and webui (standard library only: fast --help)."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

from medgpt.errors import UserError
from medgpt.infer.base import CHAT_SAMPLING, MEDGPT_ORIGIN, Engine, GenerationParams, chat_defaults, chat_origins
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
    vllm.add_argument("--data-parallel-size", type=int, default=1,
                      help="model replicas vLLM runs, each on --tensor-parallel-size GPUs of its own (vLLM's "
                           "data_parallel_size)")
    vllm.add_argument("--quantization", help="e.g. awq, gptq, fp8 (the checkpoint must match)")
    vllm.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="share of GPU memory vLLM may use")
    vllm.add_argument("--max-model-len", type=int, help="longest prompt + answer in tokens")


SAMPLING_FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
                  "repetition_penalty": "--repetition-penalty"}
# What the API samples with where neither the request, a flag nor the model's generation_config sets a value:
# OpenAI's and vLLM's defaults (temperature 1, no top-p or top-k cut, no penalty), not medgpt's chat defaults.
API_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
API_ORIGIN = "OpenAI's and vLLM's default"


def add_generation_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 512, api: bool = False) -> None:
    """Generation flags; a sampling flag left out takes the model's generation_config value, else medgpt's chat
    default (`api`: else OpenAI's and vLLM's default, medgpt's with --chat-defaults; see `serve_params`)."""
    fallback = ("OpenAI's and vLLM's defaults (temperature 1, no top-p/top-k cut, no penalty; --chat-defaults: "
                "medgpt's chat defaults)" if api else "medgpt's chat defaults (sampling with a repetition penalty: "
                "greedy decoding makes small models repeat themselves)")
    group = parser.add_argument_group(
        "generation", "Sampling flags left out take the model's generation_config.json values where it sets them, "
                      f"else {fallback}. --greedy decodes greedily, as evaluation does.")
    group.add_argument("--system", help="system prompt (default: the template's)")
    group.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction,
                       help="the chat template's thinking switch (Qwen3's enable_thinking): --no-enable-thinking "
                            "ends the prompt with an empty think block, so the model answers without reasoning "
                            "(default: the template's own; a template without a reasoning format ignores it)")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default: {max_new_tokens}")
    for field, flag in SAMPLING_FLAGS.items():
        value = CHAT_SAMPLING[field]
        kind = int if isinstance(value, int) else float
        note = {"temperature": "; 0 = greedy", "top_k": "; 0 = off"}.get(field, "")
        default = f"{API_SAMPLING[field]:g} (--chat-defaults: {value})" if api else value
        group.add_argument(flag, type=kind, help=f"default: the model's generation_config, else {default}{note}")
    group.add_argument("--greedy", action="store_true",
                       help="greedy decoding: temperature 0, no top-p/top-k cut, repetition penalty 1.0 unless "
                            "--repetition-penalty is given (reproducible; what evaluation uses)")
    group.add_argument("--stop", action="append", default=[],
                       help="stop string (repeatable; at most 8, each at most 256 characters)")
    group.add_argument("--seed", type=int, help="default: none (a new random seed for each answer)")


def params_from_args(args: argparse.Namespace, defaults: GenerationParams | None = None) -> GenerationParams:
    """The flags given over `defaults` (the engine's `chat_defaults`; None: medgpt's own, to check the flags before
    a model is loaded)."""
    return chat_params(args, defaults)[0]


def chat_params(args: argparse.Namespace, defaults: GenerationParams | None = None,
                origins: dict[str, str] | None = None) -> tuple[GenerationParams, dict[str, str]]:
    """`params_from_args` and where each sampling value came from: a flag, --greedy, or `origins` (the defaults')."""
    given = {field: getattr(args, field) for field in SAMPLING_FLAGS if getattr(args, field, None) is not None}
    where = {**(origins or {field: MEDGPT_ORIGIN for field in SAMPLING_FLAGS}),
             **{field: SAMPLING_FLAGS[field] for field in given}}
    if getattr(args, "greedy", False):
        clash = [SAMPLING_FLAGS[f] for f in ("temperature", "top_p", "top_k") if f in given]
        if clash:
            raise UserError(f"--greedy cannot be combined with {', '.join(clash)}")
        where.update({field: "--greedy" for field in SAMPLING_FLAGS if field not in given})
        given = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, **given}
    base = defaults or GenerationParams(max_new_tokens=args.max_new_tokens, **CHAT_SAMPLING)
    params = replace(base, max_new_tokens=args.max_new_tokens, stop=list(args.stop), seed=args.seed, **given)
    return params.validate(), where


def engine_from_args(args: argparse.Namespace, system: str | None = None) -> Engine:
    """The engine the flags ask for; `system`: its default system prompt (for prompts that bring none)."""
    kwargs: dict = {"max_batch_size": args.max_batch_size} if args.max_batch_size else {}
    if args.engine == "vllm":
        kwargs.update(vllm_options(args))
    return load_engine(model=args.model, adapter=args.adapter, template=args.template, engine=args.engine,
                       dtype=args.dtype, trust_remote_code=args.trust_remote_code, system=system,
                       enable_thinking=getattr(args, "enable_thinking", None), **kwargs)


def vllm_options(args: argparse.Namespace) -> dict:
    """The vllm engine's own flags, as `vllm_engine.llm_kwargs` takes them."""
    return {"tensor_parallel_size": args.tensor_parallel_size, "data_parallel_size": args.data_parallel_size,
            "quantization": args.quantization, "gpu_memory_utilization": args.gpu_memory_utilization,
            "max_model_len": args.max_model_len}


def api_key(flag: str | None) -> str | None:
    """The API key from the flag, else the MEDGPT_API_KEY environment variable; None = no key required."""
    return flag or os.environ.get("MEDGPT_API_KEY") or None


def engine_params(args: argparse.Namespace, engine: Engine) -> tuple[GenerationParams, dict[str, str]]:
    """The settings chat, webui and predict generate with: the flags over the engine's chat defaults."""
    return chat_params(args, chat_defaults(engine, args.max_new_tokens), chat_origins(engine))


def serve_params(args: argparse.Namespace, engine: Engine) -> tuple[GenerationParams, dict[str, str]]:
    """The API's defaults, for the fields a request leaves out (the request's own values win,
    `SamplingFields.generation_params`): each flag given, else the model's generation_config.json (as vLLM's
    `--generation-config auto` reads it), else API_SAMPLING (OpenAI's and vLLM's defaults) or, with
    --chat-defaults, medgpt's chat defaults."""
    defaults, origins = chat_defaults(engine, args.max_new_tokens), chat_origins(engine)
    if not getattr(args, "chat_defaults", False):
        neutral = {field: value for field, value in API_SAMPLING.items() if origins[field] == MEDGPT_ORIGIN}
        defaults = replace(defaults, **neutral)
        origins = {**origins, **dict.fromkeys(neutral, API_ORIGIN)}
    return chat_params(args, defaults, origins)
