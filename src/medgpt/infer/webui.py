"""A Gradio chat page: streaming answers, a system prompt, generation sliders, clear."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from medgpt.infer.chat import format_sources
from medgpt.infer.base import Augment, Engine, GenerationParams


def history_messages(history: list[Any]) -> list[dict]:
    """Gradio's chat history (messages whose content may be parts or files) as plain text messages."""
    out = []
    for turn in history or []:
        role, content = turn.get("role"), turn.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if role in ("user", "assistant") and isinstance(content, str) and content:
            out.append({"role": role, "content": content})
    return out


def build_demo(engine: Engine, defaults: GenerationParams | None = None, system: str | None = None,
               augment: Augment | None = None, title: str = "medgpt"):
    import gradio as gr

    defaults = defaults or GenerationParams()

    def respond(message: str, history: list, system_prompt: str, max_new_tokens: float, temperature: float,
                top_p: float, repetition_penalty: float) -> Iterator[str]:
        messages = [*history_messages(history), {"role": "user", "content": message}]
        sources: list[dict] = []
        if augment:
            messages, sources = augment(messages)
        params = GenerationParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                  top_p=float(top_p), repetition_penalty=float(repetition_penalty),
                                  stop=list(defaults.stop), seed=defaults.seed)
        answer = ""
        for delta in engine.stream(messages, params, system=system_prompt.strip() or None):
            answer += delta
            yield answer
        if sources:
            yield answer + "\n\nSources:\n" + format_sources(sources)

    inputs = [
        gr.Textbox(value=system or "", label="System prompt", lines=2),
        gr.Slider(1, 2048, value=defaults.max_new_tokens, step=1, label="Max new tokens"),
        gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)"),
        gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p"),
        gr.Slider(1.0, 2.0, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty"),
    ]
    return gr.ChatInterface(respond, additional_inputs=inputs, title=title, api_name="chat",
                            additional_inputs_accordion=gr.Accordion("Settings", open=False))
