"""Reward functions for GRPO on medical data, and scoring with a trained reward model.

A reward function takes TRL's keyword arguments (`prompts`, `completions` and every other dataset column,
here `answer`, `options` and `reference`) and returns one float per completion, or None where it does not apply: TRL
then leaves it out for that completion, so multiple-choice and open questions can share a data set.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

from medgpt.errors import UserError

_LETTER = r"[\(（\[【]?\s*([A-H])\s*[\)）\]】]?"
# "答案是 B", "Answer: (B)", "the correct option is B", "选B" ...
_STATED = re.compile(r"(?i:answer|option|choice|答案|选项|应选|选择|选)\s*(?i:is|should be|为|是|:|：)?\s*" + _LETTER
                     + r"(?![A-Za-z])")
_STANDALONE = re.compile(r"(?<![A-Za-z])([A-H])(?![A-Za-z])")
_TERMINAL = tuple(".!?。！？…)）\"”")


def completion_text(completion: Any) -> str:
    """The text of a completion: TRL passes strings, or assistant messages for conversational prompts."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The option letter a reply commits to: the one it states as the answer ("答案是B", "the answer is (B)"),
    else the only option letter it names ("B", "B. Aspirin"). None when it names none, or hedges between
    several ("A or B"), so listing every letter never earns the reward."""
    stated = {m.upper() for m in _STATED.findall(text)} & set(letters)
    if stated:
        return stated.pop() if len(stated) == 1 else None
    named = set(_STANDALONE.findall(text)) & set(letters)
    return named.pop() if len(named) == 1 else None


def _keys(completions: list, answer: list | None, options: list | None) -> list[tuple[str | None, str]]:
    """(answer letter or None, option letters) per completion."""
    answer = answer or [None] * len(completions)
    options = options or ["ABCD"] * len(completions)
    return [(key or None, letters or "ABCD") for key, letters in zip(answer, options)]


def mcq_accuracy(completions: list, answer: list[str | None] | None = None, options: list[str] | None = None,
                 **_: Any) -> list[float | None]:
    """1.0 when the reply picks the correct option letter, else 0.0; None for rows without an answer key."""
    return [None if not key else float(extract_choice(completion_text(c), letters) == key)
            for c, (key, letters) in zip(completions, _keys(completions, answer, options))]


def _repeats(text: str) -> bool:
    """Degenerate output: the same non-trivial line, or the same 20 characters, three times or more."""
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) >= 8]
    if any(lines.count(line) >= 3 for line in set(lines)):
        return True
    return any(text.count(text[i:i + 20]) >= 3 for i in range(0, max(0, len(text) - 20), 10))


def answer_format(completions: list, answer: list[str | None] | None = None, options: list[str] | None = None,
                  **_: Any) -> list[float]:
    """Share of format checks a reply passes. Multiple choice: it commits to exactly one option letter, and
    does not ramble. Open questions: it is non-empty, ends a sentence (was not cut off) and does not repeat
    itself."""
    scores = []
    for completion, (key, letters) in zip(completions, _keys(completions, answer, options)):
        text = completion_text(completion).strip()
        if key:
            checks = [extract_choice(text, letters) is not None, len(text) <= 200]
        else:
            checks = [bool(text), text.endswith(_TERMINAL), bool(text) and not _repeats(text)]
        scores.append(sum(checks) / len(checks))
    return scores


def length_reward(completions: list, target_chars: int = 200, **_: Any) -> list[float]:
    """1.0 up to `target_chars` characters, then target/length: concise answers win, and every extra
    character still costs a little, so the signal never goes flat. An empty reply gets 0."""
    lengths = [len(completion_text(c).strip()) for c in completions]
    return [0.0 if n == 0 else min(1.0, target_chars / n) for n in lengths]


def load_reward_model(args, training: bool = False):
    """A sequence-classification model with a single output (the score), with its adapter if any.

    The label count is set on the config: from_pretrained rejects `num_labels` next to a config object.
    """
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    from medgpt.models import model_kwargs

    folder, kwargs = model_kwargs(args, training)
    kwargs["config"].num_labels = 1
    # from a causal LM the score head is new (trained, or loaded from the adapter): not worth a warning
    quiet = suppress_seqcls_warning() if args.adapter or training else contextlib.nullcontext()
    with quiet:
        model = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter, is_trainable=training)
    return model if training else model.eval()


class RewardModel:
    """A trained reward model (`medgpt train` stage rm: a LoRA adapter with its score head, or a full
    model) that scores (prompt, response) pairs; also a GRPO reward function."""

    __name__ = "reward_model"

    def __init__(self, path: str, dtype: str = "auto", batch_size: int = 8, device: str | None = None):
        import torch

        from medgpt.models import ModelArgs, adapter_base, load_tokenizer, read_meta, resolve_model

        folder = Path(resolve_model(path))
        meta = read_meta(folder)
        if (folder / "adapter_config.json").exists():
            base = adapter_base(str(folder))
            if not base or not Path(base).exists():  # trained elsewhere: the name the config gave
                base = meta.get("base_model") or base
            args = ModelArgs(model=base, adapter=str(folder), dtype=dtype)
        else:
            args = ModelArgs(model=str(folder), dtype=dtype)
        if meta.get("stage") not in (None, "rm"):
            raise UserError(f"{path}: trained by stage {meta['stage']}, not a reward model (stage rm)")
        self.tokenizer = load_tokenizer(str(folder))
        self.model = load_reward_model(args)
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
