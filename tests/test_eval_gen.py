"""medgpt.eval.gen: BLEU and ROUGE of generated answers against the libraries. sacrebleu's corpus BLEU equals
nltk's on the same tokens (Chinese on characters, English on words); Chinese ROUGE equals rouge-chinese's (on
characters without punctuation, or on jieba words); English ROUGE equals rouge-score's as it ships. `eval gen`
scores a predictions file, or a model's answers, resuming an interrupted run."""

from __future__ import annotations

import json

import pytest
from _inference import closes_its_engines

from medgpt.cli import main
from medgpt.eval import gen
from medgpt.files import value_digest


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


def test_a_reasoning_reply_is_scored_on_its_answer(tmp_path):
    """Reference: the same answers scored without their think blocks; a reply cut inside its reasoning scores as
    the empty answer and is counted."""
    thoughts = ["血压高于140/90 mmHg。", "2型糖尿病的一线治疗。", "空腹血糖的诊断界值。"]
    replies = [f"<think>\n{thoughts[0]}\n</think>\n\n{PAIRS[0][0]}", f"<think>\n{thoughts[1]}\n</think>\n\n{PAIRS[1][0]}",
               f"<think>\n{thoughts[2]}"]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"prediction": p, "answer": r}, ensure_ascii=False) + "\n"
                             for p, (_, r) in zip(replies, PAIRS)), encoding="utf-8")
    result = gen.run_gen(None, predictions=str(preds))
    expected, _ = gen.score_pairs([PAIRS[0][0], PAIRS[1][0], ""], [r for _, r in PAIRS])
    assert result["metrics"] == expected
    assert [i["prediction"] for i in result["items"]] == [PAIRS[0][0], PAIRS[1][0], ""]
    assert [i["reasoning"] for i in result["items"]] == thoughts
    assert [i.get("unanswered", False) for i in result["items"]] == [False, False, True]
    assert result["reasoning"] == {"replies": 3, "with_reasoning": 3, "cut_in_reasoning": 1,
                                   "mean_chars": round(sum(map(len, thoughts)) / 3, 1)}
    assert "reasoning" not in gen.run_gen(None, predictions=str(write_pairs(tmp_path / "plain.jsonl")))


def write_pairs(path):
    path.write_text("".join(json.dumps({"prediction": p, "answer": r}, ensure_ascii=False) + "\n" for p, r in PAIRS),
                    encoding="utf-8")
    return path


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
    from medgpt.models import inference_precision

    partial = tmp_path / "partial.jsonl"
    args = dict(model=tiny_model, mode="char", max_new_tokens=4, limit=3, partial=partial)
    with closes_its_engines():
        first = gen.run_gen(str(sample_data / "qa" / "medical_qa.jsonl"), **args)
    assert first["count"] == 3 and not partial.exists()
    assert all(set(i) >= {"question", "answer", "prediction", "bleu-1", "rouge-l"} for i in first["items"])
    # a run interrupted after two answers: those are reused, not generated again
    rows = [json.loads(line) for line in (sample_data / "qa" / "medical_qa.jsonl").read_text().splitlines()][:3]
    key = {"model": tiny_model, "adapter": None, "template": None,
           "questions": value_digest([r["question"] for r in rows]), "max_new_tokens": 4, "system": None,
           "precision": inference_precision()}
    partial.write_text("\n".join(json.dumps(x) for x in [key, {"prediction": "kept 1"}, {"prediction": "kept 2"}]))
    again = gen.run_gen(str(sample_data / "qa" / "medical_qa.jsonl"), **args)
    assert [i["prediction"] for i in again["items"]][:2] == ["kept 1", "kept 2"]
    assert again["items"][2]["prediction"] == first["items"][2]["prediction"]
    # answers saved by a run in another precision are not reused: the model answers differently there
    other = {**key, "precision": "bf16" if key["precision"] == "fp32" else "fp32"}
    partial.write_text("\n".join(json.dumps(x) for x in [other, {"prediction": "kept 1"}, {"prediction": "kept 2"}]))
    assert "kept 1" not in [i["prediction"] for i in gen.run_gen(str(sample_data / "qa" / "medical_qa.jsonl"),
                                                                   **args)["items"]]
    # the same path with other questions in it: the saved answers belong to the old file and are not reused
    edited = tmp_path / "medical_qa.jsonl"
    edited.write_text("".join(json.dumps({**r, "question": r["question"] + "？"}, ensure_ascii=False) + "\n"
                              for r in rows), encoding="utf-8")
    key["questions"] = value_digest([r["question"] for r in rows])  # the old file's questions
    partial.write_text("\n".join(json.dumps(x) for x in [key, {"prediction": "kept 1"}, {"prediction": "kept 2"}]))
    fresh = gen.run_gen(str(edited), **args)
    assert "kept 1" not in [i["prediction"] for i in fresh["items"]]
