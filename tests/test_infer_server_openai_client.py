"""The API server through real clients: the official `openai` package for every endpoint (streaming, n, seeds,
log-probs, JSON schema, tools), transformers' own forward pass and greedy decoding for the log-probs, and the chat
templates' own tool format for the tool calls, and lm-evaluation-harness's `local-completions` client scoring
multiple choice, which must give the numbers and choices of `medgpt eval mcq`'s scorer."""

from __future__ import annotations

import json

import httpx
import pytest
from _inference import openai_client, serving

from medgpt.infer.base import GenerationParams
from medgpt.infer.engine import load_engine
from medgpt.infer.server import ServerSettings, create_app, running_server
from medgpt.infer.tool_calls import parse_tool_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}
DOSE = {"type": "function", "function": {
    "name": "dose", "description": "A drug's dose.",
    "parameters": {"type": "object", "properties": {"drug": {"type": "string", "enum": ["aspirin"]},
                                                    "mg": {"type": "integer", "enum": [100, 300]}},
                   "required": ["drug", "mg"], "additionalProperties": False}}}
QUESTION = [{"role": "user", "content": "What is a fever?"}]


@pytest.fixture(scope="module")
def served(tiny_model):
    """The tiny model with the qwen template (a tool format; the bundled tokenizer is ChatML like Qwen's)."""
    engine = load_engine(tiny_model, template="qwen", dtype="fp32", max_batch_size=8)
    settings = ServerSettings(defaults=GenerationParams(max_new_tokens=8), max_tokens_cap=128)
    with serving(engine, settings, "tiny") as running:
        yield running


@pytest.fixture(scope="module")
def client(served):
    return openai_client(served[0])


@pytest.fixture(scope="module")
def reference(tiny_model):
    """transformers' own model (fp32): the log-probabilities every answer is checked against."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype="float32").eval()


def next_token_logprobs(model, ids: list[int]):
    import torch

    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_models_and_openai_errors(client, served):
    import openai

    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.get("/nowhere", cast_to=dict)
    assert missing.value.body["message"].startswith("no such endpoint")
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model="tiny", messages=QUESTION, extra_body={"best_of": 3})
    assert unknown.value.body["param"] == "best_of" and "unrecognized" in unknown.value.body["message"]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=129)
    assert too_long.value.body["param"] == "max_tokens" and "at most 128" in too_long.value.body["message"]
    reply = httpx.put(f"{served[0]}/v1/chat/completions")
    assert reply.status_code == 405 and set(reply.json()["error"]) == {"message", "type", "param", "code"}
    for choice in ({"type": "function", "function": "dose"}, {"type": "function", "function": {"name": "nope"}}):
        reply = httpx.post(f"{served[0]}/v1/chat/completions", json={"messages": QUESTION, "tools": [DOSE],
                                                                     "tool_choice": choice})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "tool_choice"
    bad_schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    reply = httpx.post(f"{served[0]}/v1/chat/completions", json={"messages": QUESTION, "tools": [bad_schema],
                                                                 "tool_choice": "required"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "tools"


def test_chat_n_seeds_roles_and_usage(client, served):
    _, engine = served
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "a fever?"}]}]
    reply = client.chat.completions.create(model="tiny", messages=messages, n=3, seed=11, temperature=1.0,
                                           max_completion_tokens=6, max_tokens=40)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a fever?"}]
    counted = 0
    for k, choice in enumerate(reply.choices):  # choice k samples with seed + k, as one request with that seed
        alone = engine.generate([plain], GenerationParams(max_new_tokens=6, temperature=1.0, seed=11 + k))[0]
        assert choice.message.content == alone.text and choice.finish_reason == alone.finish_reason
        counted += alone.completion_tokens
    assert reply.usage.prompt_tokens == len(engine.encode(plain))  # the prompt counts once for n choices
    assert reply.usage.completion_tokens == counted
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, n=3, seed=11, temperature=1.0,
                                                 max_completion_tokens=6, stream=True))
    streamed = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
                for i in range(3)}
    assert streamed == {c.index: c.message.content for c in reply.choices}


def test_assistant_tool_call_turn_with_null_content(client, served):
    """OpenAI's shape of an earlier call (content null, arguments as JSON text) reaches the template as its own
    training format has it (arguments as an object): the prompt is the one the template renders."""
    _, engine = served
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    turns = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "user", "content": "And in Rome?"}]
    reply = client.chat.completions.create(model="tiny", messages=turns, tools=[WEATHER], max_tokens=2)
    as_trained = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [
        {**call, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}, turns[-1]]
    assert reply.usage.prompt_tokens == len(engine.encode(as_trained, tools=[WEATHER]))
    without_tools = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2)
    assert reply.usage.prompt_tokens > without_tools.usage.prompt_tokens + 20  # the tools are in the prompt


def test_penalties_and_logit_bias_are_honoured(client, served):
    """Each field reaches the engine: the answer is the engine's own for the same settings, and not the plain one."""
    _, engine = served
    greedy = engine.generate([QUESTION], GenerationParams(max_new_tokens=8))[0]
    plain, banned = greedy.text, greedy.token_ids[0]
    for fields, params in (({"frequency_penalty": 2.0, "presence_penalty": 1.5},
                            {"frequency_penalty": 2.0, "presence_penalty": 1.5}),
                           ({"extra_body": {"repetition_penalty": 3.0}}, {"repetition_penalty": 3.0}),
                           ({"logit_bias": {str(banned): -100}}, {"logit_bias": {banned: -100.0}})):
        reply = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0, **fields)
        expected = engine.generate([QUESTION], GenerationParams(max_new_tokens=8, **params))[0].text
        assert reply.choices[0].message.content == expected != plain


def test_tool_results_in_the_conversation(client):
    tool_turns = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}, {"role": "user", "content": "And so?"}]
    after_tool = client.chat.completions.create(model="tiny", messages=tool_turns, tools=[WEATHER], max_tokens=4)
    assert after_tool.choices[0].finish_reason in ("stop", "length")
    # the model answers right after a tool result, and the result's text is in its prompt
    sizes = []
    for result in ("sunny", "sunny, 24 degrees, light wind from the west"):
        turns = [*tool_turns[:2], {"role": "tool", "tool_call_id": "call_1", "content": result}]
        reply = client.chat.completions.create(model="tiny", messages=turns, tools=[WEATHER], max_tokens=2)
        sizes.append(reply.usage.prompt_tokens)
    assert sizes[1] > sizes[0]


def test_chat_logprobs_are_the_models(client, served, reference):
    _, engine = served
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 5
    ids = engine.encode(QUESTION)
    import torch

    with torch.inference_mode():  # transformers' own greedy decoding gives the tokens
        generated = reference.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, min_new_tokens=5,
                                       pad_token_id=engine.tokenizer.pad_token_id)[0, len(ids):].tolist()
    assert reply.choices[0].message.content == engine.tokenizer.decode(generated)
    table = next_token_logprobs(reference, ids + generated)
    for step, entry in enumerate(content):
        row = table[len(ids) - 1 + step]
        best = row.topk(3)
        assert [t.token for t in entry.top_logprobs] == [engine.tokenizer.decode([i]) for i in best.indices.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert entry.token == entry.top_logprobs[0].token  # greedy: the most likely token
        assert entry.logprob == pytest.approx(best.values[0].item(), abs=1e-4)
        assert bytes(entry.bytes).decode("utf-8") == entry.token
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_completions_echo_scores_the_prompt(client, served, reference):
    _, engine = served
    ids = engine.tokenizer.encode("The patient has a fever and a cough.")
    reply = client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=2, max_tokens=0)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert choice.text == engine.tokenizer.decode(ids) and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    table = next_token_logprobs(reference, ids)
    expected = [table[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    for i in range(1, len(ids)):
        assert len(lp.top_logprobs[i]) in (2, 3) and lp.tokens[i] in lp.top_logprobs[i]
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 0
    whole = client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=2, max_tokens=2, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=2, max_tokens=2,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs] == [whole.choices[0].logprobs]
    assert whole.choices[0].logprobs.tokens[:len(ids)] == lp.tokens and len(whole.choices[0].logprobs.tokens) == \
        len(ids) + 2

    batch = client.completions.create(model="tiny", prompt=["Fever is", "A cough is"], n=2, max_tokens=3,
                                      temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    from medgpt.infer.base import Request

    for k, text in enumerate(["Fever is", "A cough is"]):
        expected = engine.run([Request(engine.tokenizer.encode(text), GenerationParams(max_new_tokens=3))])[0]
        assert batch.choices[2 * k].text == batch.choices[2 * k + 1].text == expected.text
    streamed = list(client.completions.create(model="tiny", prompt="Fever is", max_tokens=3, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == batch.choices[0].text
    assert streamed[-1].usage.completion_tokens == 3


def test_json_schema_output_parses(client):
    schema = {"type": "object", "properties": {"urgent": {"type": "boolean"},
                                               "triage": {"type": "string", "enum": ["red", "amber", "green"]}},
              "required": ["urgent", "triage"], "additionalProperties": False}
    for seed in (1, 2):
        reply = client.chat.completions.create(
            model="tiny", messages=QUESTION, max_tokens=128, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "triage", "schema": schema}})
        data = json.loads(reply.choices[0].message.content)
        assert set(data) == {"urgent", "triage"} and isinstance(data["urgent"], bool)
        assert data["triage"] in ("red", "amber", "green") and reply.choices[0].finish_reason == "stop"
    obj = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=128, temperature=0,
                                         response_format={"type": "json_object"}, logit_bias={"90": 5})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:  # cut at max_tokens: still a prefix of a JSON object
        assert obj.choices[0].message.content.lstrip().startswith("{")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "dose"}}])
def test_forced_tool_calls_come_back_as_tool_calls(client, choice):
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, tools=[WEATHER, DOSE],
                                           tool_choice=choice, max_tokens=128, temperature=1.0, seed=3)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert arguments in ({"city": "Paris"}, {"city": "Rome"})
    else:
        assert call.function.name == "dose" and arguments["drug"] == "aspirin" and arguments["mg"] in (100, 300)
    if isinstance(choice, dict):
        assert call.function.name == "dose"
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, tools=[WEATHER, DOSE],
                                                 tool_choice=choice, max_tokens=128, temperature=1.0, seed=3,
                                                 stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [(call.function.name, arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("template", ["qwen", "qwen3", "llama3.1", "mistral"])
def test_tool_calls_parse_back_from_the_templates_own_format(template):
    """What the template writes for an assistant's calls (the format checked against the official Jinja in
    test_templates) parses back into the same calls."""
    from medgpt.data.templates import get_template

    tmpl = get_template(template, None)
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]
    if template != "llama3.1":
        calls.append({"type": "function", "function": {"name": "dose", "arguments": {"drug": "aspirin", "mg": 100}}})
    messages = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": calls}]
    reply = "".join(text for text, labelled in tmpl.segments(messages, tools=[WEATHER, DOSE]) if labelled)
    for stop in (*tmpl.stop_words, "</s>"):
        reply = reply.removesuffix(stop)
    content, parsed = parse_tool_calls(reply, tmpl.tool_format, [WEATHER, DOSE])
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == [(c["function"]["name"], c["function"]["arguments"])
                                                                   for c in calls]
    if template == "mistral":
        assert all(len(c.id) == 9 and c.id.isalnum() for c in parsed)
    assert parse_tool_calls("It is sunny.", tmpl.tool_format, [WEATHER]) == ("It is sunny.", [])
    assert parse_tool_calls(reply, tmpl.tool_format, [DOSE])[1] == []  # a tool not offered is not a call


def test_metrics_count_requests_tokens_and_errors(client, served):
    from prometheus_client.parser import text_string_to_metric_families

    client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=3)
    httpx.post(f"{served[0]}/v1/chat/completions", content=b"{")
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{served[0]}/metrics").text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("medgpt_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))] >= 1
    assert samples[("medgpt_errors_total", (("status", "400"),))] >= 1
    assert samples[("medgpt_generation_tokens_total", ())] >= 3
    assert samples[("medgpt_time_to_first_token_seconds_count", ())] >= 1
    assert ("medgpt_queue_length", ()) in samples and ("medgpt_time_per_output_token_seconds_count", ()) in samples


def test_lm_eval_local_completions_picks_what_eval_mcq_picks(served, tiny_model, reference):
    """lm-evaluation-harness's own `local-completions` client scores A-D through /v1/completions (echo + logprobs,
    token-id prompts, as `lm_eval --model local-completions` sends them); pooled over each letter's spellings as
    `medgpt eval mcq` does, the choice per question is the one its LoglikScorer makes on the same model and prompt."""
    import math

    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from medgpt.eval.mcq import LETTERS, LoglikScorer, Question, evaluate_loglik, prompt_text

    url, engine = served
    items = [("Which organ pumps blood around the body?", ("liver", "heart", "lung", "kidney")),
             ("Which bone is in the thigh?", ("ulna", "radius", "femur", "tibia")),
             ("Which organ makes insulin?", ("spleen", "stomach", "skin", "pancreas")),
             ("Which gas do the lungs take in from the air?", ("helium", "nitrogen", "argon", "oxygen"))]
    questions = [Question(str(i), "anatomy", q, choices, "A", f"q:{i}") for i, (q, choices) in enumerate(items)]
    shots = [Question("s", "anatomy", "Which organ filters the blood to make urine?", ("brain", "kidney", "heart",
                                                                                       "skin"), "B", "s")]
    scorer = LoglikScorer(reference, engine.tokenizer, engine.template, batch_size=8)
    items = evaluate_loglik(scorer, {"anatomy": questions}, {"anatomy": shots}, "mmlu", chat=False, max_length=2048,
                            n_shots=1)
    assert [item["shots"] for item in items] == [1] * len(questions)

    harness = LocalCompletionsAPI(base_url=f"{url}/v1/completions", model="tiny", tokenizer=tiny_model,
                                  tokenizer_backend="huggingface", tokenized_requests=True, batch_size=8,
                                  max_retries=1, max_length=2048)
    texts = [prompt_text(q, shots, "mmlu") for q in questions]
    cands = [scorer.candidates(text) for text in texts]
    requests = [(("", ""), scorer.encode(text), [t]) for text, letters in zip(texts, cands)
                for spellings in letters for t in spellings]
    scores = iter([loglik for loglik, _ in harness._loglikelihood_tokens(requests)])
    for item, letters in zip(items, cands):
        pooled = [math.log(sum(math.exp(next(scores)) for _ in spellings)) for spellings in letters]
        assert pooled == pytest.approx([item["loglik"][k] for k in LETTERS], abs=1e-3)  # the same numbers
        assert LETTERS[max(range(len(LETTERS)), key=pooled.__getitem__)] == item["pred"]


def test_the_stop_token_comes_back_with_its_log_prob(client, served, reference):
    """A completion that ends on the model's stop token lists that token in `tokens`, `token_logprobs`,
    `top_logprobs` and `text_offset` (as vLLM does; its text stays out of `text`), so lm-eval's
    `token_logprobs[ctxlen:-1]` still holds the whole continuation; chat's `logprobs.content` lists it too."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    _, engine = served
    tok = engine.tokenizer
    ids = tok.encode("The patient has a fever and a cough.")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert eos in engine.stop_ids
    forced = {"logit_bias": {str(eos): 100}, "temperature": 0}  # the first generated token is the stop token
    whole = client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=2, max_tokens=1, **forced)
    choice, lp = whole.choices[0], whole.choices[0].logprobs
    table = next_token_logprobs(reference, ids)
    assert choice.text == tok.decode(ids) and choice.finish_reason == "stop" and whole.usage.completion_tokens == 1
    assert lp.tokens == [tok.decode([i]) for i in ids] + ["<|im_end|>"]
    assert lp.token_logprobs[-1] == pytest.approx(table[-1, eos].item(), abs=1e-4)  # the raw log-prob, before bias
    assert "<|im_end|>" in lp.top_logprobs[-1] and lp.text_offset[-1] == len(choice.text)
    ctxlen = len(ids) - 1  # lm-eval's request: context ids[:-1], continuation ids[-1:]
    [(loglik, _)] = LocalCompletionsAPI.parse_logprobs(whole.model_dump(), ctxlens=[ctxlen])
    assert loglik == pytest.approx(table[-2, ids[-1]].item(), abs=1e-4)
    chunks = list(client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=2, max_tokens=1,
                                            stream=True, **forced))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs] == [lp]

    chat = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=4, logprobs=True,
                                          top_logprobs=2, **forced)
    content = chat.choices[0].logprobs.content
    assert chat.choices[0].message.content == "" and chat.usage.completion_tokens == len(content) == 1
    prompt = engine.encode(QUESTION)
    assert content[0].token == "<|im_end|>"
    assert content[0].logprob == pytest.approx(next_token_logprobs(reference, prompt)[-1, eos].item(), abs=1e-4)
    streamed = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=4, logprobs=True,
                                                   top_logprobs=2, stream=True, **forced))
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in content]


@pytest.mark.slow
def test_lm_eval_over_http_scores_continuations_the_model_ends_on(bundled_model):
    """lm-eval's `local-completions` client through /v1/completions gives the log-likelihoods and greediness of
    lm-eval's own `hf` model, for continuations after which the bundled model's next token is its stop token
    (`<|im_end|>`, checked below; the continuation's log-prob must not be dropped) and for others."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    engine = load_engine(bundled_model, dtype="fp32", max_batch_size=8)
    tok = engine.tokenizer
    items = [("Which organ pumps blood around the body?", ["heart", "Heart.", "liver", "Lung"]),
             ("Which organ makes insulin?", ["skin", "Pancreas."]),
             ("Which gas do the lungs take in from the air?", ["oxygen", "Nitrogen"])]
    requests = []
    for question, answers in items:
        ctx = tok.apply_chat_template([{"role": "user", "content": f"{question} Answer in one word."}],
                                      add_generation_prompt=True, tokenize=False)
        requests += [((ctx, answer), tok.encode(ctx), tok.encode(answer)) for answer in answers]
    settings = ServerSettings(defaults=GenerationParams(max_new_tokens=8))
    with running_server(create_app(engine, settings, model_name="bundled")) as url:
        harness = LocalCompletionsAPI(base_url=f"{url}/v1/completions", model="bundled", tokenizer=bundled_model,
                                      tokenizer_backend="huggingface", tokenized_requests=True, batch_size=8,
                                      max_retries=1, max_length=2048)
        over_http = harness._loglikelihood_tokens(requests)
        ends = []  # the token the model generates right after each continuation
        for _, ctx_ids, cont_ids in requests:
            reply = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "prompt": ctx_ids + cont_ids, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True})
            ends.append(reply.json()["choices"][0]["logprobs"]["tokens"][-1])
    engine.close()
    reference = HFLM(pretrained=bundled_model, dtype="float32", device="cpu", batch_size=8)
    expected = reference._loglikelihood_tokens(requests)
    assert [loglik for loglik, _ in over_http] == pytest.approx([loglik for loglik, _ in expected], abs=1e-3)
    assert [greedy for _, greedy in over_http] == [greedy for _, greedy in expected]
    assert ends == ["<|im_end|>"] * 3 + [".", "<|im_end|>", "<|im_end|>", "<|im_end|>", " is"]


@pytest.mark.slow
def test_temperature_0_through_medgpt_serve_is_greedy(bundled_model, monkeypatch):
    """`medgpt serve` applies what the client sends, then the model's generation_config (the bundled model's sets
    no sampling), then OpenAI's and vLLM's defaults: at temperature 0 every chosen token is the top-1 of its own
    top_logprobs and the text is transformers' greedy decoding (with medgpt's chat default repetition penalty 1.1,
    2 of these 16 tokens were not); /v1/models says which defaults apply. `--chat-defaults` puts medgpt's chat
    defaults in place of the neutral ones."""
    import torch
    from openai import OpenAI
    from transformers import AutoModelForCausalLM

    from medgpt.cli import main

    seen = {}

    def serve_here(app, host, port):
        with running_server(app) as url:
            client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
            seen["defaults"] = client.models.list().data[0].model_extra.get("medgpt_defaults")
            seen["reply"] = client.chat.completions.create(model="m", messages=QUESTION, temperature=0,
                                                           max_tokens=16, logprobs=True, top_logprobs=3)
            seen["prompt"], seen["tokenizer"] = app.state.engine.encode(QUESTION), app.state.engine.tokenizer

    monkeypatch.setattr("medgpt.infer.server.serve", serve_here)
    assert main(["serve", "--model", bundled_model, "--dtype", "fp32"]) == 0
    reply, ids = seen["reply"], seen["prompt"]
    content = reply.choices[0].logprobs.content
    assert len(content) == 16
    assert [e.token for e in content] == [e.top_logprobs[0].token for e in content]  # each the top-1
    reference = AutoModelForCausalLM.from_pretrained(bundled_model, dtype="float32").eval()
    with torch.inference_mode():
        greedy = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                    pad_token_id=reference.generation_config.pad_token_id)[0, len(ids):].tolist()
    assert reply.choices[0].message.content == seen["tokenizer"].decode(greedy, skip_special_tokens=True)
    neutral = "OpenAI's and vLLM's default"
    assert {k: seen["defaults"][k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")} == {
        "temperature": {"value": 1.0, "from": neutral}, "top_p": {"value": 1.0, "from": neutral},
        "top_k": {"value": 0, "from": neutral}, "repetition_penalty": {"value": 1.0, "from": neutral}}

    assert main(["serve", "--model", bundled_model, "--dtype", "fp32", "--chat-defaults", "--top-p", "0.8"]) == 0
    assert {k: seen["defaults"][k] for k in ("repetition_penalty", "top_p")} == {
        "repetition_penalty": {"value": 1.1, "from": "medgpt's chat default"},
        "top_p": {"value": 0.8, "from": "--top-p"}}
