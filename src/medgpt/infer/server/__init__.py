"""An OpenAI-compatible HTTP API (plus the seed's `/chat`) over one engine.

`/v1/chat/completions`, `/v1/completions` (log-likelihood scoring with `echo` + `logprobs`), `/v1/models`,
`/metrics` (Prometheus), `/health`. Every request goes to `engine.submit`; the engine batches them continuously
and one request's failure fails only that request. Every error is an OpenAI error object
`{"error": {"message", "type", "param", "code"}}`, and anything the server cannot honour is a 400 naming the field.

The `Guard` middleware checks the API key before the body is read and bounds the body while reading it; the
handlers parse the body themselves (`parse_body`), so bad JSON, invalid UTF-8, lone surrogates and deep nesting
are 400s rather than library errors.

The modules, as vLLM's `entrypoints/openai` splits them: `protocol` (request models, each turning itself into
`GenerationParams`), `errors`, `settings` (limits and defaults), `body` (strict parsing), `context` (one request
being served), `tool_use`, `responses` and `streaming` (answers), `serving_chat` and `serving_completion` (the
handlers), `guard` and `metrics`, `app` (routes, `create_app`) and `run` (`serve`, `running_server`).
"""

from medgpt.infer.server.app import create_app
from medgpt.infer.server.errors import ApiError
from medgpt.infer.server.run import exposure_warning, free_port, loopback, running_server, serve
from medgpt.infer.server.settings import ServerSettings

__all__ = ["ApiError", "ServerSettings", "create_app", "exposure_warning", "free_port", "loopback",
           "running_server", "serve"]
