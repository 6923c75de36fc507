"""One generation interface for chat, predict, serve, webui and evaluation.

The transformers engine runs many requests in one `model.generate` call even when they ask for
different sampling settings, lengths or stop strings: a per-row logits processor does the sampling
(each row with its own temperature, top-p/k, repetition penalty and seed) and a per-row stopping
criterion ends each row on eos, the template's stop words, its own stop strings or its own length,
streaming each row's text as it grows.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from medgpt.errors import UserError

log = logging.getLogger(__name__)

ENGINES = ("transformers", "vllm")

# A retrieval hook (knowledge-base answers): turns the conversation into augmented messages and the
# sources it used; chat, serve and webui accept one and show or return the sources.
Augment = Callable[[list[dict]], tuple[list[dict], list[dict]]]


@dataclass
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> GenerationParams:
        """Reject settings a user can get wrong, with a message instead of a library traceback."""
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


class Engine(Protocol):
    tokenizer: Any
    template: Any

    def generate(self, batch: list[list[dict]], params: GenerationParams,
                 system: str | None = None) -> list[Completion]: ...

    def stream(self, messages: list[dict], params: GenerationParams,
               system: str | None = None) -> Iterator[str]: ...


@dataclass
class Request:
    """One prompt (token ids) with its own parameters; `on_text` receives text deltas as they are final."""

    prompt_ids: list[int]
    params: GenerationParams
    on_text: Callable[[str], None] | None = None
    cancelled: bool = False  # set by a server whose client went away: the row stops at the next step


def check_messages(messages: Any) -> list[dict]:
    """Canonical messages: a non-empty list of {"role", "content": str} ending with a user turn."""
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise UserError(f"messages[{i}]: expected {{role: system|user|assistant, content: string}}")
    if messages[-1]["role"] != "user":
        raise UserError("the last message must come from the user")
    return messages


def split_system(messages: list[dict], system: str | None) -> tuple[list[dict], str | None]:
    """A leading system message wins over the default system prompt."""
    if messages and messages[0]["role"] == "system":
        return messages[1:], messages[0]["content"]
    return messages, system


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


class BaseEngine:
    """What every engine shares: prompts through the template, validation, streaming over `run`."""

    tokenizer: Any
    template: Any

    def encode(self, messages: list[dict], system: str | None = None) -> list[int]:
        """Token ids of the prompt, rendered by the same template as training."""
        messages, system = split_system(check_messages(messages), system)
        return list(self.template.encode_prompt(self.tokenizer, messages, system=system))

    def generate(self, batch: list[list[dict]], params: GenerationParams,
                 system: str | None = None) -> list[Completion]:
        params.validate()
        return self.run([Request(self.encode(m, system), params) for m in batch])

    def stream(self, messages: list[dict], params: GenerationParams, system: str | None = None) -> Iterator[str]:
        params.validate()
        deltas: queue.Queue = queue.Queue()
        request = Request(self.encode(messages, system), params, on_text=deltas.put)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self.run([request])
            except BaseException as exc:  # re-raised in the consumer below
                failure.append(exc)
            finally:
                deltas.put(None)

        threading.Thread(target=work, daemon=True).start()
        try:
            while (delta := deltas.get()) is not None:
                yield delta
        finally:  # the consumer stopped early (closed, interrupted): stop generating for it
            request.cancelled = True
        if failure:
            raise failure[0]

    def run(self, requests: list[Request]) -> list[Completion]:
        """Generate for many requests together; results keep the input order."""
        raise NotImplementedError


class TransformersEngine(BaseEngine):
    """Generation with transformers on CPU or GPU; a LoRA adapter stays unmerged (PEFT)."""

    def __init__(self, model: str | None = None, adapter: str | None = None, template: str | None = None,
                 dtype: str = "auto", trust_remote_code: bool = False, max_batch_size: int = 16,
                 attn_implementation: str | None = None, device: str = "auto"):
        from medgpt.models import ModelArgs, adapter_base, load_model, load_tokenizer

        if adapter and not model:
            model = adapter_base(adapter)
        args = ModelArgs(model=model or ModelArgs.model, adapter=adapter, dtype=dtype,
                         trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
        self.tokenizer = load_tokenizer(adapter or args.model, trust_remote_code)
        self.template = resolve_template(template, model=args.model, adapter=adapter, tokenizer=self.tokenizer)
        self.model = load_model(args)
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if getattr(self.model, "hf_device_map", None) is None:
            self.model.to(device)
        self.device = device
        self.max_batch_size = max(1, int(max_batch_size))
        self.stop_ids, self.stop_strings = stop_tokens(self.tokenizer, self.template, self.model)
        self.name = Path(adapter or args.model).name
        self._lock = threading.Lock()  # one generate at a time on one model
        log.info("loaded %s%s on %s (%s), template %s", args.model, f" + adapter {adapter}" if adapter else "",
                 device, str(self.model.dtype).removeprefix("torch."), self.template.name)

    def run(self, requests: list[Request]) -> list[Completion]:
        """Generate for prompts of any length in batches of similar length; results keep the input order."""
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids))
        results: list[Completion | None] = [None] * len(requests)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start:start + self.max_batch_size]
            for i, completion in zip(chunk, self._run_batch([requests[i] for i in chunk])):
                results[i] = completion
        return results  # type: ignore[return-value]

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


def resolve_template(name: str | None, model: str | None, adapter: str | None, tokenizer):
    """The template named, else the one recorded beside the adapter or model (medgpt.json), else the tokenizer's."""
    from medgpt.data.templates import get_template
    from medgpt.models import read_meta, resolve_model

    if name is None:
        for folder in (adapter, model):
            if folder and Path(folder).expanduser().is_dir():
                name = read_meta(Path(folder).expanduser()).get("template")
                if name:
                    break
        if name is None and model and not Path(model).expanduser().exists():
            name = read_meta(resolve_model(model)).get("template")
    return get_template(name or "auto", tokenizer)


def stop_tokens(tokenizer, template, model=None) -> tuple[set[int], list[str]]:
    """Split the template's stop words and the eos tokens into single token ids and multi-token strings."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, eos):
        ids.update(v for v in (value if isinstance(value, list) else [value]) if v is not None)
    strings = []
    for word in getattr(template, "stop_words", None) or []:
        token = tokenizer.convert_tokens_to_ids(word) if word in tokenizer.get_vocab() else None
        if token is not None and token != tokenizer.unk_token_id:
            ids.add(token)
        else:
            strings.append(word)
    return ids, strings


def load_engine(model: str | None = None, adapter: str | None = None, template: str | None = None,
                engine: str = "transformers", dtype: str = "auto", trust_remote_code: bool = False,
                **engine_kwargs) -> Engine:
    """Load the named engine; template None = the one recorded with the model/adapter, else the tokenizer's."""
    if engine == "transformers":
        return TransformersEngine(model=model, adapter=adapter, template=template, dtype=dtype,
                                  trust_remote_code=trust_remote_code, **engine_kwargs)
    if engine == "vllm":
        from medgpt.infer.vllm_engine import VllmEngine

        return VllmEngine(model=model, adapter=adapter, template=template, dtype=dtype,
                          trust_remote_code=trust_remote_code, **engine_kwargs)
    raise UserError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
