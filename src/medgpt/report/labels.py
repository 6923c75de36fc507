"""What the logged metrics are: the name a reader knows each curve by, the panel it is drawn in and the label of
each axis (whose unit may depend on the stage, from `medgpt.stages`); what the final and evaluation metrics mean."""

from __future__ import annotations

import re
from typing import Any

from medgpt.stages import STAGES_BY_NAME, UNKNOWN, Stage

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

def number_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


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
