"""`medgpt.infer.base`: generation parameters checked against OpenAI's ranges (where it has them), and the chat
defaults: the model's generation_config where it recommends sampling settings, else medgpt's; what the vLLM engine
reads from the file must be what transformers' GenerationConfig loads from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _inference import with_generation_config

from medgpt.errors import UserError
from medgpt.infer.base import GenerationParams
from medgpt.infer.engine import load_engine


def test_params_are_validated():
    """Out-of-range values (OpenAI's ranges where it has them) are refused with a message naming the field;
    issue 14's extreme values among them (repetition_penalty 1e-300, seed 2**70)."""
    bad = {"max_new_tokens": [-1, 1.5, True], "temperature": [-1, 2.5, float("nan"), float("inf"), "1"],
           "top_p": [0, 1.5, float("nan")], "top_k": [-1, 10**6, 2.0], "repetition_penalty": [1e-300, 0, 21, -1],
           "presence_penalty": [-2.1, 3, float("-inf")], "frequency_penalty": [2.5], "seed": [-1, 2**63, 2**70, 1.0],
           "stop": [[""], ["x"] * 9, ["x" * 257], "x"], "logit_bias": [{-1: 1.0}, {1: 101}, {1: float("nan")},
                                                                       {"1": 1.0}, {i: 1.0 for i in range(301)}],
           "logprobs": [-1, 21], "grammar": ["", 3]}
    for name, values in bad.items():
        for value in values:
            with pytest.raises(UserError, match=name):
                GenerationParams(**{name: value}).validate()
    fine = GenerationParams(max_new_tokens=0, temperature=1e-300, top_p=1e-9, top_k=1000, repetition_penalty=20,
                            presence_penalty=-2, frequency_penalty=2, seed=2**63 - 1, stop=["x"] * 8,
                            logit_bias={0: -100, 5: 100.0}, logprobs=20, grammar="root ::= [a-z]+")
    assert fine.validate() is fine


def test_chat_defaults_come_from_the_model_generation_config(tiny_model, tmp_path):
    from transformers import GenerationConfig

    from medgpt.infer.base import (CHAT_SAMPLING, MEDGPT_ORIGIN, MODEL_ORIGIN, chat_defaults, chat_origins,
                                   read_sampling)

    plain = load_engine(tiny_model, dtype="fp32")
    assert json.loads((Path(tiny_model) / "generation_config.json").read_text()).keys().isdisjoint(CHAT_SAMPLING)
    params = chat_defaults(plain)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.7, 0.9, 0, 1.1)
    assert params.max_new_tokens == 512 and set(chat_origins(plain).values()) == {MEDGPT_ORIGIN}

    shipped = with_generation_config(tiny_model, tmp_path / "shipped", do_sample=True, temperature=0.6, top_p=0.8,
                                     top_k=20)
    engine = load_engine(shipped, dtype="fp32")
    params = chat_defaults(engine, max_new_tokens=64)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.6, 0.8, 20, 1.1)
    assert chat_origins(engine) == {"temperature": MODEL_ORIGIN, "top_p": MODEL_ORIGIN, "top_k": MODEL_ORIGIN,
                                    "repetition_penalty": MEDGPT_ORIGIN}
    # the vLLM engine reads the file itself: it must agree with what transformers loads from it
    assert read_sampling(shipped) == engine.model_sampling
    assert engine.model_sampling == {k: v for k, v in GenerationConfig.from_pretrained(shipped).to_dict().items()
                                     if k in ("do_sample", *CHAT_SAMPLING) and v is not None}
    assert read_sampling(tmp_path) == {}  # a folder without the file

    greedy = load_engine(with_generation_config(tiny_model, tmp_path / "greedy", do_sample=False,
                                                repetition_penalty=1.3), dtype="fp32")
    params = chat_defaults(greedy)
    assert (params.temperature, params.repetition_penalty) == (0.0, 1.3)
    assert GenerationParams().temperature == 0 and GenerationParams().repetition_penalty == 1.0  # library: greedy
