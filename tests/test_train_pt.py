"""medgpt.train.pt: how PT cuts a corpus into blocks (every document followed by eos, the stream unchanged) and,
with isolate_documents, keeps the documents packed into one block from attending to each other (the reference:
the model's logits for the document alone); on an extended vocabulary, LoRA trains the new tokens' rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from medgpt.train import build_config


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


@pytest.mark.slow
def test_pt_on_an_extended_vocabulary_trains_the_new_rows_and_merges(tiny_model, sample_data, tmp_path):
    """LoRA PT on a model `medgpt tokenizer extend` grew: embed_tokens/lm_head are trained in full (set for the
    user, said in the report), the new tokens' rows learn, and the merged model keeps the extended tokenizer and
    gives the adapter's logits (PEFT's unmerged forward is the reference)."""
    import torch
    from safetensors.torch import load_file

    from medgpt.models import merge_adapter, open_model
    from medgpt.report import write_training_report
    from medgpt.train import run_training
    from medgpt.vocab import ExtendArgs, extend_vocabulary

    corpus = str(sample_data / "pt" / "medical_corpus.txt")
    extended = tmp_path / "extended"
    report = extend_vocabulary(ExtendArgs(model=tiny_model, corpus=[corpus], out=str(extended), vocab_size=1000))
    out = tmp_path / "pt"
    cfg = build_config({"stage": "pt", "model": str(extended), "data": corpus, "output_dir": str(out),
                        "block_size": 64, "max_steps": 4, "learning_rate": 1e-2, "per_device_train_batch_size": 4,
                        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "report_prompts": "none",
                        "dtype": "fp32", "seed": 0})
    assert cfg.lora.modules_to_save == "embed_tokens,lm_head"
    run_training(cfg)
    write_training_report(cfg)
    assert "| trained in full |" in (out / "report.md").read_text() and \
        f"extended by {report['pieces_added']} tokens" in (out / "report.md").read_text()

    base_rows = load_file(str(extended / "model.safetensors"))["model.embed_tokens.weight"]
    saved = load_file(str(out / "adapter_model.safetensors"))
    [trained] = [v for k, v in saved.items() if k.endswith("embed_tokens.weight")][:1]
    new_ids = slice(report["base_tokens"], report["tokens"])
    assert trained.shape == base_rows.shape
    assert not torch.equal(trained[new_ids], base_rows[new_ids])  # the new tokens' rows learned

    merged = merge_adapter(str(out), str(tmp_path / "merged"))
    adapter, whole = open_model(str(extended), str(out), template="none", dtype="fp32"), \
        open_model(str(merged), template="none", dtype="fp32")
    assert len(whole.tokenizer) == report["tokens"]
    ids = torch.tensor([whole.tokenizer.encode("高血压患者应定期测量血压。Measure it daily.")])
    assert int(ids.max()) >= report["base_tokens"]
    with torch.no_grad():
        assert torch.allclose(adapter.model(ids).logits, whole.model(ids).logits, atol=1e-4)
