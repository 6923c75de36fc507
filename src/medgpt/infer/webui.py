"""A Gradio chat page: the loaded model on top, streaming answers (a reasoning model's reasoning folded above its
answer), a system prompt, every generation setting (with its default and where the default comes from), answers cut
at the token limit marked, clear; served (`launch_page`) behind an optional login, to its own origin only, without
uploads or telemetry."""

from __future__ import annotations

import html
import ipaddress
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from medgpt.errors import UserError
from medgpt.infer.base import Augment, Engine, GenerationParams, chat_defaults, chat_origins, engine_facts
from medgpt.infer.chat import cut_note, describe_params, format_sources

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20  # a request body the page accepts: a long conversation is far smaller
UPLOAD_ROUTE = "/gradio_api/upload"  # Gradio's file upload route; the page has no file input

# what the page appends to an answer (a cut note, the sources): left out of the history the model sees
PAGE_NOTES = re.compile(r"(\n\n\*\(cut at \d+ tokens[^\n]*\)\*)?(\n\nSources:\n(\[\d+\] [^\n]*(\n|$))+)?$")
# the folded reasoning the page shows before an answer (its text escaped, so no `</details>` inside it)
FOLD_START, FOLD_END = "<details><summary>Reasoning</summary>\n\n", "\n\n</details>\n\n"
PAGE_REASONING = re.compile(re.escape(FOLD_START) + r".*?" + re.escape(FOLD_END), re.DOTALL)


def shown_reply(reasoning: str, answer: str) -> str:
    """A reply as the page shows it: its reasoning folded (an HTML <details> block, closed) before the answer."""
    if not reasoning:
        return answer
    return FOLD_START + html.escape(reasoning, quote=False) + FOLD_END + answer


def history_messages(history: list[Any]) -> list[dict]:
    """Gradio's chat history (messages whose content may be parts or files) as plain text messages, without the
    notes the page added to answers."""
    out = []
    for turn in history or []:
        role, content = turn.get("role"), turn.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if role == "assistant" and isinstance(content, str):
            content = PAGE_NOTES.sub("", PAGE_REASONING.sub("", content, count=1), count=1)
        if role in ("user", "assistant") and isinstance(content, str) and content:
            out.append({"role": role, "content": content})
    return out


def engine_summary(engine: Engine) -> str:
    """What is loaded, in one Markdown line: model (and its folder), adapter, template, dtype, device."""
    return " · ".join(f"**{key if key == 'dtype' else key.capitalize()}** {value}"
                      for key, value in engine_facts(engine).items())


def build_demo(engine: Engine, defaults: GenerationParams | None = None, system: str | None = None,
               augment: Augment | None = None, title: str = "medgpt", origins: dict[str, str] | None = None):
    """The page; `defaults`: the settings it starts with (None: the engine's chat defaults); `origins`: where each
    sampling default came from, shown beside its control (None: the engine's generation config or medgpt)."""
    import gradio as gr

    if defaults is None:
        defaults, origins = chat_defaults(engine), origins or chat_origins(engine)
    origins = origins or {}

    def respond(message: str, history: list, system_prompt: str, max_new_tokens: float, temperature: float,
                top_p: float, top_k: float, repetition_penalty: float, seed: float | None,
                stop_text: str) -> Iterator[str]:
        messages = [*history_messages(history), {"role": "user", "content": message}]
        sources: list[dict] = []
        if augment:
            messages, sources = augment(messages)
        stop = [line for line in (stop_text or "").splitlines() if line.strip()]
        params = GenerationParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                  top_p=float(top_p), top_k=int(top_k), repetition_penalty=float(repetition_penalty),
                                  stop=stop, seed=None if seed is None or seed < 0 else int(seed))
        reasoning = answer = ""
        stream = engine.stream(messages, params, system=(system_prompt or "").strip() or None)
        reader = getattr(stream, "reader", None)
        try:
            for delta in stream:
                thought, said = reader.feed(delta) if reader is not None else ("", delta)
                if thought or said:
                    reasoning, answer = reasoning + thought, answer + said
                    yield shown_reply(reasoning, answer)
            if reader is not None and any(rest := reader.finish()):
                reasoning, answer = reasoning + rest[0], answer + rest[1]
                yield shown_reply(reasoning, answer)
        finally:  # the page stopped it (Stop, a closed tab): stop generating
            getattr(stream, "close", lambda: None)()
        answer = shown_reply(reasoning, answer)
        notes = ""
        if note := cut_note(getattr(stream, "completion", None)):
            notes += f"\n\n*({note}; raise Max new tokens under Settings for a longer answer)*"
        if sources:
            notes += "\n\nSources:\n" + format_sources(sources)
        if notes:
            yield answer + notes

    def info(field: str, value: Any, note: str = "") -> str:
        where = origins.get(field)
        return f"default {value:g}" + (f": {where}" if where else "") + (f"; {note}" if note else "")

    inputs = [
        gr.Textbox(value=system or "", label="System prompt", lines=2,
                   info="empty: the template's own" if not system else None),
        gr.Slider(1, max(2048, defaults.max_new_tokens), value=defaults.max_new_tokens, step=1,
                  label="Max new tokens", info=f"default {defaults.max_new_tokens}; longer answers are cut"),
        gr.Slider(0.0, max(2.0, defaults.temperature), value=defaults.temperature, step=0.05, label="Temperature",
                  info=info("temperature", defaults.temperature, "0 = greedy")),
        gr.Slider(min(0.05, defaults.top_p), 1.0, value=defaults.top_p, step=0.05, label="Top-p",
                  info=info("top_p", defaults.top_p)),
        gr.Slider(0, max(200, defaults.top_k), value=defaults.top_k, step=1, label="Top-k",
                  info=info("top_k", defaults.top_k, "0 = off")),
        gr.Slider(min(1.0, defaults.repetition_penalty), max(2.0, defaults.repetition_penalty),
                  value=defaults.repetition_penalty, step=0.05, label="Repetition penalty",
                  info=info("repetition_penalty", defaults.repetition_penalty, "1 = off")),
        gr.Number(value=-1 if defaults.seed is None else defaults.seed, precision=0, minimum=-1, label="Seed",
                  info="-1: a new random seed for each answer; 0 or more makes sampling repeatable"),
        gr.Textbox(value="\n".join(defaults.stop), label="Stop strings", lines=2,
                   info="one per line; the template's end-of-turn always stops"),
    ]
    return gr.ChatInterface(respond, additional_inputs=inputs, title=title, api_name="chat",
                            analytics_enabled=gradio_analytics(),
                            description=f"{engine_summary(engine)}\n\n**Generation** "
                                        f"{describe_params(defaults, origins)} · change it under Settings below",
                            additional_inputs_accordion=gr.Accordion("Settings", open=False))


def gradio_analytics() -> bool:
    """Gradio's telemetry: off unless GRADIO_ANALYTICS_ENABLED=True asks for it (Gradio's own default is on)."""
    return os.environ.get("GRADIO_ANALYTICS_ENABLED") == "True"


def parse_login(text: str) -> tuple[str, str]:
    """`user:password` (the password may hold colons) as a pair; a ValueError that never quotes the password."""
    user, colon, password = text.strip().partition(":")
    if not colon or not user.strip() or not password:
        raise ValueError("expected user:password with a non-empty user and password")
    return user.strip(), password


def read_login_file(path: str | Path) -> list[tuple[str, str]]:
    """One `user:password` a line (blank lines and `#` comments skipped); a bad line is `FILE:LINE: ...`."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the login file: {getattr(exc, 'strerror', None) or exc}") from None
    logins = []
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                logins.append(parse_login(line))
            except ValueError as exc:
                raise UserError(f"{path}:{number}: {exc}") from None
    if not logins:
        raise UserError(f"{path}: no user:password line")
    return logins


def check_logins(logins: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The logins, each user once (Gradio would keep only a repeated user's last password)."""
    users = [user for user, _ in logins]
    if twice := sorted({user for user in users if users.count(user) > 1}):
        raise UserError(f"login user {', '.join(twice)} is given more than once")
    return list(logins)


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches only this machine."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: it may resolve to any interface
        return False


def exposure_warning(host: str, login: bool, share: bool) -> str | None:
    """Why a page without a login is open to others (None: it is not)."""
    if login:
        return None
    if share:
        return ("the page has a public gradio.live link and no login: anyone with the link can use the model "
                "(add --auth USER:PASSWORD or --auth-file FILE)")
    if not is_loopback(host):
        return (f"the page listens on {host} without a login: anyone who can reach this machine can use the model "
                f"(add --auth USER:PASSWORD or --auth-file FILE)")
    return None


def cross_site(method: str, headers: Any) -> bool:
    """Whether a browser sent this request from another site's page: the browser's Sec-Fetch-Site when it sends
    one (a link from elsewhere that opens the page is allowed), else an Origin that is not this host."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        navigation = method in ("GET", "HEAD") and headers.get("sec-fetch-mode") == "navigate"
        return site not in ("same-origin", "none") and not navigation
    origin = headers.get("origin")
    if origin is None:  # not a browser page's request (gradio_client, curl) or a plain navigation
        return False
    try:
        page, request = urlsplit(origin), urlsplit(f"//{headers.get('host', '')}")
        default = {"http": 80, "https": 443}.get(page.scheme)
        return (page.hostname, page.port or default) != (request.hostname, request.port or default)
    except ValueError:  # a port that is not a number
        return True


class PageGuard:
    """ASGI middleware in front of the page: refuses cross-site requests (403), file uploads (403: the page
    takes none) and request bodies over `max_body` bytes (413), before Gradio reads them."""

    def __init__(self, app, max_body: int = MAX_REQUEST_BYTES):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        from starlette.datastructures import Headers
        from starlette.responses import PlainTextResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers, method = Headers(scope=scope), scope["method"]

        async def refuse(status: int, message: str):
            await PlainTextResponse(message, status_code=status)(scope, receive, send)

        if cross_site(method, headers):
            return await refuse(403, "cross-site request refused: use the page from its own address")
        if scope["path"].rstrip("/") == UPLOAD_ROUTE:
            return await refuse(403, "this page takes no file uploads")
        too_large = f"request body over {self.max_body} bytes refused"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:  # any other body is counted as it comes
            return await refuse(413, too_large)
        if method in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True  # read the whole body first
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > self.max_body:
                return await refuse(413, too_large)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def launch_page(demo, host: str = "127.0.0.1", port: int | None = None, logins: Sequence[tuple[str, str]] = (),
                share: bool = False, max_request_bytes: int = MAX_REQUEST_BYTES, block: bool = True):
    """Serve the page on host:port (loopback unless told otherwise), behind a login page when `logins` are
    given, guarded by `PageGuard`, without Gradio's MCP, monitoring and server-side rendering routes and without
    its run history (which keeps conversations in the browser and copies them to a Hub bucket through this
    server); warns when it is open to others without a login. `block=False` returns the local URL and leaves it running
    (`demo.close()` stops it)."""
    from starlette.middleware import Middleware

    users = [user for user, _ in check_logins(logins)]
    if warning := exposure_warning(host, bool(logins), share):
        log.warning(warning)
    if logins:
        log.info("login required: %d user(s) (%s)", len(users), ", ".join(users))
    _, url, _ = demo.queue().launch(
        server_name=host, server_port=port, share=share, auth=list(logins) or None,
        auth_message="Log in to use this medgpt page." if logins else None, prevent_thread_lock=not block,
        quiet=not block, max_file_size=max_request_bytes, enable_monitoring=False, mcp_server=False, ssr_mode=False,
        pwa=False, run_history=False, strict_cors=True, app_kwargs={"middleware": [Middleware(PageGuard, max_body=max_request_bytes)]})
    return url
