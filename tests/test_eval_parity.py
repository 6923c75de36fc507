"""Parity: the comparison rules on hand-made outputs, and the whole check on a LoRA trained a few steps on the bundled
model (PEFT unmerged, medgpt's engine, and the GGUF in f16 and q8_0 read back by transformers' GGUF loader, each
against the merged model)."""

from __future__ import annotations

import pytest
from _stage_runs import train

from medgpt.errors import UserError
from medgpt.eval.parity import Outputs, Tolerance, compare, cut_at_stop, format_table, run_parity

STOP = {2}


def outputs(logprobs, top1, greedy, margins=None):
    return Outputs([logprobs], [top1], [greedy], [margins] if margins else None)


def test_equal_outputs_pass():
    ref = outputs([-1.0, -2.0], [5, 6], [7, 8, 2], [3.0, 3.0])
    result = compare(ref, outputs([-1.0, -2.0], [5, 6], [7, 8, 2]), Tolerance(1e-3), [1], STOP)
    assert result["passed"] and result["max_logprob_delta"] == 0 and result["top1_agreement"] == 1.0
    assert result["first_divergence"] is None


def test_a_log_prob_beyond_the_tolerance_fails_and_names_the_position():
    ref = outputs([-1.0, -2.0], [5, 6], [7], [3.0, 3.0])
    result = compare(ref, outputs([-1.0, -2.01], [5, 6], [7]), Tolerance(1e-3), [1], STOP)
    assert not result["passed"] and result["max_logprob_delta"] == pytest.approx(0.01)
    assert result["first_divergence"]["prompt"] == 0 and result["first_divergence"]["position"] == 2


def test_flips_at_near_ties_are_explained_elsewhere_they_fail():
    """A top-1 or greedy difference where the reference's two best tokens are within 2x the tolerance passes."""
    tie = outputs([-0.7, -0.7], [5, 6], [7, 8], [1e-4, 1e-4])
    flipped = outputs([-0.7, -0.7], [9, 6], [7, 9])
    result = compare(tie, flipped, Tolerance(1e-3), [1], STOP)
    assert result["passed"] and result["top1_agreement"] == 0.5 and result["greedy_agreement"] == 0.0
    clear = outputs([-0.7, -0.7], [5, 6], [7, 8], [4.0, 4.0])
    result = compare(clear, flipped, Tolerance(1e-3), [1], STOP)
    assert result["failures"] == ["1 top-1 disagreement(s) away from a near-tie",
                                  "1 greedy divergence(s) away from a near-tie"]
    assert result["first_divergence"]["kind"] == "teacher-forced" and result["first_divergence"]["position"] == 1


def test_a_continuation_cut_short_without_a_stop_agrees_one_stopping_early_does_not():
    ref = outputs([-0.1, -0.1], [5, 6], [7, 8, 9], [4.0, 4.0])
    assert compare(ref, outputs([-0.1, -0.1], [5, 6], [7, 8]), Tolerance(1e-3), [1], STOP)["greedy_agreement"] == 1
    assert compare(ref, outputs([-0.1, -0.1], [5, 6], [7, 2]), Tolerance(1e-3), [1], STOP)["greedy_agreement"] == 0
    assert cut_at_stop([4, 2, 5], STOP, 10) == [4, 2] and cut_at_stop([4, 5, 6], STOP, 2) == [4, 5]


def test_options_it_cannot_honour_are_errors(tiny_model):
    with pytest.raises(UserError, match="runtimes onnx"):
        run_parity(tiny_model, runtimes=("onnx",))
    with pytest.raises(UserError, match="parity of f32: no stated tolerance"):
        run_parity(tiny_model, quants=("f32",))
    with pytest.raises(UserError, match="no such GGUF file"):
        run_parity(tiny_model, gguf_files=("/nonexistent.gguf",))


@pytest.fixture(scope="module")
def trained_adapter(bundled_model, sample_data, tmp_path_factory):
    """A LoRA trained 3 steps on the bundled model (a high learning rate, so the adapter moves the log-probs)."""
    out = tmp_path_factory.mktemp("parity") / "lora"
    train("sft", bundled_model, out, str(sample_data / "sft" / "medical_sft.jsonl"), method="lora", max_steps=3,
          learning_rate=5e-3, max_samples=6, val_size=0, eval_strategy="no", max_length=160,
          per_device_train_batch_size=2)
    return str(out)


@pytest.mark.slow
def test_a_trained_adapter_behaves_the_same_merged_served_and_in_gguf(trained_adapter, tmp_path, capsys):
    """The reference is the merged model; the adapter must have changed it (else parity would be trivial)."""
    result = run_parity(trained_adapter, limit=2, max_new_tokens=12, runtimes=("adapter", "engine", "gguf"),
                        work_dir=str(tmp_path))
    table = format_table(result)
    print(table)
    assert result["template"] == "chatml" and result["adapter"]
    rows = {p["candidate"]: p for p in result["pairs"]}
    assert set(rows) == {"adapter on base (PEFT, unmerged, fp32)", "medgpt engine (adapter unmerged, fp32)",
                         "GGUF f16 (transformers GGUF loader)", "GGUF q8_0 (transformers GGUF loader)"}
    for name, row in rows.items():
        assert row["passed"], (name, row)
        assert row["max_logprob_delta"] <= row["tolerance"]["logprob"]
    assert rows["adapter on base (PEFT, unmerged, fp32)"]["max_logprob_delta"] < 1e-3
    assert rows["GGUF f16 (transformers GGUF loader)"]["greedy_agreement"] == 1.0
    assert result["passed"]


@pytest.mark.slow
def test_the_adapter_changes_the_model(trained_adapter, bundled_model):
    import torch

    from medgpt.models import open_model

    base, tuned = open_model(bundled_model, dtype="fp32"), open_model(trained_adapter, dtype="fp32")
    ids = torch.tensor([tuned.template.encode_prompt(tuned.tokenizer, [{"role": "user", "content": "头痛怎么办？"}])])
    with torch.inference_mode():
        assert (base.model(ids).logits - tuned.model(ids).logits).abs().max() > 0.05
