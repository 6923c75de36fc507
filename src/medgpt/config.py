"""Typed run configuration: one flat YAML (plus `--key value` overrides) for every stage.

A config's keys are the fields of the dataclasses below, of the stage's own STAGE_ARGS dataclass, and of the
stage's TRL config class (a `transformers.TrainingArguments` subclass), so every TRL option is reachable
without a second argument system. Unknown keys are an error, with a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgpt.data.readers import ON_ERROR, OVERLONG
from medgpt.errors import UserError
from medgpt.models import LoraArgs, ModelArgs

ALIASES = {
    "model_name_or_path": "model",
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "train_file": "data",
    "dataset": "data",
    "out": "output_dir",
    "lora_r": "lora_rank",
    "finetuning_type": "method",
    "warmup_ratio": "warmup_steps",  # transformers 5: a float < 1 is a share of the steps
    "gradient_checkpointing": "activation_checkpointing",
    "rewards": "reward_fn",
}
# checked by medgpt before any library sees them: key -> (test, what the value must be)
RANGES: dict[str, tuple[Any, str]] = {
    **{k: (lambda v: v >= 1, "at least 1") for k in (
        "lora_rank", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
        "max_length", "block_size", "max_samples", "max_prompt_length", "max_completion_length", "max_new_tokens",
        "num_generations", "rollout_batch_size", "ppo_epochs")},
    **{k: (lambda v: v > 0, "greater than 0") for k in (
        "lora_alpha", "learning_rate", "num_train_epochs", "rope_factor", "logging_steps", "save_steps", "eval_steps",
        "temperature")},
    **{k: (lambda v: v >= 0, "at least 0") for k in (
        "val_size", "weight_decay", "warmup_steps", "max_grad_norm", "beta", "seed", "kl_coef", "vf_coef",
        "dataloader_num_workers", "neftune_noise_alpha")},
    "lora_dropout": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (use num_train_epochs) or at least 1"),
    "quantization_bit": (lambda v: v in (4, 8), "4 or 8"),
    "top_p": (lambda v: 0 < v <= 1, "greater than 0 and at most 1"),
}
# keys of older configs whose meaning moved: the error says where
MOVED = {"length_target": "reward_kwargs: {target_chars: N}"}
# text options that name several things: a YAML list is read as the comma-separated string
COMMA_LISTS = ("lora_target", "modules_to_save")
METHODS = ("lora", "qlora", "full")
LM_HEAD_LOSSES = ("auto", "plain", "chunked")


@dataclass
class DataArgs:
    """Where the data comes from and how it is validated."""

    data: str | None = None  # file, folder, comma-separated list, or hub data set name
    data_subset: str | None = None
    data_split: str = "train"
    eval_data: str | None = None
    val_size: float = 0.0  # share (or count, if >= 1) of the training data held out for eval
    max_samples: int | None = None
    on_error: str = "fail"  # fail | skip
    overlong: str = "drop"  # drop | truncate (records longer than max_length after tokenization)
    system: str | None = None  # system prompt; None = the template's default
    train_on_all: bool = False  # labels on every token, not only assistant turns
    enable_thinking: bool | None = None  # reasoning templates: false trains and prompts without reasoning
    train_on_reasoning: bool = True  # labels on the reasoning (think block) of records that carry it
    allow_split_markers: bool = False  # train a named template whose markers are several tokens (a warning)
    data_cache_dir: str | None = None  # prepared (encoded) data; default: HF_DATASETS_CACHE/medgpt-prepared
    streaming: bool = False  # stage pt: read and tokenize the corpus as training consumes it (needs max_steps)


@dataclass
class RunArgs:
    """What to run and how to resume."""

    stage: str = "sft"
    method: str = "lora"  # lora | qlora | full
    pure_bf16: bool = False  # trained weights, gradients, AdamW states in bf16 (GPU): 8 bytes/param less, lossy
    resume: bool = False  # continue from the last checkpoint in output_dir
    report_prompts: str | None = None  # jsonl of {"query"} rows answered by the model in the report
    lm_head_loss: str = "auto"  # auto | plain | chunked: how the loss reads the LM head (medgpt.train.lm_head)


@dataclass
class Config:
    """Everything one `medgpt train` run needs; `train` is the stage's TRL config object."""

    run: RunArgs
    model: ModelArgs
    data: DataArgs
    lora: LoraArgs
    train: Any
    stage_args: Any = None  # the instance of the stage module's STAGE_ARGS dataclass, if it has one
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir)


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _takes_no(tp: Any) -> bool:
    """Whether the field is a strategy whose values include "no" (eval_strategy, save_strategy, ...)."""
    return any(isinstance(t, type) and issubclass(t, enum.Enum) and "no" in {e.value for e in t}
               for t in (typing.get_args(tp) or (tp,)))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Turn a YAML or command-line value into the field's type (YAML reads 1e-4 as a string). A yes/no value
    stays a yes/no value: it is an error for a field that takes none, except that YAML 1.1 reads
    `eval_strategy: no` as false, which means the strategy "no"."""
    tp = _unwrap_optional(tp)
    if isinstance(value, bool) and tp is not bool and tp is not Any and bool not in typing.get_args(tp):
        if value is False and _takes_no(tp):
            return "no"
        raise UserError(f"{key}: {str(value).lower()} is a yes/no value, but {key} takes a "
                        f"{getattr(tp, '__name__', tp)} (quote it if you mean the text)")
    if value is None or tp is Any or isinstance(tp, str):
        return value
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if tp in (int, float):
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if tp is int and not number.is_integer():
                raise ValueError(value)
            return tp(number)
        if tp is str:
            return ",".join(map(str, value)) if key in COMMA_LISTS and isinstance(value, list) else str(value)
        if origin is list or tp is list:
            return value if isinstance(value, list) else [v.strip() for v in str(value).split(",") if v.strip()]
        if origin is dict or tp is dict:
            return value if isinstance(value, dict) else json.loads(value)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{key}: {value!r} is not a valid {getattr(tp, '__name__', tp)}") from exc
    return value


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--key value`, `--key=value` and bare `--flag` (true) into a dict; values parsed as YAML scalars."""
    import yaml

    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise UserError(f"unexpected argument {token!r}: overrides are --key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        out[key.replace("-", "_")] = yaml.safe_load(value) if value != "" else ""
        i += 1
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such config file")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}: invalid YAML: {problem}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: the config must be a mapping of keys to values")
    return loaded


def build_stage_config(raw: dict[str, Any], stage_module: Any) -> Config:
    """Validate a flat dict of options, split it into the typed parts of a `Config` and settle it: the shared
    rules, then the stage's own `configure(cfg)`. The result is fixed: nothing changes it while the stage runs.
    `stage_module` is the stage's module (`medgpt.train.stage_module`; `medgpt.train.build_config` finds it)."""
    raw = {ALIASES.get(k, k): v for k, v in raw.items()}
    stage = str(raw.get("stage", "sft"))
    ours = {"run": RunArgs, "model": ModelArgs, "data": DataArgs, "lora": LoraArgs}
    stage_cls = getattr(stage_module, "STAGE_ARGS", None)
    train_cls = stage_module.CONFIG_CLASS
    known = {}
    for cls in [*ours.values(), *([stage_cls] if stage_cls else []), train_cls]:
        known.update({name: (cls, tp) for name, tp in _fields(cls).items()})
    unknown = [k for k in raw if k not in known or k == "extra"]  # ModelArgs.extra is for code, not configs
    if unknown:
        hints = [f"{k} (now {MOVED[k]})" if k in MOVED
                 else f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k
                 for k in unknown]
        raise UserError(f"unknown config key(s) for stage {stage}: {', '.join(hints)}")
    auto_checkpointing = str(raw.get("activation_checkpointing", "auto")).lower() == "auto"
    values = {k: coerce(k, v, known[k][1]) for k, v in raw.items()
              if not (k == "activation_checkpointing" and auto_checkpointing)}
    for key, value in values.items():
        test, must = RANGES.get(key, (None, ""))
        if test and isinstance(value, (int, float)) and not isinstance(value, bool) and not test(value):
            raise UserError(f"{key}: {value!r} must be {must}")

    def make(cls):
        return cls(**{k: v for k, v in values.items() if k in _fields(cls)})

    parts = {name: make(cls) for name, cls in ours.items()}
    run: RunArgs = parts["run"]
    if run.method not in METHODS:
        raise UserError(f"method {run.method!r}: expected one of {', '.join(METHODS)}")
    if run.lm_head_loss not in LM_HEAD_LOSSES:
        raise UserError(f"lm_head_loss {run.lm_head_loss!r}: expected one of {', '.join(LM_HEAD_LOSSES)}")
    if run.method == "qlora" and not parts["model"].quantization_bit:
        parts["model"].quantization_bit = 4
    data: DataArgs = parts["data"]
    for name, value, allowed in (("on_error", data.on_error, ON_ERROR), ("overlong", data.overlong, OVERLONG)):
        if value not in allowed:
            raise UserError(f"{name} {value!r}: expected {' or '.join(allowed)}")
    if data.streaming and stage != "pt":
        raise UserError(f"streaming: true is for stage pt (a corpus read as a stream); stage {stage} prepares its "
                        "data (`medgpt data prepare`)")
    train_values = {k: v for k, v in values.items() if k in _fields(train_cls)}
    train_values.setdefault("output_dir", f"outputs/{stage}")
    train_values.update(_device_defaults(raw, run, parts["model"]))
    train_values.setdefault("report_to", ["tensorboard"])
    train_values.setdefault("logging_steps", 5)
    train_values.setdefault("save_total_limit", 2)
    if (data.eval_data or data.val_size) and "eval_strategy" not in raw:
        train_values["eval_strategy"] = "epoch"  # an eval split with no schedule set: evaluate once per epoch
    try:
        train = train_cls(**train_values)
    except (ValueError, TypeError) as exc:
        raise UserError(f"invalid training options: {exc}") from exc
    if getattr(train, "use_liger_kernel", False):
        import importlib.util

        if train.use_cpu or not _cuda():
            raise UserError("use_liger_kernel: Liger's kernels are Triton kernels for CUDA GPUs; this run trains "
                            "on the CPU")
        if importlib.util.find_spec("liger_kernel") is None:
            raise UserError("use_liger_kernel needs the liger-kernel package: pip install liger-kernel")
    cfg = Config(run=run, model=parts["model"], data=data, lora=parts["lora"], train=train,
                 stage_args=make(stage_cls) if stage_cls else None, raw=raw)
    if configure := getattr(stage_module, "configure", None):
        configure(cfg)
    check_eval_and_length(cfg)
    if auto_checkpointing and hasattr(cfg.train, "activation_checkpointing"):
        cfg.train.activation_checkpointing = cfg.train.gradient_checkpointing = checkpointing_needed(cfg)
    return cfg


def check_eval_and_length(cfg: Config) -> None:
    """An evaluation schedule needs eval data, and `max_length` must fit the model's context (its
    max_position_embeddings, times rope_factor where rope_scaling stretches it)."""
    strategy = getattr(cfg.train, "eval_strategy", "no")
    strategy = str(getattr(strategy, "value", strategy))
    if strategy != "no" and not (cfg.data.eval_data or cfg.data.val_size):
        raise UserError(f"eval_strategy {strategy}: there is no eval data; set eval_data: FILE or val_size "
                        "(a share or a count of the training data), or eval_strategy: no")
    max_length = getattr(cfg.train, "max_length", None)
    context = model_context(cfg.model) if max_length else None
    if context and max_length > context:
        raise UserError(f"max_length {max_length}: above the model's context of {context} tokens "
                        "(max_position_embeddings in its config.json); lower max_length, or set rope_scaling and "
                        "rope_factor to stretch the context")


def model_context(model: ModelArgs) -> int | None:
    """The tokens the model attends over, from its config.json (a folder, the hub cache or the hub, the bundled
    copy); None where the config cannot be read, or gives no length."""
    from transformers import AutoConfig

    from medgpt.models import BUNDLED, resolve_model

    try:
        source = resolve_model(model.model) if model.model in BUNDLED else model.model
        config = AutoConfig.from_pretrained(source, trust_remote_code=model.trust_remote_code)
    except (UserError, OSError, ValueError):
        return None
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    if not isinstance(context, int):
        return None
    return int(context * model.rope_factor) if model.rope_scaling else context


CPU_MEMORY_SHARE = 0.4  # of the RAM a CPU run may plan to fill (the OS, the data and other processes share it)
GPU_MEMORY_SHARE = 0.9  # of the GPU's memory (the planner counts the CUDA context and allocator slack itself)


def checkpointing_needed(cfg: Config) -> bool:
    """`activation_checkpointing: auto`: on only where the memory planner (`medgpt.plan`) says the step would
    not fit the device without it (on a GPU: 90% of its memory; on a CPU: 40% of the RAM). Where the planner
    cannot model the architecture: on for a GPU, off for a CPU (whose RAM is rarely what runs out first)."""
    import logging

    from medgpt.plan import needs_checkpointing

    gpu = not cfg.train.use_cpu and _cuda()
    args = plan_args(cfg, gpu)
    try:
        budget = device_memory_gib(gpu) * (GPU_MEMORY_SHARE if gpu else CPU_MEMORY_SHARE)
        needed = needs_checkpointing(args, budget)
    except Exception as exc:  # an architecture the planner cannot build on the meta device, a GPU unread
        logging.getLogger(__name__).info("activation_checkpointing auto: no memory plan for %s (%s): %s",
                                         cfg.model.model, exc, "on" if gpu else "off")
        return gpu
    logging.getLogger(__name__).info("activation_checkpointing auto: %s (batch %d x %d tokens %s %.1f GiB)",
                                     "on" if needed else "off", args.batch_size, args.seq_len,
                                     "would not fit in" if needed else "fits in", budget)
    return needed


def plan_args(cfg: Config, gpu: bool, checkpointing: bool = False):
    """The memory planner's `medgpt.plan.PlanArgs` for the run `cfg` on a GPU or a CPU."""
    from medgpt.plan import PlanArgs

    method = f"qlora{cfg.model.quantization_bit}" if cfg.run.method == "qlora" else cfg.run.method
    return PlanArgs(cfg.model.model, stage=cfg.run.stage, method=method, device="gpu" if gpu else "cpu",
                    batch_size=cfg.train.per_device_train_batch_size,
                    seq_len=getattr(cfg.train, "max_length", None) or 1024, gradient_checkpointing=checkpointing,
                    lora_rank=cfg.lora.lora_rank, lora_target=cfg.lora.lora_target,
                    lora_dropout=cfg.lora.lora_dropout, pure_bf16=cfg.run.pure_bf16,
                    trust_remote_code=cfg.model.trust_remote_code)


def _cuda() -> bool:
    from medgpt.models import cuda_available

    return cuda_available()


def device_memory_gib(gpu: bool) -> float:
    """The device's memory in GiB: the first GPU's (this process's, under a launcher), else the machine's RAM."""
    import os

    if gpu:
        import torch

        return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def uses_deepspeed(option: Any) -> bool:
    """Whether the run trains under DeepSpeed: its config names a DeepSpeed file, or accelerate launched it so."""
    import os

    return bool(option) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def training_precision(cfg: Config):
    """The run's `medgpt.models.Precision`: what its trained and frozen weights are held in, and its autocast."""
    from medgpt.models import cuda_available, training_precision as rule

    return rule(cfg.run.method, cfg.model.dtype, cfg.model.quantization_bit, cfg.run.pure_bf16,
                gpu=cuda_available() and not cfg.train.use_cpu,
                deepspeed=uses_deepspeed(getattr(cfg.train, "deepspeed", None)))


def _device_defaults(raw: dict[str, Any], run: RunArgs, model: ModelArgs) -> dict[str, Any]:
    """CPU when there is no GPU; the autocast of the run's precision (bf16, or fp16 with loss scaling on GPUs
    without bf16; none for fp32), unless `bf16` or `fp16` is set; errors for a precision that cannot be had."""
    from medgpt.models import cuda_available, training_precision as rule

    out: dict[str, Any] = {}
    if not cuda_available() and "use_cpu" not in raw:
        out["use_cpu"] = True
    gpu = cuda_available() and not (coerce("use_cpu", raw["use_cpu"], bool) if "use_cpu" in raw else False)
    precision = rule(run.method, model.dtype, model.quantization_bit, run.pure_bf16, gpu=gpu,
                     deepspeed=uses_deepspeed(raw.get("deepspeed")))
    if "bf16" not in raw and "fp16" not in raw:
        out["bf16"] = precision.autocast == "bf16"
        out["fp16"] = precision.autocast == "fp16"
    elif run.pure_bf16 and coerce("fp16", raw.get("fp16", False), bool):
        raise UserError("pure_bf16 with fp16: true: pure bf16 trains bf16 weights (set bf16: true or unset fp16)")
    return out


def read_config(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None,
                **defaults: Any) -> dict[str, Any]:
    """YAML file (optional) + overrides (command line) -> one flat dict of options. Later sources win."""
    raw: dict[str, Any] = dict(defaults)
    if path:
        raw.update(read_yaml(path))
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    raw.update(overrides or {})
    return raw
