"""`medgpt.infer.options`: generation flags override the chat defaults and say where each setting comes from,
--greedy is one switch (exactly what evaluation decodes with), and the help of every command that generates shows
each default."""

from __future__ import annotations

import pytest

from medgpt.errors import UserError
from medgpt.infer.base import GenerationParams


def generation_parser():
    import argparse

    from medgpt.infer.options import add_generation_arguments

    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    return parser


def test_flags_override_the_defaults_and_greedy_is_one_switch():
    from medgpt.infer.base import MEDGPT_ORIGIN
    from medgpt.infer.options import chat_params

    model = GenerationParams(max_new_tokens=1, temperature=0.6, top_p=0.8, top_k=20, repetition_penalty=1.05)
    origins = {"temperature": "model", "top_p": "model", "top_k": "model", "repetition_penalty": MEDGPT_ORIGIN}
    params, where = chat_params(generation_parser().parse_args(["--top-p", "0.5", "--seed", "3"]), model, origins)
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.6, 0.5, 20, 3)
    assert params.max_new_tokens == 512
    assert where == {**origins, "top_p": "--top-p"}
    params, where = chat_params(generation_parser().parse_args(["--greedy"]), model, origins)
    assert params == GenerationParams(max_new_tokens=512)  # exactly what evaluation decodes with
    assert set(where.values()) == {"--greedy"}
    with pytest.raises(UserError, match="--greedy cannot be combined with --temperature"):
        chat_params(generation_parser().parse_args(["--greedy", "--temperature", "0.5"]), model, origins)
    with pytest.raises(UserError, match="top_p"):
        chat_params(generation_parser().parse_args(["--top-p", "0"]))


@pytest.mark.parametrize("command", ["chat", "webui", "serve", "predict"])
def test_help_shows_every_generation_default(command, capsys):
    from medgpt.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag, value, api in (("--temperature", "0.7", "1"), ("--top-p", "0.9", "1"), ("--top-k", "0", "0"),
                             ("--repetition-penalty", "1.1", "1")):
        # the API falls back on OpenAI's and vLLM's defaults, not medgpt's chat defaults (unless --chat-defaults)
        default = f"{api} (--chat-defaults: {value})" if command == "serve" else value
        assert f"{flag} " in text and f"default: the model's generation_config, else {default}" in text
    assert "--greedy" in text and "--max-new-tokens" in text and "default: 512" in text


def test_serve_defaults_are_the_flags_then_the_models_then_openais():
    """`medgpt serve`'s defaults: a flag given, else the model's generation_config (as vLLM reads it), else
    OpenAI's and vLLM's neutral values; --chat-defaults puts medgpt's chat defaults in place of the neutral ones."""
    from types import SimpleNamespace

    from medgpt.infer.base import MEDGPT_ORIGIN, MODEL_ORIGIN
    from medgpt.infer.options import API_ORIGIN, serve_params

    def parse(*flags):
        parser = generation_parser()
        parser.add_argument("--chat-defaults", action="store_true")
        return parser.parse_args(list(flags))

    engine = SimpleNamespace(model_sampling={"temperature": 0.6, "top_p": 0.95}, name="m")
    params, where = serve_params(parse("--top-p", "0.5"), engine)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.6, 0.5, 0, 1.0)
    assert where == {"temperature": MODEL_ORIGIN, "top_p": "--top-p", "top_k": API_ORIGIN,
                     "repetition_penalty": API_ORIGIN}
    params, where = serve_params(parse("--chat-defaults"), engine)
    assert (params.temperature, params.top_p, params.repetition_penalty) == (0.6, 0.95, 1.1)
    assert where["repetition_penalty"] == MEDGPT_ORIGIN
    params, _ = serve_params(parse(), SimpleNamespace(model_sampling={"do_sample": False}, name="m"))
    assert params == GenerationParams(max_new_tokens=512)  # the model asks for greedy decoding
