"""The transformers engine, and `load_engine`, which opens either engine by name (see base.py for the interface).

The transformers engine serves every submitted request with continuous batching: one scheduler thread keeps a
running batch with one shared KV cache; requests that arrive together are prefilled together (left-padded, similar
lengths in one forward) and merged into the batch, each step runs one forward for every row, and a finished or
cancelled row leaves the batch at once. Each row has
its own sampling (temperature, top-p/k, penalties, logit bias, a grammar, its own seeded generator), stop strings,
log-probs and streaming; a failure while processing one row fails only that request, and a forward that fails
for the whole batch is retried row by row so only the request that caused it fails.

transformers' own continuous batching (`generate_batch`, ContinuousBatchingManager) was measured first: it runs on
a CPU, but its per-request settings are temperature and top-p/k only (one generator for the batch, no penalties,
logit bias, grammar, prompt log-probs or top-k log-probs), so this scheduler does the batching itself. Against it
and against padded static batches (`model.generate`) on the same CPU: bench/infer_throughput.py.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

from medgpt.errors import UserError
from medgpt.infer.base import (BaseEngine, Completion, Engine, Request, TokenLogprob, close_at_exit,
                               require_template, shipped_sampling, stop_tokens)
from medgpt.infer.kv_batch import Batch

log = logging.getLogger(__name__)

ENGINES = ("transformers", "vllm")
PREFILL_TOKENS = 2048  # most prompt tokens (padding included) prefilled in one forward
CLOSE_WAIT = 60.0  # seconds `close()` waits for the scheduler's current step
GREEDY_BELOW = 1e-5  # a temperature under this decodes greedily (vLLM's rule): dividing by it would overflow


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


def token_logprob(logprobs, token: int, k: int) -> TokenLogprob:
    """`token`'s entry of one position's log-softmax, with the `k` most likely tokens there."""
    top = []
    if k:
        values, ids = logprobs.topk(k)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), top)


def prompt_logprobs(logits, prompt: list[int], k: int, chunk: int = 256) -> list[TokenLogprob]:
    """Each prompt token's log-prob given the tokens before it (from the logits of every prompt position),
    a chunk of positions at a time so a long prompt never holds a second [positions, vocabulary] tensor."""
    import torch

    out = []
    for start in range(0, len(prompt) - 1, chunk):
        scores = torch.log_softmax(logits[start:min(start + chunk, len(prompt) - 1)], dim=-1)
        out += [token_logprob(scores[i], t, k) for i, t in enumerate(prompt[start + 1:start + 1 + len(scores)])]
    return out


def ready(item: tuple[Request, Future, Future | None]) -> bool:
    """A waiting request can start: it has no grammar, or its grammar is compiled (or failed to)."""
    return item[2] is None or item[2].done()


class Row:
    """One request in the running batch: its decoding state and its own sampling."""

    def __init__(self, request: Request, future: Future, engine: TransformersEngine, grammar: Future | None):
        import torch

        self.request, self.future, self.params = request, future, request.params
        self.tokenizer = engine.tokenizer
        self.stop_ids = engine.stop_ids
        self.stops = self.params.stop + engine.stop_strings
        self.prompt = request.prompt_ids
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters already handed to on_text
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] | None = [] if self.params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.room = engine.max_context - len(self.prompt)  # tokens the context has left
        self.greedy = self.params.temperature < GREEDY_BELOW
        self.generator = None
        if not self.greedy:
            seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(seed)
        self.matcher = None
        if grammar is not None:
            import xgrammar

            self.matcher = xgrammar.GrammarMatcher(grammar.result())
        self.bias = None
        if self.params.logit_bias:
            ids, values = zip(*self.params.logit_bias.items())
            self.bias = (torch.tensor(ids, device=engine.device), torch.tensor(values, device=engine.device))

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits: the batch's argmax is this row's token."""
        p = self.params
        return (self.greedy and self.matcher is None and self.bias is None and p.repetition_penalty == 1.0
                and p.presence_penalty == 0 and p.frequency_penalty == 0)

    def choose(self, logits) -> int:
        """This row's next token from its raw logits (1-D): grammar, bias, penalties, then greedy or sampling."""
        import torch
        from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                                  TopPLogitsWarper)

        p = self.params
        scores = logits[None].clone()
        if self.matcher is not None:
            import xgrammar

            mask = xgrammar.allocate_token_bitmask(1, scores.shape[-1])
            self.matcher.fill_next_token_bitmask(mask)
            backend = "cpu" if scores.device.type == "cpu" else "torch_native"
            xgrammar.apply_token_bitmask_inplace(scores, mask.to(scores.device), backend=backend)
        if self.bias is not None:
            scores[0, self.bias[0]] += self.bias[1]
        if p.repetition_penalty != 1.0:  # transformers' semantics: prompt and answer, divide or multiply
            seen = torch.tensor([self.prompt + self.ids], device=scores.device)
            scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(seen, scores)
        if (p.presence_penalty or p.frequency_penalty) and self.ids:  # OpenAI's: the answer's token counts
            counts = torch.bincount(torch.tensor(self.ids, device=scores.device), minlength=scores.shape[-1])
            scores = scores - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
        if self.greedy:
            return int(scores.argmax())
        scores = TemperatureLogitsWarper(p.temperature)(None, scores)
        if p.top_k:
            scores = TopKLogitsWarper(min(p.top_k, scores.shape[-1]))(None, scores)
        if p.top_p < 1.0:
            scores = TopPLogitsWarper(p.top_p)(None, scores)
        probs = torch.softmax(scores.float(), dim=-1).cpu()
        if not torch.isfinite(probs).all() or not probs.sum() > 0:
            raise UserError("sampling produced no valid probabilities for this request")
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def advance(self, token: int, logprobs=None) -> None:
        """Take the row's next token: log-prob, grammar, text, stop strings and length, streaming what is final."""
        if self.logprobs is not None:
            self.logprobs.append(token_logprob(logprobs, token, self.params.logprobs))
        self.ids.append(token)
        if self.matcher is not None:
            if not self.matcher.accept_token(token):
                raise RuntimeError(f"the grammar refused token {token}, which its own mask allowed")
            if self.matcher.is_terminated():
                self.finish_reason = "stop"
        if token in self.stop_ids:
            self.finish_reason = "stop"
            self.emit(len(self.text))
            return
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = stop_position(self.text, self.stops)
        if cut >= 0:
            self.text = self.text[:cut]
            self.finish_reason = "stop"
        elif self.finish_reason is None and (len(self.ids) >= self.params.max_new_tokens
                                             or len(self.ids) >= self.room):
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self.text = self.text.rstrip("\ufffd")
            self.emit(len(self.text))
        else:
            self.emit(len(self.text) - held_back(self.text, self.stops))

    def emit(self, upto: int) -> None:
        if self.request.on_text and upto > self.sent:
            self.request.on_text(self.text[self.sent:upto])
        self.sent = max(self.sent, upto)

    def completion(self) -> Completion:
        ids = [t for t in self.ids if t not in self.stop_ids]
        while ids and len(self.tokenizer.decode(ids, skip_special_tokens=True)) > len(self.text):
            ids.pop()  # the tokens of a stop string that cut the text
        logprobs = None
        if self.logprobs is not None:  # the stop token that ended the answer keeps its log-prob, as vLLM's does
            stopped = bool(self.ids) and self.ids[-1] in self.stop_ids
            logprobs = self.logprobs[:len(ids)] + (self.logprobs[-1:] if stopped else [])
        return Completion(self.text, len(self.prompt), len(self.ids), self.finish_reason or "stop", ids, logprobs,
                          self.prompt_logprobs)


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
        config = self.model.config.get_text_config()
        self.max_context = int(getattr(config, "max_position_embeddings", None) or 2048)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self._grammars = None  # xgrammar's compiler for this tokenizer, made at the first grammar
        self._compiler = ThreadPoolExecutor(1, thread_name_prefix="medgpt-grammar")
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._batch = Batch()
        self._thread = threading.Thread(target=self._serve, args=(weakref.ref(self),), name="medgpt-engine",
                                        daemon=True)
        self._thread.start()
        close_at_exit(self)
        log.info("loaded %s%s on %s (%s), template %s", opened.folder,
                 f" + adapter {opened.adapter}" if opened.adapter else "", device, self.dtype, self.template.name)

    # -- the interface ---------------------------------------------------------------------------------

    def submit(self, request: Request) -> Future[Completion]:
        future: Future[Completion] = Future()
        future.set_running_or_notify_cancel()
        try:
            self._check(request)
        except UserError as exc:
            future.set_exception(exc)
            return future
        with self._wake:
            if self._closed:
                future.set_exception(UserError("the engine is closed"))
                return future
            grammar = None
            if request.params.grammar:  # compiled off the scheduler thread: a slow grammar delays only its request
                grammar = self._compiler.submit(self._compile, request.params.grammar)
                grammar.add_done_callback(lambda _: self._notify())
            self._queue.append((request, future, grammar))
            self._wake.notify()
        return future

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def waiting(self) -> int:
        return len(self._queue)

    def running(self) -> int:
        return len(self._batch.rows)

    def close(self) -> None:
        """Stop the scheduler after its current step (running and waiting requests fail with "the engine was
        closed") and wait for its thread, at most CLOSE_WAIT seconds."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._compiler.shutdown(wait=False, cancel_futures=True)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=CLOSE_WAIT)

    def _check(self, request: Request) -> None:
        """What only the engine knows: the vocabulary and the context length."""
        request.params.validate()
        ids = request.prompt_ids
        if not ids:
            raise UserError("the prompt is empty")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
            raise UserError(f"the prompt has token ids outside the vocabulary (0..{self.vocab_size - 1})")
        if len(ids) >= self.max_context:
            raise UserError(f"the prompt ({len(ids)} tokens) does not fit the model's context of {self.max_context}")
        if any(t >= self.vocab_size for t in request.params.logit_bias):
            raise UserError(f"logit_bias: token ids must be below the vocabulary size {self.vocab_size}")

    def _compile(self, grammar: str):
        """`grammar` (EBNF) compiled for this tokenizer (xgrammar caches by text); a bad grammar is a UserError."""
        import xgrammar

        if self._grammars is None:
            info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                           stop_token_ids=sorted(self.stop_ids))
            self._grammars = xgrammar.GrammarCompiler(info, max_threads=1)
        try:
            return self._grammars.compile_grammar(grammar)
        except RuntimeError as exc:
            raise UserError(f"grammar: {exc}") from exc

    # -- the scheduler ---------------------------------------------------------------------------------

    @staticmethod
    def _serve(ref: weakref.ref) -> None:
        """The scheduler thread: it holds the engine only while working or for a second of waiting, so an engine
        nobody uses any more is freed (and its thread ends) without `close()`."""
        import torch

        with torch.inference_mode():
            while (engine := ref()) is not None and engine._cycle():
                del engine
        if engine is not None:
            engine._shut()

    def _cycle(self) -> bool:
        """Admit waiting requests, drop cancelled rows, run one step; False once closed."""
        with self._wake:
            if not self._batch.rows and not self._closed and not any(ready(item) for item in self._queue):
                self._wake.wait(timeout=1.0)
            if self._closed:
                return False
            room = self.max_batch_size - len(self._batch.rows)
            new = [item for item in self._queue if ready(item)][:room]
            if new:
                taken = {id(item) for item in new}
                waiting = [item for item in self._queue if id(item) not in taken]
                self._queue.clear()
                self._queue.extend(waiting)
        try:
            self._admit(new)
            self._drop_cancelled()
            if self._batch.rows:
                self._step()
        except Exception as exc:  # a fault of the scheduler itself: the running requests fail, the engine goes on
            log.exception("the decoding step failed")
            for row in self._batch.rows:
                if not row.future.done():
                    row.future.set_exception(exc)
            self._batch = Batch()
        return True

    def _shut(self) -> None:
        for row in self._batch.rows:
            row.future.set_exception(UserError("the engine was closed"))
        self._batch = Batch()
        with self._wake:
            while self._queue:
                self._queue.popleft()[1].set_exception(UserError("the engine was closed"))

    def _admit(self, new: list[tuple[Request, Future, Future | None]]) -> None:
        """Prefill new requests (similar lengths together, left-padded, up to PREFILL_TOKENS a forward; a request
        that scores its prompt alone), choose each one's first token and merge them into the running batch."""
        rows = []
        for request, future, grammar in new:
            if request.cancelled:
                future.set_result(Completion("", len(request.prompt_ids), 0, "stop"))
                continue
            try:
                rows.append(Row(request, future, self, grammar))
            except Exception as exc:  # this request only (a grammar that does not compile)
                self._fail(future, exc)
        groups: list[list[Row]] = []
        for row in sorted(rows, key=lambda r: len(r.prompt)):
            group = groups[-1] if groups else None
            if (group is None or row.request.echo or group[0].request.echo
                    or (len(group) + 1) * len(row.prompt) > PREFILL_TOKENS):
                groups.append([row])
            else:
                group.append(row)
        for group in groups:
            try:
                self._prefill(group)
            except Exception as exc:
                if len(group) == 1:
                    self._fail(group[0].future, exc)
                    continue
                log.warning("prefilling %d requests together failed (%s); prefilling them one by one", len(group), exc)
                for row in group:
                    try:
                        self._prefill([row])
                    except Exception as alone:  # this request only
                        self._fail(row.future, alone)

    def _prefill(self, rows: list[Row]) -> None:
        """One forward over these prompts (left-padded), then each row's first token; rows still going join."""
        from transformers import DynamicCache

        from medgpt.models import left_padded

        ids, mask, positions = left_padded([r.prompt for r in rows], self.tokenizer.pad_token_id, self.device)
        padded = len(rows) > 1
        cache = DynamicCache()
        echo = rows[0].request.echo  # a scoring request is prefilled alone, with the logits of every position
        out = self.model(input_ids=ids, attention_mask=mask if padded else None, past_key_values=cache,
                         position_ids=positions if padded else None, use_cache=True, logits_to_keep=0 if echo else 1)
        logits = out.logits.float()
        if echo:
            rows[0].prompt_logprobs = [None] + prompt_logprobs(logits[0], rows[0].prompt, rows[0].params.logprobs or 0)
        group = Batch()
        group.rows, group.cache, group.mask = rows, cache, mask
        going = []
        for i, row in enumerate(rows):
            try:
                if row.params.max_new_tokens == 0:
                    row.finish_reason = "length"
                else:
                    self._take(row, logits[i, -1])
            except Exception as exc:  # this request only
                self._fail(row.future, exc)
                continue
            if row.finish_reason is None:
                going.append(i)
            else:
                self._finish(row)
        group.keep(going)
        if group.rows:
            self._batch.add(group.rows, group.cache, group.mask)

    def _finish(self, row: Row) -> None:
        try:
            completion = row.completion()
        except Exception as exc:
            self._fail(row.future, exc)
            return
        row.future.set_result(completion)

    def _take(self, row: Row, logits) -> None:
        import torch

        logprobs = torch.log_softmax(logits, dim=-1) if row.logprobs is not None else None
        row.advance(row.choose(logits), logprobs)

    def _drop_cancelled(self) -> None:
        batch = self._batch
        for row in batch.rows:
            if row.request.cancelled:
                row.finish_reason = "stop"
                self._finish(row)
        batch.keep([i for i, row in enumerate(batch.rows) if not row.request.cancelled])

    def _forward(self, cache, mask, rows: list[Row]):
        """One decoding step of `rows` over their cache (grown in place): the logits and the grown mask."""
        import torch

        ids = torch.tensor([[row.ids[-1]] for row in rows], device=self.device)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        positions = torch.tensor([[len(row.prompt) + len(row.ids) - 1] for row in rows], device=self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True)
        return out.logits[:, -1].float(), mask

    def _step(self) -> None:
        """One forward for every running row, then each row's own token; finished and failed rows leave."""
        import torch

        batch = self._batch
        width = batch.mask.shape[1]
        try:
            logits, batch.mask = self._forward(batch.cache, batch.mask, batch.rows)
        except Exception as exc:
            log.warning("a decoding step of %d rows failed (%s); retrying them one by one", len(batch.rows), exc)
            batch.crop(width)
            logits = self._retry_alone()
            batch = self._batch
            if not batch.rows:
                return
        greedy = logits.argmax(-1).tolist()
        want_logprobs = any(row.logprobs is not None for row in batch.rows)
        logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        keep = []
        for i, row in enumerate(batch.rows):
            try:
                token = greedy[i] if row.plain_greedy else row.choose(logits[i])
                row.advance(token, logprobs[i] if logprobs is not None else None)
            except Exception as exc:  # this request only
                self._fail(row.future, exc)
                continue
            if row.finish_reason is not None:
                self._finish(row)
            else:
                keep.append(i)
        batch.keep(keep)

    def _retry_alone(self):
        """After a failed batch forward, each row steps alone: one that fails alone fails its request only."""
        import torch

        old, self._batch = self._batch, Batch()
        logits = []
        for i, row in enumerate(old.rows):
            cache, mask = old.part(i)
            try:
                row_logits, mask = self._forward(cache, mask, [row])
            except Exception as exc:
                self._fail(row.future, exc)
                continue
            self._batch.add([row], cache, mask)
            logits.append(row_logits)
        return torch.cat(logits) if logits else None

    @staticmethod
    def _fail(future: Future, exc: Exception) -> None:
        if not isinstance(exc, UserError):
            log.exception("a request failed", exc_info=exc)
        future.set_exception(exc)


def load_engine(model: str | None = None, adapter: str | None = None, template: str | None = None,
                engine: str = "transformers", dtype: str = "auto", trust_remote_code: bool = False,
                system: str | None = None, enable_thinking: bool | None = None, **engine_kwargs) -> Engine:
    """Load the named engine; template None = the one recorded with the model/adapter, else the tokenizer's;
    `system` = the default system prompt of every prompt that brings none; `enable_thinking` = the template's
    thinking switch for every prompt that sets none (None: the template's default)."""
    if engine not in ENGINES:
        raise UserError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "transformers":
        loaded: Engine = TransformersEngine(model=model, adapter=adapter, template=template, dtype=dtype,
                                            trust_remote_code=trust_remote_code, system=system, **engine_kwargs)
    else:
        from medgpt.infer.vllm_engine import VllmEngine

        loaded = VllmEngine(model=model, adapter=adapter, template=template, dtype=dtype,
                            trust_remote_code=trust_remote_code, system=system, **engine_kwargs)
    loaded.enable_thinking = enable_thinking
    return loaded
