"""The fused LoRA forward against PEFT's own `lora.Linear.forward` (the reference): the same logits and the same
adapter gradients, with and without dropout, and PEFT's path wherever the fused one would not be exact."""

import pytest

torch = pytest.importorskip("torch")


def peft_pair(tiny_model, **lora):
    """Two copies of the tiny model with the same LoRA weights (lora_B made non-zero), the second fused."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medgpt.train import lora_forward

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.5)
        models.append(model)
    fused = lora_forward.fuse(models[1])
    return models[0], models[1], fused


def forward_backward(model, ids, seed=1):
    torch.manual_seed(seed)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_gives_peft_logits_and_gradients(tiny_model, dropout):
    reference, fused, count = peft_pair(tiny_model, lora_dropout=dropout)
    assert count == sum(1 for n, _ in fused.named_modules() if n.endswith(("q_proj", "down_proj", "up_proj",
                                                                           "gate_proj", "k_proj", "v_proj",
                                                                           "o_proj")))
    reference.train(), fused.train()
    ids = torch.randint(0, 1000, (2, 24))
    logits_ref, grads_ref = forward_backward(reference, ids)
    logits, grads = forward_backward(fused, ids)  # same seed: the same dropout masks, drawn in the same order
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * count
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6)


def test_disabled_merged_and_dora_adapters_take_peft_path(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medgpt.train import lora_forward

    reference, fused, _ = peft_pair(tiny_model)
    ids = torch.randint(0, 1000, (1, 16))
    reference.eval(), fused.eval()
    with torch.no_grad():
        with reference.disable_adapter(), fused.disable_adapter():  # DPO's reference pass
            torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)
        adapted = reference(input_ids=ids).logits
        fused.merge_adapter()
        torch.testing.assert_close(fused(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
        fused.unmerge_adapter()
        torch.testing.assert_close(fused(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)

    torch.manual_seed(0)
    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                          LoraConfig(r=4, target_modules="all-linear", use_dora=True, init_lora_weights=False))
    dora.eval()
    with torch.no_grad():
        expected = dora(input_ids=ids).logits
        assert lora_forward.fuse(dora) > 0
        torch.testing.assert_close(dora(input_ids=ids).logits, expected)


def test_training_set_up_fuses_lora_layers(tiny_model, sample_data, tmp_path):
    from trl import SFTTrainer

    from medgpt.train import build_config, common, lora_forward, sft

    cfg = build_config({"stage": "sft", "model": tiny_model, "data": str(sample_data / "sft" / "medical_sft.jsonl"),
                        "max_samples": 4, "max_steps": 1, "output_dir": str(tmp_path / "out"), "report_to": "none"})
    assert cfg.lora.lora_dropout == 0.0  # the default: PEFT's, and no mask per adapted layer
    trainer, _ = common.build_trainer(cfg, SFTTrainer, sft.build_datasets)
    layers = [m for m in trainer.model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")]
    assert layers and all(m.forward.__func__ is lora_forward.fused_forward for m in layers)


def test_bf16_base_weights_give_the_autocast_products(tiny_model):
    """Reference: PEFT's model with fp32 weights under torch's own bf16 autocast, which casts each frozen weight
    for every product; holding the base weights in bf16 must give the same logits and adapter gradients."""
    from medgpt.models import cast_lora_base_weights
    from medgpt.train import lora_forward

    reference, cast, count = peft_pair(tiny_model)
    lora_forward.fuse(reference)  # both fused: only where the base weights are held differs
    assert cast_lora_base_weights(cast, "bf16") == count
    bases = [m.base_layer.weight for m in cast.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    assert bases and all(w.dtype == torch.bfloat16 and not w.requires_grad for w in bases)
    assert all(p.dtype == torch.float32 for p in cast.parameters() if p.requires_grad)  # the adapter stays fp32
    ids = torch.randint(0, 1000, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_ref, grads_ref = forward_backward(reference, ids)
        logits, grads = forward_backward(cast, ids)
    torch.testing.assert_close(logits, logits_ref, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=0, atol=0)


def test_training_under_bf16_autocast_holds_base_weights_in_bf16(tiny_model, sample_data, tmp_path, monkeypatch):
    """Where the CPU computes bf16 natively (forced here), SFT keeps the LoRA base in bf16 and trains and
    evaluates under the Trainer's autocast; GRPO, which generates outside it, keeps fp32."""
    import math

    from trl import SFTTrainer

    import medgpt.models
    from medgpt.train import build_config, common, sft

    monkeypatch.setattr(medgpt.models, "cpu_supports_bf16", lambda: True)
    cfg = build_config({"stage": "sft", "model": tiny_model, "data": str(sample_data / "sft" / "medical_sft.jsonl"),
                        "max_samples": 8, "val_size": 2, "max_steps": 2, "max_length": 64, "overlong": "truncate",
                        "output_dir": str(tmp_path / "out"), "report_to": "none"})
    assert cfg.train.bf16 and common.runs_under_autocast_only(cfg)
    trainer, _ = common.build_trainer(cfg, SFTTrainer, sft.build_datasets)
    bases = [m.base_layer.weight for m in trainer.model.modules() if hasattr(m, "lora_A")]
    assert bases and all(w.dtype == torch.bfloat16 for w in bases)
    trainer.train()
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    grpo = build_config({"stage": "grpo", "model": tiny_model, "data": str(sample_data / "sft" / "medical_sft.jsonl"),
                         "output_dir": str(tmp_path / "grpo"), "report_to": "none"})
    assert not common.runs_under_autocast_only(grpo)
