"""`medgpt.infer.vllm_engine`, everything short of a GPU: medgpt's engine and generation settings mapped to vLLM's
LLM and SamplingParams arguments, vLLM's per-position log-prob entries (the format of its outputs) mapped to
TokenLogprob, and the install step named where vLLM is missing."""

from __future__ import annotations

import pytest

from medgpt.errors import UserError
from medgpt.infer.base import GenerationParams
from medgpt.infer.engine import load_engine


def test_vllm_argument_mapping():
    from medgpt.infer.vllm_engine import llm_kwargs, sampling_kwargs

    kwargs = llm_kwargs("/m", "/m", adapter="/a", dtype="bf16", tensor_parallel_size=2, quantization="awq",
                        gpu_memory_utilization=0.8, max_model_len=4096, max_batch_size=32)
    assert kwargs == {"model": "/m", "tokenizer": "/m", "dtype": "bfloat16", "trust_remote_code": False,
                      "tensor_parallel_size": 2, "gpu_memory_utilization": 0.8, "seed": 0, "quantization": "awq",
                      "max_model_len": 4096, "max_num_seqs": 32, "enable_lora": True, "max_lora_rank": 64}
    assert "quantization" not in llm_kwargs("/m", "/m") and "enable_lora" not in llm_kwargs("/m", "/m")
    with pytest.raises(UserError):
        llm_kwargs("/m", "/m", gpu_memory_utilization=1.5)
    sampling = sampling_kwargs(GenerationParams(max_new_tokens=9, temperature=0.5, top_k=0, stop=["Q:"], seed=3),
                               {2}, ["<|im_start|>"])
    assert sampling == {"max_tokens": 9, "temperature": 0.5, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0,
                        "presence_penalty": 0.0, "frequency_penalty": 0.0, "stop": ["Q:", "<|im_start|>"],
                        "stop_token_ids": [2], "seed": 3, "skip_special_tokens": True}
    scoring = sampling_kwargs(GenerationParams(max_new_tokens=0, logprobs=1, presence_penalty=0.5,
                                               frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={7: -100},
                                               grammar="root ::= [a-z]+"), set(), [], echo=True)
    assert scoring == {**scoring, "max_tokens": 1, "logprobs": 1, "prompt_logprobs": 1, "presence_penalty": 0.5,
                       "frequency_penalty": -0.5, "repetition_penalty": 1.2, "logit_bias": {7: -100},
                       "structured_outputs": {"grammar": "root ::= [a-z]+"}}


def test_vllm_log_probs_map_to_token_logprobs():
    """vLLM's per-position {token id: Logprob(logprob, rank, decoded_token)} (its outputs' format) -> TokenLogprob."""
    from collections import namedtuple

    from medgpt.infer.base import TokenLogprob
    from medgpt.infer.vllm_engine import vllm_logprob

    Logprob = namedtuple("Logprob", "logprob rank decoded_token")
    entry = {5: Logprob(-0.1, 1, "a"), 9: Logprob(-2.5, 2, "b"), 4: Logprob(-7.0, 30, "c")}  # 4 sampled, rank 30
    assert vllm_logprob(entry, 4, 2) == TokenLogprob(4, -7.0, [(5, -0.1), (9, -2.5)])
    assert vllm_logprob(entry, 5, 0) == TokenLogprob(5, -0.1, [])
    assert vllm_logprob(None, 3, 1) is None  # a prompt's first token


def test_vllm_missing_names_the_install_step(tiny_model):
    pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(UserError, match=r"pip install 'medgpt\[vllm\]'"):
        load_engine(tiny_model, engine="vllm")
    with pytest.raises(UserError, match="expected one of"):
        load_engine(tiny_model, engine="llamacpp")


def test_serve_parallel_flags_reach_vllms_llm_arguments():
    """`medgpt serve --engine vllm --tensor-parallel-size 2 --data-parallel-size 4`, parsed by the real command
    line, becomes vLLM's LLM(tensor_parallel_size=2, data_parallel_size=4) (vLLM's own names for the two sizes)."""
    from medgpt.cli import build_parser
    from medgpt.infer.options import vllm_options
    from medgpt.infer.vllm_engine import llm_kwargs

    args = build_parser("serve").parse_args(["serve", "--engine", "vllm", "--tensor-parallel-size", "2",
                                             "--data-parallel-size", "4"])
    kwargs = llm_kwargs("/m", "/m", **vllm_options(args))
    assert (kwargs["tensor_parallel_size"], kwargs["data_parallel_size"]) == (2, 4)
    plain = build_parser("serve").parse_args(["serve", "--engine", "vllm"])
    assert "data_parallel_size" not in llm_kwargs("/m", "/m", **vllm_options(plain))
    with pytest.raises(UserError, match="data_parallel_size"):
        llm_kwargs("/m", "/m", data_parallel_size=0)


def test_vllm_engine_renders_the_thinking_switch_as_the_transformers_engine(tokenizer):
    """vLLM gets medgpt's prompt ids, so enable_thinking is the template's (Qwen3's official rendering, as
    tests/test_data_templates_reasoning.py checks it) and replies are read by the same `reply_reader`; the engine
    itself needs a GPU and is not run here."""
    from medgpt.data.templates import get_template
    from medgpt.infer.reasoning import reply_reader
    from medgpt.infer.vllm_engine import VllmEngine

    engine = object.__new__(VllmEngine)  # its encode, without loading vLLM
    engine.tokenizer, engine.template, engine.system = tokenizer, get_template("qwen3"), None
    question = [{"role": "user", "content": "What is a fever?"}]
    for default, asked, closed in ((None, None, False), (False, None, True), (False, True, False), (None, False, True)):
        engine.enable_thinking = default
        ids = engine.encode(question, enable_thinking=asked)
        expected = engine.template.render(question, add_generation_prompt=True, enable_thinking=not closed)
        assert tokenizer.decode(ids) == expected
        assert (reply_reader(engine.template, tokenizer, ids) is None) is closed
