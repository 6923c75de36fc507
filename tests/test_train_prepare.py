"""medgpt.train.prepare: the prepared-data path gives the rows and counts of encoding a list of records one by one
(`medgpt.data.readers.read_records` + `medgpt.data.encode.encode_conversations`, and the seeded held-out split)
record for record, in one process and in two, in one chunk and in several; it is cached by what determines it; a
bad record stops it with `path:line` and leaves no cache; `medgpt data prepare` prints what `medgpt train` will
train on; `medgpt data check` measures token lengths on the same path."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from medgpt.data.encode import encode_conversations
from medgpt.data.readers import read_records
from medgpt.errors import UserError
from medgpt.models import load_tokenizer
from medgpt.train import build_config
from medgpt.train.common import training_template
from medgpt.train.prepare import prepare, record_lengths


def config(tmp_path, data: str, **options):
    return build_config({"stage": "sft", "data": data, "output_dir": str(tmp_path / "out"), "template": "qwen",
                         "data_cache_dir": str(tmp_path / "cache"), **options})


def in_memory(cfg, tokenizer):
    """The rows and counts of reading into a list and encoding it (the reference path)."""
    records, stats = read_records(cfg.data.data, "sft", on_error=cfg.data.on_error)
    evals = []
    if cfg.data.val_size:  # a seeded shuffle picks the held-out records; both splits keep the records' order
        count = int(cfg.data.val_size) if cfg.data.val_size >= 1 else max(1, int(len(records) * cfg.data.val_size))
        order = list(range(len(records)))
        random.Random(cfg.train.seed).shuffle(order)
        held = set(order[:count])
        evals = [r for i, r in enumerate(records) if i in held]
        records = [r for i, r in enumerate(records) if i not in held]
    template = training_template(cfg, tokenizer)
    train = encode_conversations(records, tokenizer, template, cfg, stats)
    return train, encode_conversations(evals, tokenizer, template, cfg, stats), stats


def rows(dataset) -> list[dict]:
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in dataset] if dataset else []


def mixed_records(sample_data, path, count: int) -> str:
    """`count` lines cycling through the shipped SFT, tool and reasoning-free records, with a broken line and a
    record without a reply among them."""
    lines = [line for name in ("medical_sft.jsonl", "medical_tools.jsonl")
             for line in (sample_data / "sft" / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    out = list(itertools.islice(itertools.cycle(lines), count))
    out[7] = '{"conversations": [{"from": "human", "value": "no reply"'
    out[11] = json.dumps({"conversations": [{"from": "human", "value": "only a question"}]})
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return str(path)


def test_prepared_rows_and_counts_equal_the_in_memory_path(sample_data, tmp_path):
    tokenizer = load_tokenizer()
    data = ",".join(str(sample_data / "sft" / n) for n in ("medical_sft.jsonl", "medical_tools.jsonl"))
    cfg = config(tmp_path, data, max_length=200, val_size=0.25, dataset_num_proc=1)
    prepared = prepare(cfg, tokenizer, training_template(cfg, tokenizer))
    train, evals, stats = in_memory(cfg, tokenizer)
    assert stats.dropped["longer than max_length"] > 0  # the length rule is exercised
    assert rows(prepared.train) == train and rows(prepared.eval) == evals
    assert prepared.stats["train"].to_dict() == stats.to_dict()
    assert not prepared.cached

    again = prepare(cfg, tokenizer, training_template(cfg, tokenizer))
    assert again.cached and again.folder == prepared.folder and rows(again.train) == train
    assert again.stats["train"].to_dict() == stats.to_dict()
    # what determines the rows names the cache: another max_length, another system prompt
    for changed in (config(tmp_path, data, max_length=256, val_size=0.25),
                    config(tmp_path, data, max_length=200, val_size=0.25, system="You are a nurse.")):
        assert prepare(changed, tokenizer, training_template(changed, tokenizer)).folder != prepared.folder


@pytest.mark.slow
def test_two_processes_and_several_chunks_give_the_rows_and_counts_of_one(sample_data, tmp_path, monkeypatch):
    """2,400 records read and encoded 1,000 at a time (three chunks, each in two processes), with a held-out split
    that takes records from every chunk."""
    import medgpt.train.prepare

    monkeypatch.setattr(medgpt.train.prepare, "CHUNK_RECORDS", 1000)
    tokenizer = load_tokenizer()
    data = mixed_records(sample_data, tmp_path / "mixed.jsonl", 2400)
    cfg = config(tmp_path, data, max_length=160, overlong="truncate", on_error="skip", dataset_num_proc=2,
                 val_size=0.1)
    prepared = prepare(cfg, tokenizer, training_template(cfg, tokenizer))
    train, evals, stats = in_memory(cfg, tokenizer)
    assert stats.truncated > 0 and set(stats.dropped) == {"invalid JSON", "roles out of order",
                                                      "no assistant tokens after truncation"}, stats.dropped
    assert rows(prepared.train) == train and rows(prepared.eval) == evals
    assert prepared.stats["train"].to_dict() == stats.to_dict()
    parts = json.loads((prepared.folder / "parts.json").read_text())
    assert len({name.split("_")[0] for name in parts["train"]}) == 3 and len(parts["eval"]) >= 3
    lengths = [len(row["input_ids"]) for row in train]
    assert prepared.tokens["train"]["tokens"] == sum(lengths) and prepared.tokens["train"]["max"] == max(lengths)
    assert prepared.tokens["train"]["labelled_tokens"] == sum(l != -100 for row in train for l in row["labels"])
    # without a held-out split, the next chunk is read while this one is encoded (a reader thread)
    cfg = config(tmp_path, data, max_length=160, overlong="truncate", on_error="skip", dataset_num_proc=2)
    prepared = prepare(cfg, tokenizer, training_template(cfg, tokenizer))
    train, _, stats = in_memory(cfg, tokenizer)
    assert rows(prepared.train) == train and prepared.stats["train"].to_dict() == stats.to_dict()
    # `medgpt data check`'s token lengths, measured in two processes, are the lengths of encoding one by one
    records, _ = read_records(data, "sft", on_error="skip")
    template = training_template(cfg, tokenizer)
    measured = record_lengths(iter(records), "sft", tokenizer, template, tmp_path / "lengths", 2)
    assert list(measured["length"]) == [len(template.encode(tokenizer, r["messages"], tools=r.get("tools"))["input_ids"])
                                  for r in records]
    assert list(measured["loc"]) == [r["_loc"] for r in records]


def test_a_bad_record_stops_preparing_with_its_line_and_leaves_no_cache(sample_data, tmp_path):
    data = mixed_records(sample_data, tmp_path / "bad.jsonl", 20)
    cfg = config(tmp_path, data)
    tokenizer = load_tokenizer()
    with pytest.raises(UserError, match=r"bad\.jsonl:8: invalid JSON"):
        prepare(cfg, tokenizer, training_template(cfg, tokenizer))
    assert not list((tmp_path / "cache").iterdir())  # nor a half-built folder


def test_data_prepare_prints_what_train_will_train_on(sample_data, tmp_path, capsys):
    from medgpt.cli import main

    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"stage: sft\ndata: {sample_data / 'sft' / 'medical_sft.jsonl'}\ntemplate: chatml\n"
                   f"max_length: 128\ndata_cache_dir: {tmp_path / 'cache'}\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["data", "prepare", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "prepared data:" in out and "(new)" in out and "longer than max_length" in out
    assert main(["data", "prepare", "--json", str(cfg)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cached"] and report["train"]["rows"] == report["counts"]["train"]["kept"]
    assert 0 < report["train"]["labelled_tokens"] < report["train"]["tokens"]
    # `medgpt train` starts from the same folder
    from medgpt.models import open_tokenizer
    from medgpt.train import load_config
    from medgpt.train.sft import build_datasets

    loaded = load_config(str(cfg))
    assert len(build_datasets(loaded, open_tokenizer(loaded.model))[0]) == report["train"]["rows"]
    assert len(list((tmp_path / "cache").glob("sft-*"))) == 1
    # a DPO config: TRL's conversational rows, which `medgpt train` then loads from the same folder
    pairs = ["--stage", "dpo", "--data", str(sample_data / "pref" / "medical_pref.jsonl")]
    assert main(["data", "prepare", str(cfg), *pairs]) == 0
    out = capsys.readouterr().out
    assert "(conversational: the trainer tokenizes them)" in out and "pref-" in out
    from medgpt.train import prefs

    loaded = load_config(str(cfg), pairs)
    train, _, stats = prefs.conversation_datasets(loaded, open_tokenizer(loaded.model))
    assert len(list((tmp_path / "cache").glob("pref-*"))) == 1 and f"rows {len(train)} " in out
    assert set(train[0]) == {"prompt", "chosen", "rejected", "tools"} and stats["train"].kept >= len(train)
    # a PT config: the corpus's token rows (every token labelled)
    assert main(["data", "prepare", "--json", str(cfg), "--stage", "pt", "--data",
                 str(sample_data / "pt" / "medical_corpus.txt")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train"]["rows"] == report["counts"]["train"]["kept"] > 0
    assert report["train"]["labelled_tokens"] == report["train"]["tokens"]
