"""A Gradio chat page: the loaded model on top, streaming answers, a system prompt, every generation setting
(with its default and where the default comes from), answers cut at the token limit marked, clear."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from medgpt.infer.base import Augment, Engine, GenerationParams, chat_defaults, chat_origins, engine_facts
from medgpt.infer.chat import cut_note, describe_params, format_sources

# what the page appends to an answer (a cut note, the sources): left out of the history the model sees
PAGE_NOTES = re.compile(r"(\n\n\*\(cut at \d+ tokens[^\n]*\)\*)?(\n\nSources:\n(\[\d+\] [^\n]*(\n|$))+)?$")


def history_messages(history: list[Any]) -> list[dict]:
    """Gradio's chat history (messages whose content may be parts or files) as plain text messages, without the
    notes the page added to answers."""
    out = []
    for turn in history or []:
        role, content = turn.get("role"), turn.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if role == "assistant" and isinstance(content, str):
            content = PAGE_NOTES.sub("", content, count=1)
        if role in ("user", "assistant") and isinstance(content, str) and content:
            out.append({"role": role, "content": content})
    return out


def engine_summary(engine: Engine) -> str:
    """What is loaded, in one Markdown line: model (and its folder), adapter, template, dtype, device."""
    return " · ".join(f"**{key if key == 'dtype' else key.capitalize()}** {value}"
                      for key, value in engine_facts(engine).items())


def build_demo(engine: Engine, defaults: GenerationParams | None = None, system: str | None = None,
               augment: Augment | None = None, title: str = "medgpt", origins: dict[str, str] | None = None):
    """The page; `defaults`: the settings it starts with (None: the engine's chat defaults); `origins`: where each
    sampling default came from, shown beside its control (None: the engine's generation config or medgpt)."""
    import gradio as gr

    if defaults is None:
        defaults, origins = chat_defaults(engine), origins or chat_origins(engine)
    origins = origins or {}

    def respond(message: str, history: list, system_prompt: str, max_new_tokens: float, temperature: float,
                top_p: float, top_k: float, repetition_penalty: float, seed: float | None,
                stop_text: str) -> Iterator[str]:
        messages = [*history_messages(history), {"role": "user", "content": message}]
        sources: list[dict] = []
        if augment:
            messages, sources = augment(messages)
        stop = [line for line in (stop_text or "").splitlines() if line.strip()]
        params = GenerationParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                  top_p=float(top_p), top_k=int(top_k), repetition_penalty=float(repetition_penalty),
                                  stop=stop, seed=None if seed is None or seed < 0 else int(seed))
        answer = ""
        stream = engine.stream(messages, params, system=(system_prompt or "").strip() or None)
        try:
            for delta in stream:
                answer += delta
                yield answer
        finally:  # the page stopped it (Stop, a closed tab): stop generating
            getattr(stream, "close", lambda: None)()
        notes = ""
        if note := cut_note(getattr(stream, "completion", None)):
            notes += f"\n\n*({note}; raise Max new tokens under Settings for a longer answer)*"
        if sources:
            notes += "\n\nSources:\n" + format_sources(sources)
        if notes:
            yield answer + notes

    def info(field: str, value: Any, note: str = "") -> str:
        where = origins.get(field)
        return f"default {value:g}" + (f": {where}" if where else "") + (f"; {note}" if note else "")

    inputs = [
        gr.Textbox(value=system or "", label="System prompt", lines=2,
                   info="empty: the template's own" if not system else None),
        gr.Slider(1, max(2048, defaults.max_new_tokens), value=defaults.max_new_tokens, step=1,
                  label="Max new tokens", info=f"default {defaults.max_new_tokens}; longer answers are cut"),
        gr.Slider(0.0, max(2.0, defaults.temperature), value=defaults.temperature, step=0.05, label="Temperature",
                  info=info("temperature", defaults.temperature, "0 = greedy")),
        gr.Slider(min(0.05, defaults.top_p), 1.0, value=defaults.top_p, step=0.05, label="Top-p",
                  info=info("top_p", defaults.top_p)),
        gr.Slider(0, max(200, defaults.top_k), value=defaults.top_k, step=1, label="Top-k",
                  info=info("top_k", defaults.top_k, "0 = off")),
        gr.Slider(min(1.0, defaults.repetition_penalty), max(2.0, defaults.repetition_penalty),
                  value=defaults.repetition_penalty, step=0.05, label="Repetition penalty",
                  info=info("repetition_penalty", defaults.repetition_penalty, "1 = off")),
        gr.Number(value=-1 if defaults.seed is None else defaults.seed, precision=0, minimum=-1, label="Seed",
                  info="-1: a new random seed for each answer; 0 or more makes sampling repeatable"),
        gr.Textbox(value="\n".join(defaults.stop), label="Stop strings", lines=2,
                   info="one per line; the template's end-of-turn always stops"),
    ]
    return gr.ChatInterface(respond, additional_inputs=inputs, title=title, api_name="chat",
                            description=f"{engine_summary(engine)}\n\n**Generation** "
                                        f"{describe_params(defaults, origins)} · change it under Settings below",
                            additional_inputs_accordion=gr.Accordion("Settings", open=False))
