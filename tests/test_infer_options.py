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
    for flag, value in (("--temperature", "0.7"), ("--top-p", "0.9"), ("--top-k", "0"),
                        ("--repetition-penalty", "1.1")):
        assert f"{flag} " in text and f"default: the model's generation_config, else {value}" in text
    assert "--greedy" in text and "--max-new-tokens" in text and "default: 512" in text
