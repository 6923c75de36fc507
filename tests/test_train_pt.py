"""medgpt.train.pt: how PT cuts a corpus into blocks (every document followed by eos, the stream unchanged) and,
with isolate_documents, keeps the documents packed into one block from attending to each other (the reference:
the model's logits for the document alone)."""

from __future__ import annotations

from pathlib import Path

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
