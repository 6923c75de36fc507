"""medgpt eval: MCQ log-likelihood scoring, answer extraction, BLEU/ROUGE-L against the libraries, compare."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from medgpt.cli import main
from medgpt.errors import UserError
from medgpt.eval import compare, gen, mcq
from medgpt.files import value_digest


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

    from medgpt.models import open_model

    opened = open_model(tiny_model, dtype="fp32")  # the product path: the template recorded beside the model
    model, tokenizer = opened.model, opened.tokenizer
    scorer = mcq.LoglikScorer(model, tokenizer, opened.template, batch_size=5)
    questions = mcq.load_questions(str(sample_data / "mcq"), "val", limit=4)
    shots = mcq.load_questions(str(sample_data / "mcq"), "dev")
    flat = [q for qs in questions.values() for q in qs]
    # different shot counts give prompts of very different lengths, so batches are padded
    prompts = [scorer.encode(mcq.question_messages(q, shots[q.subject][:i % 3], "cmmlu")) for i, q in enumerate(flat)]
    assert len({len(p) for p in prompts}) > 5
    scores = torch.log_softmax(scorer.letter_loglik(prompts), dim=-1)
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


def test_bleu_matches_the_libraries():
    from nltk.translate.bleu_score import corpus_bleu

    metrics, items = gen.score_pairs([p for p, _ in PAIRS], [r for _, r in PAIRS])
    hyps = [gen.tokenize(p) for p, _ in PAIRS]
    refs = [gen.tokenize(r) for _, r in PAIRS]
    assert hyps[0][:4] == ["高", "血", "压", "患"]  # Chinese on characters
    assert hyps[1][:3] == ["Type", "2", "diabetes"]  # English on words
    for n in gen.ORDERS:  # sacrebleu's corpus BLEU = nltk's, given the same tokens
        expected = 100 * corpus_bleu([[r] for r in refs], hyps, weights=[1 / n] * n)
        assert metrics[f"bleu-{n}"] == pytest.approx(expected, abs=0.01)
    # fixed numbers, so a change of library or tokenization shows up
    assert [metrics[f"bleu-{n}"] for n in gen.ORDERS] == pytest.approx([74.51, 62.3, 50.57, 39.62], abs=0.01)
    # each item's BLEU statistics add up to the corpus BLEU-4 (what the paired bootstrap resamples)
    import numpy as np

    from medgpt.eval import stats

    data = np.array([i["bleu_stats"] for i in items], dtype=float)
    assert stats.corpus_bleu(data, np.arange(len(items))[None])[0] == pytest.approx(metrics["bleu-4"], abs=0.01)


# Chinese pairs without Latin text, so the reference tokenization below is unambiguous: every character
# that is not punctuation is a token (what ChatGLM's P-tuning evaluation hands to rouge-chinese)
ZH_PAIRS = [
    ("高血压患者应该低盐饮食并规律服药。", "高血压患者需要低盐饮食，并按时服用降压药。"),
    ("，，。", "高血压，需要服药，定期复查。"),
    ("糖尿病患者要控制饮食，适量运动！", "糖尿病的治疗包括饮食控制、运动和药物。"),
    ("发热时多喝水", "发热时多喝水"),
]
EN_PAIRS = [
    ("Type 2 diabetes is treated with diet, exercise and metformin.",
     "Type 2 diabetes is managed with diet, exercise and often metformin."),
    ("TAKE THE TABLETS WITH FOOD.", "Take the tablets with food."),
    ("Rest, fluids; and paracetamol!!", "rest and fluids"),
]


def test_chinese_rouge_equals_rouge_chinese_on_characters_without_punctuation():
    """Reference: rouge-chinese's Rouge on space-joined characters, punctuation (Unicode P*/S*) removed."""
    import unicodedata

    from rouge_chinese import Rouge

    for pred, ref in ZH_PAIRS:
        chars = lambda text: " ".join(c for c in text if unicodedata.category(c)[0] not in "PS")  # noqa: E731
        ours = gen.rouge_scores(pred, ref)
        if not chars(pred):
            assert ours == {"rouge-1": 0, "rouge-2": 0, "rouge-l": 0}  # a reply of punctuation only scores 0
            continue
        expected = Rouge().get_scores(chars(pred), chars(ref))[0]
        assert ours == pytest.approx({k: 100 * expected[k]["f"] for k in gen.ROUGE}, abs=0.01)
    assert gen.rouge_scores(*ZH_PAIRS[3]) == {"rouge-1": 100, "rouge-2": 100, "rouge-l": 100}


def test_chinese_rouge_on_jieba_words_equals_rouge_chinese():
    import jieba
    from rouge_chinese import Rouge

    pred, ref = ZH_PAIRS[0]
    words = lambda text: " ".join(w for w in jieba.lcut(text) if w not in "，。")  # noqa: E731
    expected = Rouge().get_scores(words(pred), words(ref))[0]
    assert gen.rouge_scores(pred, ref, "jieba") == pytest.approx(
        {k: 100 * expected[k]["f"] for k in gen.ROUGE}, abs=0.01)


def test_english_rouge_equals_rouge_score_as_it_ships():
    """Reference: rouge-score's RougeScorer with its own tokenizer (lower-case, letters and digits) and defaults."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"])
    metrics, items = gen.score_pairs([p for p, _ in EN_PAIRS], [r for _, r in EN_PAIRS])
    for (pred, ref), item in zip(EN_PAIRS, items):
        expected = scorer.score(ref, pred)
        assert item["rouge-1"] == pytest.approx(100 * expected["rouge1"].fmeasure, abs=0.01)
        assert item["rouge-2"] == pytest.approx(100 * expected["rouge2"].fmeasure, abs=0.01)
        assert item["rouge-l"] == pytest.approx(100 * expected["rougeL"].fmeasure, abs=0.01)
    assert items[1]["rouge-l"] == 100  # an upper-case copy is a copy
    assert metrics["rouge-l"] == pytest.approx(sum(i["rouge-l"] for i in items) / 3, abs=0.01)


def test_default_library_tokenizers_would_score_chinese_zero():
    """Why we tokenize first: out of the box, rouge-score sees no Chinese tokens at all."""
    from rouge_score.rouge_scorer import RougeScorer

    pred, ref = PAIRS[0]
    assert RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure == 0
    assert gen.score_pairs([pred], [ref])[0]["rouge-l"] > 40
    metrics = gen.score_pairs([ref], [ref])[0]
    assert metrics == {"bleu-1": 100, "bleu-2": 100, "bleu-3": 100, "bleu-4": 100, "rouge-1": 100, "rouge-2": 100,
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
    rows = [json.loads(line) for line in (sample_data / "qa" / "medical_qa.jsonl").read_text().splitlines()][:3]
    key = {"model": tiny_model, "adapter": None, "template": None,
           "questions": value_digest([r["question"] for r in rows]), "max_new_tokens": 4, "system": None}
    partial.write_text("\n".join(json.dumps(x) for x in [key, {"prediction": "kept 1"}, {"prediction": "kept 2"}]))
    again = gen.run_gen(str(sample_data / "qa" / "medical_qa.jsonl"), **args)
    assert [i["prediction"] for i in again["items"]][:2] == ["kept 1", "kept 2"]
    assert again["items"][2]["prediction"] == first["items"][2]["prediction"]
    # the same path with other questions in it: the saved answers belong to the old file and are not reused
    edited = tmp_path / "medical_qa.jsonl"
    edited.write_text("".join(json.dumps({**r, "question": r["question"] + "？"}, ensure_ascii=False) + "\n"
                              for r in rows), encoding="utf-8")
    key["questions"] = value_digest([r["question"] for r in rows])  # the old file's questions
    partial.write_text("\n".join(json.dumps(x) for x in [key, {"prediction": "kept 1"}, {"prediction": "kept 2"}]))
    fresh = gen.run_gen(str(edited), **args)
    assert "kept 1" not in [i["prediction"] for i in fresh["items"]]


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


# ---- few-shot examples, letter tokens, logits, subjects ---------------------------------------------


def test_few_shot_examples_never_include_the_scored_question(answers_c_model, sample_data, tmp_path):
    """--split dev --shots N and --dev pointing at the scored file: each question's examples are the other rows."""
    dev = sample_data / "mcq" / "dev"
    for args in (mcq.McqArgs(data=str(sample_data / "mcq"), split="dev", shots=4),
                 mcq.McqArgs(data=str(dev / "physician_dev.csv"), dev=str(dev / "physician_dev.csv"), shots=4)):
        questions = mcq.load_questions(args.data, args.split)
        pool = mcq.load_shots(args, list(questions))
        for q in (q for qs in questions.values() for q in qs):
            picked = mcq.shots_for(q, pool[q.subject], 4)
            assert len(picked) == 4 and q.id not in {s.id for s in picked}
    # the same question under another id, with full-width and spacing changes, is the same question
    rows = (dev / "physician_dev.csv").read_text(encoding="utf-8").splitlines()
    copy = rows[1].split(",")
    copy[0], copy[1] = "copy", " " + copy[1].replace("是", "是 ") + " "
    shots = tmp_path / "physician_dev.csv"
    shots.write_text("\n".join([rows[0], ",".join(copy), *rows[2:]]) + "\n", encoding="utf-8")
    q = mcq.load_questions(str(dev / "physician_dev.csv"), "dev")["physician"][0]
    pool = mcq.load_questions(str(shots), "dev")["physician"]
    assert pool[0].id == "copy" and "copy" not in {s.id for s in mcq.shots_for(q, pool, 3)}
    with pytest.raises(UserError, match="fewer than 5 few-shot examples other than this question"):
        mcq.shots_for(q, pool, 5)
    result = mcq.run_mcq(answers_c_model, mcq.McqArgs(data=str(sample_data / "mcq"), split="dev", shots=4),
                         dtype="fp32")
    assert {item["shots"] for item in result["items"]} == {4}


def test_letter_ids_are_what_follows_the_prompt_with_sentencepiece(tmp_path, sample_data):
    """Reference: a SentencePiece model trained here (BPE, dummy prefix, byte fallback, as Llama's) and its own
    encoding: after `答案：` a letter is the bare piece `A`, which encoding the letter alone (`▁A`) never gives."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    lines = (sample_data / "pt" / "medical_corpus.txt").read_text(encoding="utf-8").splitlines()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines + ["维生素A、维生素B、维生素C和维生素D"] * 5), model_prefix=str(tmp_path / "sp"),
        model_type="bpe", vocab_size=2000, character_coverage=1.0, byte_fallback=True, add_dummy_prefix=True,
        normalization_rule_name="identity", minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    vocab = SentencePieceExtractor(str(tmp_path / "sp.model")).extract(BPE)
    backend = Tokenizer(BPE(vocab=vocab["vocab"], merges=vocab["merges"], unk_token="<unk>", fuse_unk=True,
                            byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    scorer = mcq.LoglikScorer(None, tokenizer, None)
    prompt = "霍乱\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案："
    base = sp.encode(prompt)
    for letter, ids in zip(mcq.LETTERS, scorer.candidates(prompt)):
        expected = {tuple(sp.encode(prompt + s)[len(base):]) for s in (letter, " " + letter)}
        assert sorted(ids) == sorted(e[0] for e in expected if len(e) == 1)
        assert sp.id_to_piece(sp.encode(prompt + letter)[-1]) == letter and sp.piece_to_id(letter) in ids
        assert sp.encode(letter) != [sp.piece_to_id(letter)]  # alone, a letter is never just the bare piece


def test_letter_ids_with_the_byte_level_tokenizer(tiny_model):
    from medgpt.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    scorer = mcq.LoglikScorer(None, tokenizer, None)
    for prompt in ("题目\n答案：", "Question\nAnswer:"):
        base = tokenizer.encode(prompt)
        for letter, ids in zip(mcq.LETTERS, scorer.candidates(prompt)):
            expected = {tokenizer.encode(prompt + s)[len(base):][0] for s in (letter, " " + letter)}
            assert sorted(ids) == sorted(expected) and len(ids) == 2


def test_scores_are_the_models_own_logits_with_soft_capping(tmp_path):
    """Reference: transformers' Gemma-2 forward, which soft-caps its logits (final_logit_softcapping);
    recomputing `hidden @ W` would skip the cap and give other probabilities."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from medgpt.models import load_tokenizer

    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
                          initializer_range=1.0, pad_token_id=tokenizer.pad_token_id)
    model = Gemma2ForCausalLM(config).eval()
    scorer = mcq.LoglikScorer(model, tokenizer, None, batch_size=2)
    texts = ["题目一\n答案：", "另一个更长一些的题目\n答案：", "Question\nAnswer:"]
    prompts = [scorer.encode(t) for t in texts]
    loglik = scorer.letter_loglik(prompts)
    for prompt, row in zip(prompts, loglik):
        with torch.no_grad():
            out = model(torch.tensor([prompt]), output_hidden_states=True)
        logprobs = torch.log_softmax(out.logits[0, -1].float(), -1)
        expected = torch.stack([torch.logsumexp(logprobs[ids], 0) for ids in scorer.letter_ids])
        assert torch.allclose(row, expected, atol=1e-5)
        uncapped = torch.log_softmax(out.hidden_states[-1][0, -1] @ model.lm_head.weight.T, -1)
        assert not torch.allclose(torch.stack([torch.logsumexp(uncapped[ids], 0) for ids in scorer.letter_ids]),
                                  expected, atol=1e-2)


def test_subjects_from_rows_flag_and_official_names(tmp_path):
    assert len(mcq.CEVAL_SUBJECTS) == 52 and len(mcq.CMMLU_SUBJECTS) == 67
    assert {k: mcq.CEVAL_SUBJECTS[k] for k in mcq.CEVAL_MEDICAL} == {
        "clinical_medicine": "临床医学", "basic_medicine": "基础医学", "physician": "医师资格"}
    assert set(mcq.CMMLU_MEDICAL) <= set(mcq.CMMLU_SUBJECTS)
    assert mcq.subject_name("cmmlu", "high_school_physics") == "高中物理学"
    assert mcq.subject_name("ceval", "high_school_physics") == "高中物理"
    data = tmp_path / "med_exam.jsonl"
    rows = [{"id": "1", "question": "心脏有几个腔", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "D",
             "subject": "clinical_medicine"},
            {"id": "2", "question": "肺位于", "A": "胸腔", "B": "腹腔", "C": "盆腔", "D": "颅腔", "answer": "A",
             "subject": "内科学"}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    by_subject = mcq.load_questions(str(data))
    assert sorted(by_subject) == ["clinical_medicine", "内科学"]
    q = by_subject["clinical_medicine"][0]
    assert mcq.prompt_text(q, [], "ceval").startswith("以下是中国关于临床医学考试的单项选择题")
    assert mcq.prompt_text(by_subject["内科学"][0], [], "ceval").startswith("以下是中国关于内科学考试")
    forced = mcq.load_questions(str(data), subject="physician")
    assert list(forced) == ["physician"] and len(forced["physician"]) == 2
    assert mcq.prompt_text(forced["physician"][0], [], "cmmlu").startswith("以下是关于医师资格的单项选择题")


def test_items_keep_the_raw_log_likelihood(answers_c_model, sample_data):
    result = mcq.run_mcq(answers_c_model, mcq.McqArgs(data=str(sample_data / "mcq"), limit=2), dtype="fp32")
    for item in result["items"]:
        assert set(item["loglik"]) == set(mcq.LETTERS) and all(v < 0 for v in item["loglik"].values())
        total = math.log(sum(math.exp(v) for v in item["loglik"].values()))
        assert item["probs"]["C"] == pytest.approx(math.exp(item["loglik"]["C"] - total), abs=1e-4)
    assert result["accuracy"] == result["overall"]["accuracy"]


# ---- perplexity, intervals, suite -------------------------------------------------------------------


def test_answer_nll_equals_the_models_own_loss(tiny_model, sample_data):
    """Reference: transformers' causal-LM loss with labels on the assistant tokens (the template's labels)."""
    import torch

    from medgpt.eval import ppl
    from medgpt.models import open_model

    opened = open_model(tiny_model, dtype="fp32")  # the product path: the template recorded beside the model
    model, tokenizer, template = opened.model, opened.tokenizer, opened.template
    conversations = [m for _, m in ppl.read_conversations(str(sample_data / "qa" / "medical_qa.jsonl"), 5)]
    scores = ppl.answer_nll(model, tokenizer, template, conversations, batch_size=3)
    for messages, (total, tokens) in zip(conversations, scores):
        row = template.encode(tokenizer, messages)
        with torch.no_grad():
            loss = model(torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
        assert total / tokens == pytest.approx(float(loss), abs=1e-4)
        assert tokens == sum(label >= 0 for label in row["labels"][1:])
    result = ppl.summarize(["x"] * 5, scores)
    assert result["metrics"]["ppl"] == pytest.approx(math.exp(sum(s for s, _ in scores) / sum(n for _, n in scores)))


def test_ppl_cli(tiny_model, sample_data, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--model", tiny_model, "--data", str(sample_data / "sft" / "medical_sft.jsonl"),
                 "--limit", "3", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 3 and result["metrics"]["ppl"] > 1 and "perplexity" in capsys.readouterr().out
    items = [json.loads(line) for line in (tmp_path / "ppl.items.jsonl").read_text().splitlines()]
    assert [i["loc"].rsplit(":", 1)[1] for i in items] == ["1", "2", "3"]


def test_mcnemar_and_paired_bootstrap_against_scipy():
    """References: scipy's exact binomial test (McNemar's exact test is one on the discordant pairs) and
    scipy's paired percentile bootstrap."""
    import numpy as np
    from scipy.stats import binomtest, bootstrap

    from medgpt.eval import stats

    rng = np.random.default_rng(1)
    before = rng.random(40) < 0.3
    after = before.copy()
    after[:9] = True
    after[30:32] = False
    b, c = int((before & ~after).sum()), int((~before & after).sum())
    assert stats.mcnemar_exact(list(before), list(after)) == pytest.approx(binomtest(b, b + c, 0.5).pvalue)
    lo, hi = stats.paired_interval(stats.mean_of(100.0), before[:, None].astype(float), after[:, None].astype(float))
    ref = bootstrap((before.astype(float), after.astype(float)), lambda x, y: 100 * (y.mean() - x.mean()),
                    paired=True, vectorized=False, method="percentile", n_resamples=2000, random_state=0)
    assert lo == pytest.approx(ref.confidence_interval.low, abs=3)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=3)
    assert lo > 0  # 9 gained against 2 lost on 40 items
    assert stats.standard_error(10, 40) == pytest.approx(100 * math.sqrt(0.25 * 0.75 / 40))


def test_compare_reports_paired_intervals(tmp_path, capsys):
    def write(name, correct):
        items = [{"subject": "s", "id": str(i), "correct": c} for i, c in enumerate(correct)]
        (tmp_path / f"{name}.items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"metrics": {"accuracy": 100 * sum(correct) / len(correct)}, "items_file": f"{name}.items.jsonl"}))
        return tmp_path / f"{name}.json"

    base = write("base", [False] * 30 + [True] * 10)
    same_ish = write("noise", [True] + [False] * 29 + [True] * 9 + [False])
    better = write("better", [True] * 20 + [False] * 10 + [True] * 10)
    table = compare.compare([base, same_ish, better])
    row = next(r for r in table["rows"] if r["metric"] == "accuracy")
    noise, real = row["tests"]
    assert not noise["significant"] and noise["ci95"][0] < 0 < noise["ci95"][1] and noise["p_mcnemar"] == 1
    assert real["significant"] and real["ci95"][0] > 0 and real["p_mcnemar"] < 1e-4
    assert main(["eval", "compare", str(base), str(same_ish), str(better)]) == 0
    printed = capsys.readouterr().out
    assert "+0.00 [" in printed and "not significant" in printed and "+50.00 [" in printed


def test_suite_parse_eval_sets(sample_data):
    from medgpt.eval import suite

    assert suite.parse_eval_sets("none") == [] and suite.parse_eval_sets(None) == []
    sets = suite.parse_eval_sets([{"name": "m", "kind": "mcq", "data": str(sample_data / "mcq"), "limit": 3}])
    assert sets == [suite.EvalSet("m", "mcq", str(sample_data / "mcq"), limit=3)]
    assert [s.name for s in suite.default_eval_sets()] == ["mcq", "qa"]
    for bad, message in [("x", "expected a list"), ([{"name": "m", "kind": "bleu", "data": "."}], r"\(m\): kind"),
                         ([{"name": "m", "kind": "qa"}], r"\(m\): missing data"),
                         ([{"name": "m", "kind": "qa", "data": "/nope"}], "no such file"),
                         ([{"name": "m", "kind": "qa", "data": ".", "limit": 0}], "positive integer"),
                         ([{"name": "m", "kind": "qa", "data": ".", "shots": 1}], "unknown key shots"),
                         ([{"name": "m", "kind": "qa", "data": "."}] * 2, "used twice")]:
        with pytest.raises(UserError, match=message):
            suite.parse_eval_sets(bad)


def test_suite_evaluates_once_caches_and_compares(tiny_model, answers_c_model, sample_data, tmp_path,
                                                  monkeypatch):
    from medgpt.eval import suite
    from medgpt.models import cache_dir

    monkeypatch.setenv("MEDGPT_CACHE", str(tmp_path / "cache"))
    assert str(cache_dir()).startswith(str(tmp_path))
    sets = [suite.EvalSet("mcq", "mcq", str(sample_data / "mcq"), limit=4),
            suite.EvalSet("qa", "qa", str(sample_data / "qa" / "medical_qa.jsonl"), limit=4, max_new_tokens=4)]
    base = suite.evaluate(tiny_model, None, None, sets, tmp_path / "base")
    assert base["mcq"]["n"] == 12 and set(base["qa"]["metrics"]) == {"bleu", "rouge-l", "rouge-1", "rouge-2",
                                                                     "nll", "ppl"}
    assert json.loads((tmp_path / "base" / "qa.json").read_text())["items"][0]["prediction"] is not None
    alone = mcq.run_mcq(tiny_model, mcq.McqArgs(data=str(sample_data / "mcq"), limit=4), dtype="fp32")
    assert base["mcq"]["metrics"]["accuracy"] == alone["accuracy"]
    lo, hi = base["mcq"]["ci95"]["accuracy"]
    assert lo <= base["mcq"]["metrics"]["accuracy"] <= hi
    # the same inputs again: read back without loading a model
    import medgpt.infer.engine

    monkeypatch.setattr(medgpt.infer.engine, "load_engine", lambda *a, **k: pytest.fail("model loaded again"))
    assert suite.evaluate(tiny_model, None, None, sets, tmp_path / "base") == base
    assert suite.evaluate(tiny_model, None, None, sets, tmp_path / "elsewhere") == base  # the shared cache
    monkeypatch.undo()
    after = suite.evaluate(answers_c_model, None, None, sets[:1], tmp_path / "c")
    changes = suite.compare_results(base, after)
    c = changes["mcq"]["accuracy"]
    assert c["diff"] == pytest.approx(after["mcq"]["metrics"]["accuracy"] - base["mcq"]["metrics"]["accuracy"])
    assert c["ci95"][0] <= c["diff"] <= c["ci95"][1] and c["significant"] == (c["ci95"][0] > 0 or c["ci95"][1] < 0)
    assert 0 <= c["p_mcnemar"] <= 1 and "qa" not in changes
    same = suite.compare_results(base, base)["qa"]
    assert all(v["diff"] == 0 and v["ci95"] == [0, 0] and not v["significant"] for v in same.values())
