"""`/v1/chat/completions` and the seed's `/chat`."""

from __future__ import annotations

import dataclasses

from fastapi import Request as HttpRequest

from medgpt.infer.base import Completion
from medgpt.infer.reasoning import read_reply
from medgpt.infer.server.body import parse_body
from medgpt.infer.server.context import RequestContext, choices_of
from medgpt.infer.server.protocol import ChatCompletionRequest, SeedChatRequest
from medgpt.infer.server.responses import chat_logprobs, usage
from medgpt.infer.server.streaming import ChatChunks, stream
from medgpt.infer.server.tool_use import chat_message, output_rules


async def chat_completions(http: HttpRequest):
    body = parse_body(await http.body(), ChatCompletionRequest)
    ctx = RequestContext.of(http, body, "chatcmpl")
    params = ctx.generation_params()
    ctx.tool_use, grammar = output_rules(body, ctx.engine)
    tools = ctx.tool_use.tools if ctx.tool_use else None
    prompt_ids = await ctx.encode_chat(body.engine_messages(), tools=tools, enable_thinking=body.enable_thinking())
    params = ctx.fit(dataclasses.replace(params, grammar=grammar), len(prompt_ids), "messages")
    top_logprobs = body.logprobs_asked().value
    if body.stream:
        return stream(ctx, ChatChunks(ctx, top_logprobs), prompt_ids, params)
    results = await ctx.generate(choices_of(prompt_ids, params, body.n))
    choices = [chat_choice(ctx, i, result, top_logprobs or 0) for i, result in enumerate(results)]
    return {**ctx.meta(), "object": "chat.completion", "choices": choices, "usage": usage(results, body.n),
            **ctx.extra()}


def chat_choice(ctx: RequestContext, index: int, result: Completion, top_logprobs: int) -> dict:
    message, finish = chat_message(result, ctx.tool_use, ctx.reader)
    return {"index": index, "message": message, "finish_reason": finish,
            "logprobs": chat_logprobs(ctx.tokenizer, result.logprobs, top_logprobs)}


async def seed_chat(http: HttpRequest) -> dict:
    body = parse_body(await http.body(), SeedChatRequest)
    ctx = RequestContext.of(http, body, "chat")
    params = ctx.generation_params()
    history = body.engine_history()
    messages = [*history, {"role": "user", "content": body.message}]
    prompt_ids = await ctx.encode_chat(messages, body.system or None, chars_param="message", history_param="history")
    params = ctx.fit(params, len(prompt_ids), "message")
    result = (await ctx.generate(choices_of(prompt_ids, params, 1)))[0]
    pairs = [[q["content"], a["content"]] for q, a in zip(history, history[1:])
             if q["role"] == "user" and a["role"] == "assistant"]
    reasoning, answer, _ = read_reply(result.text, ctx.reader)
    thought = {} if ctx.reader is None else {"reasoning": reasoning}
    return {"response": answer, **thought, "history": [*pairs, [body.message, answer]],
            "finish_reason": result.finish_reason, "usage": usage([result]), **ctx.extra()}
