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
