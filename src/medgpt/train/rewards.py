"""Every reward of GRPO and PPO: the reward functions, their registry, and scoring with a trained reward model.

A reward function takes TRL's keyword arguments (`prompts`, `completions` and every other dataset column,
here `answer`, `options`, `reference` and `rubrics`) and returns one float per completion, or None where it does not apply:
GRPO (TRL) and PPO then leave it out for that completion, so multiple-choice and open questions can share a data
set. Both stages name their rewards the same way, with `RewardArgs`. Which option a reply commits to is read by
`medgpt.data.answers.extract_choice`, the reader `eval mcq` scores replies with. A reasoning model's reply is read
as `medgpt.data.messages.reply_parts` reads it: every answer-based reward sees only the answer after the reasoning,
and a reply cut inside its reasoning has no answer.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medgpt.data.answers import extract_choice
from medgpt.data.messages import reply_parts
from medgpt.errors import UserError

log = logging.getLogger(__name__)

_TERMINAL = tuple(".!?。！？…)）\"”")


def completion_text(completion: Any) -> str:
    """The text of a completion: TRL passes strings, or assistant messages for conversational prompts (a
    message's separate reasoning field is put back as the `<think>` block it was generated as)."""
    if isinstance(completion, str):
        return completion
    parts = []
    for m in completion:
        if isinstance(m, dict):
            thought = m.get("reasoning_content") or m.get("reasoning")
            parts.append((f"<think>\n{thought}\n</think>\n\n" if thought else "") + (m.get("content") or ""))
    return "".join(parts)


def answer_text(completion: Any) -> str:
    """The answer a completion commits to: the text after its reasoning (`reply_parts`); empty for a reply cut
    inside its reasoning. Every answer-based reward reads only this."""
    return reply_parts(completion_text(completion))[1]


def _keys(completions: list, answer: list | None, options: list | None) -> list[tuple[str | None, str]]:
    """(answer letter or None, option letters) per completion."""
    answer = answer or [None] * len(completions)
    options = options or ["ABCD"] * len(completions)
    return [(key or None, letters or "ABCD") for key, letters in zip(answer, options)]


def mcq_accuracy(completions: list, answer: list[str | None] | None = None, options: list[str] | None = None,
                 **_: Any) -> list[float | None]:
    """1.0 when the reply picks the correct option letter, else 0.0; None for rows without an answer key."""
    return [None if not key else float(extract_choice(answer_text(c), letters) == key)
            for c, (key, letters) in zip(completions, _keys(completions, answer, options))]


def _repeats(text: str) -> bool:
    """Degenerate output: the same non-trivial line, or the same 20 characters, three times or more."""
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) >= 8]
    if any(lines.count(line) >= 3 for line in set(lines)):
        return True
    return any(text.count(text[i:i + 20]) >= 3 for i in range(0, max(0, len(text) - 20), 10))


def answer_format(completions: list, answer: list[str | None] | None = None, options: list[str] | None = None,
                  **_: Any) -> list[float]:
    """How well a reply keeps the format. Multiple choice: 0 unless it commits to exactly one option letter, then
    1 when it also stays within 200 characters, else 0.5 (an empty or unanswered reply never ties with an
    answer). Open questions: the share of checks passed: non-empty, ends a sentence (was not cut off), does not
    repeat itself."""
    scores = []
    for completion, (key, letters) in zip(completions, _keys(completions, answer, options)):
        text = answer_text(completion).strip()
        if key:
            scores.append(0.0 if extract_choice(text, letters) is None else 1.0 if len(text) <= 200 else 0.5)
            continue
        checks = [bool(text), text.endswith(_TERMINAL), bool(text) and not _repeats(text)]
        scores.append(sum(checks) / len(checks))
    return scores


def length_reward(completions: list, target_chars: int = 200, **_: Any) -> list[float]:
    """1.0 up to `target_chars` characters, then target/length: concise answers win, and every extra
    character still costs a little, so the signal never goes flat. An empty reply gets 0."""
    lengths = [len(answer_text(c).strip()) for c in completions]
    return [0.0 if n == 0 else min(1.0, target_chars / n) for n in lengths]


def keyword_reward(completions: list, keywords: str | list[str] = (), **_: Any) -> list[float]:
    """The share of `keywords` a reply mentions (case-insensitive)."""
    words = [k.strip().lower() for k in (keywords.split(",") if isinstance(keywords, str) else keywords) if k.strip()]
    if not words:
        raise UserError("reward_fn keyword: set reward_kwargs: {keywords: [word, ...]}")
    texts = [answer_text(c).lower() for c in completions]
    return [sum(w in text for w in words) / len(words) for text in texts]


def reasoning_format(completions: list, answer: list[str | None] | None = None, options: list[str] | None = None,
                     **_: Any) -> list[float]:
    """Reasoning, then a committed answer (for reasoning models): 0 without a think block, or cut inside it;
    otherwise half for a non-empty reasoning and half for an answer after it (multiple choice: one option
    letter; open questions: a non-empty answer)."""
    scores = []
    for completion, (key, letters) in zip(completions, _keys(completions, answer, options)):
        reasoning, reply, complete = reply_parts(completion_text(completion))
        if reasoning is None or not complete:
            scores.append(0.0)
            continue
        committed = extract_choice(reply, letters) is not None if key else bool(reply.strip())
        scores.append(0.5 * bool(reasoning.strip()) + 0.5 * committed)
    return scores


@functools.lru_cache(maxsize=4)
def _judge(settings: tuple) -> Any:
    """One judge client (HTTP connections, verdict cache) per judge setting, kept for the whole run."""
    from medgpt.judge import Judge, JudgeSettings

    return Judge(JudgeSettings(**dict(settings)))


def judge_reward(prompts: list, completions: list, reference: list | None = None, rubrics: list | None = None,
                 judge_url: str | None = None, judge_model: str | None = None, judge_api_key_env: str | None = None,
                 judge_concurrency: int = 8, judge_timeout: float = 60, judge_retries: int = 3,
                 judge_max_tokens: int = 512, judge_json_schema: bool = False,
                 judge_explanation_chars: int | None = None, judge_cache: str | None = None,
                 **_: Any) -> list[float | None]:
    """A judge model's grade (`medgpt.judge`, any OpenAI-compatible endpoint, every verdict cached): with
    `rubrics` (HealthBench's [{criterion, points, tags}], a list or JSON text) the points met over the points
    possible, clipped to [0, 1]; with a `reference` answer its 0-10 score / 10. None for a row with neither, or
    whose verdict failed or could not be read; 0 for a reply cut inside its reasoning. reward_kwargs:
    {judge_url, judge_model, judge_api_key_env, judge_concurrency, judge_timeout, judge_retries,
    judge_max_tokens, judge_json_schema, judge_explanation_chars, judge_cache}."""
    import json

    from medgpt.judge import API_KEY_ENV, grade_reference, grade_rubrics

    if not judge_url:
        raise UserError("reward_fn judge: set reward_kwargs: {judge_url: http://HOST:PORT/v1, judge_model: NAME}")
    judge = _judge((("url", judge_url), ("model", judge_model), ("api_key_env", judge_api_key_env or API_KEY_ENV),
                    ("concurrency", judge_concurrency), ("timeout", judge_timeout), ("retries", judge_retries),
                    ("max_tokens", judge_max_tokens), ("json_schema", judge_json_schema),
                    ("explanation_chars", judge_explanation_chars), ("cache", judge_cache)))
    n = len(completions)
    rubrics, reference = rubrics or [None] * n, reference or [None] * n
    prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    texts = [completion_text(c) for c in completions]
    scores: list[float | None] = [None] * n
    by_rubric = [i for i in range(n) if rubrics[i]]
    if by_rubric:
        rows = [{"prompt": prompts[i], "_loc": str(i), "rubrics": json.loads(rubrics[i]) if isinstance(rubrics[i], str)
                 else rubrics[i]} for i in by_rubric]
        for i, item in zip(by_rubric, grade_rubrics(judge, rows, [texts[i] for i in by_rubric])["items"]):
            scores[i] = None if item["score"] is None else min(1.0, max(0.0, item["score"]))
    by_reference = [i for i in range(n) if not rubrics[i] and reference[i]]
    if by_reference:
        rows = [{"question": next((m["content"] for m in reversed(prompts[i]) if m["role"] == "user"), ""),
                 "answer": reference[i], "_loc": str(i)} for i in by_reference]
        for i, item in zip(by_reference, grade_reference(judge, rows, [texts[i] for i in by_reference])["items"]):
            scores[i] = None if item["score"] is None else item["score"] / 10
    left_out = sum(scores[i] is None for i in by_rubric + by_reference)
    if left_out:
        log.warning("reward judge: %d of %d replies without a verdict (failed or unreadable) are left out; judge "
                    "calls so far: %s", left_out, len(by_rubric) + len(by_reference), judge.report())
    return scores


REWARD_FUNCTIONS: dict[str, Callable[..., list[float | None]]] = {
    "length": length_reward,  # reward_kwargs: {target_chars: 200}
    "answer_format": answer_format,
    "reasoning_format": reasoning_format,  # reasoning models: a think block, then a committed answer
    "mcq_accuracy": mcq_accuracy,
    "keyword": keyword_reward,  # reward_kwargs: {keywords: [...]}
    "judge": judge_reward,  # reward_kwargs: {judge_url, judge_model, ...}; rows with rubrics or a reference
}
AUTO = ("mcq_accuracy", "answer_format")  # `auto`, plus reward_model when one is set


@dataclass
class RewardArgs:
    """Which rewards score the sampled replies (GRPO and PPO).

    `reward_fn`: comma-separated registry names (`REWARD_FUNCTIONS`, and `reward_model`) or `module:function`;
    `auto` is mcq_accuracy, answer_format, and reward_model when one is set. A set `reward_model` always
    scores: when `reward_fn` does not name it, it comes last. None is the stage's default (GRPO: auto; PPO:
    the reward model alone). `reward_kwargs` go to every reward function, e.g. {target_chars: 200} for
    `length`, {keywords: [...]} for `keyword`.
    """

    reward_fn: str | None = None
    reward_model: str | None = None  # folder of a model trained by stage rm (an adapter with its score head)
    reward_kwargs: dict[str, Any] = field(default_factory=dict)


def reward_function(name: str) -> Callable[..., list[float | None]]:
    """A reward function by registry name or `module:function`, called like TRL's GRPO reward functions."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise UserError(f"reward_fn {name!r}: expected one of {', '.join(REWARD_FUNCTIONS)} or module:function")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"reward_fn {name!r}: cannot import it ({exc})") from exc
    if not callable(fn):
        raise UserError(f"reward_fn {name!r}: not a function")
    return fn


def reward_names(args: RewardArgs) -> list[str]:
    """The rewards `args` asks for, in order (the order GRPO's `reward_weights` follows); checked without
    importing a function or loading the reward model."""
    names = [n.strip() for n in (args.reward_fn or "").split(",") if n.strip()]
    if names == ["auto"]:
        names = list(AUTO)
    if args.reward_model and "reward_model" not in names:
        names.append("reward_model")
    unknown = [n for n in names if n not in REWARD_FUNCTIONS and n != "reward_model" and ":" not in n]
    if unknown or not names:
        raise UserError(f"reward_fn {args.reward_fn!r}: expected auto or a comma-separated list of "
                        f"{', '.join([*REWARD_FUNCTIONS, 'reward_model'])} or module:function")
    if "reward_model" in names and not args.reward_model:
        raise UserError("reward_fn: reward_model needs reward_model: FOLDER (a model trained by stage rm)")
    return names


def check_rewards(args: RewardArgs) -> list[str]:
    """`reward_names`, with every `module:function` imported: a config's rewards are settled before a run
    loads any model."""
    names = reward_names(args)
    for name in names:
        if name != "reward_model":
            reward_function(name)
    if "judge" in names and not args.reward_kwargs.get("judge_url"):
        raise UserError("reward_fn judge: set reward_kwargs: {judge_url: http://HOST:PORT/v1, judge_model: NAME}")
    return names


def build_rewards(args: RewardArgs, device: str | None = None, dtype: str = "auto",
                  batch_size: int = 8) -> list[Callable[..., list]]:
    """The configured rewards, in order: each function bound to `reward_kwargs` (keeping its `__name__`, which
    TRL logs as rewards/<name>), and the reward model on `device`."""
    names = reward_names(args)
    log.info("rewards: %s", ", ".join(names))
    out: list[Callable[..., list]] = []
    for name in names:
        if name == "reward_model":
            out.append(RewardModel(args.reward_model, dtype=dtype, batch_size=batch_size, device=device))
        else:
            fn = reward_function(name)
            out.append(functools.update_wrapper(functools.partial(fn, **args.reward_kwargs), fn))
    return out


class RewardModel:
    """A trained reward model (`medgpt train` stage rm: a LoRA adapter with its score head, or a full
    model) that scores (prompt, response) pairs; also a reward of GRPO and PPO."""

    __name__ = "reward_model"

    def __init__(self, path: str, dtype: str = "auto", batch_size: int = 8, device: str | None = None):
        import torch

        from medgpt.models import open_model

        opened = open_model(path, template="none", dtype=dtype, weights=False)  # `path`: an adapter or a full model
        if opened.meta.get("stage") not in (None, "rm"):
            raise UserError(f"{path}: trained by stage {opened.meta['stage']}, not a reward model (stage rm)")
        self.tokenizer = opened.tokenizer
        self.model = opened.load_weights(head="seq_cls")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.batch_size = batch_size

    def texts(self, prompts: list[list[dict]], responses: list[Any]) -> list[str]:
        """Prompt + response rendered with the chat template the model was trained with."""
        out = []
        for prompt, response in zip(prompts, responses):
            reply = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
            out.append(self.tokenizer.apply_chat_template(list(prompt) + reply, tokenize=False))
        return out

    def score(self, prompts: list[list[dict]], responses: list[Any], progress: bool = False) -> list[float]:
        """One scalar per pair; higher is better."""
        import torch
        from tqdm import tqdm

        texts = self.texts(prompts, responses)
        scores: list[float] = []
        starts = range(0, len(texts), self.batch_size)
        for start in tqdm(starts, desc="scoring", unit="batch", disable=None if progress else True, leave=False):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   padding_side="right", add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores

    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        if prompts and isinstance(prompts[0], str):
            prompts = [[{"role": "user", "content": p}] for p in prompts]
        return self.score(prompts, [completion_text(c) for c in completions])
