"""medgpt.eval.mcq: multiple-choice questions scored by the log-likelihood of the answer letters or by generation.

A model crafted to answer "C" to every prompt gives an accuracy known in advance; prompts follow the official
C-Eval and CMMLU wording; CSV and JSON-lines question files, subjects and few-shot examples (never the scored
question). References: one unpadded float32 forward per question, a SentencePiece model's own encoding of the
letters, transformers' Gemma-2 forward (soft-capped logits). Agreement with lm-evaluation-harness is checked in
test_eval_mcq_lm_eval.py, the letter a generated reply commits to in test_data_answers.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _inference import closes_its_engines

from medgpt.cli import main
from medgpt.errors import UserError
from medgpt.eval import mcq


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
    with closes_its_engines():
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
    with pytest.raises(UserError, match=r"x_val.csv:3: wrong type: answer 'E' is not one of"):
        mcq.load_questions(str(bad))
    bad.write_text("id,question,A,B,C,answer\n0,q,a,b,c,A\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"x_val.csv:2: missing field: D"):
        mcq.load_questions(str(bad))
    with pytest.raises(UserError, match=r"ceval/ceval-exam \(physician, val\): not a local path"):
        mcq.load_questions("ceval/ceval-exam", subjects=["physician"])  # the hub is offline in tests


def test_mcq_cli_writes_results(answers_c_model, sample_data, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "mcq", "--model", answers_c_model, "--data", str(sample_data / "mcq" / "val"),
                 "--subjects", "physician", "--limit", "8", "--style", "cmmlu", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["metrics"]["accuracy/physician"] == result["overall"]["accuracy"]
    assert result["overall"]["total"] == 8 and Path(tmp_path / "r.items.jsonl").exists()
    assert main(["eval", "mcq", "--model", answers_c_model, "--data", str(tmp_path / "missing")]) == 2


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


def test_an_option_column_past_d_is_an_error_as_in_the_grpo_reader(tmp_path):
    from medgpt.data.records import read_prompts

    five = tmp_path / "x_val.csv"
    five.write_text("id,question,A,B,C,D,E,answer\n0,q,a,b,c,d,,A\n1,q,a,b,c,d,e,B\n", encoding="utf-8")
    for read in (mcq.load_questions, lambda path: read_prompts(path, "prompts")):
        with pytest.raises(UserError, match=r"x_val\.csv:3: too many options: option column\(s\) E: .*A, B, C, D only"):
            read(str(five))
    five.write_text("id,question,A,B,C,D,E,answer\n0,q,a,b,c,d,,A\n", encoding="utf-8")  # an empty E is no option
    assert mcq.load_questions(str(five))["x"][0].choices == ("a", "b", "c", "d")
    assert read_prompts(str(five), "prompts")[0][0]["options"] == "ABCD"


# ---- benchmark layouts, answer sets, yes/no/maybe, reasoning --------------------------------------

BENCHMARKS = Path(__file__).parent / "fixtures" / "benchmarks"  # made-up questions in each benchmark's layout


def test_each_benchmark_layout_is_detected_with_its_own_categories():
    expected = {"medqa_hf": ("medqa_hf", "single", 4), "medqa": ("medqa", "single", 4),
                "medqa_mcmle": ("medqa_mcmle", "single", 5), "medmcqa": ("medmcqa", "single", 4),
                "pubmedqa": ("pubmedqa", "label", 0), "mmlu": ("mmlu", "single", 4), "cmb": ("cmb", None, 5),
                "cmexam": ("cmexam", "set", 5), "medxpertqa": ("medxpertqa", "single", 10)}
    for folder, (fmt, rule, options) in expected.items():
        found, questions = mcq.load_set(str(BENCHMARKS / folder))
        flat = [q for qs in questions.values() for q in qs]
        assert found == fmt and {len(q.choices) for q in flat} == {options}, folder
        assert rule is None or {q.rule for q in flat} == {rule}, folder
    _, cmb = mcq.load_set(str(BENCHMARKS / "cmb"))
    assert sorted(cmb) == ["医师考试", "护理考试"]  # CMB's exam_type; exam_class as a category
    multi = [q for qs in cmb.values() for q in qs if q.rule == "set"]
    assert [q.answer for q in multi] == ["ABD", "ABC"] and {q.kind for q in multi} == {"多项选择题"}
    assert multi[0].meta["exam_class"] == "执业医师"
    _, medmcqa = mcq.load_set(str(BENCHMARKS / "medmcqa" / "validation.parquet"))
    assert sorted(medmcqa) == ["Anatomy", "Pathology", "Pediatrics", "Pharmacology"]
    assert medmcqa["Anatomy"][0].answer == "B"  # cop 1
    _, mx = mcq.load_set(str(BENCHMARKS / "medxpertqa"))
    q = mx["Understanding"][0]
    assert q.answer == "G" and q.letters == "ABCDEFGHIJ" and "Answer Choices" not in q.question
    prompt = mcq.prompt_text(q, [], "medqa")
    assert prompt.endswith("\nJ. Carbamoyl phosphate synthetase II\nAnswer:")
    _, cmexam = mcq.load_set(str(BENCHMARKS / "cmexam"))
    assert {q.answer for qs in cmexam.values() for q in qs} == {"B", "ABD", "A"}
    assert "（不定项选择题）" in mcq.prompt_text(cmexam["临床医学"][0], [], "cmb")


def test_pubmedqa_original_json_and_unknown_fields(tmp_path):
    """ori_pqal.json is one object keyed by PMID; a row of no known layout names every format tried."""
    ori = tmp_path / "ori_pqal.json"
    ori.write_text(json.dumps({"111": {"QUESTION": "Does it work?", "CONTEXTS": ["It was tested.", "It worked."],
                                       "final_decision": "yes", "LONG_ANSWER": "Yes."}}), encoding="utf-8")
    q = mcq.load_questions(str(ori))["pubmedqa"][0]
    assert (q.id, q.answer, q.rule, q.keys) == ("111", "yes", "label", ("yes", "no", "maybe"))
    assert mcq.prompt_text(q, [], "pubmedqa") == \
        "Abstract: It was tested.\nIt worked.\nQuestion: Does it work?\nAnswer:"
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"prompt": "x", "target": "y"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"odd.jsonl:1: fields prompt, target match no multiple-choice format; "
                                        r"tried medqa_hf .*cmb .*medxpertqa .*ceval"):
        mcq.load_questions(str(odd))
    with pytest.raises(UserError, match=r"missing field: sent1, ending0, ending1, label \(format medqa_hf"):
        mcq.load_questions(str(BENCHMARKS / "mmlu"), fmt="medqa_hf")
    bad = tmp_path / "cmb.json"
    bad.write_text(json.dumps([{"exam_type": "x", "question_type": "多项选择题", "question": "q",
                                "option": {"A": "1", "B": "2"}, "answer": "AC"}], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UserError, match=r"answer 'AC' is not a set of options among A, B"):
        mcq.load_questions(str(bad))


def test_answer_sets_and_labels_by_log_likelihood(tiny_model):
    """Multiple-answer questions score each of their 2^5 - 1 answer sets, yes/no/maybe their three labels; the
    reference is one unpadded float32 forward of prompt + continuation, summed over its tokens."""
    import torch

    from medgpt.models import open_model

    opened = open_model(tiny_model, dtype="fp32")
    scorer = mcq.LoglikScorer(opened.model, opened.tokenizer, opened.template, batch_size=7)
    for folder, style, keys in (("cmb", "cmb", 31), ("pubmedqa", "pubmedqa", 3)):
        questions = mcq.load_questions(str(BENCHMARKS / folder))
        items = mcq.evaluate_loglik(scorer, questions, {}, style, chat=False, max_length=2048)
        flat = [q for qs in questions.values() for q in qs]
        for q, item in zip(flat, items):
            assert item["rule"] == q.rule and item["correct"] == (item["pred"] == q.answer)
            if q.rule == "single":
                assert list(item["loglik"]) == list("ABCDE")
                continue
            assert len(item["loglik"]) == keys and item["pred"] == max(item["loglik"], key=item["loglik"].get)
            prompt = mcq.prompt_text(q, [], style)
            base = scorer.encode(prompt)
            for key in (q.answer, list(item["loglik"])[-1]):
                ids = scorer.encode(prompt, mcq._answer_prefix(style, False) + key)
                with torch.no_grad():
                    logprobs = torch.log_softmax(opened.model(torch.tensor([ids])).logits[0].float(), -1)
                expected = sum(float(logprobs[p - 1, ids[p]]) for p in range(len(base), len(ids)))
                assert item["loglik"][key] == pytest.approx(expected, abs=1e-3)
    summary = mcq.summarize(items)
    assert summary["by"]["rule"] == {"label": {"correct": sum(i["correct"] for i in items), "total": 3,
                                               "accuracy": summary["overall"]["accuracy"]}}
    assert len(summary["ci95"]["accuracy"]) == 2
    many = mcq.Question("x", "s", "q", tuple("abcdef"), "AB", "f:1", rule="set")
    with pytest.raises(UserError, match="63 answer sets, too many .*use --method generate"):
        mcq.choices_scored(many)


class _Replies:
    """An engine that replies with given texts (what is tested is how the replies are read)."""

    def __init__(self, template, texts):
        self.template, self.texts = template, texts

    def generate(self, batch, params):
        from medgpt.infer.base import Completion

        return [Completion(t, 0, 0, "stop") for t, _ in zip(self.texts, batch)]


def test_generated_answers_are_read_after_the_reasoning(tiny_model):
    """The answer after `</think>` is scored; a reply cut inside its reasoning is unanswered, not read; the mean
    reasoning length is reported (reply_parts is the one reading)."""
    from medgpt.models import open_model

    template = open_model(tiny_model, dtype="fp32").template
    questions = mcq.load_questions(str(BENCHMARKS / "cmb"))
    flat = [q for qs in questions.values() for q in qs]
    assert [q.answer for q in flat] == ["B", "ABD", "C", "ABC"]
    replies = ["<think>A looks right, but troponin rises later.</think>答案：B", "<think>肾病、视网膜、神经病变</think>A、B、D",
               "<think>先看C选项，漱口会误吸，所以答案是C", "答案：AB"]
    items = mcq.evaluate_generate(_Replies(template, replies), questions, {}, "cmb", 64)
    assert [i["pred"] for i in items] == ["B", "ABD", None, "AB"]
    assert [i["correct"] for i in items] == [True, True, False, False]
    assert items[2]["complete"] is False and items[2]["reasoning"].startswith("先看C选项")
    summary = mcq.summarize(items)
    assert summary["reasoning"]["cut_in_reasoning"] == 1 and summary["reasoning"]["with_reasoning"] == 3
    lengths = [len("A looks right, but troponin rises later."), len("肾病、视网膜、神经病变"), len(items[2]["reasoning"]), 0]
    assert summary["reasoning"]["mean_chars"] == pytest.approx(sum(lengths) / 4, abs=0.1)
    assert summary["metrics"]["unanswered"] == 1
    labels = mcq.evaluate_generate(_Replies(template, ["Answer: no", "maybe", "Yes."]),
                                   mcq.load_questions(str(BENCHMARKS / "pubmedqa")), {}, "pubmedqa", 16)
    assert [i["pred"] for i in labels] == ["no", "maybe", "yes"]


def test_eval_mcq_cli_on_a_benchmark_format(answers_c_model, tmp_path):
    out = tmp_path / "medxpertqa.json"
    assert main(["eval", "mcq", "--model", answers_c_model, "--data", str(BENCHMARKS / "medxpertqa"), "--format",
                 "medxpertqa", "--dtype", "fp32", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    items = [json.loads(line) for line in out.with_name("medxpertqa.items.jsonl").read_text().splitlines()]
    assert result["format"] == "medxpertqa" and result["style"] == "medqa"
    assert {i["pred"] for i in items} == {"C"} and result["accuracy"] == 0.0
    assert set(result["by"]) == {"rule", "medical_task", "body_system"}
    with pytest.raises(UserError, match="--format 'nope'"):
        mcq.load_questions(str(BENCHMARKS / "cmb"), fmt="nope")
