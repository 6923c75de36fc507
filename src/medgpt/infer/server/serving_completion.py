"""`/v1/completions`: text or token-id prompts, several per request; with `echo` + `logprobs` it scores the prompt
(what log-likelihood evaluation clients such as lm-evaluation-harness send)."""

from __future__ import annotations

import asyncio

from fastapi import Request as HttpRequest

from medgpt.infer.server.body import parse_body
from medgpt.infer.server.context import RequestContext, choices_of
from medgpt.infer.server.errors import InvalidRequest
from medgpt.infer.server.protocol import CompletionRequest
from medgpt.infer.server.responses import completion_logprobs, usage
from medgpt.infer.server.streaming import CompletionChunks, stream


async def completions(http: HttpRequest):
    body = parse_body(await http.body(), CompletionRequest)
    ctx = RequestContext.of(http, body, "cmpl")
    items = body.prompts(ctx.settings, ctx.vocab())
    params = ctx.generation_params()
    echo_scores = body.echo and body.logprobs is not None
    prompts = []  # (ids, text, params) of each prompt
    for item in items:
        ids = item if isinstance(item, list) else await asyncio.to_thread(
            ctx.tokenizer.encode, item, add_special_tokens=True)
        fitted = ctx.fit(params, len(ids), "prompt")
        prompts.append((ids, item if isinstance(item, str) else ctx.tokenizer.decode(ids), fitted))
    if body.stream:
        if len(prompts) > 1:
            raise InvalidRequest("stream: one prompt per streamed request on this server", "stream")
        ids, text, fitted = prompts[0]
        return stream(ctx, CompletionChunks(ctx, ids, text), ids, fitted, echo=echo_scores)
    rows = [t for ids, _, fitted in prompts for t in choices_of(ids, fitted, body.n, echo=echo_scores)]
    results = await ctx.generate(rows)
    choices = []
    for i, result in enumerate(results):
        ids, text, _ = prompts[i // body.n]
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(ctx.tokenizer, ids, result, body.echo, body.logprobs)
        choices.append({"index": i, "text": (text if body.echo else "") + result.text, "logprobs": logprobs,
                        "finish_reason": result.finish_reason})
    return {**ctx.meta(), "object": "text_completion", "choices": choices, "usage": usage(results, body.n)}
