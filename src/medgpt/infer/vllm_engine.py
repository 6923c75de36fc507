"""The vLLM engine (GPU): paged attention and continuous batching, behind the same interface.

Prompts are rendered and tokenized by medgpt's template (the same as training) and handed to vLLM as
token ids, so both engines see identical prompts. A LoRA adapter is applied per request (unmerged).
"""

from __future__ import annotations

import importlib.util
import itertools
import threading
from typing import Any

from medgpt.errors import UserError
from medgpt.infer.base import (BaseEngine, Completion, GenerationParams, Request, read_sampling, require_template,
                               stop_tokens)

INSTALL_HINT = "the vllm engine needs vLLM on Linux with an NVIDIA GPU: pip install 'medgpt[vllm]' (or pip install vllm)"
DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
          "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise UserError(INSTALL_HINT)


def llm_kwargs(model: str, tokenizer: str, adapter: str | None = None, dtype: str = "auto",
               trust_remote_code: bool = False, tensor_parallel_size: int = 1, quantization: str | None = None,
               gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, max_lora_rank: int = 64,
               max_batch_size: int | None = None, seed: int = 0, **extra: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` from medgpt's flags."""
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: expected one of auto, fp32, bf16, fp16")
    if tensor_parallel_size < 1:
        raise UserError("tensor_parallel_size must be >= 1")
    if not 0 < gpu_memory_utilization <= 1:
        raise UserError("gpu_memory_utilization must be in (0, 1]")
    kwargs: dict[str, Any] = {
        "model": model, "tokenizer": tokenizer, "dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code,
        "tensor_parallel_size": tensor_parallel_size, "gpu_memory_utilization": gpu_memory_utilization,
        "seed": seed,
    }
    if quantization:
        kwargs["quantization"] = quantization
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    if max_batch_size:
        kwargs["max_num_seqs"] = max_batch_size
    if adapter:
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank)
    kwargs.update(extra)
    return kwargs


def sampling_kwargs(params: GenerationParams, stop_ids: set[int], stop_strings: list[str]) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` from medgpt's GenerationParams."""
    kwargs: dict[str, Any] = {
        "max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1, "repetition_penalty": params.repetition_penalty,
        "stop": list(dict.fromkeys(params.stop + stop_strings)) or None,
        "stop_token_ids": sorted(stop_ids) or None, "seed": params.seed, "skip_special_tokens": True,
    }
    return kwargs


class VllmEngine(BaseEngine):
    """vLLM's LLM engine driven step by step, so one code path serves batches and streams."""

    def __init__(self, model: str | None = None, adapter: str | None = None, template: str | None = None,
                 dtype: str = "auto", trust_remote_code: bool = False, max_batch_size: int | None = None,
                 system: str | None = None, **kwargs: Any):
        require_vllm()
        from vllm import LLM

        from medgpt.models import open_model

        opened = open_model(model, adapter, template, trust_remote_code=trust_remote_code, weights=False)
        self.tokenizer, self.name, self.system = opened.tokenizer, opened.name, system
        self.template = require_template(opened.template)
        self.stop_ids, self.stop_strings = stop_tokens(self.tokenizer, self.template)
        self.folder, self.adapter, self.dtype, self.device = opened.folder, opened.adapter, dtype, "cuda"
        self.model_sampling = read_sampling(opened.folder)
        self.llm = LLM(**llm_kwargs(opened.folder, opened.tokenizer_folder, opened.adapter, dtype, trust_remote_code,
                                    max_batch_size=max_batch_size, **kwargs))
        self.max_batch_size = max_batch_size or 16  # requests a server hands over at once; vLLM schedules them
        self.lora = None
        if opened.adapter:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, opened.adapter)
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def run(self, requests: list[Request]) -> list[Completion]:
        from vllm import SamplingParams

        engine = self.llm.llm_engine
        pending: dict[str, int] = {}
        sent = [0] * len(requests)
        results: list[Completion | None] = [None] * len(requests)
        with self._lock:
            for i, request in enumerate(requests):
                rid = f"medgpt-{next(self._ids)}"
                pending[rid] = i
                sampling = SamplingParams(**sampling_kwargs(request.params, self.stop_ids, self.stop_strings))
                engine.add_request(rid, {"prompt_token_ids": request.prompt_ids}, sampling, lora_request=self.lora)
            while pending:
                for rid in [rid for rid, i in pending.items() if requests[i].cancelled]:
                    engine.abort_request([rid])
                    i = pending.pop(rid)
                    results[i] = Completion("", len(requests[i].prompt_ids), 0, "stop")
                for output in engine.step():
                    i = pending.get(output.request_id)
                    if i is None:
                        continue
                    out = output.outputs[0]
                    if requests[i].on_text and len(out.text) > sent[i]:
                        requests[i].on_text(out.text[sent[i]:])
                        sent[i] = len(out.text)
                    if output.finished:
                        del pending[output.request_id]
                        results[i] = Completion(out.text, len(requests[i].prompt_ids), len(out.token_ids),
                                                "length" if out.finish_reason == "length" else "stop")
        return results  # type: ignore[return-value]
