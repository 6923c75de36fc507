"""The vLLM engine (GPU): paged attention and continuous batching, behind the same interface.

Prompts are rendered and tokenized by medgpt's template (the same as training) and handed to vLLM as
token ids, so both engines see identical prompts. A LoRA adapter is applied per request (unmerged).
The template's thinking switch (`enable_thinking`, a request's `chat_template_kwargs`) is part of that rendering,
and replies are read into reasoning and answer by `medgpt.infer.reasoning` as for the transformers engine: vLLM's
`--reasoning-parser` belongs to its own OpenAI server, which this engine does not run. Tested without a GPU only
as far as the prompt ids and the argument mapping go.
"""

from __future__ import annotations

import importlib.util
import itertools
import queue
import threading
from concurrent.futures import Future
from typing import Any

from medgpt.errors import UserError
from medgpt.infer.base import (BaseEngine, Completion, GenerationParams, Request, TokenLogprob, close_at_exit,
                               read_sampling, require_template, stop_tokens)

INSTALL_HINT = "the vllm engine needs vLLM on Linux with an NVIDIA GPU: pip install 'medgpt[vllm]' (or pip install vllm)"
DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
          "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise UserError(INSTALL_HINT)


def llm_kwargs(model: str, tokenizer: str, adapter: str | None = None, dtype: str = "auto",
               trust_remote_code: bool = False, tensor_parallel_size: int = 1, data_parallel_size: int = 1,
               quantization: str | None = None,
               gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, max_lora_rank: int = 64,
               max_batch_size: int | None = None, seed: int = 0, **extra: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` from medgpt's flags."""
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: expected one of auto, fp32, bf16, fp16")
    if tensor_parallel_size < 1 or data_parallel_size < 1:
        raise UserError("tensor_parallel_size and data_parallel_size must be >= 1")
    if not 0 < gpu_memory_utilization <= 1:
        raise UserError("gpu_memory_utilization must be in (0, 1]")
    kwargs: dict[str, Any] = {
        "model": model, "tokenizer": tokenizer, "dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code,
        "tensor_parallel_size": tensor_parallel_size, "gpu_memory_utilization": gpu_memory_utilization,
        "seed": seed,
    }
    if data_parallel_size > 1:
        kwargs["data_parallel_size"] = data_parallel_size
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


def sampling_kwargs(params: GenerationParams, stop_ids: set[int], stop_strings: list[str],
                    echo: bool = False) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` from medgpt's GenerationParams (same meaning on both engines:
    vLLM's log-probs are the raw ones by default, its penalties and logit bias follow OpenAI and transformers).

    vLLM generates at least one token: a request that only scores its prompt (max_new_tokens 0) asks for one,
    which the engine drops. The grammar goes to `structured_outputs` (StructuredOutputsParams, vLLM 0.12+)."""
    kwargs: dict[str, Any] = {
        "max_tokens": max(1, params.max_new_tokens), "temperature": params.temperature, "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1, "repetition_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
        "stop": list(dict.fromkeys(params.stop + stop_strings)) or None,
        "stop_token_ids": sorted(stop_ids) or None, "seed": params.seed, "skip_special_tokens": True,
    }
    if params.logit_bias:
        kwargs["logit_bias"] = dict(params.logit_bias)
    if params.logprobs is not None:
        kwargs["logprobs"] = params.logprobs
    if echo:
        kwargs["prompt_logprobs"] = params.logprobs or 0
    if params.grammar:
        kwargs["structured_outputs"] = {"grammar": params.grammar}
    return kwargs


def vllm_logprob(entry: dict | None, token: int, k: int) -> TokenLogprob | None:
    """medgpt's TokenLogprob from one position of vLLM's log-probs ({token id: Logprob(logprob, rank, ...)}:
    the top k and the chosen token)."""
    if entry is None:
        return None
    top = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k), key=lambda x: x[1].rank)
    return TokenLogprob(token, float(entry[token].logprob), [(t, float(lp.logprob)) for t, lp in top])


class VllmEngine(BaseEngine):
    """vLLM's LLM engine driven step by step from one scheduler thread: vLLM batches the submitted requests
    continuously; medgpt adds them, aborts cancelled ones and hands each its text as it grows."""

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
        self.max_context = int(self.llm.llm_engine.model_config.max_model_len)
        self.max_batch_size = max_batch_size or 16
        self.lora = None
        if opened.adapter:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, opened.adapter)
        self._ids = itertools.count()
        self._new: queue.Queue = queue.Queue()
        self._pending: dict[str, tuple[Request, Future, list[int]]] = {}  # request id -> request, future, [sent]
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="medgpt-vllm", daemon=True)
        self._thread.start()
        close_at_exit(self)

    def submit(self, request: Request) -> Future[Completion]:
        future: Future[Completion] = Future()
        future.set_running_or_notify_cancel()
        try:
            request.params.validate()
            if not request.prompt_ids:
                raise UserError("the prompt is empty")
        except UserError as exc:
            future.set_exception(exc)
            return future
        self._new.put((request, future))
        return future

    def waiting(self) -> int:  # not handed to vLLM yet, or beyond its max_num_seqs
        return self._new.qsize() + max(0, len(self._pending) - self.max_batch_size)

    def running(self) -> int:
        return min(len(self._pending), self.max_batch_size)

    def close(self) -> None:
        self._closed.set()
        self._new.put(None)
        self._thread.join(timeout=60)

    def _add(self, request: Request, future: Future) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        kwargs = sampling_kwargs(request.params, self.stop_ids, self.stop_strings, echo=request.echo)
        if "structured_outputs" in kwargs:
            kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
        rid = f"medgpt-{next(self._ids)}"
        try:
            self.llm.llm_engine.add_request(rid, {"prompt_token_ids": request.prompt_ids}, SamplingParams(**kwargs),
                                            lora_request=self.lora)
        except (ValueError, TypeError) as exc:  # vLLM refused this request's values
            future.set_exception(UserError(str(exc)))
            return
        self._pending[rid] = (request, future, [0])

    def _completion(self, request: Request, output: Any) -> Completion:
        out = output.outputs[0]
        ids = list(out.token_ids)
        scored_only = request.params.max_new_tokens == 0
        while ids and ids[-1] in self.stop_ids:
            ids.pop()
        k = request.params.logprobs or 0
        logprobs = None
        if request.params.logprobs is not None and not scored_only:
            scored = list(out.token_ids)[:len(ids) + 1]  # with the stop token that ended the answer, as vLLM's
            logprobs = [vllm_logprob(entry, t, k) for entry, t in zip(out.logprobs or [], scored)]
        prompt_logprobs = None
        if request.echo:
            prompt_logprobs = [vllm_logprob(entry, t, k)
                               for entry, t in zip(output.prompt_logprobs or [], request.prompt_ids)]
        if scored_only:
            return Completion("", len(request.prompt_ids), 0, "length", [], None, prompt_logprobs)
        return Completion(out.text, len(request.prompt_ids), len(out.token_ids),
                          "length" if out.finish_reason == "length" else "stop", ids, logprobs, prompt_logprobs)

    def _loop(self) -> None:
        engine = self.llm.llm_engine
        while not self._closed.is_set():
            block = not self._pending
            try:
                while True:
                    item = self._new.get(block=block)
                    block = False
                    if item is None:
                        break
                    self._add(*item)
            except queue.Empty:
                pass
            for rid in [rid for rid, (request, _, _) in self._pending.items() if request.cancelled]:
                engine.abort_request([rid])
                request, future, _ = self._pending.pop(rid)
                future.set_result(Completion("", len(request.prompt_ids), 0, "stop"))
            if not self._pending:
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # vLLM's step is the whole batch's: every running request fails with it
                for rid, (_, future, _) in list(self._pending.items()):
                    engine.abort_request([rid])
                    future.set_exception(exc)
                self._pending.clear()
                continue
            for output in outputs:
                if output.request_id not in self._pending:
                    continue
                request, future, sent = self._pending[output.request_id]
                text = output.outputs[0].text
                try:
                    if request.on_text and len(text) > sent[0] and request.params.max_new_tokens > 0:
                        request.on_text(text[sent[0]:])
                        sent[0] = len(text)
                    if output.finished:
                        del self._pending[output.request_id]
                        future.set_result(self._completion(request, output))
                except Exception as exc:  # this request only
                    self._pending.pop(output.request_id, None)
                    engine.abort_request([output.request_id])
                    future.set_exception(exc)
