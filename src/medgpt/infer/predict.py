"""Batch prediction over a jsonl file, in input order, resumable after an interruption.

Answers are appended, a chunk at a time and in input order, to `<output>.partial`; each written row is
its input row plus `response`, so a re-run checks that the finished prefix matches the input and
continues after it. The partial file is renamed to the output when every row is done.

With a template that has a reasoning format (qwen3) a row also gets `reasoning`: the reply's think block (null
without one), and `response` holds only the answer after it ("" for a reply cut inside its reasoning).
"""

from __future__ import annotations

import collections
import json
import logging
import os
from pathlib import Path
from typing import Any

from medgpt.data import readers
from medgpt.data.rows import RecordError
from medgpt.errors import UserError
from medgpt.files import atomic_write
from medgpt.infer.base import Engine, GenerationParams, Request
from medgpt.infer.reasoning import ReplyReader, reply_reader

log = logging.getLogger(__name__)

QUERY_KEYS = ("query", "question", "instruction")
RESPONSE_KEY = "response"
REASONING_KEY = "reasoning"
OUTPUT_KEYS = (RESPONSE_KEY, REASONING_KEY)  # what a written row adds to its input row


def prompt_messages(row: Any) -> list[dict]:
    """Canonical messages ending with a user turn from a `query` (seed batch format, with optional `system`
    and `history` pairs), `question`, `instruction` (+`input`), OpenAI `messages` or ShareGPT `conversations` row.

    A conversation that ends with an assistant turn is cut before it: the model answers in its place.
    """
    obj = readers.as_object(row)
    key = next((k for k in ("messages", "conversations") if obj.get(k) is not None), None)
    if key:
        messages = readers.with_system(obj, readers.message_list(obj[key], key))
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    else:
        key = next((k for k in QUERY_KEYS if obj.get(k) is not None), None)
        if key is None:
            raise RecordError("missing field", '"query", "question", "instruction", "messages" or "conversations"')
        messages = readers.query_messages(obj, key)
    readers.check_order(messages, key, last="user")
    return messages


def read_inputs(path: str | Path) -> list[tuple[dict, list[dict]]]:
    """Every row with its prompt messages; a row that cannot be used stops the run before any generation."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    records, _ = readers.read_records(str(path), "prompts",
                                      normalize=lambda row: {"row": row, "messages": prompt_messages(row)})
    if not records:
        raise UserError(f"{path}: no rows")
    return [(record["row"], record["messages"]) for record in records]


def finished_rows(partial: Path, inputs: list[dict]) -> int:
    """How many leading rows of `partial` are complete answers to `inputs`; a torn last line is cut off."""
    if not partial.exists():
        return 0
    data = partial.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        log.warning("%s: dropping an incomplete last line (interrupted while writing)", partial)
        atomic_write(partial, complete)
    done = 0
    for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        row = json.loads(line)
        expected = inputs[done] if done < len(inputs) else None
        if not isinstance(row, dict) or without_output(row) != without_output(expected):
            raise UserError(f"{partial}:{number}: does not match the input row {done + 1}; "
                            f"it was made from another input (pass --overwrite to start again)")
        done += 1
    return done


def without_output(row: Any) -> Any:
    return {k: v for k, v in row.items() if k not in OUTPUT_KEYS} if isinstance(row, dict) else row


def answered(row: dict, text: str, reader: ReplyReader | None) -> dict:
    """The output row: the input row with the answer, and the reasoning apart where the reply is read so."""
    if reader is None:
        return {**row, RESPONSE_KEY: text}
    reasoning, answer, _ = reader.parts(text)
    return {**row, REASONING_KEY: reasoning, RESPONSE_KEY: answer}


def predict_file(engine: Engine, input_path: str | Path, output_path: str | Path, params: GenerationParams,
                 system: str | None = None, chunk_size: int = 64, overwrite: bool = False,
                 rows: list[tuple[dict, list[dict]]] | None = None) -> dict:
    """Answer every row of `input_path` (or its `rows`, already read) into `output_path`; returns counts."""
    from tqdm.auto import tqdm

    params.validate()
    rows = rows if rows is not None else read_inputs(input_path)
    inputs = [row for row, _ in rows]
    output = Path(output_path)
    partial = output.with_name(output.name + ".partial")
    if overwrite:
        partial.unlink(missing_ok=True)
        output.unlink(missing_ok=True)
    elif output.exists():
        if finished_rows(output, inputs) == len(inputs):
            log.info("%s: all %d rows already answered", output, len(inputs))
            return {"rows": len(inputs), "generated": 0, "resumed": len(inputs), "completion_tokens": 0}
        raise UserError(f"{output}: exists and is not a complete answer to {input_path} (pass --overwrite)")
    done = finished_rows(partial, inputs)
    if done:
        log.info("resuming after %d finished rows of %d", done, len(inputs))
    output.parent.mkdir(parents=True, exist_ok=True)
    tokens = 0
    ahead: collections.deque = collections.deque()  # chunks submitted, not written yet
    with open(partial, "a", encoding="utf-8") as sink, \
            tqdm(total=len(rows), initial=done, desc="predict", unit="row") as bar:

        def write_oldest() -> None:
            nonlocal tokens
            chunk, requests, futures = ahead[0]
            completions = [future.result() for future in futures]
            for (row, _), request, completion in zip(chunk, requests, completions):
                reader = reply_reader(engine.template, engine.tokenizer, request.prompt_ids)
                sink.write(json.dumps(answered(row, completion.text, reader), ensure_ascii=False) + "\n")
                tokens += completion.completion_tokens
            sink.flush()
            os.fsync(sink.fileno())
            ahead.popleft()
            bar.update(len(chunk))

        try:  # the next chunk is submitted before the last is written, so the engine's batch never drains
            for start in range(done, len(rows), chunk_size):
                chunk = rows[start:start + chunk_size]
                requests = [Request(engine.encode(messages, system), params) for _, messages in chunk]
                ahead.append((chunk, requests, [engine.submit(request) for request in requests]))
                if len(ahead) > 1:
                    write_oldest()
            while ahead:
                write_oldest()
        finally:  # interrupted or failed: stop generating what will not be written
            for _, requests, _ in ahead:
                for request in requests:
                    request.cancelled = True
    os.replace(partial, output)
    return {"rows": len(rows), "generated": len(rows) - done, "resumed": done, "completion_tokens": tokens}
