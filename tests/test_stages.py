"""Training stages pt, rm, dpo, orpo, kto, grpo on the tiny model: each stage's own learning signal,
read from metrics.jsonl; PT block construction and document isolation; reward functions; `medgpt score`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from medgpt.cli import main
from medgpt.data.answers import extract_choice
from medgpt.data.records import read_prompts, read_unpaired
from medgpt.errors import UserError
from medgpt.train import build_config, run_training
from medgpt.train.rewards import AUTO, REWARD_FUNCTIONS, answer_format, length_reward, mcq_accuracy

FAST = dict(template="chatml", per_device_train_batch_size=4, logging_steps=1, activation_checkpointing=False,
            report_to="none", report_prompts="none", save_strategy="no", seed=0, max_length=64,
            lr_scheduler_type="constant", dtype="fp32")  # the same numbers on CPUs with and without native bf16
TOPICS = ["fever", "cough", "rash", "headache", "back pain", "sore throat", "dizziness", "nausea",
          "insomnia", "fatigue", "earache", "toothache"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def keyword_pairs(path: Path) -> str:
    """Separable preferences: the chosen reply sends the patient to a doctor, the rejected one does not."""
    return write_jsonl(path, [{"question": f"What should I do about my {t}?",
                               "response_chosen": f"See a doctor about the {t}.",
                               "response_rejected": f"Ignore the {t}."} for t in TOPICS])


def train(stage: str, model: str, out: Path, data: str, **options) -> list[dict]:
    """Run a stage (options set to None are left unset) and return its metrics log."""
    raw = {"stage": stage, "model": model, "data": data, "output_dir": str(out), **FAST, **options}
    cfg = build_config({k: v for k, v in raw.items() if v is not None})
    run_training(cfg)
    assert (out / "medgpt.json").exists() and (out / "final_metrics.json").exists()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def series(rows: list[dict], key: str) -> list[float]:
    return [row[key] for row in rows if key in row]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# ---- pt --------------------------------------------------------------------------------------------


DOCS = ["Aspirin thins the blood and relieves pain.", "Insulin lowers blood sugar.",
        "Vaccines train the immune system to recognise germs before an infection happens."]


def pt_trainer(model: str, tmp_path: Path, **options):
    from medgpt.train import pt

    (tmp_path / "docs.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    cfg = build_config({"stage": "pt", "model": model, "data": str(tmp_path / "docs.txt"),
                        "output_dir": str(tmp_path / "pt"), "shuffle_dataset": False, "report_to": "none",
                        "dtype": "fp32", **options})  # fp32 on every CPU: the model is called outside autocast
    return pt.build_trainer(cfg)[0]


def test_pt_blocks_join_documents_with_eos(tiny_model, tmp_path):
    trainer = pt_trainer(tiny_model, tmp_path, block_size=16)
    tok = trainer.processing_class
    stream = [i for doc in DOCS for i in tok(doc)["input_ids"] + [tok.eos_token_id]]
    blocks = trainer.train_dataset["input_ids"]
    assert [i for b in blocks for i in b] == stream
    assert all(len(b) == 16 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 16
    assert "seq_lengths" not in trainer.train_dataset.column_names


def test_pt_isolated_documents_do_not_attend_to_each_other(tiny_model, tmp_path):
    import torch

    trainer = pt_trainer(tiny_model, tmp_path, block_size=24, isolate_documents=True)
    tok = trainer.processing_class
    docs = [tok(d)["input_ids"] + [tok.eos_token_id] for d in DOCS]
    rows = trainer.train_dataset
    assert sorted(i for r in rows for i in r["input_ids"]) == sorted(i for d in docs for i in d)
    packed = next(r for r in rows if len(r["seq_lengths"]) > 1)  # two documents share a block
    first = packed["seq_lengths"][0]
    batch = trainer.data_collator([packed])
    assert batch["position_ids"][0, first] == 0  # positions restart at the second document
    model = trainer.model.eval()
    with torch.no_grad():
        in_block = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, first:]
        alone = model(input_ids=torch.tensor([packed["input_ids"][first:]])).logits[0]
        leaky = model(input_ids=torch.tensor([packed["input_ids"]])).logits[0, first:]
    assert torch.allclose(in_block, alone, atol=1e-4)
    assert not torch.allclose(leaky, alone, atol=1e-2)  # without isolation the context would change them


def test_pt_loss_goes_down(tiny_model, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"The patient with {t} should rest and drink water.\n" for t in TOPICS), encoding="utf-8")
    rows = train("pt", tiny_model, tmp_path / "out", str(corpus), method="full", block_size=32, max_length=None,
                 max_steps=6, learning_rate=1e-2, val_size=2)
    losses = series(rows, "loss")
    assert mean(losses[-2:]) < losses[0] - 1.0
    final = json.loads((tmp_path / "out" / "final_metrics.json").read_text())
    assert final["eval_perplexity"] == pytest.approx(2.718281828 ** final["eval_loss"], rel=1e-3)


# ---- rm and `medgpt score` -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model(tiny_model, tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("rm")
    data = keyword_pairs(tmp / "pairs.jsonl")
    rows = train("rm", tiny_model, tmp / "rm", data, max_steps=12, learning_rate=5e-3, val_size=4, eval_on_start=True)
    return tmp / "rm", rows


def test_rm_learns_pairwise_preference(reward_model):
    from transformers import AutoTokenizer

    from medgpt.data.templates import get_template

    folder, rows = reward_model
    before, *_, after = series(rows, "eval_accuracy")
    margins = series(rows, "eval_margin")
    assert after == 1.0 and margins[-1] > margins[0] + 1.0
    assert mean(series(rows, "accuracy")[-3:]) == 1.0
    # the named template was rendered by TRL and is saved with the model
    assert AutoTokenizer.from_pretrained(folder).chat_template == get_template("chatml").chat_template()


def test_score_command_ranks_pairs(reward_model, tmp_path, capsys):
    folder, _ = reward_model
    scores = {}
    for reply in ("See a doctor about the fever.", "Ignore the fever."):
        assert main(["score", "--model", str(folder), "--prompt", "What should I do about my fever?",
                     "--response", reply]) == 0
        scores[reply] = float(capsys.readouterr().out)
    assert scores["See a doctor about the fever."] > scores["Ignore the fever."]

    pairs = keyword_pairs(tmp_path / "pairs.jsonl")
    single = write_jsonl(tmp_path / "single.jsonl", [{"prompt": "My rash?", "response": "See a doctor about the rash."}])
    assert main(["score", "--model", str(folder), "--input", f"{pairs},{single}", "--output", str(tmp_path / "o.jsonl")]) == 0
    assert "pairwise accuracy 1.000 (12/12" in capsys.readouterr().err
    scored = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(scored) == 13 and all(r["chosen_score"] > r["rejected_score"] for r in scored[:12])
    assert isinstance(scored[-1]["score"], float)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q"}\n', encoding="utf-8")
    assert main(["score", "--model", str(folder), "--input", str(bad)]) == 2
    assert f"{bad}:1: missing field" in capsys.readouterr().err


def test_reward_model_is_a_grpo_reward(reward_model):
    from medgpt.train.rewards import RewardArgs, build_rewards

    folder, _ = reward_model
    funcs = build_rewards(RewardArgs(reward_fn="auto", reward_model=str(folder)))
    assert [getattr(f, "__name__", None) for f in funcs] == ["mcq_accuracy", "answer_format", "reward_model"]
    prompt = [{"role": "user", "content": "What should I do about my cough?"}]
    replies = [[{"role": "assistant", "content": "See a doctor about the cough."}],
               [{"role": "assistant", "content": "Ignore the cough."}]]
    good, bad = funcs[2](prompts=[prompt, prompt], completions=replies, answer=[None, None])
    assert good > bad
    with pytest.raises(UserError, match="reward_model needs"):
        build_rewards(RewardArgs(reward_fn="mcq_accuracy,reward_model"))
    with pytest.raises(UserError, match="expected auto or"):
        build_rewards(RewardArgs(reward_fn="accuracy"))


# ---- dpo, orpo, kto --------------------------------------------------------------------------------


@pytest.mark.slow
def test_dpo_margins_grow(tiny_model, tmp_path):
    long = write_jsonl(tmp_path / "long.jsonl", [{"question": "Tell me everything.", "response_chosen": "word " * 100,
                                                  "response_rejected": "no"}])
    data = f"{keyword_pairs(tmp_path / 'pairs.jsonl')},{long}"
    rows = train("dpo", tiny_model, tmp_path / "out", data, max_steps=8, learning_rate=5e-3, beta=0.1,
                 loss_type="sigmoid")
    stats = json.loads((tmp_path / "out" / "data_stats.json").read_text())["train"]
    assert (stats["read"], stats["kept"], stats["dropped"]) == (13, 12, {"longer than max_length": 1})
    assert stats["examples"]["longer than max_length"] == [f"{long}:1"]
    margins = series(rows, "rewards/margins")
    assert margins[0] == pytest.approx(0.0, abs=1e-3)  # the adapter starts at zero: policy == reference
    assert mean(margins[-2:]) > 0.5
    assert mean(series(rows, "rewards/accuracies")[-2:]) == 1.0


@pytest.mark.slow
def test_orpo_odds_ratio_term_raises_the_odds_of_the_chosen_reply(tiny_model, tmp_path):
    """TRL's ORPO logs `log_odds_chosen` (the mean log odds ratio of chosen over rejected), `log_odds_ratio` (the
    mean log-sigmoid of it, the term `beta` weighs) and `rewards/margins` (beta times the log-probability gap).
    The untrained model has no preference (log-sigmoid(0) = -ln 2); the supervised loss on the chosen reply alone
    (beta 0) raises its odds a little, the odds-ratio term clearly more."""
    data = keyword_pairs(tmp_path / "pairs.jsonl")
    runs = {beta: train("orpo", tiny_model, tmp_path / f"beta{beta}", data, method="full", max_steps=8,
                        learning_rate=3e-3, beta=beta) for beta in (0.0, 0.5)}
    rows = runs[0.5]
    losses, odds = series(rows, "loss"), series(rows, "log_odds_chosen")
    assert mean(losses[-2:]) < losses[0] - 1.0
    assert series(rows, "log_odds_ratio")[0] == pytest.approx(-math.log(2), abs=0.1)
    assert mean(series(rows, "log_odds_ratio")[-2:]) > series(rows, "log_odds_ratio")[0] + 0.2
    assert mean(odds[-2:]) > odds[0] + 0.5
    assert mean(series(rows, "rewards/margins")[-2:]) > 0.2 and series(rows, "rewards/accuracies")[-1] == 1.0
    assert mean(odds[-2:]) > mean(series(runs[0.0], "log_odds_chosen")[-2:]) + 0.2


@pytest.mark.slow
def test_kto_loss_goes_down_on_pairs_and_unpaired_rows(tiny_model, tmp_path):
    pairs = keyword_pairs(tmp_path / "pairs.jsonl")
    unpaired = write_jsonl(tmp_path / "unpaired.jsonl", [
        {"prompt": f"Is my {t} serious?", "completion": f"See a doctor about the {t}." if good else f"Ignore the {t}.",
         "label": good} for t, good in zip(TOPICS[:8], [True, False] * 4)])
    rows = train("kto", tiny_model, tmp_path / "out", f"{pairs},{unpaired}", method="full", max_steps=8,
                 learning_rate=3e-3, beta=0.1)
    losses = series(rows, "loss")
    assert losses[0] == pytest.approx(0.5, abs=1e-3)  # policy == reference at the start
    assert mean(losses[-2:]) < 0.45
    assert mean(series(rows, "rewards/margins")[-2:]) > 0.5


def test_unpaired_reader_counts_and_locates(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [
        {"question": "Q", "response_chosen": "good", "response_rejected": "bad"},
        {"prompt": "Q2", "completion": "fine", "label": 1},
        {"prompt": "Q3", "completion": "x", "label": "maybe"},
    ])
    records, stats = read_unpaired(path, "unpaired", on_error="skip")
    assert [(r["completion"][0]["content"], r["label"]) for r in records] == [("good", True), ("bad", False),
                                                                             ("fine", True)]
    assert (stats.read, stats.kept, dict(stats.dropped)) == (3, 2, {"wrong type": 1})
    with pytest.raises(UserError, match=r"u\.jsonl:3: wrong type: \"label\" is 'maybe'"):
        read_unpaired(path, "unpaired")


# ---- grpo and rewards ------------------------------------------------------------------------------


def test_mcq_accuracy_on_fixed_completions():
    completions = ["B", "答案是C。", "The answer is (D) because...", "A. Aspirin", "[{]", "A or B?",
                   "Vitamin B12 deficiency; the correct option is A"]
    answers = ["B", "C", "A", "A", "A", "A", "A"]
    assert mcq_accuracy(completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    chat = [[{"role": "assistant", "content": "选B"}]]
    assert mcq_accuracy(chat, answer=["B"]) == [1.0]
    assert mcq_accuracy(["B", "B"], answer=[None, "B"]) == [None, 1.0]  # open questions are left out
    assert mcq_accuracy(["E", "E"], answer=["E", "B"], options=["ABCDE", "ABCD"]) == [1.0, 0.0]
    assert extract_choice("The answer is a combination of two drugs.") is None


# explained, lowercase and full-width answers to a question whose key is B (the letters as a reader reads them)
RIGHT = ["B", "选项A错误，选项C错误，所以答案是B", "Answer: B. Option A is a distractor.",
         "The answer is (B). However option C is also reasonable in patients with renal impairment.", "**Answer:** B",
         "ｂ", "Ｂ", "答案：b", "分析：A项描述的是一期愈合，不符合；C项和D项均为并发症，与题干无关。" * 6 + "所以答案是B。"]
NO_ANSWER = ["", "   ", "我不知道", "答案是维生素B12", "B和C", "B or C", "The answer depends on the patient.",
             "Vitamin B12 deficiency causes megaloblastic anaemia."]


def test_rewards_never_tie_an_unanswered_reply_with_a_correct_one():
    """Per reward function and summed as GRPO sums them with its default weights (TRL's GRPOConfig: reward_weights
    unset = 1 each), every correct reply scores above every empty or unanswered one."""
    from trl import GRPOConfig

    assert GRPOConfig(output_dir="unused", use_cpu=True).reward_weights is None
    replies = RIGHT + NO_ANSWER
    scores = {name: REWARD_FUNCTIONS[name](replies, answer=["B"] * len(replies), options=["ABCD"] * len(replies))
              for name in AUTO}
    assert scores["mcq_accuracy"] == [1.0] * len(RIGHT) + [0.0] * len(NO_ANSWER)
    summed = [sum(column) for column in zip(*scores.values())]
    for values in (*scores.values(), summed):
        assert min(values[:len(RIGHT)]) > max(values[len(RIGHT):]), values
    assert answer_format(RIGHT[-1:], answer=["B"])[0] == 0.5  # explained past 200 characters: still above no answer
    lengths = length_reward(RIGHT + ["", " "])
    assert min(lengths[:len(RIGHT)]) > max(lengths[len(RIGHT):]) == 0.0


def test_format_and_length_rewards():
    assert answer_format(["B", "I think A or maybe B"], answer=["B", "B"]) == [1.0, 0.0]
    open_ = answer_format(["Rest and drink water.", "Rest and drink water and", ""], answer=[None] * 3)
    assert open_[0] == 1.0 and open_[1] < 1.0 and open_[2] == 0.0
    assert answer_format(["Take it. " * 10], answer=[None])[0] < 1.0  # repetition
    assert length_reward(["x" * 10, "x" * 40, ""], target_chars=20) == [1.0, 0.5, 0.0]


def test_grpo_reader_builds_mcq_and_open_prompts(sample_data, tmp_path):
    records, stats = read_prompts(str(sample_data / "mcq" / "val" / "physician_val.csv"), "prompts")
    assert stats.kept == len(records) == 24
    first = records[0]
    assert first["answer"] in "ABCD" and first["options"] == "ABCD"
    assert "\nA. " in first["prompt"][0]["content"] and first["prompt"][0]["content"].endswith("字母。")
    open_rows, _ = read_prompts(str(sample_data / "sft" / "medical_sft.jsonl"), "prompts", max_samples=3)
    assert all(r["prompt"][-1]["role"] == "user" and r["reference"] and r["answer"] is None for r in open_rows)
    bad = tmp_path / "bad.csv"
    bad.write_text("question,A,B,answer\nQ?,yes,no,C\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.csv:2: wrong type: \"answer\" is 'C', expected one of A, B"):
        read_prompts(str(bad), "prompts")


def stopping_model(folder: Path, tokenizer_from: str) -> str:
    """A tiny random Phi (its LM head has a bias) that ends a reply after each token with probability 0.15,
    so sampled replies differ in length, as a pretrained model's do (a uniform random model never stops)."""
    import math

    import torch
    from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=512, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id))
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[tok.eos_token_id] = math.log(0.15 / 0.85 * len(tok))
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_grpo_ends_completions_at_the_template_stop_tokens(tiny_model, tmp_path):
    """chatml stops at <|im_end|> and <|im_start|>; the tiny model's own eos is <|im_end|> only. TRL's GRPOTrainer
    ends and masks completions at `eos_token_ids`, which must hold both (ids from the real tokenizer)."""
    from transformers import AutoTokenizer

    from medgpt.train import grpo

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    expected = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>")}
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"query": f"Tell me about {t}."} for t in TOPICS[:4]])
    raw = {"stage": "grpo", "model": tiny_model, "data": prompts, "output_dir": str(tmp_path / "out"), **FAST,
           "max_length": None, "num_generations": 4, "max_completion_length": 8, "max_steps": 1, "use_vllm": False}
    trainer, _ = grpo.build(build_config({k: v for k, v in raw.items() if v is not None}))
    assert set(trainer.eos_token_ids) == expected and len(expected) == 2
    assert set(trainer.generation_config.eos_token_id) == expected
    assert trainer.args.generation_kwargs is None  # transformers generation: no vLLM sampling keys

    vllm = build_config({k: v for k, v in {**raw, "template": "alpaca"}.items() if v is not None})
    vllm.train.use_vllm, vllm.train.generation_kwargs = True, {"min_tokens": 1}
    ids, strings = grpo.stops(vllm)  # alpaca's stop words are several tokens each for this tokenizer
    assert strings == ["</s>", "### Instruction:"]
    assert all(len(tokenizer.encode(w, add_special_tokens=False)) > 1 for w in strings)
    assert vllm.train.generation_kwargs == {"stop_token_ids": ids, "stop": strings, "min_tokens": 1}
    assert ids == [tokenizer.eos_token_id]


@pytest.mark.slow
def test_grpo_mean_reward_goes_up(tiny_model, tmp_path):
    model = stopping_model(tmp_path / "model", tiny_model)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"query": f"Tell me about {t}."} for t in TOPICS])
    rows = train("grpo", model, tmp_path / "out", prompts, max_length=None, reward_fn="length",
                 reward_kwargs={"target_chars": 5}, num_generations=4, max_completion_length=8, max_steps=10,
                 learning_rate=1e-2, method="full")
    rewards = series(rows, "reward")
    assert mean(rewards[-3:]) > mean(rewards[:3]) + 0.15  # shorter replies: the model learns to stop early


# ---- the LM head the loss reads ------------------------------------------------------------------------


def head_run(stage: str, model: str, out: Path, head: str) -> list[dict]:
    """Two logged steps of `stage` with `lm_head_loss: head`; the trainer's log rows."""
    from trl import DPOTrainer, SFTTrainer

    from medgpt.train import common, lm_head, prefs, sft

    data = Path(__file__).resolve().parents[1] / "src/medgpt/sample_data" / (
        "pref/medical_pref.jsonl" if stage == "dpo" else "sft/medical_sft.jsonl")
    cfg = build_config({"stage": stage, "model": model, "data": str(data), "output_dir": str(out),
                        "max_samples": 4, "max_steps": 2, "learning_rate": 1e-2, "lora_dropout": 0.0,
                        "lm_head_loss": head, **{**FAST, "max_length": 256, "per_device_train_batch_size": 2}})
    if stage == "sft":
        trainer, _ = common.build_trainer(cfg, SFTTrainer, sft.build_datasets)
    else:
        trainer, _ = common.build_trainer(cfg, DPOTrainer, prefs.conversation_datasets)
    assert lm_head.choose(cfg, trainer.model.get_base_model()) == head
    trainer.train()
    return [row for row in trainer.state.log_history if "loss" in row]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_plain_lm_head_trains_exactly_like_trls_chunked_head(stage, tiny_model, tmp_path):
    """The reference is TRL's own chunked log-prob head (`trl.trainer.utils.add_fused_lm_head`): the plain head
    (the logits of the labelled positions) gives the same loss, to 1e-5, and the same metrics, step by step
    (each step's update follows the previous step's gradient, so the gradients agree too)."""
    chunked = head_run(stage, tiny_model, tmp_path / "chunked", "chunked")
    plain = head_run(stage, tiny_model, tmp_path / "plain", "plain")
    assert len(chunked) == len(plain) == 2
    keys = {"loss", "entropy", "mean_token_accuracy", "rewards/margins", "logps/chosen", "logits/chosen"}
    for a, b in zip(chunked, plain):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
        for key in keys & a.keys():
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert chunked[-1]["loss"] != chunked[0]["loss"]  # the steps trained


def test_lm_head_auto_is_plain_on_a_cpu_and_bad_values_are_errors(tiny_model, tmp_path):
    from medgpt.train import lm_head

    raw = {"stage": "sft", "model": tiny_model, "data": "x.jsonl", "output_dir": str(tmp_path), **FAST}
    cfg = build_config(raw)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert cfg.train.use_cpu and lm_head.choose(cfg, model) == "plain"
    assert lm_head.choose(build_config({**raw, "stage": "kto"}), model) == "chunked"  # TRL's head stays
    with pytest.raises(UserError, match="stage kto keeps TRL's head"):
        lm_head.choose(build_config({**raw, "stage": "kto", "lm_head_loss": "plain"}), model)
    with pytest.raises(UserError, match="lm_head_loss 'fast': expected one of auto, plain, chunked"):
        build_config({**raw, "lm_head_loss": "fast"})


def test_liger_kernels_on_a_cpu_are_an_error(tiny_model, tmp_path):
    raw = {"stage": "sft", "model": tiny_model, "data": "x.jsonl", "output_dir": str(tmp_path), **FAST}
    with pytest.raises(UserError, match="use_liger_kernel: Liger's kernels are Triton kernels for CUDA GPUs"):
        build_config({**raw, "use_liger_kernel": True})
