"""The training stages and what each one is: the facts the config, the memory planner, the trainer builder and the
report read about a stage, one entry per stage (its code is `medgpt.train.<name>`). Standard library only.

A new stage: its module in `medgpt/train/` and its entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from medgpt.errors import UserError


@dataclass(frozen=True)
class Stage:
    name: str
    # -- what the memory planner counts
    paired: bool = False  # chosen and rejected (or KTO's KL pairs) go through the model together
    fused_head: bool = False  # a TRL trainer with the fused log-prob LM head
    dropout_off: bool = False  # the trainer switches dropout off (TRL's disable_dropout=True)
    score_head: bool = False  # a sequence-classification model whose head PEFT trains (reward model)
    value_head: bool = False  # medgpt's PPO: a value head on the policy
    reference: bool = False  # a frozen reference model by default
    reward_model: bool = False  # a reward model by default
    generates: bool = False  # the policy samples completions while training
    # -- how the trainer runs the model
    autocast_only: bool = False  # TRL runs the model only inside its loss's autocast (LoRA base weights may be bf16)
    plain_head: bool = False  # its fused head (temperature 1) is what medgpt's plain LM head stands in for
    # -- what its report says
    loss_unit: str = "loss"  # the loss panel's y label
    batch_unit: str = "examples"  # what one unit of per_device_train_batch_size is
    step: str = "optimizer step"  # the x axis of its curves
    steps: str = "optimizer steps"  # what max_steps counts
    kl_unit: str = "KL (nats)"
    logps_unit: str = "log-prob (nats/answer)"
    reward_unit: str = "β × log-prob ratio to reference (nats)"  # its implicit reward
    options: tuple[str, ...] = ()  # the stage's own settings shown in its report
    length: str = "{max_length} tokens (longer records: {overlong})"  # its length limit, from its settings
    length_key: str = "max_length"  # the setting that is its max_length
    rollouts: bool = False  # its batches are rollouts of prompts, updated in minibatches


STAGE_LIST = (
    Stage("pt", fused_head=True, autocast_only=True, plain_head=True, loss_unit="loss (nats/token)",
          batch_unit="blocks", length="{max_length} tokens per block", length_key="block_size"),
    Stage("sft", fused_head=True, autocast_only=True, plain_head=True, loss_unit="loss (nats/token)",
          batch_unit="conversations"),
    Stage("rm", paired=True, dropout_off=True, score_head=True, loss_unit="loss (nats/pair)", batch_unit="pairs"),
    Stage("ppo", dropout_off=True, value_head=True, reference=True, reward_model=True, generates=True,
          loss_unit="loss (clipped surrogate; value: squared error)", batch_unit="responses",
          step="PPO step (one rollout and its updates)", steps="rollouts", kl_unit="KL (nats/response)",
          options=("kl_coef", "ppo_epochs", "rollout_batch_size", "mini_batch_size"), rollouts=True,
          length="prompt {max_prompt_length} + {max_new_tokens} new tokens (rollouts)"),
    Stage("dpo", paired=True, fused_head=True, dropout_off=True, reference=True, autocast_only=True, plain_head=True,
          loss_unit="loss (per pair)", batch_unit="pairs", options=("beta", "loss_type")),
    Stage("orpo", paired=True, dropout_off=True, loss_unit="loss (NLL nats/token + β × odds-ratio loss)",
          batch_unit="pairs", logps_unit="mean log-prob (nats/token)",
          reward_unit="β × mean log-prob (nats/token)", options=("beta",)),
    Stage("kto", paired=True, fused_head=True, dropout_off=True, reference=True, loss_unit="KTO loss (per example)",
          batch_unit="examples", kl_unit="KL estimate (nats/answer)", options=("beta", "loss_type")),
    Stage("grpo", fused_head=True, generates=True, loss_unit="GRPO loss (per token)", batch_unit="completions",
          kl_unit="KL (nats/token)", options=("beta", "num_generations", "loss_type"),
          length="{max_completion_length} tokens per completion"),
)
STAGES_BY_NAME = {s.name: s for s in STAGE_LIST}
STAGES = tuple(STAGES_BY_NAME)
UNKNOWN = Stage("")  # what a report says of a folder whose stage is not recorded


def stage_facts(name: str) -> Stage:
    """The entry of a stage name; an unknown name is a UserError listing the stages."""
    if name not in STAGES_BY_NAME:
        raise UserError(f"stage {name!r}: expected one of {', '.join(STAGES)}")
    return STAGES_BY_NAME[name]
