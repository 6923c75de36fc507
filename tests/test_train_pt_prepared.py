"""medgpt.train.pt on prepared and streamed data: the training blocks are those TRL's SFTTrainer builds from plain
`text` rows (the reference: the same trainer given the records as text, as PT was fed before), wrapped and with
isolate_documents, tokenized in one process or two; the cached re-run reuses the tokens; `streaming: true` packs
the same blocks on the fly, keeps `path:line` errors and counted drops, and is refused where it cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medgpt.errors import UserError
from medgpt.train import build_config


def pt_config(model: str, tmp_path: Path, data: Path, **options):
    return build_config({"stage": "pt", "model": model, "data": str(data), "output_dir": str(tmp_path / "pt"),
                         "data_cache_dir": str(tmp_path / "cache"), "report_to": "none", "dtype": "fp32",
                         "save_strategy": "no", **options})


def text_rows(cfg, tokenizer):
    """The reference: the records as plain `text` rows, tokenized and packed by TRL."""
    from datasets import Dataset

    from medgpt.data.readers import read_records
    from medgpt.train.common import held_out

    records, stats = read_records(cfg.data.data, "pt")
    texts = [{"text": r["text"]} for r in records]
    kept, held = held_out(len(texts), cfg.data.val_size, cfg.train.seed) if cfg.data.val_size else (range(len(texts)), [])
    kept, held = sorted(kept), sorted(held)  # both splits keep the records' order
    return (Dataset.from_list([texts[i] for i in kept]), Dataset.from_list([texts[i] for i in held]) if held else None,
            {"train": stats})


def blocks(dataset) -> list[dict]:
    return [{k: list(v) for k, v in row.items()} for row in dataset]


def build(cfg, datasets):
    from trl import SFTTrainer

    from medgpt.train import common

    return common.build_trainer(cfg, SFTTrainer, datasets)


@pytest.mark.parametrize("options", [{"block_size": 64, "shuffle_dataset": True},
                                     {"block_size": 96, "isolate_documents": True}], ids=["wrapped", "isolated"])
def test_prepared_blocks_are_those_trl_builds_from_text_rows(tiny_model, sample_data, tmp_path, options):
    from medgpt.train import pt

    corpus = sample_data / "pt" / "medical_corpus.txt"
    if not options.get("isolate_documents"):  # enough documents for a process per CPU (up to two) to tokenize
        lines = corpus.read_text(encoding="utf-8").splitlines()
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("\n".join(lines * (2100 // len(lines) + 1)) + "\n", encoding="utf-8")
    cfg = pt_config(tiny_model, tmp_path, corpus, val_size=0.1, **options)
    reference, stats = build(cfg, text_rows)
    prepared, prepared_stats = build(cfg, pt.text_datasets)
    assert blocks(prepared.train_dataset) == blocks(reference.train_dataset)
    assert blocks(prepared.eval_dataset) == blocks(reference.eval_dataset)
    assert {k: s.to_dict() for k, s in prepared_stats.items()} == {k: s.to_dict() for k, s in stats.items()}
    again = pt.text_datasets(cfg, prepared.processing_class)
    assert len(list((tmp_path / "cache").glob("pt-*"))) == 1 and again[2]["train"].to_dict() == stats["train"].to_dict()


def test_streaming_needs_max_steps_and_stage_pt(tmp_path):
    base = {"stage": "pt", "data": "corpus.txt", "output_dir": str(tmp_path), "streaming": True, "block_size": 32}
    with pytest.raises(UserError, match="streaming: true needs max_steps"):
        build_config(base)
    with pytest.raises(UserError, match="cannot hold out val_size"):
        build_config({**base, "max_steps": 5, "val_size": 0.1})
    with pytest.raises(UserError, match="streaming: true is for stage pt"):
        build_config({**{k: v for k, v in base.items() if k != "block_size"}, "stage": "sft", "max_steps": 5})
    assert build_config({**base, "max_steps": 5}).data.streaming


def test_streamed_blocks_equal_the_prepared_ones_and_train(tiny_model, sample_data, tmp_path):
    from medgpt.train import common, pt

    lines = (sample_data / "pt" / "medical_corpus.txt").read_text(encoding="utf-8").splitlines()
    records = [json.dumps({"text": line}, ensure_ascii=False) for line in lines if line.strip()]
    records[5] = '{"text": "a broken line'
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(records) + "\n", encoding="utf-8")
    (tmp_path / "held_out.txt").write_text("\n".join(lines[:3]) + "\n", encoding="utf-8")
    options = {"block_size": 64, "max_steps": 2, "per_device_train_batch_size": 2, "on_error": "skip",
               "eval_data": str(tmp_path / "held_out.txt"), "eval_strategy": "no"}
    prepared = build(pt_config(tiny_model, tmp_path, corpus, **options), pt.text_datasets)[0]
    cfg = pt_config(tiny_model, tmp_path, corpus, streaming=True, **options)
    streamed, stats = build(cfg, pt.text_datasets)
    assert type(streamed.train_dataset).__name__ == "IterableDataset"
    assert blocks(streamed.train_dataset) == blocks(prepared.train_dataset)
    assert blocks(streamed.eval_dataset) == blocks(prepared.eval_dataset)
    assert stats["train"].dropped == {"invalid JSON": 1} and stats["train"].examples["invalid JSON"] == \
        [f"{corpus}:6"]
    metrics = common.train_and_save(streamed, cfg, stats)
    assert metrics["train_loss"] > 0 and streamed.state.global_step == 2
    assert json.loads((tmp_path / "pt" / "data_stats.json").read_text())["train"]["dropped"] == {"invalid JSON": 1}

    failing = pt_config(tiny_model, tmp_path, corpus, streaming=True, **{**options, "on_error": "fail"})
    with pytest.raises(UserError, match=r"corpus\.jsonl:6: invalid JSON"):
        blocks(pt.text_datasets(failing, streamed.processing_class)[0])
