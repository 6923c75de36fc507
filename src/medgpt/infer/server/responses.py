"""The parts of an answer every endpoint shapes the same way: token usage, OpenAI's two log-probs formats, SSE."""

from __future__ import annotations

import json
from typing import Any

from medgpt.infer.base import Completion, TokenLogprob


def usage(results: list[Completion], n: int = 1) -> dict:
    """Token counts; each prompt counts once however many choices (n) it got."""
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer: Any, logprobs: list[TokenLogprob] | None, k: int) -> dict | None:
    """The chat format: each token with its log-prob, bytes and the k most likely tokens."""
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top[:k]]}
                        for t in logprobs], "refusal": None}


def completion_logprobs(tokenizer: Any, prompt_ids: list[int], result: Completion, echo: bool,
                        k: int) -> dict:
    """OpenAI's completions log-probs: tokens, token_logprobs, top_logprobs, text_offset (prompt first with echo).

    Each top_logprobs entry holds the k most likely tokens and the chosen one (as OpenAI and vLLM return it)."""
    rows: list[tuple[int, TokenLogprob | None]] = []
    if echo:
        rows += list(zip(prompt_ids, result.prompt_logprobs or [None] * len(prompt_ids)))
    rows += [(t.token_id, t) for t in result.logprobs or []]
    tokens, token_logprobs, tops, offsets, offset = [], [], [], [], 0
    for token_id, scored in rows:
        text = token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if scored is None:
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(scored.logprob)
        top = {token_text(tokenizer, i): lp for i, lp in scored.top[:k]}
        top.setdefault(text, scored.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
