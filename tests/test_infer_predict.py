"""`medgpt.infer.predict`: prompt messages from each input row format (query with system and history, messages,
ShareGPT conversations), bad rows reported with their location, answers written in input order, and a run
interrupted mid-way (a torn last line included) resumed without answering a row twice."""

from __future__ import annotations

import json

import pytest
from _inference import ROWS, write_rows

from medgpt.errors import UserError
from medgpt.infer.base import GenerationParams


def test_prompt_messages_formats():
    from medgpt.infer.predict import prompt_messages

    assert prompt_messages(ROWS[1]) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a fever?"},
        {"role": "assistant", "content": "A high temperature."}, {"role": "user", "content": "And in children?"}]
    assert prompt_messages(ROWS[2]) == [{"role": "user", "content": "Hi"}]  # the reference answer is cut off
    assert prompt_messages(ROWS[3]) == [{"role": "user", "content": "What is asthma?"}]


def test_predict_reports_bad_rows_with_location(tmp_path, engine):
    from medgpt.infer.predict import predict_file

    bad = write_rows(tmp_path / "q.jsonl", [ROWS[0], {"id": "x", "text": "no question"}])
    with pytest.raises(UserError, match=r"q\.jsonl:2: .*query"):
        predict_file(engine, bad, tmp_path / "a.jsonl", GenerationParams(max_new_tokens=2))
    (tmp_path / "broken.jsonl").write_text('{"query": "ok"}\n{not json\n')
    with pytest.raises(UserError, match=r"broken\.jsonl:2: invalid JSON"):
        predict_file(engine, tmp_path / "broken.jsonl", tmp_path / "a.jsonl", GenerationParams(max_new_tokens=2))


class CountingEngine:
    """Wraps an engine, counts the prompts submitted to it, and can fail on a given one (an interruption)."""

    def __init__(self, engine, fail_on_prompt: int | None = None):
        self.engine, self.fail_on_prompt, self.prompts = engine, fail_on_prompt, 0
        self.template, self.tokenizer = engine.template, engine.tokenizer

    def encode(self, messages, system=None):
        return self.engine.encode(messages, system)

    def submit(self, request):
        if self.prompts + 1 == self.fail_on_prompt:
            raise KeyboardInterrupt
        self.prompts += 1
        return self.engine.submit(request)


def test_predict_keeps_order_and_resumes(tmp_path, engine):
    from medgpt.infer.predict import predict_file

    questions = write_rows(tmp_path / "q.jsonl", ROWS)
    params = GenerationParams(max_new_tokens=6)
    out = tmp_path / "a.jsonl"
    with pytest.raises(KeyboardInterrupt):  # during the third chunk's submission: the first chunk is written
        predict_file(CountingEngine(engine, fail_on_prompt=5), questions, out, params, chunk_size=2)
    partial = tmp_path / "a.jsonl.partial"
    assert not out.exists() and len(partial.read_text().splitlines()) == 2
    with partial.open("a") as f:
        f.write('{"id": "c", "mess')  # torn line from a kill during a write
    resumed = CountingEngine(engine)
    stats = predict_file(resumed, questions, out, params, chunk_size=2)
    assert resumed.prompts == 3 and stats == {**stats, "rows": 5, "resumed": 2, "generated": 3}
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in a.items() if k != "response"} for a in answers] == ROWS
    fresh = predict_file(engine, questions, tmp_path / "fresh.jsonl", params)
    assert fresh["generated"] == 5 and (tmp_path / "fresh.jsonl").read_text() == out.read_text()
    again = CountingEngine(engine)
    assert predict_file(again, questions, out, params)["generated"] == 0 and again.prompts == 0
    with pytest.raises(UserError, match="another input"):
        predict_file(engine, write_rows(tmp_path / "other.jsonl", ROWS[::-1]), out, params)
