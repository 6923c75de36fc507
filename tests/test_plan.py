"""The memory planner against figures it did not compute: published parameter counts, the memory formulas and
tables of the ZeRO and QLoRA papers, the Hugging Face memory anatomy and LLaMA-Factory's hardware table, the
tensors autograd saves, and the peaks bench/memory.py measured."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from medgpt.cli import main
from medgpt.errors import UserError
from medgpt.plan import GIB, PlanArgs, estimate, load_architecture, lora_params, max_micro_batch, plan

QWEN_7B = "Qwen/Qwen2.5-7B"
GB = 1e9  # the papers and LLaMA-Factory write GB
MEMORY_BENCH = Path(__file__).resolve().parents[1] / "bench" / "results" / "memory.json"


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


def state_per_param(result, arch) -> float:
    """Weights, gradients and optimizer states, in bytes per parameter of the model."""
    return (result.weights + result.gradients + result.optimizer) / arch.params


def test_full_finetune_bytes_per_parameter_match_the_published_accounting(qwen7b):
    """Mixed precision with AdamW, as the Hugging Face "model memory anatomy" page counts it: fp32 weights (4) +
    fp32 gradients (4) + Adam's two fp32 moments (8), plus a half-precision copy of the weights (2) for the
    forward and backward passes, 18 bytes per parameter; the ZeRO paper (Rajbhandari et al. 2019, section 3.1)
    counts the same states as 2 + 2 + 12 = 16 without the transient copy. LLaMA-Factory's hardware table:
    "Full (bf16 or fp16): 18x GB", "Full (pure_bf16): 8x GB" for an x-billion-parameter model."""
    args = PlanArgs(QWEN_7B, stage="sft", method="full")
    mixed, trainable = estimate(args, qwen7b)
    assert trainable == qwen7b.params
    assert state_per_param(mixed, qwen7b) == 16  # ZeRO paper's 16 bytes per parameter
    with_copies = state_per_param(mixed, qwen7b) + mixed.detail["autocast_weights"] / qwen7b.params
    assert 17 < with_copies <= 18  # the anatomy's 18: the half copy of every weight that is multiplied in bf16
    pure = estimate(replace(args, pure_bf16=True), qwen7b)[0]
    assert state_per_param(pure, qwen7b) == 8  # LLaMA-Factory's "8x GB"
    assert "autocast_weights" not in pure.detail  # bf16 weights need no copies
    assert mixed.reference_model == mixed.reward_model == 0


# LLaMA-Factory's README, "Hardware Requirement" (estimated GB): method -> 7B, 14B, 30B, 70B
LLAMA_FACTORY = {
    ("full", False): (120, 240, 600, 1200),
    ("full", True): (60, 120, 300, 600),
    ("lora", False): (16, 32, 64, 160),
    ("qlora8", False): (10, 20, 40, 80),
    ("qlora4", False): (6, 12, 24, 48),
}
SIZES = ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-32B", "meta-llama/Meta-Llama-3-70B")


@pytest.mark.parametrize("method, pure_bf16", list(LLAMA_FACTORY))
def test_peaks_are_near_llama_factorys_hardware_table(method, pure_bf16):
    """The table states no batch size or length; at micro-batch 1 x 1024 tokens with gradient checkpointing the
    planner is within 25% of every cell (the 30B column taken as Qwen2.5-32B, the 70B one as Llama-3-70B)."""
    for name, published in zip(SIZES, LLAMA_FACTORY[method, pure_bf16]):
        args = PlanArgs(name, method=method, pure_bf16=pure_bf16, seq_len=1024, gradient_checkpointing=True)
        peak = estimate(args, load_architecture(name))[0].peak / GB
        assert abs(peak - published) / published < 0.25, (name, method, pure_bf16, round(peak, 1), published)


def test_zero_stages_match_the_zero_paper():
    """ZeRO paper, Figure 1: a 7.5B-parameter model, mixed-precision Adam (K = 12), 64 GPUs: 120 GB per GPU for
    plain data parallelism, 31.4 GB with optimizer states partitioned, 16.6 GB with gradients too, 1.9 GB with
    parameters too. The planner's bytes per parameter, scaled to 7.5B parameters."""
    arch = load_architecture(QWEN_7B)
    base = PlanArgs(QWEN_7B, stage="sft", method="full", gpus=64)
    per_gpu = {z: state_per_param(estimate(replace(base, zero=z), arch)[0], arch) * 7.5e9 / GB for z in range(4)}
    assert per_gpu[0] == pytest.approx(120, abs=0.05)
    assert per_gpu[1] == pytest.approx(31.4, abs=0.05)
    assert per_gpu[2] == pytest.approx(16.6, abs=0.05)
    layer = 2 * arch.layer_params * 7.5e9 / arch.params / GB  # ZeRO-3 gathers each layer, in bf16, to run it
    assert 1.9 - 0.05 < per_gpu[3] < 1.9 + 0.05 + layer
    z1, z3 = (estimate(replace(base, zero=z), arch)[0] for z in (1, 3))
    assert z3.activations == z1.activations  # data parallel: each GPU still runs its own micro-batch


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
    """LLaMA-Factory's table: LoRA holds the 16-bit base, "2x GB" for x billion parameters; QLoRA 8-bit "x GB",
    4-bit "x/2 GB"; the adapters are a rounding error beside them."""
    args = PlanArgs(QWEN_7B, stage="sft", method="lora")
    lora, trainable = estimate(args, qwen7b)
    assert trainable == 20_185_088  # r=8 on every linear layer of Qwen2.5-7B, as PEFT prints it
    assert 2 < state_per_param(lora, qwen7b) < 2.05
    qlora8 = estimate(replace(args, method="qlora8"), qwen7b)[0]
    qlora4 = estimate(replace(args, method="qlora4"), qwen7b)[0]
    # Qwen2.5-7B's 152k-entry embeddings and LM head (1.09 B parameters) stay in bf16
    assert 1 < state_per_param(qlora8, qwen7b) < 1.2 and 0.5 < state_per_param(qlora4, qwen7b) < 0.8


# LLaMA-65B as the LLaMA paper (Touvron et al. 2023, Table 2) gives it: 65.2B parameters
LLAMA_65B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 22016,
             "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 64,
             "tie_word_embeddings": False}


def test_qlora_matches_the_qlora_paper(tmp_path):
    """QLoRA paper (Dettmers et al. 2023): NF4 stores 4 bits per weight, and double quantization brings the
    quantization constants from 32/64 = 0.5 to 8/64 + 32/(64 * 256) = 0.127 bits per parameter (section 3);
    it "reduces the memory requirements of finetuning a 65B parameter model from >780GB of GPU memory to <48GB"
    (section 1)."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_65B))
    arch = load_architecture(str(tmp_path))
    assert arch.params / 1e9 == pytest.approx(65.2, abs=0.1)
    args = PlanArgs(str(tmp_path), stage="sft", method="qlora4", seq_len=512, gradient_checkpointing=True)
    qlora4, adapters = estimate(args, arch)
    lora = estimate(replace(args, method="lora"), arch)[0]
    # per quantized weight, what NF4 saves against the bf16 base: 16 bits - (4 + 0.127) bits
    quantized = sum(i * o for name, (i, o) in arch.linears.items() if name != arch.output_name)
    assert (lora.weights - qlora4.weights) / quantized * 8 == pytest.approx(16 - 4.127, abs=0.001)
    assert qlora4.peak < 48 * GIB < lora.peak
    assert estimate(replace(args, method="full"), arch)[0].peak > 780 * GB


def test_activations_follow_the_setup(qwen7b):
    args = PlanArgs(QWEN_7B, stage="sft", method="lora", batch_size=2, seq_len=2048, lora_dropout=0.05)
    base = estimate(args, qwen7b)[0].activations
    assert estimate(replace(args, gradient_checkpointing=True), qwen7b)[0].activations < base / 5
    assert estimate(replace(args, batch_size=4), qwen7b)[0].activations > 1.9 * base
    no_dropout = estimate(replace(args, lora_dropout=0.0), qwen7b)[0].activations
    assert no_dropout < base  # LoRA's dropout keeps a mask per adapted layer
    dpo = estimate(replace(args, stage="dpo"), qwen7b)[0].activations  # chosen + rejected, dropout switched off
    assert dpo == estimate(replace(args, stage="dpo", lora_dropout=0.0), qwen7b)[0].activations
    assert dpo > 1.9 * no_dropout


def test_extra_models_per_stage(qwen7b):
    """Which stages hold a second model follows TRL (DPO/KTO reference; none with LoRA, whose reference is the
    adapter switched off; GRPO's default beta 0 loads none). Their bytes are checked against loaded models in
    tests/test_models_precision.py."""
    full = PlanArgs(QWEN_7B, method="full")
    dpo = estimate(replace(full, stage="dpo"), qwen7b)[0].reference_model
    assert dpo == estimate(replace(full, stage="grpo", reference=True), qwen7b)[0].reference_model > 0
    assert estimate(replace(full, stage="dpo", method="lora"), qwen7b)[0].reference_model == 0
    assert estimate(replace(full, stage="orpo"), qwen7b)[0].reference_model == 0
    assert estimate(replace(full, stage="grpo"), qwen7b)[0].reference_model == 0


def test_ppo_holds_a_reward_model():
    result = plan(PlanArgs(QWEN_7B, stage="ppo", method="lora"), gpu_memory=[])
    score_head = result.arch.hidden  # the reward model swaps the LM head for a one-output score head
    assert result.estimate.reward_model == 2 * (result.arch.params - result.arch.output_params + score_head)
    assert result.estimate.reference_model == 0
    # the reward model is loaded for inference, unquantized, whatever the policy's method
    qlora = plan(PlanArgs(QWEN_7B, stage="ppo", method="qlora4"), gpu_memory=[])
    assert qlora.estimate.reward_model == result.estimate.reward_model


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
    assert main(["plan", "--model", QWEN_7B, "--method", "full", "--pure-bf16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pure_bf16"] and report["precision"] == {"frozen": "bf16", "trainable": "bf16", "autocast": "bf16",
                                                          "quantization_bit": None}


def test_plan_bad_input(capsys, tmp_path):
    assert main(["plan", "--method", "qlora4", "--device", "cpu"]) == 2
    assert "qlora needs bitsandbytes" in capsys.readouterr().err
    assert main(["plan", "--method", "full", "--pure-bf16", "--device", "cpu"]) == 2  # as `medgpt train` refuses it
    assert "pure_bf16 needs a GPU with bf16: CPU training keeps fp32 weights" in capsys.readouterr().err
    assert main(["plan", "--method", "full", "--pure-bf16", "--gpus", "8", "--zero", "2"]) == 2
    assert "DeepSpeed keeps its own fp32 master weights" in capsys.readouterr().err
    with pytest.raises(UserError, match="no config.json"):
        load_architecture(str(tmp_path))
    with pytest.raises(UserError, match="not in the built-in table"):
        load_architecture("./no-such-model")


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory) -> str:
    """A random 4-layer Llama (hidden 256): big enough that the per-token terms dominate the counts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("small-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                                 tie_word_embeddings=False)).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("method, weights, device, pure_bf16, dropout", [
    ("full", "fp32", "cpu", False, 0.05),  # medgpt's CPU training: fp32 weights, bf16 autocast
    ("lora", "fp32", "cpu", False, 0.05),
    ("full", "fp32", "gpu", False, 0.0),  # the GPU's default: fp32 master weights, bf16 autocast
    ("full", "bf16", "gpu", True, 0.0),  # pure_bf16
    ("lora", "bf16", "gpu", False, 0.0),  # LoRA on a GPU: bf16 base, fp32 adapters
])
def test_activations_match_what_pytorch_saves(small_llama, method, weights, device, pure_bf16, dropout):
    """The per-layer count against the tensors autograd actually keeps in a forward pass under bf16 autocast, with
    the weights in the dtypes the planned device trains in (a GPU's run on this CPU: the same tensors, except a
    GPU's dropout mask is a bool where the CPU's is a float, hence no dropout there)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from medgpt.models import LoraArgs, lora_config

    model = AutoModelForCausalLM.from_pretrained(small_llama, dtype=getattr(torch, {"fp32": "float32"}.get(
        weights, "bfloat16")))
    if method == "lora":
        model = get_peft_model(model, lora_config(LoraArgs(lora_dropout=dropout)))
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
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
    args = PlanArgs(small_llama, method=method, device=device, batch_size=batch, seq_len=seq_len,
                    lora_dropout=dropout, pure_bf16=pure_bf16)
    parts = estimate(args, load_architecture(small_llama))[0].detail
    assert parts["layers"] + parts.get("autocast_weights", 0) == pytest.approx(sum(saved.values()), rel=0.06)


def test_planner_matches_the_recorded_memory_peaks(tiny_model):
    """bench/memory.py's measurements (bench/results/memory.json): the peak resident memory of real SFT and DPO
    runs (full and LoRA; the tiny model and SmolLM2-135M) on a 2-core AVX2 CPU, against the planner's CPU
    estimate for the same shapes, now: within 10% each (the bench recorded at most 7.8%)."""
    report = json.loads(MEMORY_BENCH.read_text())
    models = {"tiny": tiny_model, "bundled": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the bundled model's shapes
    assert len(report["cases"]) >= 9
    for case in report["cases"]:
        args = PlanArgs(models[case["model"]], stage=case["stage"], method=case["method"], device="cpu",
                        batch_size=case["batch_size"], seq_len=case["seq_len"],
                        gradient_checkpointing=case["gradient_checkpointing"], lora_dropout=case["lora_dropout"])
        head = "seq_cls" if case["stage"] == "rm" else "causal_lm"
        peak_mib = estimate(args, load_architecture(args.model, head))[0].peak / 2**20
        assert peak_mib == pytest.approx(case["measured_mib"], rel=0.10), case["name"]


def test_activation_checkpointing_auto_is_on_where_the_planner_says_the_step_would_not_fit(tiny_model, monkeypatch):
    """`activation_checkpointing: auto` (the default) asks the planner for the step without checkpointing: on
    where its peak is over the device's share (here a CPU with RAM set either side of it), off where it fits;
    an explicit value (or its alias gradient_checkpointing) is kept as given."""
    import medgpt.config
    from medgpt.config import CPU_MEMORY_SHARE
    from medgpt.train import build_config

    raw = {"stage": "sft", "model": tiny_model, "data": "x.jsonl", "per_device_train_batch_size": 2,
           "max_length": 256, "report_to": "none"}
    args = PlanArgs(tiny_model, stage="sft", method="lora", device="cpu", batch_size=2, seq_len=256)
    peak_gib = estimate(args, load_architecture(tiny_model))[0].peak / GIB
    for ram, expected in ((2 * peak_gib / CPU_MEMORY_SHARE, False), (0.5 * peak_gib / CPU_MEMORY_SHARE, True)):
        monkeypatch.setattr(medgpt.config, "device_memory_gib", lambda gpu, ram=ram: ram)
        cfg = build_config(raw)
        assert cfg.train.activation_checkpointing is expected and cfg.train.gradient_checkpointing is expected
        assert build_config({**raw, "activation_checkpointing": "auto"}).train.activation_checkpointing is expected
    monkeypatch.setattr(medgpt.config, "device_memory_gib", lambda gpu: 10**6)
    assert build_config({**raw, "gradient_checkpointing": True}).train.activation_checkpointing is True
    monkeypatch.setattr(medgpt.config, "device_memory_gib", lambda gpu: 1e-6)
    assert build_config({**raw, "activation_checkpointing": False}).train.activation_checkpointing is False


def test_a_lora_target_name_no_linear_layer_has_is_an_error(tiny_model):
    arch = load_architecture(tiny_model)
    with pytest.raises(UserError, match=r"lora_target nonexistent: .*linear layer names: .*q_proj"):
        lora_params(arch, 8, "q_proj,nonexistent")
