"""`medgpt.infer.engine`, the transformers engine: batched greedy decoding equal to one prompt at a time, length and
stop strings, the model's end-of-turn token, streaming, seeded sampling, the template from the model's metadata or
by name, adapters applied without merging, the checkpoint's generation_config kept out of requests; and its
continuous batching: requests joining and leaving a running batch, log-probs and prompt scoring, penalties, logit
bias, grammars, one request's failure isolated from its batch, cancellation.

The references are transformers' own: `model(input_ids).logits` for log-probs, `model.generate` for greedy
decoding and the repetition penalty, pydantic for the JSON a grammar promises; OpenAI's published formula for
the presence and frequency penalties; for an adapter, the model with the adapter merged into it.

The `engine` fixture (tests/conftest.py) is one engine on the sharpened tiny model for the whole session.
"""

from __future__ import annotations

import shutil
import threading

import pytest
from _inference import QUESTIONS

from medgpt.errors import UserError
from medgpt.infer.base import GenerationParams, Request
from medgpt.infer.engine import held_back, load_engine, prompt_logprobs, stop_position


# -- generation, streaming, stop words, sampling, templates, adapters ------------------------------------


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


def test_stream_ends_with_the_completion(engine):
    for params in (GenerationParams(max_new_tokens=7), GenerationParams(max_new_tokens=30, stop=["e"])):
        expected = engine.generate(QUESTIONS[:1], params)[0]
        stream = engine.stream(QUESTIONS[0], params)
        assert stream.completion is None  # known only at the end
        assert "".join(stream) == expected.text
        assert stream.completion == expected
    assert expected.finish_reason == "stop" and engine.generate(QUESTIONS[:1], GenerationParams(
        max_new_tokens=7))[0].finish_reason == "length"


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


# -- continuous batching ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(engine) -> list[list[int]]:
    """Prompts of different lengths."""
    extra = [[{"role": "user", "content": "Explain, in detail, how the kidneys filter blood and what fails first "
                                          "in chronic kidney disease; mention dialysis."}],
             [{"role": "user", "content": "Dose?"}]]
    return [engine.encode(m) for m in QUESTIONS + extra]


def reference_greedy(engine, prompt: list[int], n: int, **config) -> list[int]:
    """transformers' own greedy decoding of one prompt alone, without the trailing stop token."""
    import torch

    with torch.inference_mode():
        out = engine.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    do_sample=False, max_new_tokens=n, eos_token_id=sorted(engine.stop_ids),
                                    pad_token_id=engine.tokenizer.pad_token_id, **config)
    ids = out[0, len(prompt):].tolist()
    return ids[:-1] if ids and ids[-1] in engine.stop_ids else ids


def staggered(engine, requests: list[Request], after: int = 2) -> list:
    """Submit the first request, then each next one once the previous has produced `after` text deltas: every
    request joins a batch that is already running."""
    futures = [None] * len(requests)
    started = [threading.Event() for _ in requests]
    for i, request in enumerate(requests):
        own, seen = request.on_text, []

        def on_text(delta, i=i, own=own, seen=seen):
            seen.append(delta)
            if len(seen) >= after:
                started[i].set()
            if own:
                own(delta)

        request.on_text = on_text
    for i, request in enumerate(requests):
        futures[i] = engine.submit(request)
        futures[i].add_done_callback(lambda _, i=i: started[i].set())
        started[i].wait(60)
    return [future.result(timeout=120) for future in futures]


def test_greedy_in_a_continuous_batch_equals_generate_alone(engine, prompts):
    lengths = [24, 6, 16, 10, 20]  # rows leave the batch at different steps while others join
    requests = [Request(p, GenerationParams(max_new_tokens=n)) for p, n in zip(prompts, lengths)]
    results = staggered(engine, requests)
    for prompt, n, result in zip(prompts, lengths, results):
        assert result.token_ids == reference_greedy(engine, prompt, n)
        assert result.text == engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert engine.running() == 0 and engine.waiting() == 0


def test_log_probs_and_prompt_scoring_equal_the_model_log_softmax(engine, prompts):
    """Echo scoring as lm-eval's local-completions asks for it (echo, logprobs 1, max_tokens 0), and the log-probs
    of generated tokens, against one direct forward of the whole sequence."""
    import torch

    prompt = prompts[2]
    scored = engine.submit(Request(prompt, GenerationParams(max_new_tokens=0, logprobs=1), echo=True)).result()
    assert scored.completion_tokens == 0 and scored.text == "" and scored.finish_reason == "length"
    generated = engine.submit(Request(prompt, GenerationParams(max_new_tokens=8, logprobs=3), echo=True)).result()
    sequence = prompt + generated.token_ids
    with torch.inference_mode():
        reference = engine.model(torch.tensor([sequence])).logits[0].float().log_softmax(-1)
    assert scored.prompt_logprobs[0] is None and len(scored.prompt_logprobs) == len(prompt)
    for i, entry in enumerate(scored.prompt_logprobs[1:], 1):
        assert entry.token_id == prompt[i]
        assert entry.logprob == pytest.approx(float(reference[i - 1, prompt[i]]), abs=1e-4)
        best = int(reference[i - 1].argmax())
        assert entry.top[0][0] == best and entry.top[0][1] == pytest.approx(float(reference[i - 1, best]), abs=1e-4)
    assert [e.logprob for e in generated.prompt_logprobs[1:]] == pytest.approx(
        [e.logprob for e in scored.prompt_logprobs[1:]], abs=1e-5)
    with torch.inference_mode():  # a long prompt is scored a chunk of positions at a time: the same numbers
        logits = engine.model(torch.tensor([prompt])).logits[0].float()
    chunked = prompt_logprobs(logits, prompt, 1, chunk=7)
    assert [(e.token_id, e.top[0][0]) for e in chunked] == [(e.token_id, e.top[0][0]) for e in scored.prompt_logprobs[1:]]
    assert [e.logprob for e in chunked] == pytest.approx([e.logprob for e in scored.prompt_logprobs[1:]], abs=1e-5)
    assert len(generated.logprobs) == len(generated.token_ids) == 8
    for j, entry in enumerate(generated.logprobs):
        row = reference[len(prompt) + j - 1]
        assert entry.token_id == generated.token_ids[j]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
        assert entry.top[0][0] == entry.token_id  # greedy: the chosen token is the most likely


def test_seeded_sampling_does_not_depend_on_batch_companions(engine, prompts):
    params = GenerationParams(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=11)
    alone = engine.submit(Request(prompts[0], params)).result()
    companions = [Request(prompts[3], GenerationParams(max_new_tokens=20, temperature=1.0, seed=1)),
                  Request(prompts[1], GenerationParams(max_new_tokens=5, repetition_penalty=1.3)),
                  Request(prompts[0], params),
                  Request(prompts[4], GenerationParams(max_new_tokens=15, temperature=1.2))]
    assert staggered(engine, companions)[2].token_ids == alone.token_ids
    other = engine.submit(Request(prompts[0], GenerationParams(**{**params.__dict__, "seed": 12}))).result()
    assert other.token_ids != alone.token_ids


def test_repetition_penalty_equals_transformers(engine, prompts):
    for prompt in prompts[:3]:
        result = engine.submit(Request(prompt, GenerationParams(max_new_tokens=16, repetition_penalty=1.8))).result()
        assert result.token_ids == reference_greedy(engine, prompt, 16, repetition_penalty=1.8)


def test_presence_and_frequency_penalties_follow_openai(engine, prompts):
    """OpenAI's formula: logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty, counting the
    answer's tokens; greedy decoding with it, step by step over full forwards, is the reference."""
    import torch

    prompt = prompts[1]
    for presence, frequency in ((1.5, 0.0), (0.0, 2.0), (-1.0, 0.5)):
        ids: list[int] = []
        with torch.inference_mode():
            for _ in range(12):
                logits = engine.model(torch.tensor([prompt + ids])).logits[0, -1].float()
                counts = torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=logits.shape[-1])
                logits -= counts * frequency + (counts > 0) * presence
                ids.append(int(logits.argmax()))
                if ids[-1] in engine.stop_ids:
                    break
        expected = ids[:-1] if ids[-1] in engine.stop_ids else ids
        params = GenerationParams(max_new_tokens=12, presence_penalty=presence, frequency_penalty=frequency)
        assert engine.submit(Request(prompt, params)).result().token_ids == expected
    plain = engine.submit(Request(prompt, GenerationParams(max_new_tokens=12))).result().token_ids
    assert expected != plain or len(set(plain)) == len(plain)  # the penalties changed something


def test_logit_bias_forces_and_bans_tokens(engine, prompts):
    token = engine.tokenizer.encode("fever", add_special_tokens=False)[0]
    forced = engine.submit(Request(prompts[0], GenerationParams(max_new_tokens=5, logit_bias={token: 100}))).result()
    assert forced.token_ids == [token] * 5
    plain = engine.submit(Request(prompts[0], GenerationParams(max_new_tokens=1))).result().token_ids
    banned = engine.submit(Request(prompts[0], GenerationParams(max_new_tokens=1, logit_bias={plain[0]: -100})))
    assert banned.result().token_ids != plain


def test_json_schema_grammar_output_parses_and_validates(engine, prompts):
    from typing import Literal

    import xgrammar
    from pydantic import BaseModel, Field

    class Answer(BaseModel):  # bounded, so a random model's answer ends within the token budget
        diagnosis: Literal["flu", "common cold", "asthma"]
        urgent: bool
        days: int = Field(ge=0, le=30)
        advice: list[Literal["rest", "fluids", "see a doctor"]] = Field(max_length=3)

    grammar = str(xgrammar.Grammar.from_json_schema(Answer, any_whitespace=False))
    requests = [Request(prompts[i % len(prompts)], GenerationParams(max_new_tokens=150, temperature=1.0, seed=i,
                                                                     grammar=grammar)) for i in range(4)]
    requests.append(Request(prompts[0], GenerationParams(max_new_tokens=150, grammar=grammar)))  # greedy
    for result in engine.run(requests):
        assert result.finish_reason == "stop", result.text
        Answer.model_validate_json(result.text)  # pydantic: parses and validates, else raises
    with pytest.raises(UserError, match="grammar"):
        engine.submit(Request(prompts[0], GenerationParams(grammar="root ::= undefined_rule"))).result()


def test_one_bad_request_fails_alone(engine, prompts):
    """Issue 14: extreme accepted values, a failing callback and a row that makes the batch forward fail, each
    sharing a running batch with 6 innocent requests: only the bad ones fail, the innocent answer as alone."""
    poison = engine.tokenizer.encode(" poison", add_special_tokens=False)[0]

    def refuse_poison(module, args):  # any forward (a prefill or a decoding step) that carries the token
        if (args[0] == poison).any():
            raise RuntimeError("this token breaks the model")

    def broken_callback(delta):
        raise ConnectionError("the client went away mid-write")

    innocent = [Request(prompts[i % len(prompts)], GenerationParams(max_new_tokens=8 + i)) for i in range(6)]
    alone = [engine.submit(Request(r.prompt_ids, r.params)).result() for r in innocent]
    bad = [Request(prompts[0], GenerationParams(max_new_tokens=8, logit_bias={poison: 100})),
           Request(prompts[1], GenerationParams(max_new_tokens=8), on_text=broken_callback),
           Request(prompts[2], GenerationParams(max_new_tokens=8, temperature=1.0, seed=2**70)),
           Request(prompts[2], GenerationParams(max_new_tokens=8, temperature=1.0, repetition_penalty=1e-300)),
           Request([engine.vocab_size + 5], GenerationParams(max_new_tokens=8)),
           Request(prompts[1][:3] + [poison] + prompts[1][3:], GenerationParams(max_new_tokens=8))]  # its prefill
    tiny_temperature = Request(prompts[3], GenerationParams(max_new_tokens=8, temperature=1e-300))
    hook = engine.model.get_input_embeddings().register_forward_pre_hook(refuse_poison)
    try:
        mixed = [innocent[0], bad[0], innocent[1], innocent[2], bad[1], bad[2], innocent[3], bad[5],
                 tiny_temperature, bad[3], innocent[4], bad[4], innocent[5]]
        futures = [engine.submit(r) for r in mixed]
        outcomes = {id(r): f.exception(timeout=120) or f.result() for r, f in zip(mixed, futures)}
    finally:
        hook.remove()
    assert [outcomes[id(r)].token_ids for r in innocent] == [a.token_ids for a in alone]
    assert isinstance(outcomes[id(bad[0])], RuntimeError) and isinstance(outcomes[id(bad[1])], ConnectionError)
    assert isinstance(outcomes[id(bad[5])], RuntimeError)
    for request, field in ((bad[2], "seed"), (bad[3], "repetition_penalty"), (bad[4], "vocabulary")):
        assert isinstance(outcomes[id(request)], UserError) and field in str(outcomes[id(request)])
    # a temperature too small to divide by decodes greedily (vLLM's rule)
    greedy = engine.submit(Request(prompts[3], GenerationParams(max_new_tokens=8))).result()
    assert outcomes[id(tiny_temperature)].token_ids == greedy.token_ids
    assert engine.running() == 0


def test_cancellation_frees_the_row_within_one_step(engine, prompts):
    batch_sizes: list[int] = []
    hook = engine.model.register_forward_pre_hook(lambda m, a, kw: batch_sizes.append(kw["input_ids"].shape[0]),
                                                  with_kwargs=True)
    deltas: list[str] = []
    cancelled_at: list[int] = []
    target = Request(prompts[0], GenerationParams(max_new_tokens=200, temperature=1.0, seed=3))

    def on_text(delta):
        deltas.append(delta)
        if len(deltas) == 3:
            target.cancelled = True
            cancelled_at.append(len(batch_sizes))

    target.on_text = on_text
    try:
        companion = engine.submit(Request(prompts[1], GenerationParams(max_new_tokens=30, temperature=1.0, seed=4)))
        result = engine.submit(target).result(timeout=60)
        companion.result(timeout=60)
    finally:
        hook.remove()
    assert result.finish_reason == "stop" and result.text == "".join(deltas)
    assert result.completion_tokens < 200
    assert set(batch_sizes[cancelled_at[0]:]) <= {1}  # no forward after the cancel carried the cancelled row
    waiting = Request(prompts[0], GenerationParams(max_new_tokens=5), cancelled=True)
    assert engine.submit(waiting).result().completion_tokens == 0


def test_engine_limits_are_request_errors(engine, prompts):
    for request, match in ((Request([], GenerationParams()), "empty"),
                           (Request(prompts[0], GenerationParams(logit_bias={engine.vocab_size: 1.0})), "logit_bias"),
                           (Request([1] * engine.max_context, GenerationParams()), "context"),
                           (Request(prompts[0], GenerationParams(top_p=0)), "top_p")):
        with pytest.raises(UserError, match=match):
            engine.submit(request).result()
    room = engine.max_context - 3
    result = engine.submit(Request([prompts[0][0]] * room, GenerationParams(max_new_tokens=50))).result()
    assert result.completion_tokens <= 3


def test_an_engine_nobody_holds_is_freed_with_its_thread(tiny_model):
    """Engines are opened per command and per test: the scheduler thread must not keep the model alive."""
    import gc
    import time
    import weakref

    engine = load_engine(tiny_model, dtype="fp32")
    assert engine.submit(Request([1, 2, 3], GenerationParams(max_new_tokens=2))).result().completion_tokens >= 1
    ref, thread = weakref.ref(engine), engine._thread
    del engine
    deadline = time.monotonic() + 10
    while (ref() is not None or thread.is_alive()) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.1)
    assert ref() is None and not thread.is_alive()
    closed = load_engine(tiny_model, dtype="fp32")
    closed.close()
    with pytest.raises(UserError, match="closed"):
        closed.submit(Request([1, 2, 3], GenerationParams(max_new_tokens=2))).result()


def test_a_with_block_closes_the_engine_and_closing_twice_is_harmless(tiny_model):
    """`with load_engine(...) as engine:` ends the scheduler thread at the end of the block, a request still
    running then fails as closed, and a second `close()` does nothing."""
    from _inference import closes_its_engines

    with closes_its_engines():
        with load_engine(tiny_model, dtype="fp32") as engine:
            thread = engine._thread
            assert engine.generate(QUESTIONS[:1], GenerationParams(max_new_tokens=2))[0].completion_tokens >= 1
            running = engine.submit(Request([1, 2, 3], GenerationParams(max_new_tokens=1500)))
        assert not thread.is_alive()
        with pytest.raises(UserError, match="closed"):
            running.result(timeout=1)
        engine.close()
        engine.close()
        with pytest.raises(UserError, match="closed"):
            engine.submit(Request([1, 2, 3], GenerationParams(max_new_tokens=2))).result()


def test_an_engine_left_open_is_closed_before_the_interpreter_tears_down(tiny_model):
    """A program that exits while its engine is mid-generation, never having closed it, exits 0: at exit the
    engine is closed and its thread joined before teardown (a scheduler thread inside a torch op at teardown
    aborts the process with "terminate called without an active exception", exit 134)."""
    import subprocess
    import sys

    script = ("import time\n"
              "from medgpt.infer.base import GenerationParams, Request\n"
              "from medgpt.infer.engine import load_engine\n"
              f"engine = load_engine({tiny_model!r}, dtype='fp32')\n"
              "future = engine.submit(Request([1, 2, 3], GenerationParams(max_new_tokens=1500)))\n"
              "while not engine.running():\n"
              "    time.sleep(0.01)\n"
              "time.sleep(0.3)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-2000:]
