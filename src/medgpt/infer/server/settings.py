"""The server's limits and defaults (`ServerSettings`) and the checks of a request against them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from medgpt.infer.base import GenerationParams
from medgpt.infer.server.errors import ApiError, InvalidRequest

CHARS_PER_TOKEN = 8  # text longer than max_prompt_tokens * this is refused before it is tokenized
CONTEXT_EXCEEDED = "context_length_exceeded"  # the error type of a prompt over a limit


@dataclass(frozen=True)
class Asked:
    """A number a request asks for, with the name of the field it came in (max_tokens, max_completion_tokens)."""

    value: int | None
    param: str


@dataclass
class ServerSettings:
    """Limits and defaults of the API; the default system prompt is the engine's (`load_engine(system=...)`)."""

    defaults: GenerationParams = field(default_factory=GenerationParams)  # for fields a request leaves out
    defaults_from: dict[str, str] = field(default_factory=dict)  # where each default came from (`serve_params`)
    max_tokens_cap: int = 1024  # a larger max_tokens is refused with 400
    max_prompt_tokens: int = 4096  # longer prompts are refused with 400
    max_queue: int = 256  # waiting requests beyond this are refused with 429
    max_n: int = 8  # choices per request
    max_body_bytes: int = 4 * 2**20  # larger bodies are refused with 413 while they are read
    api_key: str | None = None
    docs: bool = False  # serve /docs, /redoc and /openapi.json (behind the key when there is one)

    def described_defaults(self) -> dict:
        """What a request that leaves a field out gets, and where each value came from (`/v1/models`)."""
        d = self.defaults
        values = {"temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k,
                  "repetition_penalty": d.repetition_penalty, "presence_penalty": d.presence_penalty,
                  "frequency_penalty": d.frequency_penalty, "stop": d.stop, "seed": d.seed}
        described = {name: {"value": value, "from": self.defaults_from.get(name, "the server's settings")}
                     for name, value in values.items()}
        limit = "the server's settings (--max-new-tokens); /v1/completions: 16, OpenAI's"
        return {**described, "max_tokens": {"value": d.max_new_tokens, "from": limit}}

    def check_choices(self, n: int, max_tokens: Asked) -> None:
        if not 1 <= n <= self.max_n:
            raise InvalidRequest(f"n must be between 1 and {self.max_n} on this server (--max-n)", "n")
        if max_tokens.value is not None and max_tokens.value > self.max_tokens_cap:
            raise InvalidRequest(f"{max_tokens.param} is {max_tokens.value}; this server generates at most "
                                 f"{self.max_tokens_cap} tokens per answer (--max-tokens-cap)", max_tokens.param)

    def check_chars(self, texts: list[str], param: str) -> None:
        limit = self.max_prompt_tokens * CHARS_PER_TOKEN
        if sum(map(len, texts)) > limit:
            raise InvalidRequest(f"the prompt is longer than {limit} characters; this server takes at most "
                                 f"{self.max_prompt_tokens} tokens (--max-prompt-tokens)", param, CONTEXT_EXCEEDED)

    def check_queue(self, waiting: int, adding: int) -> None:
        if waiting + adding > self.max_queue:
            raise ApiError(429, f"too many requests are waiting (at most {self.max_queue}, --max-queue); "
                                "retry shortly")

    def fit(self, params: GenerationParams, prompt_len: int, max_context: int, max_tokens: Asked,
            prompt_param: str) -> GenerationParams:
        """Refuse a prompt over the limits; a max_tokens left out becomes what still fits in the model's context."""
        if prompt_len > self.max_prompt_tokens:
            raise InvalidRequest(f"the prompt is {prompt_len} tokens; this server takes at most "
                                 f"{self.max_prompt_tokens} (--max-prompt-tokens)", prompt_param, CONTEXT_EXCEEDED)
        room = max_context - prompt_len
        if max_tokens.value is None:
            if room < 1:
                raise InvalidRequest(f"the prompt is {prompt_len} tokens: no room left in this model's context of "
                                     f"{max_context}", prompt_param, CONTEXT_EXCEEDED)
            return dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, self.max_tokens_cap, room))
        if max_tokens.value > room:
            raise InvalidRequest(f"this model's context is {max_context} tokens; the prompt ({prompt_len}) plus "
                                 f"{max_tokens.param} ({max_tokens.value}) is more", max_tokens.param,
                                 CONTEXT_EXCEEDED)
        return dataclasses.replace(params, max_new_tokens=max_tokens.value)
