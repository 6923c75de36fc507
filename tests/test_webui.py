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
    from gradio_client import Client

    from medgpt.infer.server import free_port
    from medgpt.infer.webui import build_demo

    engine = load_engine(sharpen(tiny_model, tmp_path_factory.mktemp("sharp") / "model"), dtype="fp32")
    sources = [{"source": "kb/asthma.txt", "text": "Rinse after steroid inhalers."}]
    augment = lambda messages: (messages, sources if "inhaler" in messages[-1]["content"] else [])  # noqa: E731
    demo = build_demo(engine, GenerationParams(max_new_tokens=8), system="Be brief.", augment=augment)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False), engine
    finally:
        demo.close()


def test_page_streams_multi_turn_answers_with_the_system_prompt(page):
    client, engine = page
    params = GenerationParams(max_new_tokens=8)
    first = [{"role": "user", "content": "What is a fever?"}]
    expected = engine.generate([first], params, system="Be brief.")[0].text
    updates = list(client.submit("What is a fever?", "Be brief.", 8, 0.0, 1.0, 1.0, api_name="/chat"))
    assert updates[-1] == expected
    assert len(updates) > 1 and all(expected.startswith(u) for u in updates)  # streamed, growing

    second = [*first, {"role": "assistant", "content": expected}, {"role": "user", "content": "And a cold?"}]
    answer = client.predict("And a cold?", "Be brief.", 5, 0.0, 1.0, 1.0, api_name="/chat")
    assert answer == engine.generate([second], GenerationParams(max_new_tokens=5), system="Be brief.")[0].text

    client.reset_session()  # a new conversation, as after clearing the page
    answer = client.predict("What is a fever?", "You are a pediatrician.", 8, 0.0, 1.0, 1.0, api_name="/chat")
    assert answer == engine.generate([first], params, system="You are a pediatrician.")[0].text != expected


def test_page_shows_retrieval_sources(page):
    client, _ = page
    client.reset_session()
    answer = client.predict("How do I use my inhaler?", "", 4, 0.0, 1.0, 1.0, api_name="/chat")
    assert answer.endswith("Sources:\n[1] kb/asthma.txt: Rinse after steroid inhalers.")


def test_history_from_gradio_messages():
    from medgpt.infer.webui import history_messages

    history = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
               {"role": "assistant", "content": "Hello", "metadata": None},
               {"role": "user", "content": {"path": "scan.png"}}]
    assert history_messages(history) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
