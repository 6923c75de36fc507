"""What a stage was set to: the settled settings a training run records (hyperparameters.json), or for an older
folder its medgpt.json config with the stage's defaults, and the rows a report shows of them."""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from medgpt.errors import UserError
from medgpt.files import read_json
from medgpt.report.labels import facts_of, number_text
from medgpt.vocab import vocabulary_extension

log = logging.getLogger(__name__)


SETTINGS_FILE = "hyperparameters.json"  # the settled settings of a stage, written by its training report
META_FILE = "medgpt.json"

# ---- hyperparameters ---------------------------------------------------------------------------
# What a stage was set to, as a flat dict of config keys. A training run records its settled values (and the
# device it ran on) in hyperparameters.json; for a folder without one, medgpt.json's config is read, with the
# defaults of the stage's config classes filled in.

SETTING_KEYS = ("stage", "method", "model", "adapter", "template", "dtype", "quantization_bit", "data",
                "val_size", "overlong", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "modules_to_save", "use_dora",
                "use_rslora", "learning_rate", "lr_scheduler_type", "warmup_steps", "max_steps", "num_train_epochs",
                "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "block_size",
                "max_completion_length", "max_prompt_length", "max_new_tokens", "rollout_batch_size",
                "mini_batch_size", "ppo_epochs", "num_generations", "beta", "loss_type", "kl_coef", "bf16", "fp16",
                "use_cpu", "pure_bf16", "seed")
DEVICE_DEPENDENT = ("bf16", "fp16", "use_cpu")  # defaults chosen on the machine that trained: not in the config


def _plain(value: Any) -> Any:
    """A JSON-safe form of a config value (enums by their value, anything else unknown by its text)."""
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def settled_settings(cfg) -> dict:
    """The values a stage trained with (its settled Config) and where: device, processes, weights' dtype."""
    parts = [cfg.run, cfg.model, cfg.data, cfg.lora, cfg.stage_args, cfg.train]
    values: dict[str, Any] = {}
    for key in SETTING_KEYS:
        part = next((p for p in parts if p is not None and key in {f.name for f in dataclasses.fields(p)}), None)
        if part is not None:
            values[key] = _plain(getattr(part, key))
    return {"values": values, "measured": _measured(cfg)}


def _measured(cfg) -> dict:
    """Device, process count and the dtypes the weights were held in, on the machine that trained."""
    import torch

    out: dict[str, Any] = {}
    try:
        out["processes"] = int(cfg.train.world_size)
        gpu = torch.cuda.is_available() and not cfg.train.use_cpu
        out["device"] = f"CUDA GPU ({torch.cuda.get_device_name(torch.cuda.current_device())})" if gpu else "CPU"
        out["weights"] = _weights_text(cfg)
    except Exception:  # the settings table then says "not recorded" for these, the rest of the report stands
        log.warning("report: the device and weight dtypes were not recorded", exc_info=True)
    return out


def _weights_text(cfg) -> str:
    """The dtypes of the trained parameters and of the frozen ones, by the rule the loaders follow."""
    from medgpt.config import training_precision

    held = training_precision(cfg)
    if cfg.run.method == "full":
        return f"{held.trainable} (every weight is trained)"
    base = f"{held.quantization_bit}-bit (bitsandbytes) linear layers, the rest {held.frozen}" \
        if held.quantization_bit else held.frozen
    return f"LoRA adapters {held.trainable}, frozen base {base}"


def recorded_settings(folder: Path) -> dict | None:
    """A stage's settings from its folder: hyperparameters.json, else medgpt.json's config plus the defaults
    of the stage's config classes (device-chosen defaults stay unknown); None when neither is there."""
    settled = read_json(folder / SETTINGS_FILE, {})
    if settled.get("values"):
        return settled
    meta = read_json(folder / META_FILE, {})
    if not meta:
        return None
    from medgpt.config import ALIASES, DataArgs, RunArgs
    from medgpt.models import LoraArgs, ModelArgs

    raw = {ALIASES.get(k, k): v for k, v in (meta.get("config") or {}).items()}
    stage = str(meta.get("stage") or raw.get("stage") or "sft")
    classes: list = [RunArgs, ModelArgs, DataArgs, LoraArgs]
    try:
        from medgpt.train import stage_module

        module = stage_module(stage)
        classes += [c for c in (getattr(module, "STAGE_ARGS", None), module.CONFIG_CLASS) if c is not None]
    except (UserError, ImportError) as exc:
        log.warning("report: %s: stage %s: defaults unknown (%s)", folder, stage, exc)
    defaults: dict[str, Any] = {}
    for cls in reversed(classes):  # the first class that has a key wins, as in the config
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
    values = {"stage": stage, "method": meta.get("method") or raw.get("method"), "model": meta.get("base_model"),
              "adapter": meta.get("adapter_base"), "template": meta.get("template")}
    for key in SETTING_KEYS:
        if key in raw:
            values[key] = _plain(raw[key])
        elif key not in DEVICE_DEPENDENT and key in defaults and values.get(key) is None:
            values[key] = _plain(defaults[key])
    if values.get(length_key := facts_of(stage).length_key):
        values["max_length"] = values[length_key]
    measured = {"device": "CPU"} if _truthy(values.get("use_cpu")) else {}
    return {"values": values, "measured": measured}


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes", "on")


def _int(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def settings_rows(settings: dict, folder: Path, steps_logged: int | None) -> list[list[str]]:
    """The hyperparameter table of a stage: setting -> value, in words."""
    values, measured = settings.get("values", {}), settings.get("measured", {})
    stage, method = values.get("stage"), values.get("method") or "?"
    missing = "not recorded"
    rows = []
    kinds = {"lora": "LoRA", "qlora": "QLoRA", "full": "full fine-tuning"}
    text = kinds.get(method, method)
    if values.get("adapter"):
        text += f", training the adapter {values['adapter']} further"
    rows.append(["method", text])
    if method in ("lora", "qlora") and (values.get("lora_rank") or (folder / "adapter_config.json").exists()):
        adapter = read_json(folder / "adapter_config.json", {})  # what PEFT saved: the truth for old runs too
        rank, alpha = adapter.get("r", values.get("lora_rank")), adapter.get("lora_alpha", values.get("lora_alpha"))
        target = adapter.get("target_modules", values.get("lora_target"))
        if isinstance(target, list):
            target = ", ".join(sorted(target))
        extras = [name for name, key in (("DoRA", "use_dora"), ("rsLoRA", "use_rslora")) if _truthy(values.get(key))]
        dropout = adapter.get("lora_dropout", values.get("lora_dropout"))
        rows.append(["LoRA rank / alpha", f"rank {rank}, alpha {alpha}, dropout {dropout}, on {target}"
                     + "".join(f", {e}" for e in extras)])
        if full := adapter.get("modules_to_save", values.get("modules_to_save")):
            full = ", ".join(sorted(full)) if isinstance(full, list) else full
            extended = vocabulary_extension(values["model"]) if values.get("model") and \
                Path(str(values["model"])).is_dir() else None
            why = f" (the model's vocabulary was extended by {extended['pieces_added']} tokens: their rows learn)" \
                if extended else ""
            rows.append(["trained in full", f"{full}{why}"])
    model = str(values.get("model") or "?")
    rows.append(["model", model + (f" (template {values['template']})" if values.get("template") else "")])
    if values.get("data"):
        held = f", {values['val_size']} held out for eval" if values.get("val_size") else ""
        rows.append(["training data", f"{values['data']}{held}"])
    lr = values.get("learning_rate")
    schedule = f", {values['lr_scheduler_type']} schedule" if values.get("lr_scheduler_type") else ""
    warmup = _warmup_text(values.get("warmup_steps"))
    rows.append(["learning rate", f"{number_text(lr)}{schedule}{warmup}" if lr is not None else missing])
    max_steps = _int(values.get("max_steps")) or 0
    unit = facts_of(stage).steps
    epochs = values.get("num_train_epochs")
    planned = f"{max_steps} {unit} (max_steps)" if max_steps > 0 else \
        f"{number_text(epochs)} epoch{'' if _int(epochs) == 1 else 's'} (num_train_epochs)"
    rows.append(["steps", planned + (f"; logged up to step {steps_logged}" if steps_logged else "")])
    rows.append(["batch", _batch_text(values, measured, stage)])
    rows.append(["max length", _length_text(values, stage)])
    precision = "pure bf16 (trained weights, gradients, optimizer states)" if _truthy(values.get("pure_bf16")) else \
        "bf16 mixed precision" if _truthy(values.get("bf16")) else \
        "fp16 mixed precision" if _truthy(values.get("fp16")) else \
        "fp32" if "bf16" in values or "fp16" in values else missing
    rows.append(["precision", precision])
    weights = measured.get("weights")
    if not weights:
        dtype = values.get("dtype") or "auto"
        weights = f"{dtype} (config dtype)" if dtype != "auto" else \
            "auto: fp32 on CPU, bf16/fp16 on GPU (which one: not recorded)"
        if _int(values.get("quantization_bit")):
            weights = f"{values['quantization_bit']}-bit (bitsandbytes) base; {weights}"
    rows.append(["weights dtype (training)", str(weights)])
    processes = measured.get("processes")
    device = measured.get("device", missing)
    rows.append(["device", device + (f" × {processes} processes" if processes and processes > 1 else "")])
    options = [f"{key} {_listed(values[key])}" for key in facts_of(stage).options
               if values.get(key) is not None]
    if options:
        rows.append([f"{stage} options", ", ".join(options)])
    if values.get("seed") is not None:
        rows.append(["seed", str(values["seed"])])
    return rows


def _listed(value: Any) -> str:
    return ", ".join(map(number_text, value)) if isinstance(value, list) else number_text(value)


def _warmup_text(value: Any) -> str:
    """transformers 5's warmup_steps: a whole number of steps, or a float below 1 as a share of them."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ""
    if number <= 0:
        return ""
    if number < 1:
        return f", warmup {number:.0%} of the steps"
    return f", warmup {int(number)} step{'' if number == 1 else 's'}"


def _batch_text(values: dict, measured: dict, stage: str | None) -> str:
    per_device, accumulation = _int(values.get("per_device_train_batch_size")), \
        _int(values.get("gradient_accumulation_steps")) or 1
    processes = measured.get("processes")
    unit = facts_of(stage).batch_unit
    if facts_of(stage).rollouts:
        rollout = values.get("rollout_batch_size")
        minibatch = values.get("mini_batch_size") or (per_device or 0) * accumulation
        per = f" × {processes} processes" if processes else " per process"
        return (f"{rollout} prompts per rollout{per}; updates in minibatches of {minibatch} {unit}, "
                f"{per_device} per forward pass")
    text = f"{per_device} per device × {accumulation} gradient accumulation"
    if processes:
        return text + f" × {processes} process{'es' if processes > 1 else ''} = " \
            f"{(per_device or 0) * accumulation * processes} {unit} per optimizer step"
    return text + f" = {(per_device or 0) * accumulation} {unit} per optimizer step and process " \
        "(process count not recorded)"


def _length_text(values: dict, stage: str | None) -> str:
    text = facts_of(stage).length
    if "{max_length}" in text and not values.get("max_length"):
        return "no limit"
    return text.format_map(defaultdict(lambda: None, {**values, "overlong": values.get("overlong") or "drop"}))
