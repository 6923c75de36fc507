"""Run reports: what each stage was set to (hyperparameters), what it was fed (data counts), what it learned
(curves, final metrics), and how its answers differ from the base model's on the same prompts.

A report is `report.md` (plots as PNG files beside it, in plots/) and `report.html`, self-contained (plots
embedded as base64 PNG) so it can be mailed or archived alone. Answers are cached in answers.json, keyed
by the model's files, the prompts and the generation settings, so writing a report again is cheap.
Every curve is named as a reader knows it (not by its log key) and every axis says what it measures.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import gc
import html
import io
import logging
import math
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medgpt.data.rows import read_log
from medgpt.errors import UserError
from medgpt.files import (ResultCache, atomic_write, files_fingerprint, read_json, value_digest,
                          write_json)
from medgpt.stages import STAGES_BY_NAME, UNKNOWN, Stage

log = logging.getLogger(__name__)

SAMPLE_PROMPTS = Path(__file__).parent / "sample_data" / "prompts.jsonl"
NO_PROMPTS = ("none", "off", "false", "no", "")
MAX_NEW_TOKENS = 128
ANSWERS_FILE = "answers.json"
ANSWERS_FORMAT = 2  # answers with their finish reason and token count; older caches are generated again
SETTINGS_FILE = "hyperparameters.json"  # the settled settings of a stage, written by its training report
META_FILE = "medgpt.json"
REPORT_FILES = ("report.md", "report.html", ANSWERS_FILE, SETTINGS_FILE)

# ---- what the logged metrics are ------------------------------------------------------------------
# The names TRL 1.x's trainers (SFT, DPO, KTO, ORPO, GRPO, Reward), transformers' Trainer and medgpt's PPO
# log, by panel; `eval_NAME` is the same metric on the eval set. A name not listed here is not plotted
# (it is still in the final metrics table when it is there).
METRICS: dict[str, tuple[str, str]] = {
    "loss": ("loss", "loss"),
    "nll_loss": ("loss", "NLL of the chosen answer"),
    "policy_loss": ("loss", "policy loss"),
    "value_loss": ("loss", "value loss"),
    "aux_loss": ("loss", "router auxiliary loss"),
    "mean_token_accuracy": ("token_accuracy", "token accuracy"),
    "rewards/accuracies": ("pair_accuracy", "pairs with chosen reward > rejected"),
    "accuracy": ("pair_accuracy", "pairs with chosen scored above rejected"),
    "rewards/margins": ("implicit_reward", "reward margin (chosen − rejected)"),
    "rewards/chosen": ("implicit_reward", "reward of the chosen answer"),
    "rewards/rejected": ("implicit_reward", "reward of the rejected answer"),
    "margin": ("rm_score", "score margin (chosen − rejected)"),
    "mean_reward": ("rm_score", "mean score"),
    "min_reward": ("rm_score", "lowest score"),
    "max_reward": ("rm_score", "highest score"),
    "logps/chosen": ("logps", "log-prob of the chosen answer"),
    "logps/rejected": ("logps", "log-prob of the rejected answer"),
    "reward": ("reward", "mean reward"),
    "non_score_reward": ("reward", "KL penalty (non-score reward)"),
    "kl": ("kl", "KL to the reference model"),
    "entropy": ("entropy", "entropy"),
    "completions/mean_length": ("length", "mean completion length"),
    "response_length": ("length", "mean response length"),
    "completions/clipped_ratio": ("cut", "share cut at the length limit"),
    "finished": ("cut", "share that ended before the limit"),
    "grad_norm": ("grad_norm", "gradient norm (before clipping)"),
    "learning_rate": ("learning_rate", "learning rate"),
}
REWARD_FUNCTION = re.compile(r"^rewards/(.+)/mean$")  # GRPO: one curve per reward function
NO_SPLIT = {"learning_rate", "grad_norm"}  # optimizer state, not a measurement on train or eval data
# Panels in display order: id -> (title, y-axis label); a label may depend on the stage (see `y_label`).
PANELS: dict[str, tuple[str, str]] = {
    "loss": ("Loss", ""),
    "token_accuracy": ("Next-token accuracy", "share of tokens predicted right (0–1)"),
    "pair_accuracy": ("Preference pairs ranked right", "share of pairs (0–1)"),
    "implicit_reward": ("Implicit rewards: chosen vs rejected", ""),
    "rm_score": ("Reward-model scores", "score (logit)"),
    "logps": ("Log-probability of the answers", ""),
    "reward": ("Reward of the sampled answers", "reward (reward functions / model)"),
    "kl": ("Divergence from the reference model", ""),
    "entropy": ("Entropy of the next-token distribution", "entropy (nats/token)"),
    "length": ("Length of the sampled answers", "length (tokens)"),
    "cut": ("Sampled answers and the length limit", "share of answers (0–1)"),
    "grad_norm": ("Gradient norm", "gradient L2 norm"),
    "learning_rate": ("Learning-rate schedule", "learning rate"),
}
# Final metrics that are not curves: what they are.
FINAL_METRICS = {"train_loss": "loss averaged over the whole run", "train_runtime": "training time (s)",
                 "train_samples_per_second": "training samples per second",
                 "train_steps_per_second": "optimizer steps per second", "total_flos": "floating-point operations",
                 "epoch": "epochs done", "global_step": "steps done", "eval_runtime": "evaluation time (s)",
                 "eval_samples_per_second": "eval samples per second", "eval_steps_per_second": "eval steps per second",
                 "eval_perplexity": "perplexity on the eval set: exp(eval loss)", "num_tokens": "tokens trained on",
                 "eval_num_tokens": "tokens trained on"}


def metric_label(key: str) -> tuple[str, str] | None:
    """(panel, name as a reader knows it) of a logged metric, or None for one that is not plotted."""
    split, name = ("eval", key[5:]) if key.startswith("eval_") else ("train batch", key)
    if match := REWARD_FUNCTION.match(name):
        panel, label = "reward", f"reward: {match.group(1)}"
    elif name in METRICS:
        panel, label = METRICS[name]
    else:
        return None
    return panel, label if name in NO_SPLIT else f"{label} ({split})"


def y_label(panel: str, stage: str | None, settings: dict | None = None) -> str:
    """The y-axis label with its unit; the unit of some panels depends on what the stage computes."""
    facts = facts_of(stage)
    if panel == "loss":
        loss_type = (settings or {}).get("loss_type") or ["sigmoid"]
        sigmoid = loss_type in (["sigmoid"], "sigmoid")  # DPO's default loss: -log σ of the margin, in nats
        return "loss (nats/pair)" if facts.name == "dpo" and sigmoid else facts.loss_unit
    return {"implicit_reward": facts.reward_unit, "logps": facts.logps_unit, "kl": facts.kl_unit}.get(
        panel, PANELS[panel][1])


def facts_of(stage: str | None) -> Stage:
    """The stage's entry in `medgpt.stages` (a folder of an unknown stage: generic labels)."""
    return STAGES_BY_NAME.get(stage or "", UNKNOWN)


def x_label(stage: str | None) -> str:
    return facts_of(stage).step


@dataclass
class ModelRef:
    """A model to answer with: a folder or hub id, optionally a LoRA adapter on it, and the chat template."""

    model: str
    adapter: str | None = None
    template: str | None = None


@dataclass
class StageResult:
    """One trained stage: its output folder (metrics.jsonl, final_metrics.json, data_stats.json) and the
    model that answers for it (None for a reward model, which scores rather than answers)."""

    name: str
    stage: str
    folder: Path
    answers_from: ModelRef | None = None


# ---- inputs ------------------------------------------------------------------------------------


def load_prompts(source: str | None) -> list[list[dict]]:
    """The report's prompts as message lists: `source` (jsonl of {"query"}, {"question"}, {"prompt"} or
    conversations), the shipped sample prompts when None, no prompts for `none`."""
    if source is not None and str(source).strip().lower() in NO_PROMPTS:
        return []
    from medgpt.data.records import read_prompts

    records, _ = read_prompts(str(source or SAMPLE_PROMPTS), "prompts")
    return [r["prompt"] for r in records]


# ---- answers -----------------------------------------------------------------------------------


@dataclass
class Answer:
    """One generated answer; `finish_reason` "length" means it was cut at the token limit."""

    text: str
    finish_reason: str = "stop"
    completion_tokens: int = 0

    @property
    def cut(self) -> bool:
        return self.finish_reason == "length"

    @property
    def marker(self) -> str:
        return f"cut at {self.completion_tokens} tokens" if self.cut else ""


def _answers_key(ref: ModelRef, prompts: list[list[dict]], max_new_tokens: int) -> str:
    """Keyed by the model's files (not the report files a training run writes beside its model, which change each
    time a report is written), the prompts and the settings."""
    files = [files_fingerprint(p, skip=REPORT_FILES) for p in (ref.model, ref.adapter) if p]
    return value_digest({"ref": asdict(ref), "files": files, "prompts": prompts, "max_new_tokens": max_new_tokens,
                         "format": ANSWERS_FORMAT})


def shared_answers() -> ResultCache:
    """Answers kept for every run (a base model answers the same prompts in every run that starts from it:
    generated once, reused by each training report and pipeline run)."""
    from medgpt.models import cache_dir

    return ResultCache(cache_dir() / "answers")


def generate_answers(refs: dict[str, ModelRef], prompts: list[list[dict]], cache_file: Path,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, list[Answer]]:
    """Greedy answers of each model to the prompts: one batched generation per model, one model in memory at a
    time; answers cached in `cache_file` or in the shared cache (same model files, prompts, settings) are reused."""
    from tqdm.auto import tqdm

    from medgpt.infer.base import GenerationParams
    from medgpt.infer.engine import load_engine

    cache = read_json(cache_file, {})
    shared = shared_answers()
    out: dict[str, list[Answer]] = {}
    todo = {}
    keys = {label: _answers_key(ref, prompts, max_new_tokens) for label, ref in refs.items()}
    for label, ref in refs.items():
        key = keys[label]
        found = cache.get(label) if (cache.get(label) or {}).get("key") == key else shared.get(key)
        if found:
            out[label] = [Answer(**a) for a in found["answers"]]
        else:
            todo[label] = (ref, key)
    if todo:
        log.info("report: %d models answer %d prompts (at most %d new tokens each): %s; `report_prompts: none` "
                 "skips the answers", len(todo), len(prompts), max_new_tokens, ", ".join(todo))
    for label, (ref, key) in tqdm(todo.items(), desc="report answers", disable=not todo):
        started = time.time()
        engine = load_engine(ref.model, adapter=ref.adapter, template=ref.template)
        completions = engine.generate(prompts, GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0))
        getattr(engine, "close", lambda: None)()
        del engine
        gc.collect()
        out[label] = [Answer(c.text.strip(), c.finish_reason, c.completion_tokens) for c in completions]
        shared.put(key, {"answers": [asdict(a) for a in out[label]]})
        log.info("report: %s answered %d prompts in %.1fs", label, len(prompts), time.time() - started)
    new = {label: {"key": keys[label], "answers": [asdict(a) for a in out[label]]} for label in refs}
    if new != {label: cache.get(label) for label in refs}:
        write_json(cache_file, {**cache, **new})
    return {label: out[label] for label in refs}


# ---- plots -------------------------------------------------------------------------------------


def curves(rows: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """The plottable series of a metrics log: panel -> curve name -> (steps, values)."""
    panels: dict[str, dict[str, tuple[list, list]]] = {}
    for row in rows:
        step = row.get("step")
        if step is None:
            continue
        for key, value in row.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            if (found := metric_label(key)) is None:
                continue
            xs, ys = panels.setdefault(found[0], {}).setdefault(found[1], ([], []))
            xs.append(step)
            ys.append(value)
    return panels


def curve_figure(rows: list[dict], title: str, stage: str | None = None, settings: dict | None = None):
    """A matplotlib figure with one titled, labelled panel per kind of curve in the log; None when the log
    holds nothing worth plotting (only the optimizer's own learning rate or gradient norm)."""
    panels = curves(rows)
    if not set(panels) - NO_SPLIT:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = [name for name in PANELS if name in panels]
    columns = min(3, len(names))
    lines = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(5.2 * columns, 3.7 * lines), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for label, (xs, ys) in sorted(panels[name].items(), key=lambda item: ("(eval)" in item[0], item[0])):
            evaluated = label.endswith("(eval)")
            ax.plot(xs, ys, marker=("s" if evaluated else "o") if len(xs) < 30 else None,
                    markersize=6 if evaluated else 3, linestyle="--" if evaluated else "-", label=label)
        ax.set_title(PANELS[name][0], fontsize=11)
        ax.set_xlabel(x_label(stage))
        ax.set_ylabel(y_label(name, stage, settings))
        steps = sorted({x for xs, _ in panels[name].values() for x in xs})
        if len(steps) <= 12:
            ax.set_xticks(steps)  # few logged steps: exactly those (a locator invents fractional ones)
            if len(steps) == 1:
                ax.set_xlim(steps[0] - 1, steps[0] + 1)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(rows: list[dict], title: str, stage: str | None = None, settings: dict | None = None) -> bytes | None:
    """`curve_figure` as PNG bytes."""
    fig = curve_figure(rows, title, stage, settings)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


# ---- hyperparameters ---------------------------------------------------------------------------
# What a stage was set to, as a flat dict of config keys. A training run records its settled values (and the
# device it ran on) in hyperparameters.json; for a folder without one, medgpt.json's config is read, with the
# defaults of the stage's config classes filled in.

SETTING_KEYS = ("stage", "method", "model", "adapter", "template", "dtype", "quantization_bit", "data",
                "val_size", "overlong", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_dora",
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
    model = str(values.get("model") or "?")
    rows.append(["model", model + (f" (template {values['template']})" if values.get("template") else "")])
    if values.get("data"):
        held = f", {values['val_size']} held out for eval" if values.get("val_size") else ""
        rows.append(["training data", f"{values['data']}{held}"])
    lr = values.get("learning_rate")
    schedule = f", {values['lr_scheduler_type']} schedule" if values.get("lr_scheduler_type") else ""
    warmup = _warmup_text(values.get("warmup_steps"))
    rows.append(["learning rate", f"{_number(lr)}{schedule}{warmup}" if lr is not None else missing])
    max_steps = _int(values.get("max_steps")) or 0
    unit = facts_of(stage).steps
    epochs = values.get("num_train_epochs")
    planned = f"{max_steps} {unit} (max_steps)" if max_steps > 0 else \
        f"{_number(epochs)} epoch{'' if _int(epochs) == 1 else 's'} (num_train_epochs)"
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
    return ", ".join(map(_number, value)) if isinstance(value, list) else _number(value)


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


# ---- document ----------------------------------------------------------------------------------
# A report is a list of sections; a section is (title, blocks); a block is ("text", str),
# ("table", headers, rows) or ("image", file name, png bytes). A table cell is text or an Answer.
# Both renderers walk the same structure.


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def final_metric_meaning(key: str) -> str:
    if key in FINAL_METRICS:
        return FINAL_METRICS[key]
    found = metric_label(key)
    return found[1] if found else ""


def stage_section(result: StageResult) -> tuple[str, list]:
    """Hyperparameters, data counts, curves and final metrics of one stage."""
    blocks: list = [("text", f"Stage `{result.stage}`, output `{result.folder}`.")]
    title = result.name if result.name == result.stage else f"{result.name} ({result.stage})"
    rows = read_log(result.folder / "metrics.jsonl")
    settings = recorded_settings(result.folder)
    steps = [r["step"] for r in rows if isinstance(r.get("step"), int)]
    if settings:
        blocks.append(("table", ["setting", "value"], settings_rows(settings, result.folder, max(steps, default=0))))
    else:
        blocks.append(("text", f"No settings recorded ({SETTINGS_FILE} and {META_FILE} are missing)."))
    stats = read_json(result.folder / "data_stats.json", {})
    if stats:
        table = []
        for split, s in stats.items():
            if not isinstance(s, dict):
                continue
            reasons = ", ".join(f"{reason}: {n}" for reason, n in (s.get("dropped") or {}).items()) or "-"
            table.append([split, s.get("read", "?"), s.get("kept", "?"), sum((s.get("dropped") or {}).values()),
                          s.get("truncated", 0), reasons])
        blocks.append(("table", ["data", "read", "kept", "dropped", "truncated", "dropped by reason"], table))
    png = plot_curves(rows, f"{title}: training curves", result.stage, (settings or {}).get("values"))
    if png:
        blocks.append(("image", f"{result.name}.png", png))
        blocks.append(("text", f"x: {x_label(result.stage)}. Solid lines: training batches (the mean over each "
                               "logging interval); dashed lines with squares: the eval set."))
    else:
        blocks.append(("text", "No training curves logged (metrics.jsonl is empty or missing)."))
    metrics = read_json(result.folder / "final_metrics.json", {})
    numeric = [[k, _number(v), final_metric_meaning(k)] for k, v in sorted(metrics.items())
               if isinstance(v, (int, float))]
    if numeric:
        blocks.append(("table", ["final metric", "value", "what it is"], numeric))
    return title, blocks


def answers_section(prompts: list[list[dict]], answers: dict[str, list[Answer]],
                    max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[str, list]:
    headers = ["prompt", *answers]
    rows = [[messages[-1]["content"], *(answers[label][i] for label in answers)] for i, messages in enumerate(prompts)]
    cut = sum(a.cut for column in answers.values() for a in column)
    note = (f"Greedy decoding, the same prompts for every model, at most {max_new_tokens} new tokens; "
            f"an answer that reached that limit is marked \"cut at N tokens\" ({cut} of "
            f"{sum(len(c) for c in answers.values())} here).")
    return "Answers side by side", [("text", note), ("table", headers, rows)]


# The evaluation metrics a report shows (each result also keeps ROUGE-1/2 and the NLL): what each is, and which way
# is better.
EVAL_METRICS = {"accuracy": ("accuracy (%)", "higher"), "bleu": ("BLEU-4", "higher"), "rouge-l": ("ROUGE-L", "higher"),
                "ppl": ("answer perplexity", "lower")}


def eval_metric_name(set_name: str, metric: str) -> str:
    label, better = EVAL_METRICS.get(metric, (metric, ""))
    return f"{set_name}: {label}" + (f" ({better} is better)" if better else "")


def metric_text(metric: str, value: Any) -> str:
    """A metric value with two decimals (accuracy is a percentage already; no decimals from 1000 on), or "-"."""
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.2f}"


def evaluation_section(evaluation: dict[str, Any]) -> tuple[str, list]:
    """Every model's held-out metrics, then each stage's change against the model it started from, with the
    95% confidence interval of the paired difference (paired bootstrap over items; McNemar's exact test for
    accuracy): a change whose interval crosses 0 is marked "not significant"."""
    models: dict[str, dict] = evaluation["models"]
    columns = []  # (set, metric) in the order the sets and their metrics come
    for sets in models.values():
        for set_name, result in sets.items():
            columns += [(set_name, m) for m in (result.get("metrics") or {}) if m in EVAL_METRICS
                        and (set_name, m) not in columns]
    rows = []
    for label, sets in models.items():
        row = [label]
        for set_name, metric in columns:
            result = sets.get(set_name) or {}
            value = metric_text(metric, (result.get("metrics") or {}).get(metric))
            ci = (result.get("ci95") or {}).get(metric)
            row.append(f"{value} [{metric_text(metric, ci[0])}, {metric_text(metric, ci[1])}]" if ci else value)
        rows.append(row)
    sizes = ", ".join(f"{name}: {r.get('n', '?')} items" for name, r in next(iter(models.values())).items())
    blocks: list = [("text", f"Held-out sets ({sizes}), greedy decoding; each value with its 95% confidence "
                             "interval where the set has one."),
                    ("table", ["model", *(eval_metric_name(s, m) for s, m in columns)], rows)]
    changes = []
    for c in evaluation.get("changes", []):
        metric = c["metric"]
        ci = c.get("ci95") or [None, None]
        verdict = "significant" if c.get("significant") else "not significant"
        if c.get("p_mcnemar") is not None:
            verdict += f" (McNemar p = {c['p_mcnemar']:.3g})"
        changes.append([c["stage"], f"{c['from']} → {c['to']}", eval_metric_name(c["set"], metric),
                        metric_text(metric, c.get("before")), metric_text(metric, c.get("after")),
                        _signed(metric_text(metric, c.get("diff"))),
                        f"[{_signed(metric_text(metric, ci[0]))}, {_signed(metric_text(metric, ci[1]))}]", verdict])
    if changes:
        blocks.append(("text", "What each stage changed: after − before on the same items, with the 95% "
                               "confidence interval of the paired difference; an interval that crosses 0 is "
                               "not significant."))
        blocks.append(("table", ["stage", "models", "metric", "before", "after", "change", "95% CI", "verdict"],
                       changes))
    return "Evaluation before and after each stage", blocks


def _signed(text: str) -> str:
    return text if text == "-" or text.startswith("-") else f"+{text}"


def _md_cell(value: Any) -> str:
    if isinstance(value, Answer):
        text = _md_cell(value.text or "(empty)")
        return f"{text}<br>**[{value.marker}]**" if value.cut else text
    return str(value).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def to_markdown(title: str, sections: list[tuple[str, list]]) -> str:
    lines = [f"# {title}", ""]
    for heading, blocks in sections:
        lines += [f"## {heading}", ""]
        for block in blocks:
            if block[0] == "text":
                lines += [block[1], ""]
            elif block[0] == "image":
                lines += [f"![{block[1]}](plots/{block[1]})", ""]
            else:
                headers, rows = block[1], block[2]
                lines.append("| " + " | ".join(map(_md_cell, headers)) + " |")
                lines.append("|" + "---|" * len(headers))
                lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
                lines.append("")
    return "\n".join(lines)


HTML_STYLE = """body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1400px;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.2rem}td,th{border:1px solid #ccc;padding:.35rem .6rem;
vertical-align:top;text-align:left}th{background:#f3f3f3}td{white-space:pre-wrap}img{max-width:100%}
code{background:#f3f3f3;padding:0 .2rem}.cut{display:inline-block;margin-top:.3rem;padding:0 .4rem;
border-radius:.3rem;background:#fde8c8;color:#8a4b00;font-size:.85em;white-space:nowrap}"""


def _inline_code(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html_cell(value: Any) -> str:
    if isinstance(value, Answer):
        text = html.escape(value.text or "(empty)")
        return f'{text}\n<span class="cut">{value.marker}</span>' if value.cut else text
    return html.escape(str(value))


def to_html(title: str, sections: list[tuple[str, list]]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, blocks in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for block in blocks:
            if block[0] == "text":
                body.append(f"<p>{_inline_code(block[1])}</p>")
            elif block[0] == "image":
                data = base64.b64encode(block[2]).decode("ascii")
                body.append(f'<img alt="{html.escape(block[1])}" src="data:image/png;base64,{data}">')
            else:
                head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>"
                               for row in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{HTML_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(folder: str | Path, results: list[StageResult], base: ModelRef | None = None,
                 prompts: list[list[dict]] | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
                 title: str = "medgpt run report", summary: list[list] | None = None,
                 evaluation: dict[str, Any] | None = None) -> Path:
    """Write folder/report.md (+ plots/) and folder/report.html; returns the markdown path.

    `base` and each stage's `answers_from` answer `prompts` (none: no answers section); `summary` is an
    optional table of stages (name, stage, status, seconds) shown first; `evaluation` (the pipeline's
    `evaluate_pipeline`) adds the held-out results of every model and what each stage changed.
    """
    folder = Path(folder)
    sections: list[tuple[str, list]] = []
    intro: list = [("text", f"Run folder `{folder.resolve()}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}.")]
    if summary:
        intro.append(("table", ["stage", "type", "status", "seconds", "output"], summary))
    sections.append(("Overview", intro))
    if evaluation:
        sections.append(evaluation_section(evaluation))
    sections += [stage_section(r) for r in results]
    refs = {"base": base} if base else {}
    refs.update({r.name: r.answers_from for r in results if r.answers_from})
    if prompts and refs:
        answers = generate_answers(refs, prompts, folder / ANSWERS_FILE, max_new_tokens)
        sections.append(answers_section(prompts, answers, max_new_tokens))
    for _, blocks in sections:
        for block in blocks:
            if block[0] == "image":
                atomic_write(folder / "plots" / block[1], block[2])
    atomic_write(folder / "report.html", to_html(title, sections))
    report = folder / "report.md"
    atomic_write(report, to_markdown(title, sections))
    log.info("report written: %s and %s", report, folder / "report.html")
    return report


def trained_model(cfg, folder: Path) -> ModelRef:
    """The model a finished stage produced: its LoRA adapter on the stage's model, or the full model."""
    if (folder / "adapter_config.json").exists():
        return ModelRef(cfg.model.model, str(folder), cfg.model.template)
    return ModelRef(str(folder), None, cfg.model.template)


def write_training_report(cfg) -> Path | None:
    """The report of one `medgpt train` run, in its output folder: the stage's settled settings (also kept in
    hyperparameters.json for later reports), curves, metrics and data, and the answers of the starting model
    and of the trained one (`report_prompts: none` turns answers off).

    Called by the command that trained (`medgpt train`, the pipeline) once the model is saved, on the main
    process only, so a failure here is logged and never loses a finished training.
    """
    folder = cfg.output_dir
    try:
        write_json(folder / SETTINGS_FILE, settled_settings(cfg))
        prompts = load_prompts(cfg.run.report_prompts)
        answers = not facts_of(cfg.run.stage).score_head  # a reward model scores, it does not answer
        result = StageResult(cfg.run.stage, cfg.run.stage, folder, trained_model(cfg, folder) if answers else None)
        base = ModelRef(cfg.model.model, cfg.model.adapter, cfg.model.template) if answers else None
        return write_report(folder, [result], base, prompts, title=f"medgpt {cfg.run.stage} report")
    except UserError as exc:
        log.error("the report of %s was not written: %s", folder, exc)
    except Exception:
        log.exception("the report of %s was not written", folder)
    return None
