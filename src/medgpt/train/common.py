"""What every stage shares: data loading with counted drops, tokenization, trainer callbacks, resume, saving."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable

from medgpt.config import Config, training_precision
from medgpt.errors import UserError
from medgpt.files import is_main_process, write_json
from medgpt.stages import stage_facts
from medgpt.train import lm_head

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


def held_out(count: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices of `count` records: `val_size` of them (a share, or a count if >= 1) held out after a
    seeded shuffle."""
    size = int(val_size) if val_size >= 1 else max(1, int(count * val_size))
    if size >= count:
        raise UserError(f"val_size {val_size}: leaves no training data ({count} records)")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order[size:], order[:size]


def build_trainer(cfg: Config, trainer_cls, datasets: Callable, load: Callable | None = None,
                  task_type: str = "CAUSAL_LM", **trainer_kwargs):
    """The one way a TRL trainer is set up: the model `load(cfg)` returns (default: the policy), the data
    `datasets(cfg, tokenizer)` returns, the configured LoRA and the metrics log; returns (trainer, read counts)."""
    from medgpt.models import cast_lora_base_weights, cast_trainable, open_tokenizer

    tokenizer = open_tokenizer(cfg.model)
    train_ds, eval_ds, stats = datasets(cfg, tokenizer)
    if eval_ds is None and cfg.train.do_eval and (cfg.data.eval_data or cfg.data.val_size):
        raise UserError(f"{cfg.data.eval_data or 'val_size'}: no eval records are left to evaluate on "
                        f"(see data_stats: {stats.get('eval', stats['train']).summary()})")
    model = (load or load_policy)(cfg)
    trainer = trainer_cls(
        model=model,
        args=cfg.train,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config(cfg, task_type, model),
        callbacks=[metrics_callback(cfg.output_dir)],
        **trainer_kwargs,
    )
    check_sharding(trainer)
    precision = training_precision(cfg)
    cast_trainable(trainer.model, precision.trainable)  # what the trainer added or cast (PEFT, TRL)
    if precision.autocast and precision.frozen != precision.autocast and runs_under_autocast_only(cfg):
        count = cast_lora_base_weights(trainer.model, precision.autocast)
        log.info("LoRA base layers held in %s (the autocast dtype): %d", precision.autocast, count)
    lm_head.apply(trainer, cfg)
    if cfg.run.method != "full" or cfg.model.adapter:
        from medgpt.train import lora_forward

        log.info("LoRA layers with the fused update: %d", lora_forward.apply(trainer))
    return trainer, stats


def check_sharding(trainer) -> None:
    """An FSDP launch that would not shard is an error: accelerate applies FSDP on accelerators (GPUs) only, and
    on CPUs an FSDP config trains as plain data parallel, every process holding the whole model."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not trainer.is_fsdp_enabled:
        raise UserError("launched with an FSDP config, but accelerate does not apply FSDP here (it shards on GPUs "
                        f"only; this run is on {trainer.args.device.type}): every process would hold the whole "
                        "model; launch with examples/accelerate/ddp.yaml for data parallel on CPUs")


def runs_under_autocast_only(cfg: Config) -> bool:
    """True where every forward of the model being trained runs under the trainer's autocast (its training and
    evaluation losses): not GRPO's and PPO's generation, nor DPO's reference log-probs computed in advance."""
    return (stage_facts(cfg.run.stage).autocast_only and cfg.run.method != "full"
            and not getattr(cfg.train, "precompute_ref_log_probs", False))


def metrics_callback(output_dir: Path):
    """A TrainerCallback appending every log (loss, lr, eval metrics) to metrics.jsonl."""
    from transformers import TrainerCallback

    path = Path(output_dir) / METRICS_FILE

    class MetricsLogger(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                path.parent.mkdir(parents=True, exist_ok=True)
                row = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")

    return MetricsLogger()


CHECKPOINT_STATE = "trainer_state.json"  # the Trainer (and PPO) write it last: a checkpoint without it is partial


def complete_checkpoints(folder: Path) -> list[Path]:
    """`checkpoint-N` folders that were written to the end, oldest first; a run killed while saving leaves a
    partial one, which is passed over (with a warning) instead of crashing the resume."""
    steps = {p: p.name.removeprefix("checkpoint-") for p in folder.glob("checkpoint-*") if p.is_dir()}
    found = sorted((p for p, step in steps.items() if step.isdigit()), key=lambda p: int(steps[p]))
    complete = [p for p in found if (p / CHECKPOINT_STATE).exists()]
    if partial := [p.name for p in found if p not in complete]:
        log.warning("%s: passing over incomplete checkpoint(s) %s (interrupted while saving)", folder,
                    ", ".join(partial))
    return complete


def last_checkpoint(cfg: Config) -> str | None:
    """The last complete checkpoint to resume from when `resume` is set (None when there is none yet)."""
    if not cfg.run.resume:
        return None
    folder = cfg.output_dir
    complete = complete_checkpoints(folder) if folder.is_dir() else []
    found = str(complete[-1]) if complete else None
    log.info("resume: %s", found or "no checkpoint yet, starting fresh")
    return found


def checkpoint_step(checkpoint: str | None) -> int | None:
    """The optimizer step a checkpoint was saved at."""
    if checkpoint is None:
        return None
    return int(json.loads((Path(checkpoint) / CHECKPOINT_STATE).read_text()).get("global_step", 0))


def prepare_output(cfg: Config, resumed_at: int | None = None) -> None:
    """A run from scratch starts with an empty metrics log and first marks a folder that held a finished run as
    unfinished (its medgpt.json goes), so a run killed half-way is never taken for the old complete one. A run
    resumed at step N keeps the log's rows up to N: the steps after it are trained (and logged) again, so each
    step is in the log once."""
    from medgpt.data.rows import read_log, write_jsonl
    from medgpt.models import MEDGPT_META

    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    metrics = cfg.output_dir / METRICS_FILE
    if not cfg.run.resume or resumed_at is None:  # every process of a multi-process run gets here
        metrics.unlink(missing_ok=True)
        (cfg.output_dir / MEDGPT_META).unlink(missing_ok=True)
    elif metrics.exists() and is_main_process():
        write_jsonl(metrics, [row for row in read_log(metrics) if row.get("step", 0) <= resumed_at])


def whole_run_train_loss(output_dir: Path) -> float | None:
    """The mean training loss over every logged step of the run, resumed parts included (the Trainer's own
    `train_loss` covers only what the last process trained): each logged loss is the mean of its window."""
    from medgpt.data.rows import read_log

    rows = [r for r in read_log(Path(output_dir) / METRICS_FILE) if "loss" in r and "step" in r]
    total, steps, last = 0.0, 0, 0
    for row in sorted(rows, key=lambda r: r["step"]):
        window = row["step"] - last
        if window > 0:
            total, steps, last = total + row["loss"] * window, steps + window, row["step"]
    return total / steps if steps else None


def training_template(cfg: Config, tokenizer):
    """The configured chat template. A named template whose special markers (role markers, end-of-turn marker,
    think tags) are not single tokens of the tokenizer would train them as plain text: an error naming the
    pieces, a warning with `allow_split_markers: true`."""
    from medgpt.data.templates import get_template, split_markers

    template = get_template(cfg.model.template, tokenizer)
    split = split_markers(template, tokenizer) if cfg.model.template != "auto" else {}
    if split:
        pieces = "; ".join(f"{marker} -> {' + '.join(map(repr, parts))}" for marker, parts in split.items())
        problem = (f"template {template.name!r}: markers that are not single tokens of the tokenizer "
                   f"{getattr(tokenizer, 'name_or_path', '')!r} would be trained as plain text: {pieces}")
        if not cfg.data.allow_split_markers:
            raise UserError(f"{problem}; use the model's own template (template: auto) or one of its family, or set "
                            "allow_split_markers: true to train it anyway")
        log.warning(problem)
    return template


def peft_config(cfg: Config, task_type: str = "CAUSAL_LM", model=None):
    """The LoRA config for TRL, or None for full fine-tuning or when training a loaded adapter further; given the
    model, a `lora_target` name that matches none of its layers is an error."""
    from medgpt.models import lora_config

    if cfg.run.method == "full" or cfg.model.adapter:
        return None
    return lora_config(cfg.lora, task_type, model)


def load_policy(cfg: Config, head: str = "causal_lm", num_labels: int = 1, trainable: bool = True):
    """The model to train, as `training_precision(cfg)` holds it: full fine-tuning loads the weights straight in
    the trainable dtype (fp32 master weights unless pure_bf16; no round trip through bf16); LoRA loads the base
    in the frozen dtype, and the adapters the trainer adds are cast by `build_trainer`. `trainable=False`: a
    frozen copy (a reference model), held like frozen weights."""
    from dataclasses import replace

    from medgpt.models import PURE_BF16_COST, cast_trainable, load_model

    precision = training_precision(cfg)
    args = cfg.model
    if trainable and cfg.run.method == "full":
        args = replace(args, dtype=precision.trainable)
    if trainable and cfg.run.pure_bf16:
        log.warning(PURE_BF16_COST)
    model = load_model(args, training=True, head=head, num_labels=num_labels)
    if not trainable:
        return model.requires_grad_(False)
    if getattr(cfg.train, "activation_checkpointing", False) and cfg.model.adapter:
        model.enable_input_require_grads()
    if cfg.model.adapter:  # a loaded adapter trains on; a new one is added (and cast) by the trainer
        cast_trainable(model, precision.trainable)
    return model


def train_and_save(trainer, cfg: Config, stats: dict, extra_metrics: Callable[[Any], dict] | None = None) -> dict:
    """Train (resuming if asked), evaluate, save the final model and everything beside it, return metrics.

    Resuming from a checkpoint already at max_steps trains nothing: its weights are loaded and saved as they are.
    """
    checkpoint = last_checkpoint(cfg)
    resumed_at = checkpoint_step(checkpoint)
    prepare_output(cfg, resumed_at)
    if checkpoint and 0 < cfg.train.max_steps <= resumed_at:
        log.info("%s is at step %d of max_steps %d: nothing left to train", checkpoint, resumed_at,
                 cfg.train.max_steps)
        trainer._load_from_checkpoint(checkpoint)  # the Trainer's own loader (adapters included)
        metrics: dict[str, Any] = {"global_step": resumed_at}
    else:
        metrics = dict(trainer.train(resume_from_checkpoint=checkpoint).metrics)
    if (train_loss := whole_run_train_loss(cfg.output_dir)) is not None:
        metrics["train_loss"] = train_loss
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    if extra_metrics:
        metrics.update(extra_metrics(trainer))
    out = cfg.output_dir
    if trainer.is_world_process_zero():
        for split, s in stats.items():
            log.info("data %s: %s", split, s.to_dict())
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is in medgpt.json
        save_outputs(cfg, trainer.processing_class, stats, metrics)
    return metrics


def save_outputs(cfg: Config, tokenizer, stats: dict, metrics: dict) -> None:
    """Everything beside the saved weights: tokenizer (its chat template the one training rendered with), counts,
    metrics, and medgpt.json (the report is the command's: `medgpt.report.write_training_report`).

    medgpt.json is written last: its presence marks the folder complete.
    """
    from medgpt.models import with_training_template, write_meta

    out = cfg.output_dir
    with_training_template(tokenizer, cfg.model.template).save_pretrained(str(out))
    write_json(out / "data_stats.json", {split: s.to_dict() for split, s in stats.items()})
    write_json(out / "final_metrics.json", metrics)
    write_meta(out, stage=cfg.run.stage, method=cfg.run.method, base_model=cfg.model.model,
               adapter_base=cfg.model.adapter, template=cfg.model.template, complete=True,
               config={k: v for k, v in cfg.raw.items() if _jsonable(v)})


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False
