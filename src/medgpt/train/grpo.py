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

A completion ends at the template's stop tokens, the ones serving and PPO stop at (`infer.base.stop_tokens`):
TRL ends and masks completions at the model's `generation_config.eos_token_id`, which is set to them; vLLM
gets them, and the stop words the vocabulary holds only as several tokens, in `generation_kwargs`.
"""

from __future__ import annotations

import importlib.util
import logging
from functools import partial

from trl import GRPOConfig

from medgpt.config import Config
from medgpt.data.records import to_prompt
from medgpt.errors import UserError
from medgpt.train import common, prefs, rewards

log = logging.getLogger(__name__)

CONFIG_CLASS = GRPOConfig
STAGE_ARGS = rewards.RewardArgs

prepare_data = partial(prefs.prepare_rows, kind="prompts", normalize=to_prompt, responses=(),
                       carry=("answer", "options", "reference", "rubrics"))
prompt_datasets = partial(prefs.conversation_datasets, prepare_data=prepare_data)


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
    if cfg.data.enable_thinking is not None:
        given = cfg.train.chat_template_kwargs or {}
        if given.get("enable_thinking", cfg.data.enable_thinking) != cfg.data.enable_thinking:
            raise UserError("enable_thinking and chat_template_kwargs.enable_thinking disagree: set one")
        cfg.train.chat_template_kwargs = {**given, "enable_thinking": cfg.data.enable_thinking}
    check_eval_batch(cfg)
    use_vllm_if_available(cfg)


def stops(cfg: Config) -> tuple[list[int], list[str]]:
    """The template's stop token ids and its stop words that are several tokens, for the configured tokenizer; on
    vLLM both go into `generation_kwargs` (the user's own keys win)."""
    from medgpt.data.templates import get_template
    from medgpt.infer.base import stop_tokens
    from medgpt.models import open_tokenizer

    tokenizer = open_tokenizer(cfg.model)
    ids, strings = stop_tokens(tokenizer, get_template(cfg.model.template, tokenizer))
    if cfg.train.use_vllm:
        cfg.train.generation_kwargs = {"stop_token_ids": sorted(ids), **({"stop": strings} if strings else {}),
                                       **(cfg.train.generation_kwargs or {})}
    elif strings:
        log.warning("the stop words %s are several tokens for this tokenizer: transformers generation in GRPO ends "
                    "completions on stop tokens only (vLLM also stops on these)", ", ".join(map(repr, strings)))
    return sorted(ids), strings


def stopping_policy(cfg: Config, stop_ids: list[int]):
    """The policy, with every stop token (the template's and the model's own eos) as its eos, which TRL ends and
    masks completions at."""
    model = common.load_policy(cfg)
    own = model.generation_config.eos_token_id
    own = [] if own is None else [own] if isinstance(own, int) else list(own)
    model.generation_config.eos_token_id = sorted({*own, *stop_ids})
    return model


def build(cfg: Config):
    """The GRPO trainer (stopping where the template stops) and the read counts."""
    from trl import GRPOTrainer

    funcs = rewards.build_rewards(cfg.stage_args)
    stop_ids, _ = stops(cfg)
    return common.build_trainer(cfg, GRPOTrainer, datasets=prompt_datasets,
                                load=partial(stopping_policy, stop_ids=stop_ids), reward_funcs=funcs)


def run(cfg: Config) -> dict:
    trainer, stats = build(cfg)
    return common.train_and_save(trainer, cfg, stats)
