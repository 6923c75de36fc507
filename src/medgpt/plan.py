"""Memory planner: the memory one training process holds per device, from the model's config alone.

The architecture is built on PyTorch's meta device (shapes, no storage), so parameter counts and the
shapes LoRA attaches to are exact for any transformers architecture; no weights are downloaded.

The bytes per parameter follow the precision medgpt trains in (`medgpt.models.training_precision`, the rule
the loaders use; P = all parameters, T = trained ones):

    trained parameters   fp32 (master weights): weight 4T, gradient 4T, AdamW's two moments 8T;
                         pure_bf16: 2T + 2T + 4T
    frozen weights       LoRA's base: bf16 on a GPU (2P), fp32 on a CPU (4P); qlora4 ~0.52 per quantized
                         linear weight (NF4 with double quantization), qlora8 1, the rest bf16
    autocast copies      where the matmul weights are fp32 (full fine-tuning; any method on a CPU), autocast's
                         bf16 copy of each linear weight is kept for the backward pass (2 per weight)
    ZeRO (DeepSpeed)     DeepSpeed holds the model in bf16 and the fp32 master copy in its optimizer, as the
                         ZeRO paper counts it: 2T + 2T + 12T, split over the GPUs by stage

Activations are counted tensor by tensor for a Llama-style decoder layer (RMSNorm, rotary attention
through SDPA with a padding mask, gated MLP) as autograd saves them for the backward pass (checked against
the saved tensors in tests/test_plan.py); LoRA's dropout masks count only where the trainer keeps dropout
on. With gradient checkpointing only each layer's input is kept, plus one layer being recomputed. The LM head is TRL's
fused log-prob head (tiles of 4096 tokens x 32768 vocabulary entries) for the TRL stages, and full
logits for PPO and ORPO. The peak counts the larger of "all activations + the LM head's gradient" (the
start of the backward pass) and "all gradients" (its end), since the backward pass frees activations as
it fills gradients.

Extra models: DPO/KTO/PPO keep a frozen reference (none with LoRA: the adapter is switched off instead);
PPO scores with a reward model and keeps its value head on the policy (no separate critic); GRPO loads a
reference only when asked (TRL's default beta is 0). ZeRO stage 1 splits optimizer states over the GPUs,
stage 2 also gradients, stage 3 also weights (and the frozen extra models).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from medgpt.errors import UserError
from medgpt.models import (
    DTYPE_BYTES,
    Precision,
    lora_matches,
    lora_target_names,
    training_precision,
    unmatched_lora_targets,
)
from medgpt.stages import STAGES, Stage, stage_facts

GIB = 2**30
# the training methods as the planner tells them apart: method qlora with quantization_bit 4 or 8
PLAN_METHODS = ("full", "lora", "qlora4", "qlora8")
DEVICES = ("gpu", "cpu")
FUSED_TILE = (4096, 32768)  # trl.kernels.chunked_logprob: TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 absmax (double quant)
GPU_OVERHEAD = 1.0 * GIB  # CUDA context, cuBLAS workspace and allocator slack

# Configs of common models (from their config.json), so planning needs no network for them.
_QWEN25 = {"model_type": "qwen2", "vocab_size": 152064, "tie_word_embeddings": False}
_QWEN25_SMALL = {**_QWEN25, "vocab_size": 151936, "tie_word_embeddings": True}
_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "tie_word_embeddings": False, "rope_theta": 500000.0}
_LLAMA2 = {"model_type": "llama", "vocab_size": 32000, "tie_word_embeddings": False}
_SMOLLM2 = {"model_type": "llama", "vocab_size": 49152, "tie_word_embeddings": True}


def _dims(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict:
    return {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads}


BUILTIN: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B": {**_QWEN25_SMALL, **_dims(896, 4864, 24, 14, 2)},
    "Qwen/Qwen2.5-1.5B": {**_QWEN25_SMALL, **_dims(1536, 8960, 28, 12, 2)},
    "Qwen/Qwen2.5-3B": {**_QWEN25_SMALL, **_dims(2048, 11008, 36, 16, 2)},
    "Qwen/Qwen2.5-7B": {**_QWEN25, **_dims(3584, 18944, 28, 28, 4)},
    "Qwen/Qwen2.5-14B": {**_QWEN25, **_dims(5120, 13824, 48, 40, 8)},
    "Qwen/Qwen2.5-32B": {**_QWEN25, **_dims(5120, 27648, 64, 40, 8)},
    "Qwen/Qwen2.5-72B": {**_QWEN25, **_dims(8192, 29568, 80, 64, 8)},
    "meta-llama/Meta-Llama-3-8B": {**_LLAMA3, **_dims(4096, 14336, 32, 32, 8)},
    "meta-llama/Meta-Llama-3-70B": {**_LLAMA3, **_dims(8192, 28672, 80, 64, 8)},
    "meta-llama/Llama-2-7b-hf": {**_LLAMA2, **_dims(4096, 11008, 32, 32, 32)},
    "meta-llama/Llama-2-13b-hf": {**_LLAMA2, **_dims(5120, 13824, 40, 40, 40)},
    "mistralai/Mistral-7B-v0.1": {**_LLAMA2, "model_type": "mistral", **_dims(4096, 14336, 32, 32, 8)},
    "HuggingFaceTB/SmolLM2-135M": {**_SMOLLM2, **_dims(576, 1536, 30, 9, 3)},
    "HuggingFaceTB/SmolLM2-360M": {**_SMOLLM2, **_dims(960, 2560, 32, 15, 5)},
    "HuggingFaceTB/SmolLM2-1.7B": {**_SMOLLM2, **_dims(2048, 8192, 24, 32, 32)},
}


def _short(name: str) -> str:
    """Lookup key: no owner, lower case, no -Instruct/-Chat/-hf, Llama 3.x = Llama 3 (same shapes)."""
    key = name.rstrip("/").split("/")[-1].lower()
    key = re.sub(r"-(instruct|chat|hf|base)(-.*)?$", "", key).removeprefix("meta-")
    return re.sub(r"^llama-3\.[0-9]", "llama-3", key)


_BUILTIN_KEYS = {_short(name): name for name in BUILTIN}


@dataclass
class Architecture:
    """What memory depends on, read from a model built on the meta device."""

    name: str
    source: str  # folder, built-in table, or hub
    params: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layer_params: int  # one decoder layer
    output_params: int  # the LM head (0 when tied to the embeddings) or the classification head
    linears: dict[str, tuple[int, int]]  # every nn.Linear: name -> (in_features, out_features)
    output_name: str  # module name of the output layer (never a LoRA target)

    layer_prefix: str  # module name prefix of decoder layer 0, e.g. "model.layers.0."

    def layer_linears(self, names: dict[str, tuple[int, int]] | None = None) -> dict[str, tuple[int, int]]:
        """The linear layers (of `names`, default all) inside decoder layer 0."""
        return {n: s for n, s in (self.linears if names is None else names).items() if n.startswith(self.layer_prefix)}


def load_model_config(model: str, trust_remote_code: bool = False):
    """A transformers config: a local folder, the built-in table, or AutoConfig (the hub cache, then the hub)."""
    from transformers import AutoConfig

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{model}: no config.json in this folder")
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), str(path)
    if (known := _BUILTIN_KEYS.get(_short(model))) is not None:
        values = dict(BUILTIN[known])
        return AutoConfig.for_model(values.pop("model_type"), **values), f"built-in table ({known})"
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UserError(f"model {model!r}: no such folder, not in the built-in table ({', '.join(BUILTIN)}), "
                        "and not a hub id")
    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code), "hub"
    except (OSError, ValueError) as exc:
        raise UserError(f"model {model!r}: cannot read its config from the hub ({type(exc).__name__}); pass a "
                        f"folder with config.json, or one of {', '.join(BUILTIN)}") from exc


def load_architecture(model: str, head: str = "causal_lm", trust_remote_code: bool = False) -> Architecture:
    """Build the model on the meta device and read its shapes (seconds, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config, source = load_model_config(model, trust_remote_code)
    text = config.get_text_config()
    auto = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    if head == "seq_cls":
        config.num_labels = 1
    try:
        with torch.device("meta"):
            net = auto.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise UserError(f"model {model!r}: {type(config).__name__} has no {head} architecture ({exc})") from exc
    output = net.get_output_embeddings() if head == "causal_lm" else getattr(net, "score", None)
    output_name = next((n for n, m in net.named_modules() if m is output), "")
    embedding = net.get_input_embeddings()
    tied = output is not None and output.weight is embedding.weight
    layers_name, layers = next((n, m) for n, m in net.named_modules()
                               if isinstance(m, torch.nn.ModuleList) and len(m) == text.num_hidden_layers)
    heads = text.num_attention_heads
    return Architecture(
        name=model, source=source,
        params=sum(p.numel() for p in net.parameters()),
        hidden=text.hidden_size, layers=text.num_hidden_layers, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        vocab=text.vocab_size,
        layer_params=sum(p.numel() for p in layers[0].parameters()),
        output_params=0 if tied or output is None else output.weight.numel() + (
            output.bias.numel() if getattr(output, "bias", None) is not None else 0),
        linears={n: (m.in_features, m.out_features) for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)},
        output_name=output_name,
        layer_prefix=f"{layers_name}.0.",
    )


def lora_targets(arch: Architecture, target: str = "all-linear") -> dict[str, tuple[int, int]]:
    """The linear layers LoRA attaches to, matched as PEFT does: `all-linear` is every linear layer but the
    output layer; otherwise module names equal to, or ending in `.` + a name in the comma-separated list."""
    names = lora_target_names(target)
    if names is None:
        return {n: s for n, s in arch.linears.items() if n != arch.output_name}
    unmatched_lora_targets(target, list(arch.linears), arch.name, "linear layer")
    return {n: s for n, s in arch.linears.items() if lora_matches(n, names)}


def lora_params(arch: Architecture, rank: int = 8, target: str = "all-linear", dora: bool = False) -> int:
    """Trainable LoRA parameters: r x (in + out) per targeted layer (+ out for DoRA's magnitude vector)."""
    return sum(rank * (i + o) + (o if dora else 0) for i, o in lora_targets(arch, target).values())


@dataclass
class PlanArgs:
    """One training setup to estimate (the command-line flags of `medgpt plan`)."""

    model: str
    stage: str = "sft"
    method: str = "lora"
    device: str = "gpu"
    batch_size: int = 1  # micro-batch per device
    seq_len: int = 1024  # tokens per sequence (prompt + response)
    gradient_checkpointing: bool = False
    gpus: int = 1
    zero: int = 0
    lora_rank: int = 8
    lora_target: str = "all-linear"
    lora_dropout: float = 0.0
    reference: bool | None = None  # None: the stage's default
    reward_model: bool | None = None  # None: the stage's default (PPO yes, GRPO no)
    pure_bf16: bool = False  # trained weights, gradients and AdamW states in bf16 (config key pure_bf16)
    trust_remote_code: bool = False

    @property
    def facts(self) -> Stage:
        return stage_facts(self.stage)

    @property
    def wants_reward(self) -> bool:
        return self.facts.reward_model if self.reward_model is None else self.reward_model

    def validate(self) -> PlanArgs:
        checks = [
            (self.stage in STAGES, f"stage {self.stage!r}: expected one of {', '.join(STAGES)}"),
            (self.method in PLAN_METHODS, f"method {self.method!r}: expected one of {', '.join(PLAN_METHODS)}"),
            (self.device in DEVICES, f"device {self.device!r}: expected gpu or cpu"),
            (self.batch_size >= 1 and self.seq_len >= 1, "batch size and sequence length must be >= 1"),
            (self.gpus >= 1, "gpus must be >= 1"),
            (self.zero in (0, 1, 2, 3), "zero stage must be 0, 1, 2 or 3"),
            (self.lora_rank >= 1, "lora rank must be >= 1"),
            (not (self.device == "cpu" and self.method.startswith("qlora")),
             "qlora needs bitsandbytes on a CUDA GPU: no cpu estimate"),
            (not (self.device == "cpu" and (self.gpus > 1 or self.zero)), "gpus and zero apply to device gpu"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        plan_precision(self)  # the training rule's own errors (pure_bf16 on a CPU or under DeepSpeed)
        return self


def plan_precision(args: PlanArgs) -> Precision:
    """The precision medgpt trains `args` in, on the planned hardware: a GPU with bf16, or a CPU with native bf16
    (bf16 autocast); the same rule as `medgpt train` (models.training_precision)."""
    bits = {"qlora4": 4, "qlora8": 8}.get(args.method)
    return training_precision("qlora" if bits else args.method, "auto", bits, args.pure_bf16,
                              gpu=args.device == "gpu", gpu_bf16=True, cpu_bf16=True, deepspeed=args.zero > 0)


@dataclass(frozen=True)
class Layout:
    """Bytes per parameter: of a trained one (weight, gradient, AdamW states) and of a frozen one; `wide`: the
    matmul weights are fp32 under autocast (an fp32 residual stream, and autocast's bf16 weight copies)."""

    weight: float
    gradient: float
    optimizer: float
    frozen: float
    wide: bool


def layout(args: PlanArgs, precision: Precision | None = None) -> Layout:
    """The bytes per parameter of `args`'s precision (DeepSpeed's own layout under ZeRO)."""
    precision = precision or plan_precision(args)
    if args.zero:  # DeepSpeed's bf16 model and gradients, the fp32 master copy and moments in its optimizer
        return Layout(2.0, 2.0, 12.0, 2.0, wide=False)
    trained, frozen = DTYPE_BYTES[precision.trainable], DTYPE_BYTES[precision.frozen]
    matmul = trained if args.method == "full" else frozen
    return Layout(trained, trained, 2.0 * trained, frozen, wide=precision.autocast is not None and matmul == 4)


@dataclass
class Estimate:
    """Bytes per device, by component; `peak` is what must fit."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    reference_model: float
    reward_model: float  # PPO's value head lives on the policy: its few parameters are in weights
    overhead: float
    head_gradient: float  # the output layer's gradient, allocated first in the backward pass
    detail: dict[str, float] = field(default_factory=dict)  # activations by part

    @property
    def peak(self) -> float:
        held = self.weights + self.optimizer + self.reference_model + self.reward_model + self.overhead
        return held + max(self.activations + self.head_gradient, self.gradients)

    def gib(self) -> dict[str, float]:
        parts = {k: v for k, v in asdict(self).items() if k not in ("detail", "head_gradient")}
        return {**{k: round(v / GIB, 3) for k, v in parts.items()}, "peak": round(self.peak / GIB, 3)}


@dataclass
class Plan:
    args: PlanArgs
    arch: Architecture
    trainable: int
    estimate: Estimate
    fits: dict[float, int]  # GPU GiB -> largest micro-batch that fits (0: none)
    notes: list[str]
    precision: Precision | None = None

    def to_dict(self) -> dict:
        a = self.arch
        return {
            "model": a.name, "config_source": a.source, **{k: v for k, v in asdict(self.args).items() if k != "model"},
            "params": a.params, "trainable_params": self.trainable,
            "precision": asdict(self.precision) if self.precision else None,
            "architecture": {"hidden": a.hidden, "layers": a.layers, "heads": a.heads, "kv_heads": a.kv_heads,
                             "head_dim": a.head_dim, "intermediate": a.intermediate, "vocab": a.vocab},
            "per_device_gib": self.estimate.gib(),
            "activations_gib": {k: round(v / GIB, 3) for k, v in self.estimate.detail.items()},
            "max_micro_batch": {str(g): b for g, b in self.fits.items()},
            "notes": self.notes,
        }


def _frozen_bytes(arch: Architecture, method: str, per_param: float) -> float:
    """Bytes of frozen weights: QLoRA's quantized linear layers, everything else `per_param` bytes."""
    if method.startswith("qlora"):
        quantized = sum(i * o for n, (i, o) in arch.linears.items() if n != arch.output_name)
        per = NF4_BYTES if method == "qlora4" else 1.0
        return per * quantized + per_param * (arch.params - quantized)
    return per_param * arch.params


def _layer_bytes(arch: Architecture, args: PlanArgs, lora_in: int, lora_layers: int, wide: bool) -> float:
    """Bytes one decoder layer keeps for the backward pass per token (see the module docstring).

    A frozen projection keeps only its weight, not its input, so LoRA saves the inputs of the frozen
    layers but adds, per adapted layer, its dropout mask and its input cast to bf16.
    """
    h, i = arch.hidden, arch.intermediate
    q = arch.heads * arch.head_dim
    gpu = args.device == "gpu"
    # rotated q; k and v repeated to every head (SDPA with a padding mask); SDPA's output, which o_proj reads
    # as a view; and the bf16 attention mask SDPA keeps for each layer
    attention = 2 * q + 2 * 2 * q + 2 * q + 2 * args.seq_len
    if args.method == "full":
        mlp = 4 * 2 * i  # gate, SiLU(gate), up, their product (down_proj's input), bf16
        if not wide:  # each RMSNorm: its fp32 upcast input, the bf16 normalized input to its weight, its output
            norms = 2 * (4 * h + 2 * h + 2 * h)
        else:  # fp32 input and normalized input to the weight; autocast casts the output to bf16 once per
            norms = 2 * (4 * h + 4 * h) + 5 * 2 * h  # projection that reads it (q, k, v, gate, up)
        return attention + mlp + norms
    mlp = 3 * 2 * i  # gate, SiLU(gate), up
    norms = 2 * 4 * h  # the fp32 input of each RMSNorm
    dropout = args.lora_dropout > 0 and not args.facts.dropout_off
    mask = (1 if gpu else 4) if dropout else 0  # a bool mask on GPU; a float noise tensor on CPU
    return attention + mlp + norms + (2 + mask) * lora_in + 2 * args.lora_rank * lora_layers


def _trainable(args: PlanArgs, arch: Architecture) -> int:
    value_head = arch.hidden + 1 if args.facts.value_head else 0
    if args.method == "full":
        return arch.params + value_head
    head = arch.output_params if args.facts.score_head else 0  # PEFT trains it (modules_to_save)
    return lora_params(arch, args.lora_rank, args.lora_target) + value_head + head


def _activations(args: PlanArgs, arch: Architecture, wide: bool) -> dict[str, float]:
    """Bytes of what the forward pass keeps for the backward pass, by part (`wide`: see `Layout`)."""
    full, gpu = args.method == "full", args.device == "gpu"
    stream = 4 if wide else 2  # bytes of the residual stream: the dtype of the weights
    targets = {} if full else arch.layer_linears(lora_targets(arch, args.lora_target))
    tokens = args.batch_size * (2 if args.facts.paired else 1) * args.seq_len
    per_token = _layer_bytes(arch, args, sum(i for i, _ in targets.values()), len(targets), wide)
    if args.gradient_checkpointing:  # each layer keeps only its input; one layer is recomputed at a time
        parts = {"layers": tokens * (arch.layers * stream * arch.hidden + per_token)}
    else:
        parts = {"layers": tokens * arch.layers * per_token}
    if args.facts.fused_head:
        rows, cols = min(tokens, FUSED_TILE[0]), min(arch.vocab, FUSED_TILE[1])
        # the bf16 tile; the bf16 copy of the fp32 weight chunk it multiplies; on CPU about 8 fp32 temporaries
        # of the tile (PyTorch ops instead of a Triton kernel); the final hidden states are kept
        tile = rows * cols * 2 + (0 if gpu else rows * cols * 8 * 4) + (cols * arch.hidden * 2 if wide else 0)
        parts["lm_head"] = tile + tokens * arch.hidden * stream
    elif not args.facts.score_head:
        parts["lm_head"] = tokens * arch.vocab * (2 + 4 + 4)  # bf16 logits, fp32 log-softmax and its gradient
    if wide:  # autocast's bf16 weight copies live until the backward pass has used them
        layer_weights = sum(i * o for i, o in arch.layer_linears().values())
        copies = layer_weights * (1 if args.gradient_checkpointing else arch.layers)
        if not (args.facts.fused_head or args.facts.score_head):
            copies += arch.vocab * arch.hidden  # the LM head's weight, cast whole for the full logits
        parts["autocast_weights"] = 2.0 * copies
    if args.facts.generates:
        parts["generation_kv_cache"] = 2 * arch.layers * 2 * arch.kv_heads * arch.head_dim * tokens  # bf16 k, v
    return parts


def estimate(args: PlanArgs, arch: Architecture, reward_arch: Architecture | None = None) -> tuple[Estimate, int]:
    """The per-device estimate and the number of trainable parameters."""
    full, gpu = args.method == "full", args.device == "gpu"
    trainable = _trainable(args, arch)
    per = layout(args)

    def split(nbytes: float, from_stage: int) -> float:
        return nbytes / args.gpus if args.zero >= from_stage else nbytes

    if full:
        weights = per.weight * trainable
    else:
        weights = _frozen_bytes(arch, args.method, per.frozen) + per.weight * trainable
    if args.zero == 3 and args.gpus > 1:
        weights = weights / args.gpus + 2.0 * arch.layer_params  # ZeRO-3 gathers one layer at a time to run it
    gradients, optimizer = per.gradient * trainable, per.optimizer * trainable
    detail = _activations(args, arch, per.wide)
    activations = sum(v for k, v in detail.items() if k != "generation_kv_cache")
    # generation and training take turns: the larger one counts
    activations = max(activations, detail.get("generation_kv_cache", 0.0))

    wants_reference = args.facts.reference if args.reference is None else args.reference
    reference = per.frozen * arch.params if wants_reference and full else 0.0  # frozen, like a LoRA base
    # loaded for inference, unquantized: bf16 on a GPU (and on a CPU with native bf16)
    reward = 2.0 * reward_arch.params if args.wants_reward and reward_arch is not None else 0.0
    head_gradient = 0.0
    if full:
        head_params = arch.output_params or arch.vocab * arch.hidden
        head_gradient = per.gradient * head_params
        if args.facts.fused_head and per.gradient != 4:
            head_gradient += 4.0 * head_params  # the fused head accumulates it in fp32, then casts it (a copy)
    return Estimate(
        weights=weights,
        gradients=split(gradients, 2),
        optimizer=split(optimizer, 1),
        activations=activations,
        reference_model=split(reference, 3),
        reward_model=split(reward, 3),
        overhead=GPU_OVERHEAD if gpu else 0.0,
        head_gradient=split(head_gradient, 2),
        detail=detail,
    ), trainable


def max_micro_batch(args: PlanArgs, arch: Architecture, reward_arch: Architecture | None, budget_gib: float,
                    limit: int = 4096) -> int:
    """The largest micro-batch whose peak fits `budget_gib` (0 when even 1 does not)."""
    def fits(b: int) -> bool:
        return estimate(replace(args, batch_size=b), arch, reward_arch)[0].peak <= budget_gib * GIB

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def needs_checkpointing(args: PlanArgs, budget_gib: float) -> bool:
    """Whether the training step of `args` without gradient checkpointing would not fit in `budget_gib` GiB:
    what `activation_checkpointing: auto` turns checkpointing on for (it recomputes every layer's forward pass
    in the backward pass, a third more compute, so it is on only where it is needed)."""
    args = replace(args, gradient_checkpointing=False).validate()
    arch, reward_arch = architectures(args)
    return estimate(args, arch, reward_arch)[0].peak > budget_gib * GIB


def architectures(args: PlanArgs) -> tuple[Architecture, Architecture | None]:
    """The architecture the stage trains (a sequence classifier for a reward model) and its reward model's."""
    arch = load_architecture(args.model, "seq_cls" if args.facts.score_head else "causal_lm", args.trust_remote_code)
    reward_arch = load_architecture(args.model, "seq_cls", args.trust_remote_code) if args.wants_reward else None
    return arch, reward_arch


def plan(args: PlanArgs, gpu_memory: list[float] = (24, 40, 80)) -> Plan:
    """Estimate `args`, and the largest micro-batch for each GPU size in `gpu_memory` (GiB)."""
    args.validate()
    arch, reward_arch = architectures(args)
    result, trainable = estimate(args, arch, reward_arch)
    notes = _notes(args, arch)
    fits = {g: max_micro_batch(args, arch, reward_arch, g) for g in gpu_memory}
    return Plan(args, arch, trainable, result, fits, notes, plan_precision(args))


def _notes(args: PlanArgs, arch: Architecture) -> list[str]:
    notes = []
    if args.facts.paired:
        notes.append(f"{args.stage}: each example is two sequences (chosen and rejected) in one forward pass")
    if args.facts.reference and args.method != "full":
        notes.append("reference = the policy with its LoRA adapter switched off: no second copy")
    if args.facts.value_head:
        notes.append("value head on the policy (no separate critic); reward model = the same architecture, frozen")
    if args.facts.generates:
        notes.append("generation KV cache counted for one micro-batch; TRL GRPO generates steps_per_generation "
                     "micro-batches at once")
    if args.zero:
        notes.append("ZeRO: DeepSpeed holds bf16 weights and gradients, its optimizer the fp32 master copy")
    elif args.pure_bf16:
        notes.append("pure_bf16: bf16 weights, gradients and AdamW states, no fp32 master copy (8 bytes/param "
                     "less; updates below half a bf16 step are lost)")
    elif args.method == "full" and args.device == "gpu":
        notes.append("full: fp32 master weights, gradients and AdamW states (--pure-bf16: 8 bytes/param less)")
    if args.device == "cpu":
        notes.append("cpu: assumes native bf16 (AVX512-BF16/AMX) for autocast; without it medgpt trains in fp32")
    if args.zero == 3 and args.gpus > 1:
        notes.append("ZeRO-3: one gathered layer added to the weights; communication buckets not counted")
    if args.facts.fused_head:
        notes.append("LM head: TRL's fused log-prob head (no full logits)")
    return notes
