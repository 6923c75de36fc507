"""The memory planner on configurations whose answers are known."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from medgpt.cli import main
from medgpt.errors import UserError
from medgpt.plan import GIB, PlanArgs, estimate, load_architecture, lora_params, max_micro_batch, plan

QWEN_7B = "Qwen/Qwen2.5-7B"


@pytest.fixture(scope="module")
def qwen7b():
    return load_architecture(QWEN_7B)


@pytest.mark.parametrize("name, params", [
    ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512),  # the published parameter counts
    ("Qwen/Qwen2.5-0.5B", 494_032_768),
    ("meta-llama/Meta-Llama-3-8B", 8_030_261_248),
    ("meta-llama/Llama-3.1-70B-Instruct", 70_553_706_496),
])
def test_builtin_architectures_have_the_published_size(name, params):
    assert load_architecture(name).params == params


def test_full_finetune_of_a_7b_model(qwen7b):
    p = qwen7b.params
    result, trainable = estimate(PlanArgs(QWEN_7B, stage="sft", method="full"), qwen7b)
    assert trainable == p
    assert result.weights == 2 * p  # bf16 weights
    assert result.gradients == 2 * p  # bf16 gradients
    assert result.optimizer == 12 * p  # fp32 master copy + Adam's two moments
    assert result.reference_model == result.reward_model == 0
    assert 110 * GIB < result.peak < 125 * GIB


def test_zero_stages_split_what_they_promise(qwen7b):
    base = PlanArgs(QWEN_7B, stage="sft", method="full", gpus=8)
    single = estimate(base, qwen7b)[0]
    z1, z2, z3 = (estimate(replace(base, zero=z), qwen7b)[0] for z in (1, 2, 3))
    assert (z1.weights, z1.gradients, z1.optimizer) == (single.weights, single.gradients, single.optimizer / 8)
    assert (z2.weights, z2.gradients, z2.optimizer) == (single.weights, single.gradients / 8, single.optimizer / 8)
    layer = 2 * qwen7b.layer_params  # ZeRO-3 gathers one layer at a time to run it
    assert (z3.weights, z3.gradients, z3.optimizer) == (single.weights / 8 + layer, single.gradients / 8,
                                                        single.optimizer / 8)
    assert z3.activations == single.activations  # data parallel: each GPU still runs its own micro-batch


def test_lora_parameter_count_matches_peft(tiny_model):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from medgpt.models import LoraArgs, lora_config

    arch = load_architecture(tiny_model)
    for rank, target, dora in ((8, "all-linear", False), (4, "q_proj,v_proj", False), (16, "all-linear", True)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        peft_model = get_peft_model(model, lora_config(LoraArgs(lora_rank=rank, lora_target=target, use_dora=dora)))
        trainable, total = peft_model.get_nb_trainable_parameters()
        assert lora_params(arch, rank, target, dora) == trainable, (rank, target, dora)
        assert arch.params == total - trainable  # the architecture read from the config is the real model


def test_lora_on_a_7b_model(qwen7b):
    args = PlanArgs(QWEN_7B, stage="sft", method="lora")
    lora, trainable = estimate(args, qwen7b)
    assert trainable == 20_185_088  # r=8 on every linear layer of Qwen2.5-7B, as PEFT prints it
    assert lora.weights == 2 * qwen7b.params + 4 * trainable
    assert lora.optimizer == 8 * trainable
    qlora = estimate(replace(args, method="qlora4"), qwen7b)[0]
    assert 4.5 * GIB < qlora.weights < 6 * GIB < lora.weights
    assert estimate(replace(args, method="qlora8"), qwen7b)[0].weights < lora.weights


def test_activations_follow_the_setup(qwen7b):
    args = PlanArgs(QWEN_7B, stage="sft", method="lora", batch_size=2, seq_len=2048)
    base = estimate(args, qwen7b)[0].activations
    assert estimate(replace(args, gradient_checkpointing=True), qwen7b)[0].activations < base / 5
    assert estimate(replace(args, batch_size=4), qwen7b)[0].activations > 1.9 * base
    no_dropout = estimate(replace(args, lora_dropout=0.0), qwen7b)[0].activations
    assert no_dropout < base  # LoRA's dropout keeps a mask per adapted layer
    dpo = estimate(replace(args, stage="dpo"), qwen7b)[0].activations  # chosen + rejected, dropout switched off
    assert dpo == estimate(replace(args, stage="dpo", lora_dropout=0.0), qwen7b)[0].activations
    assert dpo > 1.9 * no_dropout


def test_extra_models_per_stage(qwen7b):
    full = PlanArgs(QWEN_7B, method="full")
    assert estimate(replace(full, stage="dpo"), qwen7b)[0].reference_model == 2 * qwen7b.params
    assert estimate(replace(full, stage="dpo", method="lora"), qwen7b)[0].reference_model == 0
    assert estimate(replace(full, stage="orpo"), qwen7b)[0].reference_model == 0
    assert estimate(replace(full, stage="grpo"), qwen7b)[0].reference_model == 0
    assert estimate(replace(full, stage="grpo", reference=True), qwen7b)[0].reference_model == 2 * qwen7b.params


def test_ppo_holds_a_reward_model():
    result = plan(PlanArgs(QWEN_7B, stage="ppo", method="lora"), gpu_memory=[])
    score_head = result.arch.hidden  # the reward model swaps the LM head for a one-output score head
    assert result.estimate.reward_model == 2 * (result.arch.params - result.arch.output_params + score_head)
    assert result.estimate.reference_model == 0


def test_largest_micro_batch_is_the_largest_that_fits(qwen7b):
    args = PlanArgs(QWEN_7B, stage="dpo", method="qlora4", seq_len=1024, gradient_checkpointing=True)
    best = max_micro_batch(args, qwen7b, None, 24)
    assert best >= 1
    assert estimate(replace(args, batch_size=best), qwen7b)[0].peak <= 24 * GIB
    assert estimate(replace(args, batch_size=best + 1), qwen7b)[0].peak > 24 * GIB
    assert max_micro_batch(replace(args, method="full", gradient_checkpointing=False), qwen7b, None, 24) == 0


def test_plan_command_json_and_table(capsys):
    assert main(["plan", "--model", QWEN_7B, "--stage", "dpo", "--method", "qlora4", "--gradient-checkpointing",
                 "--gpu-memory", "24", "80", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    sizes = report["per_device_gib"]
    assert set(sizes) >= {"weights", "gradients", "optimizer", "activations", "reference_model", "peak"}
    assert 5 < sizes["peak"] < 24
    assert report["max_micro_batch"]["24.0"] < report["max_micro_batch"]["80.0"]
    assert main(["plan", "--model", QWEN_7B, "--stage", "ppo", "--method", "full", "--gpus", "8", "--zero", "3"]) == 0
    table = capsys.readouterr().out
    assert "reward model" in table and "optimizer states" in table and "ZeRO 3" in table


def test_plan_bad_input(capsys, tmp_path):
    assert main(["plan", "--method", "qlora4", "--device", "cpu"]) == 2
    assert "qlora needs bitsandbytes" in capsys.readouterr().err
    with pytest.raises(UserError, match="no config.json"):
        load_architecture(str(tmp_path))
    with pytest.raises(UserError, match="not in the built-in table"):
        load_architecture("./no-such-model")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_cpu_activations_match_what_pytorch_saves(tiny_model, method):
    """The per-layer count against the tensors autograd actually keeps in a forward pass on this CPU."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from medgpt.models import LoraArgs, lora_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    if method == "lora":
        model = get_peft_model(model, lora_config(LoraArgs()))
    model.train()
    batch, seq_len = 2, 128
    ids = torch.randint(0, 1000, (batch, seq_len))
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[1, :10] = 0  # padding, as in a real batch
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    backbone = model.get_base_model().model if method == "lora" else model.model
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        backbone(input_ids=ids, attention_mask=mask)
    args = PlanArgs(tiny_model, method=method, device="cpu", batch_size=batch, seq_len=seq_len)
    parts = estimate(args, load_architecture(tiny_model))[0].detail
    assert parts["layers"] + parts["autocast_weights"] == pytest.approx(sum(saved.values()), rel=0.12)
