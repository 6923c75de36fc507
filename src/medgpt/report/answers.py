"""Answers side by side: the prompts a report asks (the shipped sample, a file, or none) and each model's greedy
answers, generated once per model and cached by the model's files, the prompts and the settings."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from medgpt.files import ResultCache, files_fingerprint, read_json, value_digest, write_json
from medgpt.report.settings import SETTINGS_FILE

log = logging.getLogger(__name__)


SAMPLE_PROMPTS = Path(__file__).parent.parent / "sample_data" / "prompts.jsonl"
NO_PROMPTS = ("none", "off", "false", "no", "")
MAX_NEW_TOKENS = 128
ANSWERS_FILE = "answers.json"
ANSWERS_FORMAT = 3  # answers with their finish reason, token count and reasoning; older caches are generated again
REPORT_FILES = ("report.md", "report.html", ANSWERS_FILE, SETTINGS_FILE)  # what a report writes beside a model


@dataclass
class ModelRef:
    """A model to answer with: a folder or hub id, optionally a LoRA adapter on it, and the chat template."""

    model: str
    adapter: str | None = None
    template: str | None = None


def load_prompts(source: str | None) -> list[list[dict]]:
    """The report's prompts as message lists: `source` (jsonl of {"query"}, {"question"}, {"prompt"} or
    conversations), the shipped sample prompts when None, no prompts for `none`."""
    if source is not None and str(source).strip().lower() in NO_PROMPTS:
        return []
    from medgpt.data.records import read_prompts

    records, _ = read_prompts(str(source or SAMPLE_PROMPTS), "prompts")
    return [r["prompt"] for r in records]


@dataclass
class Answer:
    """One generated answer; `finish_reason` "length" means it was cut at the token limit. A reasoning model's
    `text` is the answer after its think block and `reasoning` the block's text; a reply that ended inside its
    reasoning is `unanswered` (its text empty, marked like a cut answer)."""

    text: str
    finish_reason: str = "stop"
    completion_tokens: int = 0
    reasoning: str | None = None
    unanswered: bool = False

    @property
    def cut(self) -> bool:
        return self.finish_reason == "length" or self.unanswered

    @property
    def reasoning_chars(self) -> int:
        return len(self.reasoning or "")

    @property
    def marker(self) -> str:
        if self.unanswered:
            return (f"no answer: cut inside its reasoning ({self.reasoning_chars} characters) at "
                    f"{self.completion_tokens} tokens")
        return f"cut at {self.completion_tokens} tokens" if self.cut else ""


def _answers_key(ref: ModelRef, prompts: list[list[dict]], max_new_tokens: int) -> str:
    """Keyed by the model's files (not the report files a training run writes beside its model, which change each
    time a report is written), the prompts, the settings and the precision the model answers in here."""
    from medgpt.models import inference_precision

    files = [files_fingerprint(p, skip=REPORT_FILES) for p in (ref.model, ref.adapter) if p]
    return value_digest({"ref": asdict(ref), "files": files, "prompts": prompts, "max_new_tokens": max_new_tokens,
                         "format": ANSWERS_FORMAT, "precision": inference_precision()})


def shared_answers() -> ResultCache:
    """Answers kept for every run (a base model answers the same prompts in every run that starts from it:
    generated once, reused by each training report and pipeline run)."""
    from medgpt.models import cache_dir

    return ResultCache(cache_dir() / "answers")


def model_answers(engine, prompts: list[list[dict]], max_new_tokens: int) -> list[Answer]:
    """Greedy answers of one engine, a reasoning template's think blocks read apart (`medgpt.infer.reasoning`)."""
    from medgpt.infer.base import GenerationParams, Request
    from medgpt.infer.reasoning import read_reply, reply_reader

    ids = [engine.encode(messages) for messages in prompts]
    completions = engine.run([Request(i, GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0))
                              for i in ids])
    answers = []
    for prompt_ids, c in zip(ids, completions):
        reasoning, answer, complete = read_reply(c.text, reply_reader(engine.template, engine.tokenizer, prompt_ids))
        answers.append(Answer(answer.strip(), c.finish_reason, c.completion_tokens, reasoning, not complete))
    return answers


def generate_answers(refs: dict[str, ModelRef], prompts: list[list[dict]], cache_file: Path,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, list[Answer]]:
    """Greedy answers of each model to the prompts: one batched generation per model, one model in memory at a
    time; answers cached in `cache_file` or in the shared cache (same model files, prompts, settings) are reused."""
    from tqdm.auto import tqdm

    from medgpt.infer.engine import load_engine

    cache = read_json(cache_file, {})
    shared = shared_answers()
    out: dict[str, list[Answer]] = {}
    todo = {}
    keys = {label: _answers_key(ref, prompts, max_new_tokens) for label, ref in refs.items()}
    for label, ref in refs.items():
        key = keys[label]
        found = cache.get(label) if (cache.get(label) or {}).get("key") == key else shared.get(key)
        if found:
            out[label] = [Answer(**a) for a in found["answers"]]
        else:
            todo[label] = (ref, key)
    if todo:
        log.info("report: %d models answer %d prompts (at most %d new tokens each): %s; `report_prompts: none` "
                 "skips the answers", len(todo), len(prompts), max_new_tokens, ", ".join(todo))
    for label, (ref, key) in tqdm(todo.items(), desc="report answers", disable=not todo):
        started = time.time()
        with load_engine(ref.model, adapter=ref.adapter, template=ref.template) as engine:
            out[label] = model_answers(engine, prompts, max_new_tokens)
        del engine
        gc.collect()
        shared.put(key, {"answers": [asdict(a) for a in out[label]]})
        log.info("report: %s answered %d prompts in %.1fs", label, len(prompts), time.time() - started)
    new = {label: {"key": keys[label], "answers": [asdict(a) for a in out[label]]} for label in refs}
    if new != {label: cache.get(label) for label in refs}:
        write_json(cache_file, {**cache, **new})
    return {label: out[label] for label in refs}
