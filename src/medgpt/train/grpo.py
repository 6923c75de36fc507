"""Group relative policy optimization with TRL's GRPOTrainer and medical reward functions.

For every prompt the policy samples `num_generations` replies; each reply's advantage is its reward
relative to the others of its group, so no value model is needed. Data: C-Eval-form multiple-choice CSV
(the prompt lists the options and asks for the letter), SFT conversations (their prompts), `{"question",
"answer"}` or `{"query"}` rows; see `medgpt.train.records`. Rewards (`rewards:`, comma-separated, in the
order `reward_weights` follows):

- `mcq_accuracy`: 1 when the reply picks the right option letter (multiple-choice rows only);
- `answer_format`: the reply commits to one letter (multiple choice), or ends a sentence without repeating
  itself (open questions);
- `length`: full reward up to `length_target` characters, then falling;
- `reward_model`: the score of a reward model trained by stage rm (`reward_model: outputs/rm`).

`auto` is mcq_accuracy, answer_format, and reward_model when one is set. A reward that does not apply to a
row (mcq_accuracy on an open question) is left out for it, so one data set may mix both kinds. On a GPU
with vLLM installed, generation runs in vLLM (colocated) unless use_vllm is set.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from functools import partial

from trl import GRPOConfig

from medgpt.config import Config
from medgpt.errors import UserError
from medgpt.train import common, prefs, rewards
from medgpt.train.records import read_prompts

log = logging.getLogger(__name__)

CONFIG_CLASS = GRPOConfig
REWARDS = ("mcq_accuracy", "answer_format", "length", "reward_model")


@dataclass
class GRPOArgs:
    """Which rewards score the sampled replies."""

    rewards: str = "auto"  # comma-separated names from REWARDS, or auto
    reward_model: str | None = None  # folder of a model trained by stage rm
    length_target: int = 200  # characters a reply may use before the length reward starts to fall


EXTRA_ARGS = (GRPOArgs,)

prompt_datasets = partial(prefs.conversation_datasets, kind="prompts", read=read_prompts, responses=(),
                          carry=("answer", "options", "reference"))


def reward_funcs(args: GRPOArgs) -> list:
    """The configured reward functions, in order."""
    names = [n.strip() for n in args.rewards.split(",") if n.strip()]
    if names == ["auto"]:
        names = ["mcq_accuracy", "answer_format", *(["reward_model"] if args.reward_model else [])]
    unknown = [n for n in names if n not in REWARDS]
    if unknown or not names:
        raise UserError(f"rewards {args.rewards!r}: expected auto or a comma-separated list of {', '.join(REWARDS)}")
    if "reward_model" in names and not args.reward_model:
        raise UserError("rewards: reward_model needs reward_model: FOLDER (a model trained by stage rm)")
    log.info("GRPO rewards: %s", ", ".join(names))
    table = {
        "mcq_accuracy": lambda: rewards.mcq_accuracy,
        "answer_format": lambda: rewards.answer_format,
        "length": lambda: partial(rewards.length_reward, target_chars=args.length_target),
        "reward_model": lambda: rewards.RewardModel(args.reward_model),
    }
    return [table[name]() for name in names]


def use_vllm_if_available(cfg: Config) -> None:
    """Generate with vLLM on a GPU where it is installed, unless the config says otherwise."""
    if "use_vllm" in cfg.raw:
        return
    from medgpt.models import cuda_available

    if cuda_available() and importlib.util.find_spec("vllm") is not None:
        cfg.train.use_vllm = True
        log.info("vLLM is installed: generating with vLLM (vllm_mode %s)", cfg.train.vllm_mode)


def check_eval_batch(cfg: Config) -> None:
    """GRPO evaluates whole groups: the eval batch must hold a multiple of the generations per prompt."""
    generations = cfg.train.num_generations_eval or cfg.train.num_generations
    if (cfg.data.eval_data or cfg.data.val_size) and cfg.train.per_device_eval_batch_size % generations:
        raise UserError(f"per_device_eval_batch_size {cfg.train.per_device_eval_batch_size} must be a multiple of "
                        f"num_generations{'_eval' if cfg.train.num_generations_eval else ''} {generations}")


def run(cfg: Config) -> dict:
    from trl import GRPOTrainer

    check_eval_batch(cfg)
    use_vllm_if_available(cfg)
    funcs = reward_funcs(cfg.extra["GRPOArgs"])
    trainer, stats = prefs.build_trainer(cfg, GRPOTrainer, datasets=prompt_datasets, reward_funcs=funcs)
    return common.train_and_save(trainer, cfg, stats)
