"""A reasoning model served, predicting and chatting: a tiny SFT (template qwen3) on a shipped reasoning sample
(src/medgpt/sample_data/sft/medical_reasoning.jsonl, its first reasoning line and answer sentence, so the tiny model
can learn it by heart in a few seconds) answers through the official `openai` client with the reasoning in
`reasoning_content` and the answer alone in `content`, streamed as reasoning deltas before content deltas; predict
writes its `reasoning` and `response` apart, the terminal chat shows the reasoning marked before the answer, `eval gen`
and report answers score and show the answer after the reasoning (a reply cut inside it: unanswered);
`chat_template_kwargs: {"enable_thinking": false}` renders Qwen3's non-thinking prompt (the official template's,
tests/fixtures/chat_templates/qwen3.jinja) and its reply is all content; an unknown template option is a 400.
A LoRA run's adapter folder and its merged model render every prompt as medgpt's qwen3 template does."""

from __future__ import annotations

import json

import httpx
import pytest
from _inference import openai_client, serving
from _stage_runs import train
from test_data_templates_reasoning import official

from medgpt.data.messages import reply_parts
from medgpt.infer.base import GenerationParams
from medgpt.infer.engine import load_engine
from medgpt.infer.server import ServerSettings

pytestmark = pytest.mark.slow


def shipped_record(sample_data) -> dict:
    """The lisinopril record of the shipped samples, cut to its first reasoning line and first answer sentence."""
    rows = [json.loads(line) for line in (sample_data / "sft" / "medical_reasoning.jsonl").open(encoding="utf-8")]
    row = next(r for r in rows if "lisinopril" in r.get("Question", ""))
    return {**row, "Complex_CoT": row["Complex_CoT"].split("\n")[0], "Response": row["Response"].split(". ")[0] + "."}


@pytest.fixture(scope="module")
def record(sample_data):
    return shipped_record(sample_data)


@pytest.fixture(scope="module")
def trained(tiny_model, record, tmp_path_factory) -> str:
    """The tiny model trained (full, greedy-reproducible) on the one record until it knows it by heart."""
    tmp = tmp_path_factory.mktemp("reasoning-sft")
    data = tmp / "one.jsonl"
    data.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    train("sft", tiny_model, tmp / "sft", str(data), template="qwen3", allow_split_markers=True, max_length=256,
          method="full", max_steps=50, learning_rate=1e-2, per_device_train_batch_size=1, logging_steps=50)
    return str(tmp / "sft")


@pytest.fixture(scope="module")
def served(trained):
    engine = load_engine(trained, dtype="fp32")
    settings = ServerSettings(defaults=GenerationParams(max_new_tokens=96, temperature=0.0), max_tokens_cap=128)
    with serving(engine, settings, "reasoner") as running:
        yield running


@pytest.fixture(scope="module")
def client(served):
    return openai_client(served[0])


def test_served_reply_has_its_reasoning_apart(client, served, record):
    _, engine = served
    assert engine.template.name == "qwen3"  # recorded by the training run
    question = [{"role": "user", "content": record["Question"]}]
    reply = client.chat.completions.create(model="reasoner", messages=question, temperature=0)
    message = reply.choices[0].message
    assert message.reasoning_content == record["Complex_CoT"]
    assert message.content == record["Response"]
    raw = engine.generate([question], GenerationParams(max_new_tokens=96))[0].text
    assert reply_parts(raw) == (record["Complex_CoT"], record["Response"], True) and raw.startswith("<think>")

    chunks = list(client.chat.completions.create(model="reasoner", messages=question, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    kinds = [k for d in deltas for k in ("r", "c") if getattr(d, {"r": "reasoning_content", "c": "content"}[k], None)]
    assert kinds == sorted(kinds, key="rc".index) and "r" in kinds and "c" in kinds  # reasoning first
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == record["Complex_CoT"]
    assert "".join(d.content or "" for d in deltas) == record["Response"]

    seed = httpx.post(f"{served[0]}/chat", json={"message": record["Question"], "temperature": 0}, timeout=60).json()
    assert (seed["reasoning"], seed["response"]) == (record["Complex_CoT"], record["Response"])  # the seed's /chat

    # cut inside its reasoning: no answer, the reasoning so far
    cut = client.chat.completions.create(model="reasoner", messages=question, temperature=0, max_tokens=4)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content == ""
    assert record["Complex_CoT"].startswith(cut.choices[0].message.reasoning_content)


def test_enable_thinking_false_and_unknown_options(client, served, record, tokenizer):
    url, engine = served
    question = [{"role": "user", "content": record["Question"]}]
    reply = client.chat.completions.create(model="reasoner", messages=question, temperature=0, max_tokens=8,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert getattr(reply.choices[0].message, "reasoning_content", None) is None  # the prompt closed the think block
    rendered = tokenizer.decode(engine.encode(question, enable_thinking=False))
    assert rendered == official(question, True, enable_thinking=False)
    assert reply.usage.prompt_tokens == len(engine.encode(question, enable_thinking=False))

    body = {"model": "reasoner", "messages": question, "max_tokens": 2}
    for kwargs, param in [({"thinking_budget": 10}, "chat_template_kwargs.thinking_budget"),
                          ({"enable_thinking": "no"}, "chat_template_kwargs.enable_thinking")]:
        response = httpx.post(f"{url}/v1/chat/completions", json={**body, "chat_template_kwargs": kwargs})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    # an earlier assistant turn may come back with its reasoning_content (Qwen3 drops it from history)
    turns = [*question, {"role": "assistant", "content": "x", "reasoning_content": "y"}, *question]
    assert httpx.post(f"{url}/v1/chat/completions", json={**body, "messages": turns}).status_code == 200


def test_merged_model_renders_as_the_adapter_run(tiny_model, record, tmp_path):
    """Reference: medgpt's qwen3 rendering, itself checked against Qwen3's official template."""
    from medgpt.data.templates import get_template
    from medgpt.models import load_tokenizer, merge_adapter

    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    train("sft", tiny_model, tmp_path / "lora", str(data), template="qwen3", allow_split_markers=True,
          max_length=256, max_steps=1)
    merged = merge_adapter(str(tmp_path / "lora"), str(tmp_path / "merged"))
    qwen3 = get_template("qwen3")
    conversations = [[{"role": "user", "content": record["Question"]}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.",
                                                        "reasoning": "A greeting."}, {"role": "user", "content": "Bye"}]]
    for folder in (tmp_path / "lora", merged):
        tokenizer = load_tokenizer(str(folder))
        with load_engine(tiny_model if folder.name == "lora" else str(folder),
                         adapter=str(folder) if folder.name == "lora" else None, dtype="fp32") as engine:
            assert engine.template.name == "qwen3"
            for messages in conversations:
                for think in (True, False):
                    expected = qwen3.render(messages, add_generation_prompt=True, enable_thinking=think)
                    assert tokenizer.decode(engine.encode(messages, enable_thinking=think)) == expected
                    # each folder's tokenizer has the training template as its own, as other tools render it
                    hf = [{**{k: v for k, v in m.items() if k != "reasoning"}, "reasoning_content": m["reasoning"]}
                          if "reasoning" in m else m for m in messages]
                    assert tokenizer.apply_chat_template(hf, tokenize=False, add_generation_prompt=True,
                                                         enable_thinking=think) == expected


def test_predict_and_chat_show_the_reasoning_apart(served, record, tmp_path):
    import io

    from medgpt.infer.chat import ChatSession, run_chat
    from medgpt.infer.predict import predict_file

    _, engine = served
    params = GenerationParams(max_new_tokens=96)
    rows = [{"id": 1, "question": record["Question"]}]
    source = tmp_path / "q.jsonl"
    source.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    predict_file(engine, source, tmp_path / "a.jsonl", params)
    written = json.loads((tmp_path / "a.jsonl").read_text(encoding="utf-8"))
    assert written == {**rows[0], "reasoning": record["Complex_CoT"], "response": record["Response"]}
    assert predict_file(engine, source, tmp_path / "a.jsonl", params)["generated"] == 0  # resumable as before

    session = ChatSession(engine, params)
    lines = iter([record["Question"], "/exit"])
    out = io.StringIO()
    run_chat(session, read=lambda prompt: next(lines), out=out)
    shown = f"assistant> (reasoning)\n│ {record['Complex_CoT']}\n(answer)\n{record['Response']}\n"
    assert shown in out.getvalue(), out.getvalue()
    assert session.history[-1] == {"role": "assistant", "content": record["Response"],
                                   "reasoning": record["Complex_CoT"]}
    cut = ChatSession(engine, GenerationParams(max_new_tokens=4))
    assert "".join(cut.reply(record["Question"])) == "" and cut.unanswered


def test_eval_gen_and_report_answers_read_the_answer_after_the_reasoning(served, record, tmp_path):
    from medgpt.eval.gen import generate_replies
    from medgpt.report.answers import model_answers

    _, engine = served
    rows = [{"question": record["Question"]}]
    full = generate_replies(engine, rows, 96, None, tmp_path / "p.jsonl", {"k": 1})
    assert full == [{"prediction": record["Response"], "reasoning": record["Complex_CoT"]}]
    cut = generate_replies(engine, rows, 4, None, tmp_path / "q.jsonl", {"k": 2})
    assert cut[0]["prediction"] == "" and cut[0]["unanswered"] is True
    assert record["Complex_CoT"].startswith(cut[0]["reasoning"])
    answers = model_answers(engine, [[{"role": "user", "content": record["Question"]}]] * 2, 96)
    assert answers[0].text == record["Response"] and answers[0].reasoning == record["Complex_CoT"]
    short = model_answers(engine, [[{"role": "user", "content": record["Question"]}]], 4)[0]
    assert short.text == "" and short.unanswered and short.cut and short.marker.startswith("no answer: cut inside")
