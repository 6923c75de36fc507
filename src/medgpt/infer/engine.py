"""The transformers engine, and `load_engine`, which opens either engine by name (see base.py for the interface).

The transformers engine runs many requests in one `model.generate` call even when they ask for
different sampling settings, lengths or stop strings: a per-row logits processor does the sampling
(each row with its own temperature, top-p/k, repetition penalty and seed) and a per-row stopping
criterion ends each row on eos, the template's stop words, its own stop strings or its own length,
streaming each row's text as it grows.
"""

from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import Future

from medgpt.errors import UserError
from medgpt.infer.base import (BaseEngine, Completion, Engine, Request, require_template, shipped_sampling,
                               stop_tokens)

log = logging.getLogger(__name__)

ENGINES = ("transformers", "vllm")


def stop_position(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else -1


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still become a stop string (or an unfinished UTF-8 character)."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:n]):
                keep = n
                break
    return keep


class _Row:
    """Decoding state of one request inside a batch."""

    def __init__(self, request: Request, pad: int, generator):
        self.request = request
        self.pad = pad  # left padding in the batch tensor
        self.generator = generator
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters already handed to on_text
        self.finish_reason: str | None = None

    def emit(self, upto: int) -> None:
        if self.request.on_text and upto > self.sent:
            self.request.on_text(self.text[self.sent:upto])
        self.sent = max(self.sent, upto)


class _Batch:
    """Per-row sampling (a logits processor) and per-row stopping and streaming (a stopping criterion)."""

    def __init__(self, requests: list[Request], pads: list[int], tokenizer, stop_ids: set[int],
                 stop_strings: list[str]):
        import torch

        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.stop_strings = stop_strings
        self.rows = []
        for request, pad in zip(requests, pads):
            generator = None
            if request.params.temperature > 0:
                generator = torch.Generator()
                seed = request.params.seed
                generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
            self.rows.append(_Row(request, pad, generator))

    def process_logits(self, input_ids, scores):
        """Apply each row's repetition penalty and sampling; a sampled row keeps only its token so argmax picks it."""
        import torch
        from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                  TopKLogitsWarper, TopPLogitsWarper)

        for i, row in enumerate(self.rows):
            p = row.request.params
            if row.finish_reason is not None:
                continue
            s = scores[i:i + 1]
            if p.repetition_penalty != 1.0:
                s = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(input_ids[i:i + 1, row.pad:], s)
            if p.temperature > 0:
                s = TemperatureLogitsWarper(p.temperature)(input_ids[i:i + 1], s)
                if p.top_k > 0:
                    s = TopKLogitsWarper(p.top_k)(input_ids[i:i + 1], s)
                if p.top_p < 1.0:
                    s = TopPLogitsWarper(p.top_p)(input_ids[i:i + 1], s)
                probs = torch.softmax(s.float(), dim=-1)
                token = torch.multinomial(probs.cpu(), 1, generator=row.generator).item()
                s = torch.full_like(s, float("-inf"))
                s[0, token] = 0.0
            scores[i:i + 1] = s
        return scores

    def check_stop(self, input_ids, scores=None, **kwargs):
        """Record each row's new token, stream its settled text, and report which rows are done."""
        import torch

        done = torch.zeros(len(self.rows), dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].tolist()
        for i, row in enumerate(self.rows):
            if row.finish_reason is None:
                if row.request.cancelled:
                    row.finish_reason = "stop"
                else:
                    self._advance(row, last[i])
            done[i] = row.finish_reason is not None
        return done

    def _advance(self, row: _Row, token: int) -> None:
        params = row.request.params
        row.ids.append(token)
        if token in self.stop_ids:
            row.finish_reason = "stop"
            row.emit(len(row.text))
            return
        row.text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        stops = params.stop + self.stop_strings
        cut = stop_position(row.text, stops)
        if cut >= 0:
            row.text = row.text[:cut]
            row.finish_reason = "stop"
        elif len(row.ids) >= params.max_new_tokens:
            row.finish_reason = "length"
        if row.finish_reason is not None:
            row.text = row.text.rstrip("\ufffd")
            row.emit(len(row.text))
        else:
            row.emit(len(row.text) - held_back(row.text, stops))


def _processor(batch: _Batch):
    from transformers import LogitsProcessor

    class PerRowSampling(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return batch.process_logits(input_ids, scores)

    return PerRowSampling()


def _criterion(batch: _Batch):
    from transformers import StoppingCriteria

    class PerRowStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return batch.check_stop(input_ids, scores)

    return PerRowStop()


class TransformersEngine(BaseEngine):
    """Generation with transformers on CPU or GPU; a LoRA adapter stays unmerged (PEFT)."""

    def __init__(self, model: str | None = None, adapter: str | None = None, template: str | None = None,
                 dtype: str = "auto", trust_remote_code: bool = False, max_batch_size: int = 16,
                 attn_implementation: str | None = None, device: str = "auto", system: str | None = None):
        from medgpt.models import open_model

        opened = open_model(model, adapter, template, dtype=dtype, trust_remote_code=trust_remote_code,
                            attn_implementation=attn_implementation, weights=False)
        self.tokenizer, self.name = opened.tokenizer, opened.name
        self.template = require_template(opened.template)
        self.model = opened.load_weights()
        self.system = system
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if getattr(self.model, "hf_device_map", None) is None:
            self.model.to(device)
        self.device = device
        self.folder, self.adapter = opened.folder, opened.adapter
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        self.model_sampling = shipped_sampling(self.model.generation_config)
        self.max_batch_size = max(1, int(max_batch_size))
        self.stop_ids, self.stop_strings = stop_tokens(self.tokenizer, self.template, self.model)
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", None) or 2048)
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._running = 0
        self._lock = threading.Lock()  # one generate at a time on one model
        self._thread = threading.Thread(target=self._loop, name="medgpt-engine", daemon=True)
        self._thread.start()
        log.info("loaded %s%s on %s (%s), template %s", opened.folder,
                 f" + adapter {opened.adapter}" if opened.adapter else "", device, self.dtype, self.template.name)

    def submit(self, request: Request) -> Future[Completion]:
        future: Future[Completion] = Future()
        try:
            request.params.validate()
        except UserError as exc:
            future.set_exception(exc)
            return future
        with self._wake:
            self._queue.append((request, future))
            self._wake.notify()
        return future

    def waiting(self) -> int:
        return len(self._queue)

    def running(self) -> int:
        return self._running

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch_size))]
            self._running = len(batch)
            try:
                self._settle(batch)
            finally:
                self._running = 0

    def _settle(self, batch: list) -> None:
        try:
            results = self._run_batch([request for request, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            for item in batch:  # retry one by one: only the failing request fails
                self._settle([item])
            return
        for (_, future), result in zip(batch, results):
            future.set_result(result)

    def _run_batch(self, requests: list[Request]) -> list[Completion]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        width = max(len(r.prompt_ids) for r in requests)
        pad_id = self.tokenizer.pad_token_id
        pads = [width - len(r.prompt_ids) for r in requests]
        input_ids = torch.tensor([[pad_id] * p + r.prompt_ids for p, r in zip(pads, requests)], device=self.device)
        attention = torch.tensor([[0] * p + [1] * len(r.prompt_ids) for p, r in zip(pads, requests)],
                                 device=self.device)
        state = _Batch(requests, pads, self.tokenizer, self.stop_ids, self.stop_strings)
        # every processor is per row (above); the neutral values keep the model's own generation_config from adding
        # a batch-wide repetition penalty or n-gram ban on top
        config = GenerationConfig(max_new_tokens=max(r.params.max_new_tokens for r in requests), do_sample=False,
                                  num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0,
                                  pad_token_id=pad_id, eos_token_id=sorted(self.stop_ids) or None)
        with self._lock, torch.inference_mode():
            self.model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config,
                                logits_processor=LogitsProcessorList([_processor(state)]),
                                stopping_criteria=StoppingCriteriaList([_criterion(state)]))
        return [Completion(text=row.text, prompt_tokens=len(row.request.prompt_ids), completion_tokens=len(row.ids),
                           finish_reason=row.finish_reason or "length") for row in state.rows]


def load_engine(model: str | None = None, adapter: str | None = None, template: str | None = None,
                engine: str = "transformers", dtype: str = "auto", trust_remote_code: bool = False,
                system: str | None = None, **engine_kwargs) -> Engine:
    """Load the named engine; template None = the one recorded with the model/adapter, else the tokenizer's;
    `system` = the default system prompt of every prompt that brings none."""
    if engine == "transformers":
        return TransformersEngine(model=model, adapter=adapter, template=template, dtype=dtype,
                                  trust_remote_code=trust_remote_code, system=system, **engine_kwargs)
    if engine == "vllm":
        from medgpt.infer.vllm_engine import VllmEngine

        return VllmEngine(model=model, adapter=adapter, template=template, dtype=dtype,
                          trust_remote_code=trust_remote_code, system=system, **engine_kwargs)
    raise UserError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
