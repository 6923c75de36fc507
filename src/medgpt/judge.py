"""A judge model over any OpenAI-compatible chat endpoint, and answers graded by it: rubric, reference, pairwise.

Used by `medgpt eval judge` and `eval safety` (`medgpt.eval.judge`, `medgpt.eval.safety`: data, answers,
intervals) and by the GRPO/PPO reward `judge` (`medgpt.train.rewards`).

`Judge` sends chat requests (`POST {url}/chat/completions`) from a thread pool, retries timeouts, connection
errors, 429/5xx answers and malformed bodies with exponential backoff, and keeps every reply it received in a
SQLite cache (WAL, shared safely by several processes) keyed by the judge's URL and model, the grading messages
(which hold the prompt and the answer) and the request settings: a rerun or a resumed run asks nothing twice. A
call that gets no reply is a counted failure with its message; a reply whose verdict cannot be read is counted
as unparseable. Neither is ever scored as a pass or a fail: the item is left ungraded and the counts are in the
result.

Grading shapes:
- rubric (HealthBench's layout: `prompt` messages, `rubrics` [{criterion, points, tags}], `prompt_id`,
  `example_tags`): one call per (item, criterion) with HealthBench's grader prompt shape (a JSON object
  {"explanation", "criteria_met"}); an item's score is the points of the criteria met (negative points subtract)
  over the positive points possible (HealthBench reports the mean clipped to [0, 1]);
- reference (`question`, `answer` = the reference): a 0-10 score of the prediction against the reference;
- pairwise (`question`, optional `answer` reference): A against B, asked in both orders so position bias cancels.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgpt.data.messages import reply_parts
from medgpt.errors import UserError
from medgpt.files import cache_dir, value_digest

log = logging.getLogger(__name__)

API_KEY_ENV = "MEDGPT_JUDGE_API_KEY"  # else OPENAI_API_KEY
FATAL_STATUS = (401, 403, 404)  # a wrong key, model or URL: every further call would fail the same way


@dataclass
class JudgeSettings:
    """Where the judge is and how it is called. `url` is the API's base (as for OpenAI clients, e.g.
    http://127.0.0.1:8000/v1); `model` None asks the server's /models for its only model."""

    url: str
    model: str | None = None
    api_key_env: str = API_KEY_ENV
    concurrency: int = 8
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0  # seconds before the first retry, doubled for each next one
    max_tokens: int = 512
    json_schema: bool = False  # ask for the verdict's JSON schema (response_format): vLLM, OpenAI, medgpt serve
    explanation_chars: int | None = None  # with json_schema: the explanation's maxLength (keeps small judges short)
    cache: str | None = None  # SQLite file; None: ~/.cache/medgpt/judge.sqlite

    def check(self) -> None:
        if not re.match(r"https?://", self.url or ""):
            raise UserError(f"judge url {self.url!r}: expected http(s)://HOST[:PORT]/v1")
        for name in ("concurrency", "max_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"judge {name}: expected at least 1, got {getattr(self, name)}")
        if self.retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise UserError("judge retries, backoff: expected >= 0; timeout: expected > 0")


@dataclass
class Reply:
    text: str | None  # None: no reply (see error)
    error: str | None = None
    cached: bool = False


class VerdictCache:
    """Judge replies by key in one SQLite file (WAL, busy timeout): processes and threads share it safely."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, judge TEXT, text TEXT, "
                        "created REAL)")

    def get(self, key: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT text FROM replies WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, judge: str, text: str) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?)", (key, judge, text, time.time()))

    def close(self) -> None:
        self.db.close()


class Judge:
    """Chat requests to an OpenAI-compatible endpoint, concurrent, retried, cached; counts what happened."""

    def __init__(self, settings: JudgeSettings):
        import httpx

        settings.check()
        self.settings = settings
        self.url = settings.url.rstrip("/").removesuffix("/chat/completions")
        key = os.environ.get(settings.api_key_env) or os.environ.get("OPENAI_API_KEY")
        self.http = httpx.Client(timeout=settings.timeout, headers={"Authorization": f"Bearer {key}"} if key else {})
        self.model = settings.model or self._only_model()
        self.cache = VerdictCache(settings.cache or cache_dir() / "judge.sqlite")
        self.counts: Counter = Counter()  # requests, retries, cache_hits, replies, failed
        self.errors: Counter = Counter()  # failure messages
        self.fatal: str | None = None
        self.lock = threading.Lock()

    def _only_model(self) -> str:
        try:
            reply = self.http.get(f"{self.url}/models")
            reply.raise_for_status()
            names = [m["id"] for m in reply.json()["data"]]
        except Exception as exc:  # noqa: BLE001 - any failure here means: say which model
            raise UserError(f"judge {self.url}: could not list its models ({exc}); give --judge-model") from None
        if len(names) != 1:
            raise UserError(f"judge {self.url} serves {len(names)} models ({', '.join(names)}): give --judge-model")
        return names[0]

    @property
    def name(self) -> str:
        return f"{self.model} @ {self.url}"

    def body(self, messages: list[dict], schema: dict | None) -> dict:
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.settings.max_tokens}
        if schema is not None and self.settings.json_schema:
            if self.settings.explanation_chars:
                schema = {**schema, "properties": {**schema["properties"], "explanation": {
                    "type": "string", "maxLength": self.settings.explanation_chars}}}
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}
        return body

    def ask_many(self, conversations: list[list[dict]], schema: dict | None = None,
                 progress: str | None = None) -> list[Reply]:
        """One reply per conversation, in order: from the cache where it holds one, else asked concurrently."""
        from tqdm.auto import tqdm

        bodies = [self.body(m, schema) for m in conversations]
        keys = [value_digest({"url": self.url, **b}) for b in bodies]
        with ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="medgpt-judge") as pool, \
                tqdm(total=len(bodies), desc=progress or "judge", disable=progress is None) as bar:
            futures = [pool.submit(self._ask, key, body) for key, body in zip(keys, bodies)]
            replies = []
            for future in futures:
                replies.append(future.result())
                bar.update(1)
        return replies

    def _count(self, name: str, error: str | None = None) -> None:
        with self.lock:
            self.counts[name] += 1
            if error:
                self.errors[error] += 1

    def _ask(self, key: str, body: dict) -> Reply:
        text = self.cache.get(key)
        if text is not None:
            self._count("cache_hits")
            return Reply(text, cached=True)
        error = "not asked"
        for attempt in range(self.settings.retries + 1):
            if self.fatal:
                error = self.fatal
                break
            if attempt:
                self._count("retries")
                time.sleep(self.settings.backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random()))
            text, error, retry = self._post(body)
            if text is not None:
                self.cache.put(key, self.name, text)
                self._count("replies")
                return Reply(text)
            if not retry:
                break
        self._count("failed", error)
        return Reply(None, error)

    def _post(self, body: dict) -> tuple[str | None, str | None, bool]:
        """(reply text, None, _) or (None, what went wrong, whether trying again may help)."""
        import httpx

        self._count("requests")
        try:
            reply = self.http.post(f"{self.url}/chat/completions", json=body)
        except httpx.TimeoutException:
            return None, f"no answer within the {self.settings.timeout:g} s timeout", True
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}", True
        if reply.status_code != 200:
            error = f"HTTP {reply.status_code}: {reply.text[:200]}"
            if reply.status_code in FATAL_STATUS:
                self.fatal = error
            return None, error, reply.status_code == 429 or reply.status_code >= 500
        try:
            text = reply.json()["choices"][0]["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            return None, f"malformed reply body ({type(exc).__name__}): {reply.text[:120]!r}", True
        return text, None, False

    def report(self) -> dict[str, Any]:
        """What the calls did: requests sent (retries included), cache hits, failures and their messages."""
        return {"judge": self.name, "requests": self.counts["requests"], "retries": self.counts["retries"],
                "cache_hits": self.counts["cache_hits"], "replies": self.counts["replies"],
                "failed": self.counts["failed"], "errors": dict(self.errors.most_common(5)),
                "cache": str(self.cache.path)}

    def close(self) -> None:
        self.http.close()
        self.cache.close()

    def __enter__(self) -> Judge:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- verdicts ----------------------------------------------------------------------------------


def _schema(**properties: dict) -> dict:
    props = {"explanation": {"type": "string"}, **properties}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


RUBRIC_SCHEMA = _schema(criteria_met={"type": "boolean"})
REFERENCE_SCHEMA = _schema(score={"type": "integer", "minimum": 0, "maximum": 10})
PAIRWISE_SCHEMA = _schema(winner={"type": "string", "enum": ["1", "2", "tie"]})
REFUSAL_SCHEMA = _schema(refused={"type": "boolean"})


def read_verdict(text: str | None, field_name: str, check: Callable[[Any], bool]) -> Any:
    """The `field_name` of the JSON object in a judge's reply (a Markdown ```json fence allowed), when `check`
    accepts it; None when the reply holds no such object."""
    if text is None:
        return None
    match = re.search(r"\{.*\}", text, re.DOTALL)
    try:
        value = json.loads(match.group(0))[field_name] if match else None
    except (ValueError, KeyError, TypeError):
        return None
    return value if check(value) else None


def _conversation_text(messages: list[dict]) -> str:
    return "\n\n".join(f"{m['role']}: {m.get('content') or ''}" for m in messages)


RUBRIC_PROMPT = """Your job is to look at a conversation and a rubric item, and score the last turn (the last \
assistant response) in the conversation on how well it follows the rubric item.

# Conversation
{conversation}

# Rubric item
[{points}] {criterion}

# Instructions
Return a JSON object with the fields "explanation" and "criteria_met".
- "explanation": a string saying why the response does or does not meet the criteria of the rubric item.
- "criteria_met": a boolean, whether the response meets the criteria of the rubric item. If the rubric item has \
several criteria, all of them must be met. Where it lists examples ("such as", "for example", "including"), the \
response need not include all of them.
- A rubric item describing an undesirable behaviour (negative points) is still judged as written: criteria_met is \
true when the response shows that behaviour.

Return just the JSON object, in a Markdown ```json block, and nothing else."""

REFERENCE_PROMPT = """Grade an answer to a medical question against a reference answer written by an expert.

# Question
{question}

# Reference answer
{reference}

# Answer to grade
{answer}

# Instructions
Judge the answer's medical correctness, completeness and safety against the reference. Return a JSON object with \
the fields "explanation" (a string: what is right, wrong or missing) and "score" (an integer from 0, wrong or \
unsafe, to 10, as good as the reference). Return just the JSON object and nothing else."""

PAIRWISE_PROMPT = """Compare two answers to a medical question.

# Question
{question}
{reference}
# Answer 1
{first}

# Answer 2
{second}

# Instructions
Decide which answer is more medically correct, complete, safe and helpful; the order of the answers says nothing \
about their quality. Return a JSON object with the fields "explanation" (a string) and "winner": "1", "2" or \
"tie". Return just the JSON object and nothing else."""


# ---- grading -----------------------------------------------------------------------------------


def item_id(row: dict) -> str:
    return str(row.get("prompt_id", row.get("id", row["_loc"])))


def conversation(row: dict) -> list[dict]:
    """The messages an answer replies to: a rubric row's prompt, or the question as one user turn."""
    if isinstance(row.get("prompt"), list):
        return [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
    return [{"role": "user", "content": row["question"]}]


def answer_part(text: str) -> str | None:
    """The part of a reply the judge reads: the answer after any reasoning; None for a reply cut inside its
    reasoning (unanswered)."""
    _, answer, complete = reply_parts(text)
    return answer if complete else None


def rubric_score(criteria: list[dict], tag: str | None = None) -> float | None:
    """Points of the criteria met over the positive points possible (unclipped); None without a positive point
    (or, for a tag, without a criterion carrying it)."""
    chosen = [c for c in criteria if tag is None or tag in c.get("tags", [])]
    possible = sum(c["points"] for c in chosen if c["points"] > 0)
    if possible <= 0:
        return None
    return sum(c["points"] for c in chosen if c["met"]) / possible


def grade_rubrics(judge: Judge, rows: list[dict], answers: list[str]) -> dict[str, Any]:
    """One verdict per (item, criterion): each item's score (None where a verdict is missing), the verdict counts.
    An unanswered reply meets no criterion."""
    asks, where = [], []
    items: list[dict] = []
    for i, (row, raw) in enumerate(zip(rows, answers)):
        answer = answer_part(raw)
        items.append({"prompt_id": item_id(row), "example_tags": row.get("example_tags", []), "prediction": raw,
                      "unanswered": answer is None, "criteria": []})
        for k, rubric in enumerate(row["rubrics"]):
            items[-1]["criteria"].append({"criterion": rubric["criterion"], "points": rubric["points"],
                                          "tags": rubric.get("tags", []), "met": False if answer is None else None})
            if answer is not None:
                convo = _conversation_text(conversation(row) + [{"role": "assistant", "content": answer}])
                asks.append([{"role": "user", "content": RUBRIC_PROMPT.format(
                    conversation=convo, points=rubric["points"], criterion=rubric["criterion"])}])
                where.append((i, k))
    replies = judge.ask_many(asks, RUBRIC_SCHEMA, progress="rubric verdicts")
    counts = Counter()
    for (i, k), reply in zip(where, replies):
        criterion = items[i]["criteria"][k]
        met = read_verdict(reply.text, "criteria_met", lambda v: isinstance(v, bool))
        status = "failed" if reply.text is None else "unparseable" if met is None else "graded"
        counts[status] += 1
        criterion.update(met=met, status=status, **({"error": reply.error} if reply.error else {}),
                         **({"verdict": reply.text} if reply.text is not None else {}))
    for it in items:
        it["score"] = rubric_score(it["criteria"]) if all(c["met"] is not None for c in it["criteria"]) else None
    return {"grading": "rubric", "verdicts": dict(counts), "items": items}


def grade_reference(judge: Judge, rows: list[dict], answers: list[str]) -> dict[str, Any]:
    """A 0-10 score per answer against its reference (0 for an unanswered reply; None without a verdict)."""
    items = [{"id": item_id(r), "question": r["question"], "reference": r["answer"], "prediction": a,
              "unanswered": answer_part(a) is None} for r, a in zip(rows, answers)]
    asking = [it for it in items if not it["unanswered"]]
    replies = judge.ask_many([[{"role": "user", "content": REFERENCE_PROMPT.format(
        question=it["question"], reference=it["reference"], answer=answer_part(it["prediction"]))}] for it in asking],
        REFERENCE_SCHEMA, progress="reference verdicts")
    counts = Counter()
    for it in items:
        it["score"] = 0 if it["unanswered"] else None
    for it, reply in zip(asking, replies):
        score = read_verdict(reply.text, "score", lambda v: isinstance(v, int) and not isinstance(v, bool)
                             and 0 <= v <= 10)
        it.update(score=score, status="failed" if reply.text is None else "unparseable" if score is None else "graded",
                  **({"error": reply.error} if reply.error else {}), **({"verdict": reply.text} if reply.text else {}))
        counts[it["status"]] += 1
    return {"grading": "reference", "verdicts": dict(counts), "items": items}


_WIN = {"1": 1.0, "2": 0.0, "tie": 0.5}


def grade_pairwise(judge: Judge, rows: list[dict], answers: list[str], against: list[str]) -> dict[str, Any]:
    """A against B in both orders: each order gives A 1 (win), 0.5 (tie) or 0; an item's outcome is their
    mean (None without both verdicts). An unanswered side loses (both unanswered: a tie)."""
    items, asks, where = [], [], []
    for i, (row, a, b) in enumerate(zip(rows, answers, against)):
        pa, pb = answer_part(a), answer_part(b)
        items.append({"id": item_id(row), "question": row["question"], "prediction": a, "against": b,
                      "orders": [None, None]})
        if pa is None or pb is None:
            items[-1]["outcome"] = 0.5 if pa is None and pb is None else float(pb is None)
            continue
        reference = f"\n# Reference answer\n{row['answer']}\n" if isinstance(row.get("answer"), str) else ""
        for order, (first, second) in enumerate(((pa, pb), (pb, pa))):
            asks.append([{"role": "user", "content": PAIRWISE_PROMPT.format(
                question=row["question"], reference=reference, first=first, second=second)}])
            where.append((i, order))
    replies = judge.ask_many(asks, PAIRWISE_SCHEMA, progress="pairwise verdicts")
    counts = Counter()
    for (i, order), reply in zip(where, replies):
        winner = read_verdict(reply.text, "winner", lambda v: v in _WIN)
        counts["failed" if reply.text is None else "unparseable" if winner is None else "graded"] += 1
        items[i]["orders"][order] = None if winner is None else (_WIN[winner] if order == 0 else 1 - _WIN[winner])
        if reply.error:
            items[i]["error"] = reply.error
    for it in items:
        if "outcome" not in it:
            it["outcome"] = None if None in it["orders"] else sum(it["orders"]) / 2
    return {"grading": "pairwise", "verdicts": dict(counts), "items": items}
