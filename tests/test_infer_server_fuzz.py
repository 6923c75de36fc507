"""Hostile and malformed requests: every one gets a 4xx OpenAI error object (never a 5xx, never plain text) and the
server stays healthy; extreme sampling values do not fail the requests batched with them; a client that leaves
stops its generation; the API key is checked before the body is read and the body is bounded while it is read."""

from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from medgpt.infer.base import GenerationParams
from medgpt.infer.engine import load_engine
from medgpt.infer.server import ServerSettings, create_app, running_server

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 64 * 1024
M = [{"role": "user", "content": "hi"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def chat(**fields):
    return {"messages": M, "max_tokens": 2, **fields}


def completion(**fields):
    return {"prompt": "hi", "max_tokens": 2, **fields}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (case, method, path, body: dict = JSON, str/bytes = raw, headers or None = the key, expected status, param)
CASES = [
    ("not json", "POST", CHAT, b"not json", None, 400, None),
    ("truncated json", "POST", CHAT, b'{"messages": [', None, 400, None),
    ("empty body", "POST", CHAT, b"", None, 400, None),
    ("json array", "POST", CHAT, b"[]", None, 400, None),
    ("json string", "POST", CHAT, b'"hi"', None, 400, None),
    ("json null", "POST", CHAT, b"null", None, 400, None),
    ("invalid utf-8 start", "POST", CHAT, b"\xff\xfe{}", None, 400, None),
    ("invalid utf-8 in a string", "POST", CHAT, b'{"messages": [{"role": "user", "content": "hi \xc3("}]}', None,
     400, None),
    ("lone surrogate", "POST", CHAT, '{"messages": [{"role": "user", "content": "hi \\ud800"}]}', None, 400,
     "messages.0.content"),
    ("lone low surrogate in a key", "POST", CHAT, '{"\\udc00": 1, "messages": [{"role": "user", "content": "x"}]}',
     None, 400, None),
    ("lone surrogate in a stop string", "POST", CHAT, json.dumps(chat(stop=["a"])).replace('["a"]', '["\\udbff"]'),
     None, 400, "stop.0"),
    ("nesting past the parser", "POST", CHAT, '{"messages": ' + nested(20000) + "}", None, 400, None),
    ("nesting past the limit", "POST", CHAT, json.dumps(chat(metadata=json.loads(nested(40)))), None, 400, None),
    ("NaN", "POST", CHAT, json.dumps(chat())[:-1] + ', "temperature": NaN}', None, 400, "temperature"),
    ("Infinity", "POST", CHAT, json.dumps(chat())[:-1] + ', "top_p": Infinity}', None, 400, "top_p"),
    ("1e400", "POST", CHAT, json.dumps(chat())[:-1] + ', "temperature": 1e400}', None, 400, "temperature"),
    ("5000-digit integer", "POST", CHAT, json.dumps(chat())[:-1] + ', "seed": ' + "9" * 5000 + "}", None, 400,
     None),
    ("messages a string", "POST", CHAT, {"messages": "hi"}, None, 400, "messages"),
    ("messages empty", "POST", CHAT, {"messages": []}, None, 400, "messages"),
    ("messages missing", "POST", CHAT, {"max_tokens": 2}, None, 400, "messages"),
    ("message without content", "POST", CHAT, {"messages": [{"role": "user"}]}, None, 400, "messages.0.content"),
    ("role unknown", "POST", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, None, 400, None),
    ("content a number", "POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, None, 400, None),
    ("image content part", "POST", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, None, 400, "messages.0.content.0"),
    ("content part with extra field", "POST", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi", "cache_control": {}}]}]}, None, 400, "messages.0.content.0"),
    ("message with unknown field", "POST", CHAT, {"messages": [{"role": "user", "content": "hi", "foo": 1}]}, None,
     400, "messages.0.foo"),
    ("last message from assistant", "POST", CHAT, {"messages": [{"role": "assistant", "content": "hi"}]}, None,
     400, "messages"),
    ("null content without tool calls", "POST", CHAT, {"messages": [
        {"role": "assistant", "content": None}, *M]}, None, 400, "messages.0.content"),
    ("tool call arguments not JSON", "POST", CHAT, {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}, *M]}, None, 400,
     "messages.0.tool_calls.0.function.arguments"),
    ("temperature a word", "POST", CHAT, chat(temperature="hot"), None, 400, "temperature"),
    ("temperature negative", "POST", CHAT, chat(temperature=-1), None, 400, "temperature"),
    ("temperature 3", "POST", CHAT, chat(temperature=3), None, 400, "temperature"),
    ("temperature 1e300", "POST", CHAT, chat(temperature=1e300), None, 400, "temperature"),
    ("top_p 0", "POST", CHAT, chat(top_p=0), None, 400, "top_p"),
    ("top_p 1.5", "POST", CHAT, chat(top_p=1.5), None, 400, "top_p"),
    ("top_k negative", "POST", CHAT, chat(top_k=-1), None, 400, "top_k"),
    ("top_k huge", "POST", CHAT, chat(top_k=10**12), None, 400, "top_k"),
    ("max_tokens 0", "POST", CHAT, chat(max_tokens=0), None, 400, "max_tokens"),
    ("max_tokens negative", "POST", CHAT, chat(max_tokens=-5), None, 400, "max_tokens"),
    ("max_tokens 1e30", "POST", CHAT, chat(max_tokens=10**30), None, 400, "max_tokens"),
    ("max_tokens over the cap", "POST", CHAT, chat(max_tokens=2001), None, 400, "max_tokens"),
    ("max_completion_tokens over the cap", "POST", CHAT, chat(max_completion_tokens=5000), None, 400,
     "max_completion_tokens"),
    ("max_tokens fractional", "POST", CHAT, chat(max_tokens=1.5), None, 400, "max_tokens"),
    ("n 0", "POST", CHAT, chat(n=0), None, 400, "n"),
    ("n 1000", "POST", CHAT, chat(n=1000), None, 400, "n"),
    ("n negative", "POST", CHAT, chat(n=-1), None, 400, "n"),
    ("stop empty string", "POST", CHAT, chat(stop=[""]), None, 400, "stop"),
    ("nine stop strings", "POST", CHAT, chat(stop=list("abcdefghi")), None, 400, "stop"),
    ("stop string of 300 characters", "POST", CHAT, chat(stop=["x" * 300]), None, 400, "stop"),
    ("stop a number", "POST", CHAT, chat(stop=5), None, 400, "stop"),
    ("seed 2**70", "POST", CHAT, chat(seed=2**70), None, 400, "seed"),
    ("seed negative", "POST", CHAT, chat(seed=-1), None, 400, "seed"),
    ("seed a word", "POST", CHAT, chat(seed="abc"), None, 400, "seed"),
    ("seed + n past 2**63", "POST", CHAT, chat(seed=2**63 - 1, n=2), None, 400, "seed"),
    ("presence_penalty 5", "POST", CHAT, chat(presence_penalty=5), None, 400, "presence_penalty"),
    ("frequency_penalty -3", "POST", CHAT, chat(frequency_penalty=-3), None, 400, "frequency_penalty"),
    ("repetition_penalty 0", "POST", CHAT, chat(repetition_penalty=0), None, 400, "repetition_penalty"),
    ("repetition_penalty 1e-300", "POST", CHAT, chat(repetition_penalty=1e-300, temperature=0.7), None, 400,
     "repetition_penalty"),
    ("logit_bias key not a number", "POST", CHAT, chat(logit_bias={"abc": 1}), None, 400, "logit_bias"),
    ("logit_bias key outside the vocabulary", "POST", CHAT, chat(logit_bias={"999999999": 1}), None, 400,
     "logit_bias"),
    ("logit_bias key a superscript digit", "POST", CHAT, chat(logit_bias={"\u00b2": 1}), None, 400, "logit_bias"),
    ("logit_bias key negative", "POST", CHAT, chat(logit_bias={"-1": 1}), None, 400, "logit_bias"),
    ("logit_bias value 1000", "POST", CHAT, chat(logit_bias={"5": 1000}), None, 400, "logit_bias"),
    ("logit_bias 400 entries", "POST", CHAT, chat(logit_bias={str(i): 1 for i in range(400)}), None, 400,
     "logit_bias"),
    ("top_logprobs 50", "POST", CHAT, chat(logprobs=True, top_logprobs=50), None, 400, "top_logprobs"),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=2), None, 400, "top_logprobs"),
    ("logprobs 5", "POST", CHAT, chat(logprobs=5), None, 400, "logprobs"),
    ("stream maybe", "POST", CHAT, chat(stream="maybe"), None, 400, "stream"),
    ("stream_options unknown key", "POST", CHAT, chat(stream=True, stream_options={"include_usage": True, "x": 1}),
     None, 400, "stream_options.x"),
    ("response_format xml", "POST", CHAT, chat(response_format={"type": "xml"}), None, 400, "response_format.type"),
    ("json_schema without a schema", "POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x"}}), None, 400, "response_format.json_schema.schema"),
    ("json_schema not a schema", "POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}), None, 400, "response_format.json_schema.schema"),
    ("tools with a template without a tool format", "POST", CHAT, chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}}}]), None, 400, "tools"),
    ("tool_choice required without tools", "POST", CHAT, chat(tool_choice="required"), None, 400, "tool_choice"),
    ("tool_choice function not an object", "POST", CHAT, chat(tool_choice={"type": "function", "function": "f"}),
     None, 400, "tool_choice"),
    ("tools a string", "POST", CHAT, chat(tools="x"), None, 400, "tools"),
    ("tool name with spaces", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "a b"}}]), None,
     400, "tools.0.function.name"),
    ("best_of on chat", "POST", CHAT, chat(best_of=3), None, 400, "best_of"),
    ("functions (deprecated API)", "POST", CHAT, chat(functions=[{"name": "f"}]), None, 400, "functions"),
    ("function_call", "POST", CHAT, chat(function_call="auto"), None, 400, "function_call"),
    ("guided_json", "POST", CHAT, chat(guided_json={"type": "object"}), None, 400, "guided_json"),
    ("min_p", "POST", CHAT, chat(min_p=0.1), None, 400, "min_p"),
    ("ignore_eos", "POST", CHAT, chat(ignore_eos=True), None, 400, "ignore_eos"),
    ("modalities audio", "POST", CHAT, chat(modalities=["audio"]), None, 400, "modalities"),
    ("echo on chat", "POST", CHAT, chat(echo=True), None, 400, "echo"),
    ("prompt of too many characters", "POST", CHAT, {"messages": [{"role": "user", "content": "x" * 1601}]}, None,
     400, "messages"),
    ("prompt of too many tokens", "POST", CHAT, {"messages": [{"role": "user", "content": "word " * 300}]}, None,
     400, "messages"),
    ("prompt plus max_tokens past the context", "POST", CHAT, {"messages": [{"role": "user", "content": "word " * 60}],
                                                               "max_tokens": 2000}, None, 400, "max_tokens"),
    ("body over the limit", "POST", CHAT, {"messages": M, "user": "x" * (LIMIT + 1)}, None, 413, None),
    ("no API key", "POST", CHAT, chat(), {}, 401, None),
    ("wrong API key", "POST", CHAT, chat(), {"Authorization": "Bearer nope"}, 401, None),
    ("non-ASCII API key", "POST", CHAT, chat(), {"Authorization": b"Bearer fuzz-key\xff"}, 401, None),
    ("Basic instead of Bearer", "POST", CHAT, chat(), {"Authorization": f"Basic {KEY}"}, 401, None),
    ("body over the limit without a key", "POST", CHAT, b"x" * (LIMIT * 4), {}, 401, None),
    ("unknown path", "GET", "/nope", None, None, 404, None),
    ("unknown path without a key", "GET", "/v2/anything", None, {}, 401, None),
    ("GET on chat", "GET", CHAT, None, None, 405, None),
    ("DELETE on models", "DELETE", "/v1/models", None, None, 405, None),
    ("docs off", "GET", "/docs", None, None, 404, None),
    ("openapi off", "GET", "/openapi.json", None, None, 404, None),
    ("completions prompt empty list", "POST", COMPLETIONS, completion(prompt=[]), None, 400, "prompt"),
    ("completions prompt empty ids", "POST", COMPLETIONS, completion(prompt=[[]]), None, 400, "prompt"),
    ("completions prompt empty string", "POST", COMPLETIONS, completion(prompt=""), None, 400, "prompt"),
    ("completions negative token id", "POST", COMPLETIONS, completion(prompt=[-1]), None, 400, "prompt"),
    ("completions token id outside the vocabulary", "POST", COMPLETIONS, completion(prompt=[10**9]), None, 400,
     "prompt"),
    ("completions fractional token id", "POST", COMPLETIONS, completion(prompt=[1.5]), None, 400, "prompt"),
    ("completions boolean token id", "POST", COMPLETIONS, completion(prompt=[True]), None, 400, "prompt"),
    ("completions prompt an object", "POST", COMPLETIONS, completion(prompt={"a": 1}), None, 400, "prompt"),
    ("completions mixed prompt list", "POST", COMPLETIONS, completion(prompt=["a", 3]), None, 400, "prompt"),
    ("completions 100 prompts", "POST", COMPLETIONS, completion(prompt=["a"] * 100), None, 400, "prompt"),
    ("completions prompt missing", "POST", COMPLETIONS, {"max_tokens": 2}, None, 400, "prompt"),
    ("completions max_tokens 0 without echo", "POST", COMPLETIONS, completion(max_tokens=0), None, 400,
     "max_tokens"),
    ("completions logprobs 99", "POST", COMPLETIONS, completion(logprobs=99), None, 400, "logprobs"),
    ("completions best_of above n", "POST", COMPLETIONS, completion(best_of=2), None, 400, "best_of"),
    ("completions suffix", "POST", COMPLETIONS, completion(suffix="end"), None, 400, "suffix"),
    ("completions too many token ids", "POST", COMPLETIONS, completion(prompt=[5] * 201), None, 400, "prompt"),
    ("completions messages instead of prompt", "POST", COMPLETIONS, {"messages": M}, None, 400, "messages"),
    ("seed /chat empty message", "POST", "/chat", {"message": ""}, None, 400, "message"),
    ("seed /chat history of numbers", "POST", "/chat", {"message": "hi", "history": [1, 2]}, None, 400, None),
    ("seed /chat temperature 9", "POST", "/chat", {"message": "hi", "temperature": 9}, None, 400, "temperature"),
]


@pytest.fixture(scope="module")
def fuzz_server(tiny_model):
    engine = load_engine(tiny_model, dtype="fp32", max_batch_size=8)
    settings = ServerSettings(defaults=GenerationParams(max_new_tokens=4), max_tokens_cap=2000,
                              max_prompt_tokens=200, max_n=4, max_body_bytes=LIMIT, api_key=KEY)
    app = create_app(engine, settings)
    with running_server(app) as url:
        yield url, app
    engine.close()


def send(url: str, method: str, path: str, body, headers) -> httpx.Response:
    headers = AUTH if headers is None else headers
    if isinstance(body, dict):
        return httpx.request(method, url + path, json=body, headers=headers, timeout=60)
    content = body.encode("utf-8") if isinstance(body, str) else body
    return httpx.request(method, url + path, content=content, timeout=60,
                         headers={**headers, "content-type": "application/json"} if content is not None else headers)


def assert_openai_error(reply: httpx.Response, status: int, param: str | None = None) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def test_enough_cases():
    assert len(CASES) >= 80 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case, method, path, body, headers, status, param", CASES, ids=[c[0] for c in CASES])
def test_hostile_request_gets_an_openai_4xx(fuzz_server, case, method, path, body, headers, status, param):
    url, _ = fuzz_server
    assert_openai_error(send(url, method, path, body, headers), status, param)


def test_server_is_healthy_after_the_fuzz(fuzz_server):
    url, app = fuzz_server
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    reply = httpx.post(f"{url}{CHAT}", json=chat(max_tokens=3), headers=AUTH, timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    metrics = httpx.get(f"{url}/metrics", headers=AUTH).text
    assert 'medgpt_errors_total{status="500"}' not in metrics


def test_extreme_sampling_values_fail_no_one_else(fuzz_server):
    """The three batch poisons of the issue, sent together with six innocent requests: every innocent answers."""
    url, _ = fuzz_server
    poisons = [chat(max_tokens=6, temperature=1e-300), chat(max_tokens=6, seed=2**70, temperature=0.8),
               chat(max_tokens=6, repetition_penalty=1e-300, temperature=0.7)]
    innocents = [chat(max_tokens=6, temperature=0.7, seed=i) for i in range(6)]
    start = threading.Barrier(9)

    def post(body):
        start.wait()
        return httpx.post(f"{url}{CHAT}", json=body, headers=AUTH, timeout=120)

    with ThreadPoolExecutor(9) as pool:
        replies = list(pool.map(post, poisons + innocents))
    for reply in replies[3:]:
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
    for reply in replies[:3]:
        assert reply.status_code in (200, 400), reply.text
        if reply.status_code == 400:
            assert_openai_error(reply, 400)


def test_a_client_that_leaves_stops_its_generation(fuzz_server, monkeypatch):
    """Four non-streaming clients give up (read timeout) on long answers: their rows are cancelled and freed early,
    and the next request is answered."""
    url, app = fuzz_server
    engine = app.state.engine
    submitted = []
    real_submit = engine.submit

    def spy(request):
        future = real_submit(request)
        submitted.append((request, future))
        return future

    monkeypatch.setattr(engine, "submit", spy)
    eos = engine.tokenizer.eos_token_id
    body = chat(max_tokens=2000, temperature=0.9, logit_bias={str(eos): -100})

    def leave(_):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}{CHAT}", json=body, headers=AUTH, timeout=httpx.Timeout(60, read=1.0))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(leave, range(4)))
    assert len(submitted) == 4
    results = [future.result(timeout=60) for _, future in submitted]
    assert all(request.cancelled for request, _ in submitted)
    assert all(r.completion_tokens < 2000 and r.finish_reason == "stop" for r in results)
    reply = httpx.post(f"{url}{CHAT}", json=chat(max_tokens=2), headers=AUTH, timeout=60)
    assert reply.status_code == 200
    assert 'medgpt_requests_total{endpoint="/v1/chat/completions",status="499"} 4.0' in \
        httpx.get(f"{url}/metrics", headers=AUTH).text


def raw_request(url: str, head: str, body: bytes = b"", timeout: float = 10) -> bytes:
    """Send a request by hand (headers that no client would send) and read the status line of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        return s.recv(4096).split(b"\r\n", 1)[0]


def test_key_before_body_and_body_bounded_while_read(fuzz_server):
    url, _ = fuzz_server
    host = url.removeprefix("http://")
    # a 64 MB body announced and never sent: the answer comes at once, without waiting for (or reading) it
    big = f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {64 * 2**20}"
    assert raw_request(url, big + "\r\nAuthorization: Bearer nope").startswith(b"HTTP/1.1 401 ")
    assert raw_request(url, big + f"\r\nAuthorization: Bearer {KEY}").startswith(b"HTTP/1.1 413 ")

    def chunks():  # no Content-Length: the bytes are counted as they arrive
        for _ in range(LIMIT // 1024 + 8):
            yield b" " * 1024

    reply = httpx.post(f"{url}{CHAT}", content=chunks(), headers={**AUTH, "content-type": "application/json"},
                       timeout=60)
    assert_openai_error(reply, 413)
    padded = json.dumps(chat(max_tokens=2)).encode() + b" " * (LIMIT - 200)  # just within the limit
    assert httpx.post(f"{url}{CHAT}", content=padded, headers=AUTH, timeout=60).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200  # no key needed, nothing else without one
    assert httpx.get(f"{url}/metrics").status_code == 401
