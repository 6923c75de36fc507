"""The Gradio page, driven through gradio_client over loopback."""

from __future__ import annotations

import os

import pytest

from medgpt.infer.base import GenerationParams
from medgpt.infer.engine import load_engine
from test_infer import sharpen

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module")
def page(tiny_model, tmp_path_factory):
    from medgpt.infer.webui import build_demo

    engine = load_engine(sharpen(tiny_model, tmp_path_factory.mktemp("sharp") / "model"), dtype="fp32")
    sources = [{"source": "kb/asthma.txt", "text": "Rinse after steroid inhalers."}]
    augment = lambda messages: (messages, sources if "inhaler" in messages[-1]["content"] else [])  # noqa: E731
    demo = build_demo(engine, GenerationParams(max_new_tokens=8), system="Be brief.", augment=augment)
    yield from serve_page(demo, engine)


def serve_page(demo, engine):
    from gradio_client import Client

    from medgpt.infer.server import free_port

    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False), engine
    finally:
        demo.close()


def ask(client, message, system="", max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
        seed=-1, stop="", stream=False):
    """The page's chat endpoint with every control of the Settings panel, in the page's order."""
    args = (message, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop)
    return list(client.submit(*args, api_name="/chat")) if stream else client.predict(*args, api_name="/chat")


def shown(completion) -> str:
    """What the page shows for a completion: the text, and the cut note when it ended at the token limit."""
    if completion.finish_reason != "length":
        return completion.text
    return (f"{completion.text}\n\n*(cut at {completion.completion_tokens} tokens; raise Max new tokens under "
            f"Settings for a longer answer)*")


def test_page_streams_multi_turn_answers_with_the_system_prompt(page):
    client, engine = page
    params = GenerationParams(max_new_tokens=8)
    first = [{"role": "user", "content": "What is a fever?"}]
    expected = engine.generate([first], params, system="Be brief.")[0]
    updates = ask(client, "What is a fever?", "Be brief.", stream=True)
    assert updates[-1] == shown(expected)
    assert len(updates) > 2 and all(expected.text.startswith(u) for u in updates[:-1])  # streamed, growing

    # the page's cut note is not part of the conversation the model sees next
    second = [*first, {"role": "assistant", "content": expected.text}, {"role": "user", "content": "And a cold?"}]
    answer = ask(client, "And a cold?", "Be brief.", 5)
    assert answer == shown(engine.generate([second], GenerationParams(max_new_tokens=5), system="Be brief.")[0])

    client.reset_session()  # a new conversation, as after clearing the page
    answer = ask(client, "What is a fever?", "You are a pediatrician.")
    assert answer == shown(engine.generate([first], params, system="You are a pediatrician.")[0]) != shown(expected)


def test_page_marks_only_answers_cut_at_the_token_limit(page):
    client, engine = page
    question = [{"role": "user", "content": "What is a fever?"}]
    cut = engine.generate([question], GenerationParams(max_new_tokens=6))[0]
    assert cut.finish_reason == "length" and cut.completion_tokens == 6  # the reference: the engine's own result
    client.reset_session()
    answer = ask(client, "What is a fever?", max_new_tokens=6)
    assert answer.startswith(cut.text) and "(cut at 6 tokens;" in answer
    stop = cut.text[2:4]
    client.reset_session()
    stopped = ask(client, "What is a fever?", max_new_tokens=6, stop=f"{stop}\nnever there")
    assert stopped == engine.generate([question], GenerationParams(max_new_tokens=6, stop=[stop]))[0].text
    assert "cut at" not in stopped


def test_page_top_k_and_seed_reach_the_engine(page):
    client, engine = page
    question = [{"role": "user", "content": "What is a fever?"}]
    params = GenerationParams(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=40, repetition_penalty=1.2, seed=3)
    expected = shown(engine.generate([question], params)[0])
    client.reset_session()
    answer = ask(client, "What is a fever?", "", 8, 1.0, 0.9, 40, 1.2, 3)
    client.reset_session()
    assert answer == expected == ask(client, "What is a fever?", "", 8, 1.0, 0.9, 40, 1.2, 3)
    # -1 (what the page starts with) is a new seed for each answer, never one fixed seed
    unseeded = set()
    for _ in range(3):
        client.reset_session()
        unseeded.add(ask(client, "What is a fever?", "", 8, 2.0, 1.0, 0, 1.0, -1))
    assert len(unseeded) > 1


def test_page_shows_retrieval_sources(page):
    client, _ = page
    client.reset_session()
    answer = ask(client, "How do I use my inhaler?", max_new_tokens=4)
    assert answer.endswith("Sources:\n[1] kb/asthma.txt: Rinse after steroid inhalers.")


def components(client) -> dict[str, dict]:
    """The page's components by label (the props the browser renders)."""
    return {c["props"].get("label"): c["props"] for c in client.config["components"] if c["props"].get("label")}


def test_page_shows_the_loaded_model_and_every_setting(page, tiny_model):
    client, engine = page
    page_text = str(client.config)
    assert f"**Model** model ({engine.folder})" in page_text and "**Adapter** none" in page_text
    assert f"**Template** {engine.template.name}" in page_text
    assert "**dtype** float32" in page_text and "**Device** cpu" in page_text
    assert "**Generation** greedy, repetition penalty 1, max new tokens 8" in page_text
    props = components(client)
    expected = {"Max new tokens": 8, "Temperature": 0.0, "Top-p": 1.0, "Top-k": 0, "Repetition penalty": 1.0,
                "Seed": -1, "Stop strings": "", "System prompt": "Be brief."}
    assert {label: props[label].get("value") for label in expected} == expected


def test_page_starts_from_the_model_generation_config(tiny_model, tmp_path):
    from medgpt.infer.webui import build_demo
    from test_infer import with_generation_config

    folder = with_generation_config(tiny_model, tmp_path / "shipped", do_sample=True, temperature=0.6, top_k=20)
    engine = load_engine(folder, dtype="fp32")
    for client, _ in serve_page(build_demo(engine), engine):
        props = components(client)
        assert (props["Temperature"]["value"], props["Top-k"]["value"]) == (0.6, 20)
        assert props["Temperature"]["info"].startswith("default 0.6: the model's generation_config")
        assert props["Top-p"]["value"] == 0.9 and props["Top-p"]["info"] == "default 0.9: medgpt's chat default"
        assert props["Repetition penalty"]["value"] == 1.1 and props["Max new tokens"]["value"] == 512


def test_history_from_gradio_messages():
    from medgpt.infer.webui import history_messages

    history = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
               {"role": "assistant", "content": "Hello", "metadata": None},
               {"role": "user", "content": {"path": "scan.png"}}]
    assert history_messages(history) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
