"""medgpt.train.prefs: the preference and RL stages train on prepared, memory-mapped conversational rows.

The reference is TRL's own path: a TRL-format preference file loaded with `datasets.load_dataset("json")` and
tokenized by DPOTrainer's `_prepare_dataset`, as a TRL user runs it. medgpt's rows (read by its readers, prepared
into the cache, decoded as they are read) go through the same TRL function and must give the same token ids,
tool definitions and reasoning included; overlong and bad records are counted with their `path:line`; the second
run loads the cache; KTO's unpaired rows and GRPO's prompts keep their carried columns."""

from __future__ import annotations

import json
from types import SimpleNamespace

from _stage_runs import write_jsonl

from medgpt.models import open_tokenizer
from medgpt.train import build_config, grpo, kto, prefs

TOOLS = [{"type": "function", "function": {"name": "dose", "description": "Look up a drug's adult dose.",
                                           "parameters": {"type": "object", "properties": {"drug": {"type": "string"}},
                                                          "required": ["drug"]}}}]
PAIRS = [
    {"prompt": [{"role": "user", "content": "发热三天，需要做哪些检查？"}],
     "chosen": [{"role": "assistant", "content": "建议查血常规和C反应蛋白。"}],
     "rejected": [{"role": "assistant", "content": "不用检查。"}]},
    {"prompt": [{"role": "system", "content": "You are a careful clinician."},
                {"role": "user", "content": "I have a rash."}, {"role": "assistant", "content": "Since when?"},
                {"role": "user", "content": "Two days."}],
     "chosen": [{"role": "assistant", "content": "Please show it to a doctor if it spreads."}],
     "rejected": [{"role": "assistant", "content": "It is nothing."}]},
    {"prompt": [{"role": "user", "content": "What is the adult dose of paracetamol?"}],
     "chosen": [{"role": "assistant", "content": "Up to 4 g a day.", "reasoning": "The label says 4 g."}],
     "rejected": [{"role": "assistant", "content": "As much as you like."}], "tools": TOOLS},
]


def config(model: str, tmp_path, data: str, stage: str = "dpo", **options):
    raw = {"stage": stage, "model": model, "data": data, "output_dir": str(tmp_path / "out"), "template": "qwen3",
           "allow_split_markers": True, "max_length": 256, "data_cache_dir": str(tmp_path / "cache"),
           "report_to": "none", **options}
    return build_config({key: value for key, value in raw.items() if value is not None})


def trl_tokenized(dataset, tokenizer, args) -> list[dict]:
    """DPOTrainer's own tokenization of `dataset` (TRL's `_prepare_dataset`; for conversational rows it uses only
    the processing class, not the trainer's state)."""
    from trl import DPOTrainer

    done = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), dataset, tokenizer, args, "train")
    return [{key: row[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in done]


def test_prepared_pairs_tokenize_as_trl_tokenizes_the_plain_json_file(tiny_model, tmp_path):
    from datasets import load_dataset

    reference_file = tmp_path / "trl.jsonl"  # TRL's form: tools as JSON text (TRL reads either)
    write_jsonl(reference_file, [{**p, "tools": json.dumps(p.get("tools"))} for p in PAIRS])
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = config(tiny_model, tmp_path, data)
    tokenizer = open_tokenizer(cfg.model)
    train, evals, stats = prefs.conversation_datasets(cfg, tokenizer)
    assert evals is None and stats["train"].to_dict()["kept"] == 3 and train.cache_files  # memory-mapped
    assert train[2]["tools"] == TOOLS and train[2]["chosen"] == PAIRS[2]["chosen"]
    plain = load_dataset("json", data_files=str(reference_file), split="train")
    assert trl_tokenized(train, tokenizer, cfg.train) == trl_tokenized(plain, tokenizer, cfg.train)
    assert "dose" in tokenizer.decode(trl_tokenized(train, tokenizer, cfg.train)[2]["prompt_ids"])

    again = prefs.conversation_datasets(cfg, open_tokenizer(cfg.model))
    assert again[0].cache_files[0]["filename"].startswith(str(tmp_path / "cache")) and len(again[0]) == 3
    assert len(list((tmp_path / "cache").glob("pref-*"))) == 1


def test_overlong_and_bad_pairs_are_counted_with_their_lines(tiny_model, tmp_path):
    long = {**PAIRS[0], "chosen": [{"role": "assistant", "content": "很长的回答。" * 200}]}
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [PAIRS[0], long]) + "{not json\n" +
                    json.dumps(PAIRS[1]) + "\n", encoding="utf-8")
    cfg = config(tiny_model, tmp_path, str(data), overlong="drop", on_error="skip")
    train, _, stats = prefs.conversation_datasets(cfg, open_tokenizer(cfg.model))
    counts = stats["train"].to_dict()
    assert len(train) == 2 and counts["dropped"] == {"longer than max_length": 1, "invalid JSON": 1}
    assert counts["examples"]["longer than max_length"] == [f"{data}:2"]
    assert counts["examples"]["invalid JSON"][0].startswith(f"{data}:3")
    truncated = prefs.conversation_datasets(config(tiny_model, tmp_path, str(data), on_error="skip",
                                                   overlong="truncate"), open_tokenizer(cfg.model))
    assert len(truncated[0]) == 3 and truncated[2]["train"].truncated == 1


def test_unpaired_rows_and_prompts_keep_their_columns(tiny_model, tmp_path, sample_data):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2])
    cfg = config(tiny_model, tmp_path, data, stage="kto", enable_thinking=False)
    train, _, _ = kto.unpaired_datasets(cfg, open_tokenizer(cfg.model))
    assert [(row["completion"][0]["content"], row["label"]) for row in train] == [
        (p[key][0]["content"], key == "chosen") for p in PAIRS[:2] for key in ("chosen", "rejected")]
    assert train[0]["chat_template_kwargs"] == {"enable_thinking": False}

    mcq = write_jsonl(tmp_path / "mcq.jsonl", [{"question": "Which is a fever reducer?", "A": "Paracetamol",
                                                "B": "Sugar", "answer": "A"}])
    cfg = config(tiny_model, tmp_path, mcq, stage="grpo", max_length=None, reward_fn="mcq_accuracy", per_device_eval_batch_size=2,
                 num_generations=2)
    row, = grpo.prompt_datasets(cfg, open_tokenizer(cfg.model))[0]
    assert (row["answer"], row["options"], row["reference"], row["rubrics"]) == ("A", "AB", None, None)
    assert row["prompt"][-1]["content"].startswith("Which is a fever reducer?\nA. Paracetamol")
