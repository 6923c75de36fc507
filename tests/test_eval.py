"""medgpt eval: MCQ log-likelihood scoring, answer extraction, BLEU/ROUGE-L against the libraries, compare."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from medgpt.cli import main
from medgpt.errors import UserError
from medgpt.eval import compare, gen, mcq


@pytest.fixture(scope="module")
def answers_c_model(tiny_model, tmp_path_factory) -> str:
    """The tiny model rewired to answer "C" to every chat prompt.

    With attention and MLP outputs zeroed, the last hidden state is the embedding of the last prompt
    token (the newline after `<|im_start|>assistant`); making "C" and " C" point the same way as that
    embedding gives them the largest logit whatever the question.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "x"}]
    last = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    last = last["input_ids"][-1] if isinstance(last, dict) or hasattr(last, "keys") else last[-1]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.get_input_embeddings().weight
        for spelling in ("C", " C"):
            (token,) = tokenizer.encode(spelling, add_special_tokens=False)
            emb[token] = 10 * emb[last]
    out = tmp_path_factory.mktemp("answers-c")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


def test_crafted_model_accuracy_is_determined(answers_c_model, sample_data):
    args = mcq.McqArgs(data=str(sample_data / "mcq"), shots=2, batch_size=16)
    result = mcq.run_mcq(answers_c_model, args, dtype="fp32")
    assert {item["pred"] for item in result["items"]} == {"C"}
    # every val file holds 6 answers per letter out of 24
    assert {s: v["accuracy"] for s, v in result["subjects"].items()} == {
        "basic_medicine": 25.0, "clinical_medicine": 25.0, "physician": 25.0}
    assert result["overall"] == {"correct": 18, "total": 72, "accuracy": 25.0, "average": 25.0}
    assert {item["shots"] for item in result["items"]} == {2}


def test_generate_method_extracts_the_letter(answers_c_model, sample_data):
    args = mcq.McqArgs(data=str(sample_data / "mcq"), method="generate", max_new_tokens=1, limit=4, batch_size=12)
    result = mcq.run_mcq(answers_c_model, args, dtype="fp32")
    assert [item["output"] for item in result["items"]] == ["C"] * 12
    assert result["overall"]["correct"] == sum(item["answer"] == "C" for item in result["items"])


def test_loglik_picks_the_letter_with_the_largest_logit(tiny_model, sample_data):
    """Batched, left-padded scoring agrees with one unpadded float32 forward per question."""
    import torch

    from medgpt.infer.base import resolve_template
    from medgpt.models import ModelArgs, load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    model = load_model(ModelArgs(model=tiny_model, dtype="fp32"))
    scorer = mcq.LoglikScorer(model, tokenizer, resolve_template(None, tiny_model, None, tokenizer), batch_size=5)
    questions = mcq.load_questions(str(sample_data / "mcq"), "val", limit=4)
    shots = mcq.load_questions(str(sample_data / "mcq"), "dev")
    flat = [q for qs in questions.values() for q in qs]
    # different shot counts give prompts of very different lengths, so batches are padded
    prompts = [scorer.encode(mcq.question_messages(q, shots[q.subject][:i % 3], "cmmlu")) for i, q in enumerate(flat)]
    assert len({len(p) for p in prompts}) > 5
    scores = scorer.letter_logprobs(prompts)
    for prompt, row in zip(prompts, scores):
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, -1]
        pooled = torch.stack([torch.logsumexp(logits[ids], 0) for ids in scorer.letter_ids])
        assert int(row.argmax()) == int(pooled.argmax())
        assert torch.allclose(row, torch.log_softmax(pooled, 0), atol=1e-4)


def test_prompts_follow_the_official_wording(sample_data):
    q = mcq.load_questions(str(sample_data / "mcq"), "val")["physician"][0]
    assert mcq.prompt_text(q, [], "ceval") == (
        "以下是中国关于医师资格考试的单项选择题，请选出其中的正确答案。\n\n"
        "霍乱患者典型的粪便性状是\nA. 果酱样便\nB. 柏油样便\nC. 米泔水样便\nD. 黏液脓血便\n答案：")
    shot = mcq.load_questions(str(sample_data / "mcq"), "dev")["physician"][0]
    text = mcq.prompt_text(q, [shot], "cmmlu")
    assert text.startswith("以下是关于医师资格的单项选择题，请直接给出正确答案的选项。\n\n题目：")
    assert f"答案是：{shot.answer}\n\n题目：霍乱" in text and text.endswith("答案是：")
    messages = mcq.question_messages(q, [shot], "ceval")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == shot.answer and messages[0]["content"].startswith("以下是中国关于")


def test_cmmlu_csv_and_bad_rows(tmp_path):
    cmmlu = tmp_path / "anatomy.csv"
    cmmlu.write_text(",Question,A,B,C,D,Answer\n0,心脏有几个腔,1,2,3,4,D\n1,肺位于,胸腔,腹腔,盆腔,颅腔,A\n",
                     encoding="utf-8")
    questions = mcq.load_questions(str(cmmlu), "test")
    assert [(q.subject, q.answer, q.choices[0]) for q in questions["anatomy"]] == [
        ("anatomy", "D", "1"), ("anatomy", "A", "胸腔")]
    bad = tmp_path / "x_val.csv"
    bad.write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,q,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"x_val.csv:3: answer 'E' is not one of"):
        mcq.load_questions(str(bad))
    bad.write_text("id,question,A,B,C,answer\n0,q,a,b,c,A\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"x_val.csv:2: missing D"):
        mcq.load_questions(str(bad))
    with pytest.raises(UserError, match=r"ceval/ceval-exam \(physician, val\): not a local path"):
        mcq.load_questions("ceval/ceval-exam", subjects=["physician"])  # the hub is offline in tests


# Replies to four-option questions (A-D) and the letter a reader takes from each, written by hand: None where
# the reply commits to no single option. The first block follows the phrasings C-Eval's and CMMLU's official
# extraction patterns are written for (答案是/答案为/答案应为/答案选/答案：, 故选, 正确的选项是, 正确的一项是,
# X选项正确, X符合题意, X当选, a reply that opens with the letter); the rest are explained, hedged and
# letter-free replies of chat models, in Chinese and English.
REPLIES = [
    ("答案是B", "B"), ("答案是：B", "B"), ("答案为 C。因为肾素-血管紧张素系统被激活。", "C"), ("答案应为D", "D"),
    ("答案选A", "A"), ("答案是选项C", "C"), ("答案选项：B", "B"), ("答案：A\n解析：阿司匹林抑制环氧化酶。", "A"),
    ("故选D。", "D"), ("选择答案C", "C"), ("正确的选项是A", "A"), ("正确的一项是D", "D"), ("B选项正确", "B"),
    ("选项B正确", "B"), ("C符合题意", "C"), ("A当选，其余选项均与题干不符。", "A"), ("应该是C", "C"),
    ("C的说法是正确的", "C"), ("D\n\n解析：糖化血红蛋白反映近2-3个月的平均血糖。", "D"), ("B. 柏油样便", "B"),
    # explained answers
    ("选项A错误，选项C错误，所以答案是B", "B"), ("A项错误，C项错误，D项错误，B项正确。", "B"),
    ("首先分析A选项，它描述的是一期愈合；B选项描述的是二期愈合；因此选C。", "C"), ("答案：A。B、C、D均错误。", "A"),
    ("应选B，因为华法林与胺碘酮合用会升高INR。", "B"), ("我认为应该选B", "B"), ("不应选A，应选C。", "C"),
    ("答案不是A，是D。", "D"), ("Answer: B. Option A is a distractor.", "B"),
    ("The answer is (B). However option C is also reasonable in some patients.", "B"), ("**Answer:** B", "B"),
    ("**B**", "B"), ("Final answer: \\boxed{C}", "C"), ("The answer is D.", "D"),
    ("The answer to this question is A because ACE inhibitors cause a dry cough.", "A"),
    ("Vitamin B12 deficiency; the correct option is A", "A"), ("Option B is correct: metformin is first-line.", "B"),
    ("B is the correct answer since the INR is above range.", "B"), ("I would choose D.", "D"),
    ("(A) because it lowers blood pressure.", "A"), ("C. Insulin", "C"),
    ("Option A is wrong, option C is wrong, so B.", "B"), ("The answer is not A; it is C.", "C"),
    # lowercase and full-width letters
    ("b", "B"), ("Ｂ", "B"), ("ｂ", "B"), ("（Ｂ）", "B"), ("答案：Ｃ", "C"), ("The correct answer is c.", "C"),
    ("answer: b", "B"), ("Correct answer: (d)", "D"), ("答案 B", "B"),
    # no single option
    ("答案是维生素B12", None), ("维生素B12缺乏可引起巨幼细胞贫血。", None), ("B和C", None), ("B和C都正确", None),
    ("答案是A或B", None), ("A、B都有可能", None), ("A 或 B", None), ("我不知道", None), ("", None),
    ("答案是E", None), ("答案：BC", None), ("A. 阿司匹林\nB. 华法林\nC. 肝素\nD. 氯吡格雷", None),
    ("The answer is a combination of two drugs.", None),
    ("A patient with hepatitis B should be vaccinated against hepatitis A.", None), ("A or B?", None),
    ("B or C", None), ("I think A or maybe B", None), ("Both B and D could be right.", None), ("I'm not sure.", None),
    ("The answer is E.", None), ("HbA1c above 6.5% confirms diabetes.", None),
]


@pytest.mark.parametrize("reply,letter", REPLIES)
def test_extract_choice_reads_replies_as_a_reader_does(reply, letter):
    assert mcq.extract_choice(reply) == letter


def test_extract_choice_table_covers_both_languages_and_refusals():
    cjk = [r for r, _ in REPLIES if any("\u4e00" <= ch <= "\u9fff" for ch in r)]
    assert len(REPLIES) >= 40 and 20 <= len(cjk) <= len(REPLIES) - 20
    assert sum(letter is None for _, letter in REPLIES) >= 15
    assert mcq.extract_choice("E", "ABCDE") == "E" and mcq.extract_choice("E") is None


PAIRS = [  # (prediction, reference)
    ("高血压患者应该低盐饮食并规律服药。", "高血压患者需要低盐饮食，并按时服用降压药。"),
    ("Type 2 diabetes is treated with diet, exercise and metformin.",
     "Type 2 diabetes is managed with diet, exercise and often metformin."),
    ("糖尿病的诊断标准是空腹血糖大于等于7.0 mmol/L。", "空腹血糖≥7.0 mmol/L可诊断糖尿病。"),
]


def test_bleu_and_rouge_match_the_libraries():
    from nltk.translate.bleu_score import corpus_bleu
    from rouge_score.rouge_scorer import _score_lcs

    metrics, items = gen.score_pairs([p for p, _ in PAIRS], [r for _, r in PAIRS])
    hyps = [gen.tokenize(p) for p, _ in PAIRS]
    refs = [gen.tokenize(r) for _, r in PAIRS]
    assert hyps[0][:4] == ["高", "血", "压", "患"]  # Chinese on characters
    assert hyps[1][:3] == ["Type", "2", "diabetes"]  # English on words
    for n in gen.ORDERS:  # sacrebleu's corpus BLEU = nltk's, given the same tokens
        expected = 100 * corpus_bleu([[r] for r in refs], hyps, weights=[1 / n] * n)
        assert metrics[f"bleu-{n}"] == pytest.approx(expected, abs=0.01)
    for item, h, r in zip(items, hyps, refs):
        assert item["rouge-l"] == pytest.approx(100 * _score_lcs(r, h).fmeasure, abs=0.01)
    assert metrics["rouge-l"] == pytest.approx(sum(i["rouge-l"] for i in items) / 3, abs=0.01)
    # fixed numbers, so a change of library or tokenization shows up
    assert [metrics[f"bleu-{n}"] for n in gen.ORDERS] == pytest.approx([74.51, 62.3, 50.57, 39.62], abs=0.01)
    assert metrics["rouge-l"] == pytest.approx(67.93, abs=0.01)


def test_default_library_tokenizers_would_score_chinese_zero():
    """Why we tokenize first: out of the box, rouge-score sees no Chinese tokens at all."""
    from rouge_score.rouge_scorer import RougeScorer

    pred, ref = PAIRS[0]
    assert RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure == 0
    assert gen.score_pairs([pred], [ref])[0]["rouge-l"] > 40
    assert gen.score_pairs([ref], [ref])[0] == {"bleu-1": 100, "bleu-2": 100, "bleu-3": 100, "bleu-4": 100,
                                                "rouge-l": 100}


def test_jieba_scores_words():
    words = gen.tokenize("高血压患者应该低盐饮食", "jieba")
    assert "高血压" in words and len(words) < 8
    metrics, _ = gen.score_pairs(["高血压患者应该低盐饮食"], ["高血压患者需要低盐饮食"], "jieba")
    assert 0 < metrics["bleu-1"] < 100


def test_gen_predictions_cli(tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"prediction": p, "answer": r}, ensure_ascii=False) + "\n" for p, r in PAIRS),
                     encoding="utf-8")
    out = tmp_path / "gen.json"
    assert main(["eval", "gen", "--predictions", str(preds), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["metrics"]["bleu-1"] == pytest.approx(74.51, abs=0.01)
    items = [json.loads(line) for line in (tmp_path / "gen.items.jsonl").read_text().splitlines()]
    assert len(items) == 3 and items[0]["loc"].endswith("preds.jsonl:1") and "bleu-4" in items[0]
    preds.write_text('{"prediction": "a"}\n', encoding="utf-8")
    assert main(["eval", "gen", "--predictions", str(preds), "--output", str(out)]) == 2
    assert "preds.jsonl:1: missing or non-string field 'answer'" in capsys.readouterr().err


def test_gen_with_model_resumes(tiny_model, sample_data, tmp_path):
    partial = tmp_path / "partial.jsonl"
    args = dict(model=tiny_model, mode="char", max_new_tokens=4, limit=3, partial=partial)
    first = gen.run_gen(str(sample_data / "qa" / "medical_qa.jsonl"), **args)
    assert first["count"] == 3 and not partial.exists()
    assert all(set(i) >= {"question", "answer", "prediction", "bleu-1", "rouge-l"} for i in first["items"])
    # a run interrupted after two answers: those are reused, not generated again
    key = {"model": tiny_model, "adapter": None, "template": None,
           "data": str((sample_data / "qa" / "medical_qa.jsonl").resolve()), "max_new_tokens": 4, "system": None}
    partial.write_text("\n".join(json.dumps(x) for x in [key, {"prediction": "kept 1"}, {"prediction": "kept 2"}]))
    again = gen.run_gen(str(sample_data / "qa" / "medical_qa.jsonl"), **args)
    assert [i["prediction"] for i in again["items"]][:2] == ["kept 1", "kept 2"]
    assert again["items"][2]["prediction"] == first["items"][2]["prediction"]


def test_compare_table(tmp_path, capsys):
    a, b = tmp_path / "base.json", tmp_path / "tuned.json"
    a.write_text(json.dumps({"metrics": {"accuracy": 25.0, "accuracy/physician": 20.0}, "items_file": "x"}))
    b.write_text(json.dumps({"metrics": {"accuracy": 31.5, "accuracy/physician": 20.0, "bleu-1": 3.0}}))
    table = compare.compare([a, b])
    rows = {r["metric"]: r for r in table["rows"]}
    assert rows["accuracy"]["deltas"] == [6.5] and rows["bleu-1"]["values"] == [None, 3.0]
    md = tmp_path / "cmp.md"
    assert main(["eval", "compare", str(a), str(b), "--markdown", str(md)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "+6.50" in printed
    assert md.read_text().splitlines()[0] == "| metric | base | tuned | Δ tuned |"
    assert "| accuracy | 25.00 | 31.50 | +6.50 |" in md.read_text()
    assert math.isclose(compare.load_metrics(b)[1]["bleu-1"], 3.0)
    (tmp_path / "bad.json").write_text("{")
    assert main(["eval", "compare", str(tmp_path / "bad.json")]) == 2


def test_mcq_cli_writes_results(answers_c_model, sample_data, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "mcq", "--model", answers_c_model, "--data", str(sample_data / "mcq" / "val"),
                 "--subjects", "physician", "--limit", "8", "--style", "cmmlu", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["metrics"]["accuracy/physician"] == result["overall"]["accuracy"]
    assert result["overall"]["total"] == 8 and Path(tmp_path / "r.items.jsonl").exists()
    assert main(["eval", "mcq", "--model", answers_c_model, "--data", str(tmp_path / "missing")]) == 2
