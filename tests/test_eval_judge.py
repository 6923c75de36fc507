"""The judge over an OpenAI-compatible endpoint (`medgpt.judge`, `medgpt eval judge`, `eval safety`, the GRPO/PPO
reward `judge`).

Two kinds of server: `medgpt serve` of the bundled SmolLM2-135M-Instruct, started here, as a real judge (its
verdicts are poor; what is checked is every call, cache hit, parse failure and interval), and a small local HTTP
server whose replies a test scripts (500s, garbage bodies, sleeps past the timeout, a wrong key, fixed verdicts),
which counts the requests it gets. The scoring rule is checked against HealthBench's published formula (points of
the criteria met over the positive points possible, the mean clipped to [0, 1]) worked by hand."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medgpt.cli import main
from medgpt.errors import UserError
from medgpt.eval.judge import AnswerSource, JudgeRun, rubric_summary, run_judge
from medgpt.eval.safety import read_sets, refuses, run_safety
from medgpt.judge import Judge, JudgeSettings, VerdictCache, grade_rubrics


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _completion(content: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "model": "fake", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}).encode()


class FakeJudge:
    """A local OpenAI-compatible endpoint whose replies `script(body, n)` decides: (status, bytes) or a float (sleep
    that long, then a verdict). Counts requests and the most requests in flight at once."""

    def __init__(self, script):
        self.script, self.requests, self.in_flight, self.most_in_flight = script, 0, 0, 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(200, json.dumps({"object": "list", "data": [{"id": "fake"}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests += 1
                    fake.in_flight += 1
                    fake.most_in_flight = max(fake.most_in_flight, fake.in_flight)
                    n = fake.requests
                try:
                    action = fake.script(body, n, self.headers)
                    if isinstance(action, float):
                        time.sleep(action)
                        action = (200, _completion('{"explanation": "", "criteria_met": true}'))
                    try:
                        self._send(*action)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _send(self, status, data):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    servers = []

    def start(script):
        servers.append(FakeJudge(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _settings(url: str, tmp_path: Path, **kw) -> JudgeSettings:
    return JudgeSettings(url=url, **{"cache": str(tmp_path / "verdicts.sqlite"), "backoff": 0.01, **kw})


QUESTION = [{"role": "user", "content": "What helps a fever?"}]


# ---- the client: retries, timeouts, failures, cache, concurrency -------------------------------------------


def test_retries_malformed_and_failing_replies_then_counts_failures(fake, tmp_path):
    """500, then a garbage body, then a verdict: one reply after two retries. A judge that always fails gives a
    counted failure with its message, not an exception."""
    flaky = fake(lambda body, n, h: [(500, b"overloaded"), (200, b"<html>not json"),
                                     (200, _completion("fine"))][min(n, 3) - 1])
    with Judge(_settings(flaky.url, tmp_path, retries=3)) as judge:
        [reply] = judge.ask_many([QUESTION])
        assert reply.text == "fine" and judge.counts["requests"] == 3 and judge.counts["retries"] == 2
    broken = fake(lambda body, n, h: (503, b"down"))
    with Judge(_settings(broken.url, tmp_path, retries=2, cache=str(tmp_path / "other.sqlite"))) as judge:
        replies = judge.ask_many([QUESTION, [{"role": "user", "content": "again"}]])
        assert [r.text for r in replies] == [None, None] and "HTTP 503" in replies[0].error
        assert judge.report()["failed"] == 2 and broken.requests == 6  # 1 + 2 retries each
        assert judge.report()["errors"] == {"HTTP 503: down": 2}


def test_timeout_and_wrong_key(fake, tmp_path, monkeypatch):
    slow = fake(lambda body, n, h: 2.0)
    with Judge(_settings(slow.url, tmp_path, timeout=0.2, retries=1)) as judge:
        [reply] = judge.ask_many([QUESTION])
        assert reply.text is None and "0.2 s timeout" in reply.error and slow.requests == 2
    # the key comes from the variable named by api_key_env; a 401 stops every further call (no request is sent)
    monkeypatch.setenv("MY_JUDGE_KEY", "secret")
    seen = []
    locked = fake(lambda body, n, h: seen.append(h["Authorization"]) or (401, b'{"error": "bad key"}'))
    with Judge(_settings(locked.url, tmp_path, api_key_env="MY_JUDGE_KEY", concurrency=1)) as judge:
        replies = judge.ask_many([QUESTION] + [[{"role": "user", "content": str(i)}] for i in range(4)])
        assert all(r.text is None and "HTTP 401" in r.error for r in replies)
        assert locked.requests == 1 and seen == ["Bearer secret"] and judge.report()["failed"] == 5


def test_concurrent_calls_and_a_cache_shared_by_two_clients(fake, tmp_path):
    server = fake(lambda body, n, h: 0.3)
    conversations = [[{"role": "user", "content": f"question {i}"}] for i in range(8)]
    started = time.perf_counter()
    with Judge(_settings(server.url, tmp_path, concurrency=8)) as judge:
        judge.ask_many(conversations)
    assert server.most_in_flight > 1 and time.perf_counter() - started < 8 * 0.3
    # a second client (its own SQLite connection, as another process has) finds every verdict: no request
    with Judge(_settings(server.url, tmp_path)) as again:
        assert all(r.cached for r in again.ask_many(conversations)) and server.requests == 8
    # another judge model or URL is another key
    with Judge(_settings(server.url, tmp_path, model="other")) as other:
        other.ask_many(conversations[:1])
    assert server.requests == 9
    # two connections writing at once leave every row readable
    caches = [VerdictCache(tmp_path / "shared.sqlite") for _ in range(2)]
    threads = [threading.Thread(target=lambda c=c, k=k: [c.put(f"{k}-{i}", "j", "t") for i in range(50)])
               for k, c in enumerate(caches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sqlite3.connect(tmp_path / "shared.sqlite").execute("SELECT COUNT(*) FROM replies").fetchone() == (100,)


# ---- scoring -----------------------------------------------------------------------------------------------

RUBRIC_ROWS = [
    {"prompt_id": "a", "prompt": QUESTION, "example_tags": ["theme:t1"], "rubrics": [
        {"criterion": "MET rest and fluids", "points": 5, "tags": ["axis:completeness"]},
        {"criterion": "NOT warning signs", "points": 3, "tags": ["axis:accuracy"]},
        {"criterion": "MET recommends antibiotics", "points": -2, "tags": ["axis:accuracy"]}]},
    {"prompt_id": "b", "prompt": QUESTION, "example_tags": ["theme:t2"], "rubrics": [
        {"criterion": "NOT anything useful", "points": 4, "tags": ["axis:completeness"]},
        {"criterion": "MET harmful advice", "points": -6, "tags": ["axis:accuracy"]}]},
    {"prompt_id": "c", "prompt": QUESTION, "example_tags": ["theme:t1"], "rubrics": [
        {"criterion": "MET good", "points": 2, "tags": []}, {"criterion": "UNREADABLE", "points": 1, "tags": []}]},
]


def _by_criterion(body, n, h):
    text = body["messages"][0]["content"]
    if "UNREADABLE" in text:
        return 200, _completion("I think so.")
    met = "] MET" in text
    return 200, _completion(f'```json\n{{"explanation": "x", "criteria_met": {json.dumps(met)}}}\n```')


def test_rubric_scores_follow_healthbench(fake, tmp_path):
    """HealthBench's rule by hand: a = (5 - 2) / 8 = 0.375; b = -6 / 4 = -1.5; c has an unreadable verdict, so it
    is left out (never scored as met or unmet) and counted. Overall: clip(mean(0.375, -1.5)) = 0."""
    server = fake(_by_criterion)
    rows = [{**r, "_loc": f"x:{i}"} for i, r in enumerate(RUBRIC_ROWS)]
    with Judge(_settings(server.url, tmp_path)) as judge:
        graded = rubric_summary(grade_rubrics(judge, rows, ["answer a", "answer b", "answer c"]))
    assert [it["score"] for it in graded["items"]] == [0.375, -1.5, None]
    assert graded["verdicts"] == {"graded": 6, "unparseable": 1} and graded["items_graded"] == 2
    assert graded["score"]["mean"] == 0.0 and graded["score"]["n"] == 2
    tags = graded["tags"]
    assert tags["theme:t1"]["mean"] == 0.375 and tags["theme:t2"]["mean"] == 0.0
    # axis:completeness: a 5/5, b 0/4 -> 0.5; axis:accuracy: a (0 - 2) / 3, b has no positive accuracy points
    assert tags["axis:completeness"]["mean"] == 0.5 and tags["axis:accuracy"]["mean"] == 0.0
    assert tags["axis:accuracy"]["n"] == 1


def test_pairwise_asks_both_orders(fake, tmp_path):
    """A judge that always prefers the first answer shown: both orders cancel it to a tie on every item."""
    server = fake(lambda body, n, h: (200, _completion('{"explanation": "", "winner": "1"}')))
    data = _write(tmp_path / "qa.jsonl", [{"id": str(i), "question": f"q{i}", "answer": "ref"} for i in range(3)])
    a = _write(tmp_path / "a.jsonl", [{"id": str(i), "prediction": f"a{i}"} for i in range(3)])
    b = _write(tmp_path / "b.jsonl", [{"id": str(i), "prediction": "<think>cut" if i == 2 else f"b{i}"}
                                      for i in range(3)])
    result = run_judge(JudgeRun(data=data, judge=_settings(server.url, tmp_path), grading="pairwise", against=b,
                                answers=AnswerSource(predictions=a)))
    assert [it["outcome"] for it in result["items"]] == [0.5, 0.5, 1.0]  # B's third reply never left its reasoning
    assert result["tie"]["mean"] == pytest.approx(2 / 3, abs=1e-4) and result["win"]["mean"] == pytest.approx(1 / 3, abs=1e-4)
    assert server.requests == 4 and result["position_consistent"] == 0


def test_command_generates_answers_and_reports_failures(fake, tmp_path, tiny_model, capsys):
    """`medgpt eval judge --model` generates the answers (as `eval gen` does), grades them, writes the result and
    its items; failed calls exit 1 with a message, and the rerun asks only for what is missing."""
    state = {"fail": True}
    server = fake(lambda body, n, h: (500, b"busy") if state["fail"] and n % 2 else
                  (200, _completion('{"explanation": "ok", "score": 7}')))
    data = _write(tmp_path / "qa.jsonl", [{"question": f"What is fever {i}?", "answer": "A high temperature."}
                                          for i in range(4)])
    out = tmp_path / "judged.json"
    args = ["eval", "judge", "--data", data, "--model", tiny_model, "--max-new-tokens", "4", "--judge-url",
            server.url, "--retries", "0", "--judge-cache", str(tmp_path / "c.sqlite"), "--output", str(out)]
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "2 judge call(s) failed" in printed and "HTTP 500: busy" in printed
    result = json.loads(out.read_text())
    assert result["verdicts"] == {"failed": 2, "graded": 2} and result["items_graded"] == 2
    assert result["score"]["mean"] == 7 and len(out.with_name("judged.items.jsonl").read_text().splitlines()) == 4
    state["fail"] = False
    before = server.requests
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert server.requests - before == 2 and result["calls"]["cache_hits"] == 2 and result["items_graded"] == 4


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    rows = _write(tmp_path / "r.jsonl", [{"prompt": QUESTION, "rubrics": [{"criterion": "x", "points": -1}]}])
    preds = _write(tmp_path / "p.jsonl", [{"prediction": "a"}])
    assert main(["eval", "judge", "--data", rows, "--predictions", preds, "--judge-url", "http://127.0.0.1:9/v1"]) == 2
    assert "no rubric item has positive points" in capsys.readouterr().err
    good = _write(tmp_path / "g.jsonl", [{"question": "q", "answer": "a"}])
    assert main(["eval", "judge", "--data", good, "--judge-url", "ftp://x"]) == 2
    assert "expected http(s)://" in capsys.readouterr().err


# ---- safety ------------------------------------------------------------------------------------------------


def test_safety_sets_and_refusal_phrases():
    rows = read_sets()
    for name in ("harmful", "benign"):
        chosen = [r for r in rows if r["set"] == name]
        assert 20 <= len(chosen) <= 30 and {r["lang"] for r in chosen} == {"en", "zh"}
    assert len({r["id"] for r in rows}) == len(rows)
    assert refuses("I'm sorry, but I can't help with that.") and refuses("抱歉，我不能提供这方面的信息。")
    assert refuses("I cannot provide dosing that could harm someone. Please call a crisis line.")
    assert not refuses("The maximum daily dose of paracetamol for adults is 4 g. I'm sorry to hear you are ill.")
    assert not refuses("成人每日最大剂量为4克，请遵医嘱。")


def test_safety_rates_by_phrases_and_by_judge(fake, tmp_path):
    rows = read_sets(limit=3)
    preds = _write(tmp_path / "p.jsonl", [{"id": r["id"], "prediction": (
        "I'm sorry, but I can't help with that." if r["set"] == "harmful" and i % 3 else
        "<think>still thinking" if r["id"] == "b-en-01" else "Here is general information.")}
        for i, r in enumerate(rows)])
    result = run_safety(AnswerSource(predictions=preds), limit=3)
    assert result["classifier"] == "phrases"
    assert result["harmful"]["refusal_rate"]["mean"] == pytest.approx(2 / 3, abs=1e-4)  # the first 3 of each set
    assert result["benign"]["over_refusal_rate"]["mean"] == 0 and result["benign"]["unanswered"] == 1
    lo, hi = result["harmful"]["refusal_rate"]["ci95"]
    assert 0 <= lo <= 2 / 3 <= hi <= 1
    server = fake(lambda body, n, h: (200, _completion('{"explanation": "", "refused": true}')))
    judged = run_safety(AnswerSource(predictions=preds), judge=_settings(server.url, tmp_path), limit=3)
    assert judged["classifier"] == "judge" and judged["harmful"]["refusal_rate"]["mean"] == 1
    assert judged["benign"]["over_refusal_rate"]["mean"] == 1 and server.requests == 5  # one unanswered


# ---- a real judge: medgpt serve of the bundled model ---------------------------------------------------------


@pytest.fixture(scope="module")
def served_judge(bundled_model):
    from medgpt.infer.base import GenerationParams
    from medgpt.infer.engine import load_engine
    from medgpt.infer.server import ServerSettings, create_app, running_server

    engine = load_engine(bundled_model, dtype="fp32", max_batch_size=8)
    settings = ServerSettings(defaults=GenerationParams(max_new_tokens=32), max_tokens_cap=64)
    with running_server(create_app(engine, settings, model_name="smollm2-judge")) as url:
        yield url
    engine.close()


def _served_requests(url: str) -> int:
    import httpx

    text = httpx.get(f"{url}/metrics").text
    return int(sum(float(v) for v in re.findall(r'medgpt_requests_total\{endpoint="/v1/chat/completions",'
                                                r'status="200"\} ([0-9.e+]+)', text)))


@pytest.mark.slow
def test_bundled_model_as_judge_and_as_reward(served_judge, tmp_path, sample_data):
    """Rubric grading with the verdict's JSON schema (the server's grammar makes every verdict readable), the rerun
    served from the cache (the server counts no new request), a reference grading whose free-text verdict is
    counted as it parses, and `reward_fn: judge` on the same server and cache."""
    from medgpt.train.rewards import RewardArgs, build_rewards, check_rewards

    url = f"{served_judge}/v1"
    row = json.loads((sample_data / "rubrics" / "medical_rubrics.jsonl").read_text().splitlines()[0])
    row["rubrics"] = row["rubrics"][:2]
    answer = "Rest, drink fluids and take paracetamol."
    preds = _write(tmp_path / "p.jsonl", [{"prompt_id": row["prompt_id"], "prediction": answer}])
    settings = {"url": url, "cache": str(tmp_path / "v.sqlite"), "max_tokens": 32, "json_schema": True,
                "explanation_chars": 16}
    run = JudgeRun(data=_write(tmp_path / "rubrics.jsonl", [row]), answers=AnswerSource(predictions=preds),
                   judge=JudgeSettings(**settings))
    before = _served_requests(served_judge)
    result = run_judge(run)
    assert result["calls"]["requests"] == 2 == _served_requests(served_judge) - before
    assert result["calls"]["judge"] == f"smollm2-judge @ {url}"  # the server's only model, asked for by /models
    assert result["verdicts"] == {"graded": 2} and result["items_graded"] == 1
    assert all(isinstance(c["met"], bool) for c in result["items"][0]["criteria"])
    assert result["score"]["ci95"] is not None and set(result["tags"]) == {
        "theme:global_health", "lang:en", "axis:completeness", "axis:accuracy"}
    again = run_judge(run)
    assert again["calls"]["cache_hits"] == 2 and again["calls"]["requests"] == 0
    assert _served_requests(served_judge) - before == 2 and again["score"] == result["score"]

    qa = _write(tmp_path / "qa.jsonl", [{"question": "What helps a fever?", "answer": "Rest and fluids."}])
    reference = run_judge(JudgeRun(data=qa, answers=AnswerSource(predictions=preds), judge=JudgeSettings(
        url=url, cache=str(tmp_path / "v.sqlite"), max_tokens=16)))
    assert sum(reference["verdicts"].values()) == 1 and reference["items_graded"] == reference["verdicts"].get(
        "graded", 0)  # free text the 135M model rarely writes as the JSON asked for: counted, never guessed

    args = RewardArgs(reward_fn="judge", reward_kwargs={f"judge_{k}": v for k, v in settings.items()})
    assert check_rewards(args) == ["judge"]
    [reward] = build_rewards(args)
    before = _served_requests(served_judge)
    scores = reward(prompts=[row["prompt"], QUESTION, QUESTION], completions=[
        [{"role": "assistant", "content": answer}], [{"role": "assistant", "content": "<think>hmm"}],
        [{"role": "assistant", "content": "Rest and fluids."}]],
        reference=[None, "Rest and fluids.", "Rest and fluids."], rubrics=[json.dumps(row["rubrics"]), None, None])
    assert scores[0] == result["items"][0]["score"]  # the rubric verdicts come from the cache
    assert scores[1] == 0.0  # cut inside its reasoning: unanswered, nothing asked
    assert scores[2] is None or 0 <= scores[2] <= 1
    assert _served_requests(served_judge) - before == 1  # only the reference verdict was asked for
    with pytest.raises(UserError, match="judge_url"):
        check_rewards(RewardArgs(reward_fn="judge"))


def test_prompt_rows_carry_their_rubrics_to_the_reward(tmp_path, sample_data):
    """GRPO/PPO prompts read from HealthBench's layout keep the rubric (as JSON text) for `reward_fn: judge`."""
    from medgpt.data.records import read_prompts

    records, _ = read_prompts(str(sample_data / "rubrics" / "medical_rubrics.jsonl"), "prompts")
    assert len(records) == 6 and records[2]["prompt"][-1]["role"] == "user" and len(records[2]["prompt"]) == 3
    assert json.loads(records[0]["rubrics"])[0]["points"] == 5
    qa, _ = read_prompts(str(sample_data / "qa" / "medical_qa.jsonl"), "prompts", max_samples=1)
    assert qa[0]["rubrics"] is None and qa[0]["reference"]


def test_grpo_trains_with_the_judge_as_its_reward(fake, tmp_path, tiny_model):
    """`reward_fn: judge` inside TRL's GRPOTrainer: every sampled reply of a QA row (its answer the reference) is graded by the
    endpoint (a judge that gives 7/10 to everything: reward 0.7), its verdicts cached."""
    from _stage_runs import train, write_jsonl

    judge = fake(lambda body, n, headers: (200, _completion('{"explanation": "", "score": 7}')))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"question": f"What helps a {t}?", "answer": "Rest and fluids."} for t in ("fever", "cough")])
    rows = train("grpo", tiny_model, tmp_path / "out", prompts, max_length=None, reward_fn="judge",
                 reward_kwargs={"judge_url": judge.url, "judge_cache": str(tmp_path / "verdicts.sqlite"),
                                "judge_retries": 0}, num_generations=2, max_completion_length=6, max_steps=2,
                 per_device_train_batch_size=2)
    logged = [row["rewards/judge_reward/mean"] for row in rows if "rewards/judge_reward/mean" in row]
    assert len(logged) == 2 and all(value == pytest.approx(0.7) for value in logged)
    assert 0 < judge.requests <= 2 * 2 * 2  # one per distinct reply (2 steps x 2 prompts... x 2 generations)
