"""Training precision: what every trained and frozen parameter is held in, per method, device and stage kind, and
that `medgpt plan` counts the bytes the loaded models and the optimizer really hold.

The references are the HF Trainer's convention (trained weights in fp32, bf16 autocast; fp16 autocast with loss
scaling where a GPU lacks bf16), the dtypes of the tensors the real loaders and trainers produce, and the state
tensors PyTorch's AdamW creates after one step. A GPU is simulated where only medgpt's dtype decisions matter
(medgpt's hardware helpers are patched; the tensors stay on this CPU). `dtype: bf16` on a CPU gives the same dtypes
as `auto` on a bf16 GPU (bf16 frozen weights, fp32 trained ones, bf16 autocast), so the real trainers run here.
"""

from __future__ import annotations

import pytest
import torch

from medgpt.errors import UserError
from medgpt.models import Precision, cast_trainable, training_precision
from medgpt.plan import PlanArgs, estimate, load_architecture
from medgpt.train import build_config, common

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA GPU as medgpt sees it (`gpu(bf16=False)`: an older one, without bf16)."""
    import transformers.training_args

    import medgpt.models

    def make(bf16: bool = True):
        monkeypatch.setattr(medgpt.models, "cuda_available", lambda: True)
        monkeypatch.setattr(medgpt.models, "gpu_supports_bf16", lambda: bf16)
        monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: bf16)

    return make


def config(stage: str, model: str, sample_data, **options):
    data = sample_data / ("pref/medical_pref.jsonl" if stage in ("rm", "dpo") else "sft/medical_sft.jsonl")
    raw = {"stage": stage, "model": model, "data": str(data), "output_dir": "/nonexistent", "report_to": "none",
           "max_steps": 1, "per_device_train_batch_size": 2, "max_samples": 4, "save_strategy": "no",
           "report_prompts": "none", "learning_rate": 1e-3}
    if stage == "ppo":
        raw.update(reward_fn="length", rollout_batch_size=2, max_new_tokens=4)
    else:
        raw.update(max_length=512)
    return build_config({**raw, **options})


def dtypes(params) -> set:
    return {p.dtype for p in params}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_bytes(optimizer) -> int:
    """AdamW's state tensors (the two moments); its per-tensor `step` counters are scalars, left out."""
    return nbytes(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim())


def planned(model: str, stage: str, method: str, pure_bf16: bool = False):
    head = "seq_cls" if stage == "rm" else "causal_lm"
    args = PlanArgs(model, stage=stage, method=method, device="gpu", pure_bf16=pure_bf16)
    return estimate(args, load_architecture(model, head), load_architecture(model, "seq_cls"))[0]


# ---- the rule ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, hardware, pure, expected", [
    ("full", "gpu-bf16", False, Precision("bf16", "fp32", "bf16")),
    ("full", "gpu-fp16", False, Precision("fp16", "fp32", "fp16")),
    ("full", "gpu-bf16", True, Precision("bf16", "bf16", "bf16")),
    ("lora", "gpu-bf16", False, Precision("bf16", "fp32", "bf16")),
    ("lora", "gpu-fp16", False, Precision("fp16", "fp32", "fp16")),
    ("lora", "gpu-bf16", True, Precision("bf16", "bf16", "bf16")),
    ("qlora", "gpu-bf16", False, Precision("bf16", "fp32", "bf16", 4)),  # NF4 linear layers, the rest bf16
    ("full", "cpu-bf16", False, Precision("fp32", "fp32", "bf16")),  # a CPU with AVX512-BF16/AMX
    ("full", "cpu", False, Precision("fp32", "fp32", None)),  # an AVX2 CPU: fp32 throughout
    ("lora", "cpu", False, Precision("fp32", "fp32", None)),
])
def test_the_precision_rule(method, hardware, pure, expected):
    gpu, native = hardware.startswith("gpu"), hardware.endswith("bf16")
    got = training_precision(method, "auto", 4 if method == "qlora" else None, pure, gpu=gpu, gpu_bf16=native,
                             cpu_bf16=native)
    assert got == expected


def test_config_flags_follow_the_rule(gpu, tiny_model, sample_data, monkeypatch):
    import medgpt.models

    monkeypatch.setattr(medgpt.models, "cpu_supports_bf16", lambda: False)
    cpu = config("sft", tiny_model, sample_data, method="full")
    assert (cpu.train.use_cpu, cpu.train.bf16, cpu.train.fp16) == (True, False, False)
    assert config("sft", tiny_model, sample_data, dtype="bf16").train.bf16  # bf16 frozen base, bf16 autocast
    gpu()
    full = config("sft", tiny_model, sample_data, method="full")
    assert (full.train.use_cpu, full.train.bf16, full.train.fp16) == (False, True, False)
    assert not config("sft", tiny_model, sample_data, dtype="fp32").train.bf16  # fp32 asked for: no autocast
    assert not config("sft", tiny_model, sample_data, bf16=False).train.bf16  # an explicit flag is kept
    gpu(bf16=False)
    old = config("sft", tiny_model, sample_data, method="full")
    assert (old.train.bf16, old.train.fp16) == (False, True)  # fp16 autocast, with the Trainer's loss scaling


def test_what_cannot_be_honoured_is_an_error(gpu, tiny_model, sample_data, monkeypatch):
    with pytest.raises(UserError, match="pure_bf16 needs a GPU with bf16: CPU training keeps fp32 weights"):
        config("sft", tiny_model, sample_data, method="full", pure_bf16=True)
    with pytest.raises(UserError, match="quantized weights cannot be trained in full"):
        config("sft", tiny_model, sample_data, method="full", quantization_bit=4)
    gpu()
    with pytest.raises(UserError, match="pure_bf16 with fp16"):
        config("sft", tiny_model, sample_data, method="full", pure_bf16=True, fp16=True)
    with pytest.raises(UserError, match="dtype fp16 computes in fp16"):
        config("sft", tiny_model, sample_data, method="full", pure_bf16=True, dtype="fp16")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="DeepSpeed keeps its own fp32 master weights"):
        config("sft", tiny_model, sample_data, method="full", pure_bf16=True)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    gpu(bf16=False)
    with pytest.raises(UserError, match="this GPU has no bf16"):
        config("sft", tiny_model, sample_data, method="full", pure_bf16=True)


# ---- what the loaders and trainers hold --------------------------------------------------------------


def test_loaders_on_a_gpu(gpu, tiny_model, sample_data):
    """Full fine-tuning loads fp32 master weights (pure_bf16: bf16); LoRA's base loads in bf16 (fp16 on a GPU
    without bf16); a full run's reference model is frozen, in bf16."""
    from medgpt.train import prefs

    gpu()
    full = config("dpo", tiny_model, sample_data, method="full")
    policy = common.load_policy(full)
    assert dtypes(policy.parameters()) == {FP32} and all(p.requires_grad for p in policy.parameters())
    reference = prefs.reference_model(full)
    assert dtypes(reference.parameters()) == {BF16}
    assert nbytes(reference.parameters()) == planned(tiny_model, "dpo", "full").reference_model
    assert dtypes(common.load_policy(config("sft", tiny_model, sample_data, method="full", pure_bf16=True))
                  .parameters()) == {BF16}
    assert dtypes(common.load_policy(config("sft", tiny_model, sample_data, method="lora")).parameters()) == {BF16}
    gpu(bf16=False)
    assert dtypes(common.load_policy(config("sft", tiny_model, sample_data, method="lora")).parameters()) == {FP16}
    assert dtypes(common.load_policy(config("sft", tiny_model, sample_data, method="full")).parameters()) == {FP32}


def one_trainer_step(cfg, monkeypatch) -> dict:
    """Run the stage as `medgpt train` does for one optimizer step; what the model and optimizer hold then."""
    from transformers import TrainerCallback

    from medgpt.train import run_training

    seen: dict = {}

    class Measure(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen["gradients"] = nbytes(p.grad for p in model.parameters() if p.grad is not None)

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            seen["optimizer"] = optimizer_bytes(optimizer)
            seen["optimizer_dtypes"] = {t.dtype for s in optimizer.state.values() for t in s.values() if t.dim()}

    def train_one_step(trainer, cfg, stats, extra_metrics=None):
        trainer.add_callback(Measure())
        trainer.train()
        seen.update(model=trainer.model, args=trainer.args, ref_model=getattr(trainer, "ref_model", None))
        return {}

    monkeypatch.setattr(common, "train_and_save", train_one_step)
    run_training(cfg)
    return seen


@pytest.mark.parametrize("stage, method", [("sft", "full"), ("sft", "lora"), ("rm", "full"), ("rm", "lora"),
                                           ("dpo", "full")])
def test_trainers_hold_fp32_trained_weights_over_a_bf16_base(stage, method, tiny_model, sample_data, tmp_path,
                                                             monkeypatch):
    """The real TRL trainers after one step: every trained parameter, its gradient and both AdamW moments in fp32
    (a reward model's new score head, which PEFT copies in the base's dtype, included), every frozen one in bf16;
    and the planner's GPU bytes equal the tensors' bytes."""
    cfg = config(stage, tiny_model, sample_data, method=method, dtype="bf16", output_dir=str(tmp_path))
    seen = one_trainer_step(cfg, monkeypatch)
    model = seen["model"]
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trained and dtypes(trained) == {FP32}
    assert dtypes(frozen) == ({BF16} if method == "lora" else set())
    if stage == "rm" and method == "lora":
        assert any("score" in name for name, p in model.named_parameters() if p.requires_grad)
    assert seen["args"].bf16 and seen["optimizer_dtypes"] == {FP32}
    plan = planned(tiny_model, stage, method)
    assert nbytes(model.parameters()) == plan.weights
    assert seen["gradients"] == plan.gradients
    assert seen["optimizer"] == plan.optimizer
    if stage == "dpo":
        assert dtypes(seen["ref_model"].parameters()) == {BF16}
        assert nbytes(seen["ref_model"].parameters()) == plan.reference_model


def adamw_step(model, loss_fn, cfg) -> tuple[int, int]:
    """One step of the optimizer the HF Trainer builds for `cfg`, under bf16 autocast; (gradient, state) bytes."""
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(cfg.train)
    optimizer = cls([p for p in model.parameters() if p.requires_grad], **kwargs)
    with torch.autocast("cpu", dtype=BF16):
        loss = loss_fn(model)
    loss.float().backward()
    gradients = nbytes(p.grad for p in model.parameters() if p.grad is not None)
    optimizer.step()
    return gradients, optimizer_bytes(optimizer)


def lm_loss(model):
    ids = torch.randint(0, 1000, (2, 16))
    return model(input_ids=ids, labels=ids).loss


def test_pure_bf16_holds_everything_in_bf16(gpu, tiny_model, sample_data):
    gpu()
    cfg = config("sft", tiny_model, sample_data, method="full", pure_bf16=True)
    model = common.load_policy(cfg)
    gradients, states = adamw_step(model, lm_loss, cfg)
    plan = planned(tiny_model, "sft", "full", pure_bf16=True)
    assert dtypes(model.parameters()) == {BF16}
    assert (nbytes(model.parameters()), gradients, states) == (plan.weights, plan.gradients, plan.optimizer)
    mixed = planned(tiny_model, "sft", "full")
    params = sum(p.numel() for p in model.parameters())
    assert (mixed.weights + mixed.gradients + mixed.optimizer) - (plan.weights + plan.gradients + plan.optimizer) \
        == 8 * params  # what pure_bf16 saves: 8 bytes per parameter


def test_pure_bf16_loses_small_updates(tiny_model, sample_data):
    """What pure_bf16 costs: one AdamW step at lr 2e-5 moves every weight by about 2e-5; fp32 master weights
    keep every such move, bf16 weights round most of them away."""
    from transformers import AutoModelForCausalLM

    changed = {}
    for dtype in (FP32, BF16):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
        lm_loss(model).float().backward()
        optimizer.step()
        moved = [(p != b)[p.grad != 0] for p, b in zip(model.parameters(), before)]
        changed[dtype] = float(torch.cat([m.flatten() for m in moved]).float().mean())
    assert changed[FP32] > 0.99 and changed[BF16] < 0.5, changed  # about 0.30 for the tiny model


@pytest.mark.parametrize("method, pure", [("full", False), ("lora", False), ("full", True)])
def test_ppo_value_head_follows_the_rule(gpu, method, pure, tiny_model, sample_data):
    """PPO's policy, its value head, its reference and its reward model on a GPU, against the planner."""
    from medgpt.train import ppo
    from medgpt.train.rewards import RewardModel

    gpu()
    cfg = config("ppo", tiny_model, sample_data, method=method, pure_bf16=pure)
    policy, reference, _ = ppo.build_policy(cfg, None)
    model = ppo.ActorCritic(policy, common.training_precision(cfg).trainable)
    trained = dtypes(p for p in model.parameters() if p.requires_grad)
    assert model.value_head.weight.dtype == (BF16 if pure else FP32) and trained == {BF16 if pure else FP32}
    assert dtypes(p for p in model.parameters() if not p.requires_grad) <= {BF16}

    def loss(m):
        ids = torch.randint(0, 1000, (2, 12))
        logits, values = m(ids, torch.ones_like(ids), logits_to_keep=4)
        return logits.float().logsumexp(-1).mean() + values.float().pow(2).mean()

    gradients, states = adamw_step(model, loss, cfg)
    plan = planned(tiny_model, "ppo", method, pure)
    assert (nbytes(model.parameters()), gradients, states) == (plan.weights, plan.gradients, plan.optimizer)
    if method == "full":
        assert dtypes(reference.parameters()) == {BF16} and nbytes(reference.parameters()) == plan.reference_model
    scorer = RewardModel(tiny_model)  # a reward model is loaded for inference: bf16 on a GPU
    assert dtypes(scorer.model.parameters()) == {BF16} and nbytes(scorer.model.parameters()) == plan.reward_model


def test_cast_trainable_undoes_trls_bf16_qlora_adapters(tiny_model):
    """TRL casts a quantized model's LoRA adapters to bf16 inside its trainers; medgpt's trainer set-up casts
    every trained parameter back to the run's trainable dtype and leaves the frozen base alone."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from medgpt.models import LoraArgs, lora_config

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=BF16), lora_config(LoraArgs()))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(BF16)  # what TRL does for a 4-bit or 8-bit base
    cast_trainable(model, training_precision("qlora", quantization_bit=4, gpu=True, gpu_bf16=True).trainable)
    assert dtypes(p for p in model.parameters() if p.requires_grad) == {FP32}
    assert dtypes(p for p in model.parameters() if not p.requires_grad) == {BF16}


# ---- auto precision by measurement -------------------------------------------------------------------------


def test_auto_precision_on_a_cpu_follows_the_bf16_instructions_and_the_measured_speed(monkeypatch):
    """`auto` picks bf16 on a CPU only where it has bf16 instructions and the measured bf16 matmuls outrun fp32
    ones; training keeps frozen weights in fp32 on a CPU and autocasts to bf16 where bf16 pays."""
    import medgpt.cpu
    from medgpt.models import torch_dtype

    monkeypatch.setattr(medgpt.cpu, "cpu_info", lambda: ("a CPU", {"avx2", "avx512f", "avx512_bf16"}))
    for fp32, bf16, native in ((133.0, 0.3, False), (100.0, 400.0, True), (100.0, 110.0, False)):
        monkeypatch.setattr(medgpt.cpu, "matmul_speed", lambda fp32=fp32, bf16=bf16: {"fp32": fp32, "bf16": bf16})
        assert medgpt.cpu.cpu_supports_bf16() is native
        assert training_precision("lora", gpu=False).autocast == ("bf16" if native else None)  # training
        assert torch_dtype("auto") == (BF16 if native else FP32)  # inference
        assert torch_dtype("auto", training=True) == FP32  # frozen training weights stay fp32 on a CPU
