"""The engine (batching, stop words, streaming, sampling, templates, adapters), predict and chat."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from medgpt.errors import UserError
from medgpt.infer.base import GenerationParams
from medgpt.infer.engine import held_back, load_engine, stop_position

QUESTIONS = [
    [{"role": "user", "content": "What is hypertension?"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are a careful doctor."},
     {"role": "user", "content": "List three symptoms of influenza and say when to see a doctor."}],
]


def sharpen(tiny_model: str, folder: Path, std: float = 0.2) -> str:
    """The tiny model with larger random weights: its greedy text then depends on the prompt (not just newlines)."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_model, folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() > 1):
            weight.normal_(0, std)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def sharp_model(tiny_model, tmp_path_factory) -> str:
    return sharpen(tiny_model, tmp_path_factory.mktemp("sharp") / "model")


@pytest.fixture(scope="module")
def engine(sharp_model):
    return load_engine(sharp_model, dtype="fp32", max_batch_size=8)


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


def test_stop_helpers():
    assert stop_position("abc STOP def END", ["END", "STOP"]) == 4
    assert stop_position("abc", ["x"]) == -1
    assert held_back("answer <|im", ["<|im_end|>"]) == 4  # a stop string may be starting: not shown yet
    assert held_back("answer", ["<|im_end|>"]) == 0


def test_batched_greedy_equals_one_by_one(engine):
    params = GenerationParams(max_new_tokens=12)
    batched = engine.generate(QUESTIONS, params)
    single = [engine.generate([q], params)[0] for q in QUESTIONS]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.completion_tokens for c in batched] == [c.completion_tokens for c in single]
    for completion, question in zip(batched, QUESTIONS):
        assert completion.prompt_tokens == len(engine.encode(question))
        assert completion.finish_reason in ("stop", "length")


def test_length_and_stop_strings(engine):
    long = engine.generate(QUESTIONS[:1], GenerationParams(max_new_tokens=16))[0]
    assert long.finish_reason == "length" and long.completion_tokens == 16
    stop = long.text[len(long.text) // 2:][:3]
    assert stop.strip(), long.text
    cut = engine.generate(QUESTIONS[:1], GenerationParams(max_new_tokens=16, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == long.text[:long.text.find(stop)]
    assert cut.completion_tokens < 16


def test_stream_matches_generate(engine):
    for params in (GenerationParams(max_new_tokens=12), GenerationParams(max_new_tokens=12, stop=["e"])):
        deltas = list(engine.stream(QUESTIONS[0], params))
        assert "".join(deltas) == engine.generate(QUESTIONS[:1], params)[0].text
        assert len(deltas) > 1 or params.stop


def test_eos_and_template_stop_words_end_generation(engine):
    """The model's only way to end a turn (eos = <|im_end|>) stops it with finish_reason stop."""
    import torch

    eos = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eos in engine.stop_ids
    bias = torch.zeros(len(engine.tokenizer))
    bias[eos] = 1e4
    head = engine.model.get_output_embeddings()
    original = head.weight.data.clone()
    try:
        head.weight.data[:] = 0
        head.bias = torch.nn.Parameter(bias)
        completion = engine.generate(QUESTIONS[:1], GenerationParams(max_new_tokens=10))[0]
    finally:
        head.weight.data[:] = original
        head.bias = None
    assert completion == type(completion)("", completion.prompt_tokens, 1, "stop")


def test_seeded_sampling_is_per_request(engine):
    params = GenerationParams(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    alone = engine.generate(QUESTIONS[:1], params)[0].text
    assert engine.generate(QUESTIONS[:1], params)[0].text == alone
    other_seed = GenerationParams(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.95, seed=8)
    assert engine.generate(QUESTIONS[:1], other_seed)[0].text != alone
    # in a batch beside rows with other settings, a seeded row samples exactly as it does alone
    from medgpt.infer.base import Request

    rows = [Request(engine.encode(QUESTIONS[1]), GenerationParams(max_new_tokens=4)),
            Request(engine.encode(QUESTIONS[0]), params),
            Request(engine.encode(QUESTIONS[2]), GenerationParams(max_new_tokens=20, repetition_penalty=1.3))]
    assert engine.run(rows)[1].text == alone


def test_template_from_metadata_and_by_name(sharp_model, tmp_path):
    from medgpt.data.templates import get_template
    from medgpt.models import write_meta

    folder = tmp_path / "model"
    shutil.copytree(sharp_model, folder)
    write_meta(folder, template="vicuna")
    recorded = load_engine(str(folder), dtype="fp32")
    assert recorded.template.name == "vicuna"
    assert "</s>" in recorded.stop_strings or recorded.tokenizer.convert_tokens_to_ids("</s>") in recorded.stop_ids
    named = load_engine(str(folder), template="chatml", dtype="fp32")
    assert named.encode(QUESTIONS[0]) == get_template("chatml").encode_prompt(named.tokenizer, QUESTIONS[0])
    with pytest.raises(UserError, match="unknown template"):
        load_engine(str(folder), template="nope")


@pytest.mark.slow
def test_adapter_applies_without_merging(sharp_model, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medgpt.models import merge_adapter

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(sharp_model),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    params = GenerationParams(max_new_tokens=10)
    base = load_engine(sharp_model, dtype="fp32").generate(QUESTIONS, params)
    adapted_engine = load_engine(sharp_model, adapter=str(tmp_path / "adapter"), dtype="fp32")
    assert type(adapted_engine.model).__name__.startswith("Peft")
    adapted = adapted_engine.generate(QUESTIONS, params)
    merged = merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "merged"), base=sharp_model)
    assert [c.text for c in adapted] == [c.text for c in load_engine(str(merged), dtype="fp32").generate(QUESTIONS, params)]
    assert [c.text for c in adapted] != [c.text for c in base]


@pytest.mark.slow
def test_bundled_model_answers_sanely_in_bf16(bundled_model):
    engine = load_engine(bundled_model)  # auto: bf16 where the CPU has fast bf16
    answers = engine.generate([[{"role": "user", "content": "What is the capital of France?"}],
                               [{"role": "user", "content": "Say hello."}]], GenerationParams(max_new_tokens=24))
    # facts and a stop of its own, not one wording: fp32 (CPUs without native bf16) and bf16 word it differently
    assert "Paris" in answers[0].text and answers[0].finish_reason == "stop"
    assert "hello" in answers[1].text.lower()


# -- vLLM: everything short of a GPU ---------------------------------------------------------------

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


# -- predict -----------------------------------------------------------------------------------------

ROWS = [
    {"id": "a", "query": "What is a fever?"},
    {"id": "b", "query": "And in children?", "system": "Be brief.", "history": [["What is a fever?", "A high temperature."]]},
    {"id": "c", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "reference"}]},
    {"id": "d", "conversations": [{"from": "human", "value": "What is asthma?"}]},
    {"question": "No id here: what is a stroke?"},
]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_prompt_messages_formats():
    from medgpt.infer.predict import prompt_messages

    assert prompt_messages(ROWS[1]) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a fever?"},
        {"role": "assistant", "content": "A high temperature."}, {"role": "user", "content": "And in children?"}]
    assert prompt_messages(ROWS[2]) == [{"role": "user", "content": "Hi"}]  # the reference answer is cut off
    assert prompt_messages(ROWS[3]) == [{"role": "user", "content": "What is asthma?"}]


def test_predict_reports_bad_rows_with_location(tmp_path, engine):
    from medgpt.infer.predict import predict_file

    bad = write_rows(tmp_path / "q.jsonl", [ROWS[0], {"id": "x", "text": "no question"}])
    with pytest.raises(UserError, match=r"q\.jsonl:2: .*query"):
        predict_file(engine, bad, tmp_path / "a.jsonl", GenerationParams(max_new_tokens=2))
    (tmp_path / "broken.jsonl").write_text('{"query": "ok"}\n{not json\n')
    with pytest.raises(UserError, match=r"broken\.jsonl:2: invalid JSON"):
        predict_file(engine, tmp_path / "broken.jsonl", tmp_path / "a.jsonl", GenerationParams(max_new_tokens=2))


class CountingEngine:
    """Wraps an engine, counts the prompts submitted to it, and can fail on a given one (an interruption)."""

    def __init__(self, engine, fail_on_prompt: int | None = None):
        self.engine, self.fail_on_prompt, self.prompts = engine, fail_on_prompt, 0

    def encode(self, messages, system=None):
        return self.engine.encode(messages, system)

    def submit(self, request):
        if self.prompts + 1 == self.fail_on_prompt:
            raise KeyboardInterrupt
        self.prompts += 1
        return self.engine.submit(request)


def test_predict_keeps_order_and_resumes(tmp_path, engine):
    from medgpt.infer.predict import predict_file

    questions = write_rows(tmp_path / "q.jsonl", ROWS)
    params = GenerationParams(max_new_tokens=6)
    out = tmp_path / "a.jsonl"
    with pytest.raises(KeyboardInterrupt):  # during the third chunk's submission: the first chunk is written
        predict_file(CountingEngine(engine, fail_on_prompt=5), questions, out, params, chunk_size=2)
    partial = tmp_path / "a.jsonl.partial"
    assert not out.exists() and len(partial.read_text().splitlines()) == 2
    with partial.open("a") as f:
        f.write('{"id": "c", "mess')  # torn line from a kill during a write
    resumed = CountingEngine(engine)
    stats = predict_file(resumed, questions, out, params, chunk_size=2)
    assert resumed.prompts == 3 and stats == {**stats, "rows": 5, "resumed": 2, "generated": 3}
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in a.items() if k != "response"} for a in answers] == ROWS
    fresh = predict_file(engine, questions, tmp_path / "fresh.jsonl", params)
    assert fresh["generated"] == 5 and (tmp_path / "fresh.jsonl").read_text() == out.read_text()
    again = CountingEngine(engine)
    assert predict_file(again, questions, out, params)["generated"] == 0 and again.prompts == 0
    with pytest.raises(UserError, match="another input"):
        predict_file(engine, write_rows(tmp_path / "other.jsonl", ROWS[::-1]), out, params)


def test_predict_command(tmp_path, sharp_model, capsys):
    from medgpt.cli import main

    questions = write_rows(tmp_path / "q.jsonl", ROWS[:2])
    argv = ["predict", "--model", sharp_model, "--input", str(questions), "--output", str(tmp_path / "a.jsonl"),
            "--max-new-tokens", "4", "--dtype", "fp32"]
    assert main(argv) == 0
    assert [json.loads(line)["id"] for line in (tmp_path / "a.jsonl").read_text().splitlines()] == ["a", "b"]
    assert main(argv[:-4] + ["--temperature", "-1"]) == 2
    assert "temperature must be a number in [0, 2]" in capsys.readouterr().err


# -- chat --------------------------------------------------------------------------------------------

def test_chat_session_history_clear_and_retrieval_hook(engine):
    from medgpt.infer.chat import ChatSession, run_chat

    seen = []

    def augment(messages):
        seen.append(messages)
        context = {"role": "system", "content": "Context: fevers are common."}
        return [context, *messages], [{"source": "kb/fever.md", "text": "Fevers are common."}]

    session = ChatSession(engine, GenerationParams(max_new_tokens=5), augment=augment)
    lines = iter(["What is a fever?", "And a cold?", "/clear", "Hi", "/exit", "never read"])
    out = io.StringIO()
    run_chat(session, read=lambda prompt: next(lines), out=out)
    first_answer = engine.generate([[{"role": "system", "content": "Context: fevers are common."},
                                     {"role": "user", "content": "What is a fever?"}]],
                                    GenerationParams(max_new_tokens=5))[0].text
    assert f"assistant> {first_answer}\n" in out.getvalue()
    assert "[1] kb/fever.md: Fevers are common." in out.getvalue()
    assert [len(m) for m in seen] == [1, 3, 1]  # the second turn saw the first; /clear forgot both
    assert seen[1][1] == {"role": "assistant", "content": first_answer}
    assert next(lines) == "never read" and len(session.history) == 2


def test_model_generation_config_does_not_leak_into_requests(engine):
    """Only the request's own settings apply, whatever the checkpoint's generation_config recommends."""
    question = QUESTIONS[:1]
    before = engine.generate(question, GenerationParams(max_new_tokens=10))[0].text
    config = engine.model.generation_config
    saved = config.to_dict()
    try:
        config.update(repetition_penalty=5.0, no_repeat_ngram_size=1, do_sample=True, temperature=3.0)
        assert engine.generate(question, GenerationParams(max_new_tokens=10))[0].text == before
    finally:
        config.update(**saved)


def test_terminal_chat_marks_an_answer_cut_at_the_token_limit(engine):
    from medgpt.infer.chat import ChatSession, run_chat

    # the reference: the engine's own completion of the same prompt, cut at 5 tokens and one that stops first
    cut = engine.generate(QUESTIONS[:1], GenerationParams(max_new_tokens=5))[0]
    assert cut.finish_reason == "length" and cut.completion_tokens == 5
    stop = cut.text[1:3]
    assert stop.strip()
    for params, marked in ((GenerationParams(max_new_tokens=5), True),
                           (GenerationParams(max_new_tokens=5, stop=[stop]), False)):
        session = ChatSession(engine, params)
        lines = iter([QUESTIONS[0][0]["content"], "/exit"])
        out = io.StringIO()
        run_chat(session, read=lambda prompt: next(lines), out=out)
        assert ("(cut at 5 tokens" in out.getvalue()) is marked, out.getvalue()
        assert session.completion.finish_reason == ("length" if marked else "stop")


# -- streaming results and chat defaults ----------------------------------------------------------------

def test_stream_ends_with_the_completion(engine):
    for params in (GenerationParams(max_new_tokens=7), GenerationParams(max_new_tokens=30, stop=["e"])):
        expected = engine.generate(QUESTIONS[:1], params)[0]
        stream = engine.stream(QUESTIONS[0], params)
        assert stream.completion is None  # known only at the end
        assert "".join(stream) == expected.text
        assert stream.completion == expected
    assert expected.finish_reason == "stop" and engine.generate(QUESTIONS[:1], GenerationParams(
        max_new_tokens=7))[0].finish_reason == "length"


def with_generation_config(model: str, folder: Path, **fields) -> str:
    """A copy of `model` whose generation_config.json also sets `fields`, written as a model author would."""
    shutil.copytree(model, folder)
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}, indent=2))
    return str(folder)


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


def test_chat_command_shows_the_loaded_model_and_settings(sharp_model, tmp_path, monkeypatch, capsys):
    from medgpt.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # the chat ends at once (Ctrl-D)
    shipped = with_generation_config(sharp_model, tmp_path / "m", do_sample=True, temperature=0.6)
    assert main(["chat", "--model", shipped, "--dtype", "fp32", "--top-p", "0.5"]) == 0
    out = capsys.readouterr().out
    assert f"model m ({shipped})" in out and "adapter none" in out and "dtype float32" in out
    assert ("temperature 0.6, top-p 0.5, repetition penalty 1.1, max new tokens 512 "
            "(from --top-p; medgpt's chat default; the model's generation_config)") in out
