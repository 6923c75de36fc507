"""medgpt.eval.ppl: the negative log-likelihood of the answers and the perplexity; the reference is transformers'
causal-LM loss with labels on the assistant tokens. `eval ppl` writes its result and one item per row."""

from __future__ import annotations

import json
import math

import pytest

from medgpt.cli import main


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
