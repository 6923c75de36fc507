"""The API server: the official openai client against the bundled model; limits, keys, bad input, load.

More in test_infer_server_openai_client.py (every endpoint through real clients) and test_infer_server_fuzz.py
(hostile input)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from medgpt.infer.base import GenerationParams
from medgpt.infer.engine import load_engine
from medgpt.infer.server import ServerSettings, create_app, running_server


@pytest.fixture(scope="module")
def bundled_server(bundled_model):
    engine = load_engine(bundled_model)
    settings = ServerSettings(defaults=GenerationParams(max_new_tokens=64), max_tokens_cap=48)
    with running_server(create_app(engine, settings)) as url:
        yield url, engine


@pytest.fixture(scope="module")
def tiny_server(tiny_model):
    engine = load_engine(tiny_model, dtype="fp32", max_batch_size=8)
    sources = [{"source": "kb/fever.md", "text": "Fevers are common."}]
    settings = ServerSettings(defaults=GenerationParams(max_new_tokens=8), max_prompt_tokens=60, api_key="s3cret")
    app = create_app(engine, settings, augment=lambda messages: (messages, sources))
    with running_server(app) as url:
        yield url, app


@pytest.mark.slow
def test_openai_client_non_streaming_and_streaming(bundled_server):
    import openai
    from openai import OpenAI

    url, engine = bundled_server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    assert [m.id for m in client.models.list()] == [engine.name]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="any", messages=messages, max_tokens=20, temperature=0)
    text = reply.choices[0].message.content
    assert "Paris" in text
    expected = engine.generate([messages], GenerationParams(max_new_tokens=20))[0]
    assert text == expected.text and reply.choices[0].finish_reason == expected.finish_reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected.prompt_tokens, expected.completion_tokens)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="any", messages=messages, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens

    story = [{"role": "user", "content": "Tell me a long story."}]
    capped = client.chat.completions.create(model="any", messages=story, max_tokens=48)
    assert capped.choices[0].finish_reason == "length" and capped.usage.completion_tokens == 48
    with pytest.raises(openai.BadRequestError) as over:  # above the server's cap: refused, not silently lowered
        client.chat.completions.create(model="any", messages=story, max_tokens=500)
    assert over.value.body["param"] == "max_tokens" and "at most 48" in over.value.body["message"]
    stopped = client.chat.completions.create(model="any", messages=messages, max_tokens=20, stop=["Paris"])
    assert stopped.choices[0].finish_reason == "stop" and "Paris" not in stopped.choices[0].message.content
    seeded = [client.chat.completions.create(model="any", messages=messages, max_tokens=12, temperature=1.0,
                                             top_p=0.9, seed=5).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.slow
def test_seed_chat_endpoint(bundled_server):
    url, _ = bundled_server
    reply = httpx.post(f"{url}/chat", json={"message": "And of Italy?",
                                            "history": [["What is the capital of France?", "Paris."]]}, timeout=120)
    assert reply.status_code == 200
    body = reply.json()
    assert "Rome" in body["response"]
    assert body["history"] == [["What is the capital of France?", "Paris."], ["And of Italy?", body["response"]]]


def test_api_key_and_health(tiny_server):
    url, _ = tiny_server
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # no key needed
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


@pytest.mark.parametrize("body, message", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "last message"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 99}, "n must be between 1 and 8"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": "long " * 200}]}, "at most 60"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text"),
    ("not json", "not valid JSON"),
])
def test_invalid_requests_get_4xx_with_a_message(tiny_server, body, message):
    url, _ = tiny_server
    headers = {"Authorization": "Bearer s3cret"}
    if isinstance(body, str):
        reply = httpx.post(f"{url}/v1/chat/completions", content=body, headers={**headers, "content-type": "application/json"})
    else:
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert httpx.get(f"{url}/health").status_code == 200


def test_finish_reason_says_length_when_cut_at_max_tokens(tiny_server, tiny_model):
    """Streaming and not: "length" at the token limit, "stop" at a stop string, as the engine itself reports."""
    from openai import OpenAI

    url, app = tiny_server
    engine = app.state.engine
    client = OpenAI(base_url=f"{url}/v1", api_key="s3cret", timeout=120, max_retries=0)
    messages = [{"role": "user", "content": "What is a fever?"}]
    cut = engine.generate([messages], GenerationParams(max_new_tokens=5))[0]  # the reference
    assert cut.finish_reason == "length" and cut.completion_tokens == 5
    stop = cut.text[1:3]  # this untrained model writes mostly newlines: a stop string of two of them is fine
    assert len(stop) == 2
    stopped = engine.generate([messages], GenerationParams(max_new_tokens=5, stop=[stop]))[0]
    assert stopped.finish_reason == "stop"
    for extra, expected in (({}, cut), ({"stop": [stop]}, stopped)):
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=5, **extra)
        assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (expected.text,
                                                                                      expected.finish_reason)
        assert reply.usage.completion_tokens == expected.completion_tokens
        chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=5, stream=True,
                                                     stream_options={"include_usage": True}, **extra))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
        assert chunks[-1].usage.completion_tokens == expected.completion_tokens
    seed = httpx.post(f"{url}/chat", json={"message": "What is a fever?", "max_tokens": 5},
                      headers={"Authorization": "Bearer s3cret"}, timeout=120).json()
    assert (seed["response"], seed["finish_reason"]) == (cut.text, "length")


def test_concurrent_requests_are_batched_and_all_answered(tiny_server):
    from openai import OpenAI

    url, app = tiny_server
    client = OpenAI(base_url=f"{url}/v1", api_key="s3cret", timeout=120, max_retries=0)
    questions = [f"Question number {i}?" for i in range(8)]

    def ask(question: str):
        if question.endswith("3?"):  # a streaming client among them
            chunks = client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}],
                                                    stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks)
        return client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}])

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, questions))
    assert len(replies) == 8 and all(r for r in replies)
    assert app.state.engine.waiting() == 0
    one = replies[0]
    assert one.sources == [{"source": "kb/fever.md", "text": "Fevers are common."}]  # the retrieval hook's sources


def test_docs_are_off_by_default_and_behind_the_key_when_on(tiny_server):
    from fastapi.testclient import TestClient

    _, app = tiny_server
    with TestClient(app) as client:
        assert client.get("/docs", headers={"Authorization": "Bearer s3cret"}).status_code == 404
    settings = ServerSettings(api_key="s3cret", docs=True)
    with TestClient(create_app(app.state.engine, settings)) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_a_full_queue_is_a_429_error_object_streaming_or_not(tiny_server):
    from fastapi.testclient import TestClient

    _, app = tiny_server
    with TestClient(create_app(app.state.engine, ServerSettings(max_queue=1))) as client:
        for stream in (False, True):  # two choices never fit a queue of one: refused before anything is sent
            reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "n": 2, "stream": stream})
            assert reply.status_code == 429 and reply.json()["error"]["type"] == "rate_limit_error"


def test_models_lists_the_loaded_adapter(tiny_model, tmp_path):
    from fastapi.testclient import TestClient
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=2, target_modules=["q_proj"])) \
        .save_pretrained(tmp_path / "nurse-lora")
    engine = load_engine(tiny_model, adapter=str(tmp_path / "nurse-lora"), dtype="fp32")
    try:
        with TestClient(create_app(engine, model_name="tiny")) as client:
            models = client.get("/v1/models").json()["data"]
    finally:
        engine.close()
    assert [(m["id"], m.get("parent")) for m in models] == [("tiny", None), ("nurse-lora", "tiny")]
    assert models[0]["max_model_len"] == engine.max_context == 2048


def test_exposed_bind_without_a_key_is_warned_about_and_limits_are_in_help(capsys):
    from medgpt.cli import main
    from medgpt.infer.server import exposure_warning

    assert "without an API key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", "k") is None
    assert all(exposure_warning(host, None) is None for host in ("127.0.0.1", "::1", "localhost"))
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for limit in ("--max-n", "--max-tokens-cap", "--max-body-bytes", "--docs",
                  "stop at most 8 non-empty strings of at most 256 characters", "at most --max-n choices"):
        assert limit in text

