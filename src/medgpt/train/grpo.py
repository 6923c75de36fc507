"""Group relative policy optimization with TRL's GRPOTrainer and medical reward functions.

For every prompt the policy samples `num_generations` replies; each reply's advantage is its reward
relative to the others of its group, so no value model is needed. Data: C-Eval-form multiple-choice CSV
(the prompt lists the options and asks for the letter), SFT conversations (their prompts), `{"question",
"answer"}` or `{"query"}` rows; see `medgpt.data.records`. Rewards (`reward_fn:`, comma-separated, in the
order `reward_weights` follows; `medgpt.train.rewards` has them all):

- `mcq_accuracy`: 1 when the reply picks the right option letter (multiple-choice rows only);
- `answer_format`: the reply commits to one letter (multiple choice), or ends a sentence without repeating
  itself (open questions);
- `length`: full reward up to `reward_kwargs: {target_chars: N}` characters, then falling;
- `keyword` or any `module:function`;
- `reward_model`: the score of a reward model trained by stage rm (`reward_model: outputs/rm`).

`auto` (the default) is mcq_accuracy, answer_format, and reward_model when one is set. A reward that does
not apply to a row (mcq_accuracy on an open question) is left out for it, so one data set may mix both
kinds. On a GPU with vLLM installed, generation runs in vLLM (colocated) unless use_vllm is set.
"""

from __future__ import annotations

import importlib.util
import logging
from functools import partial

from trl import GRPOConfig

from medgpt.config import Config
from medgpt.data.records import read_prompts
from medgpt.errors import UserError
from medgpt.train import common, prefs, rewards

log = logging.getLogger(__name__)

CONFIG_CLASS = GRPOConfig
STAGE_ARGS = rewards.RewardArgs

prompt_datasets = partial(prefs.conversation_datasets, kind="prompts", read=read_prompts, responses=(),
                          carry=("answer", "options", "reference"))


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


def configure(cfg: Config) -> None:
    """Settle the rewards (unset: auto) and the generation engine, and check the eval batch, before any model
    is loaded."""
    args: rewards.RewardArgs = cfg.stage_args
    if args.reward_fn is None:
        args.reward_fn = "auto"
    rewards.check_rewards(args)
    check_eval_batch(cfg)
    use_vllm_if_available(cfg)


def run(cfg: Config) -> dict:
    from trl import GRPOTrainer

    funcs = rewards.build_rewards(cfg.stage_args)
    trainer, stats = common.build_trainer(cfg, GRPOTrainer, datasets=prompt_datasets, reward_funcs=funcs)
    return common.train_and_save(trainer, cfg, stats)
