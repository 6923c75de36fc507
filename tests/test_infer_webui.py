"""The Gradio page, driven through gradio_client (Gradio's own client) and plain HTTP over loopback, served as
`medgpt webui` serves it (`launch_page`): login, same-origin requests only, no uploads, bounded bodies, no
telemetry."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from _inference import closes_its_engines

from medgpt.infer.base import GenerationParams
from medgpt.infer.engine import load_engine


@pytest.fixture(scope="module")
def engine(sharp_model):
    return load_engine(sharp_model, dtype="fp32")


@pytest.fixture(scope="module")
def page(engine):
    from medgpt.infer.webui import build_demo

    sources = [{"source": "kb/asthma.txt", "text": "Rinse after steroid inhalers."}]
    augment = lambda messages: (messages, sources if "inhaler" in messages[-1]["content"] else [])  # noqa: E731
    demo = build_demo(engine, GenerationParams(max_new_tokens=8), system="Be brief.", augment=augment)
    yield from serve_page(demo, engine)


def serve_page(demo, engine, **launch):
    """The page served by `launch_page` on a free loopback port: (gradio_client, engine), closed afterwards."""
    from gradio_client import Client

    from medgpt.infer.server import free_port
    from medgpt.infer.webui import launch_page

    url = launch_page(demo, port=free_port(), block=False, **launch)
    try:
        yield Client(url, verbose=False, auth=(launch.get("logins") or [None])[0]), engine
    finally:
        demo.close()


def ask(client, message, system="", max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
        seed=-1, stop="", stream=False):
    """The page's chat endpoint with every control of the Settings panel, in the page's order."""
    args = (message, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop)
    return list(client.submit(*args, api_name="/chat")) if stream else client.predict(*args, api_name="/chat")


def shown(completion) -> str:
    """What the page shows for a completion: the text, and the cut note when it ended at the token limit."""
    if completion.finish_reason != "length":
        return completion.text
    return (f"{completion.text}\n\n*(cut at {completion.completion_tokens} tokens; raise Max new tokens under "
            f"Settings for a longer answer)*")


def test_page_streams_multi_turn_answers_with_the_system_prompt(page):
    client, engine = page
    params = GenerationParams(max_new_tokens=8)
    first = [{"role": "user", "content": "What is a fever?"}]
    expected = engine.generate([first], params, system="Be brief.")[0]
    updates = ask(client, "What is a fever?", "Be brief.", stream=True)
    assert updates[-1] == shown(expected)
    assert len(updates) > 2 and all(expected.text.startswith(u) for u in updates[:-1])  # streamed, growing

    # the page's cut note is not part of the conversation the model sees next
    second = [*first, {"role": "assistant", "content": expected.text}, {"role": "user", "content": "And a cold?"}]
    answer = ask(client, "And a cold?", "Be brief.", 5)
    assert answer == shown(engine.generate([second], GenerationParams(max_new_tokens=5), system="Be brief.")[0])

    client.reset_session()  # a new conversation, as after clearing the page
    answer = ask(client, "What is a fever?", "You are a pediatrician.")
    assert answer == shown(engine.generate([first], params, system="You are a pediatrician.")[0]) != shown(expected)


def test_page_marks_only_answers_cut_at_the_token_limit(page):
    client, engine = page
    question = [{"role": "user", "content": "What is a fever?"}]
    cut = engine.generate([question], GenerationParams(max_new_tokens=6))[0]
    assert cut.finish_reason == "length" and cut.completion_tokens == 6  # the reference: the engine's own result
    client.reset_session()
    answer = ask(client, "What is a fever?", max_new_tokens=6)
    assert answer.startswith(cut.text) and "(cut at 6 tokens;" in answer
    stop = cut.text[2:4]
    client.reset_session()
    stopped = ask(client, "What is a fever?", max_new_tokens=6, stop=f"{stop}\nnever there")
    assert stopped == engine.generate([question], GenerationParams(max_new_tokens=6, stop=[stop]))[0].text
    assert "cut at" not in stopped


def test_page_top_k_and_seed_reach_the_engine(page):
    client, engine = page
    question = [{"role": "user", "content": "What is a fever?"}]
    params = GenerationParams(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=40, repetition_penalty=1.2, seed=3)
    expected = shown(engine.generate([question], params)[0])
    client.reset_session()
    answer = ask(client, "What is a fever?", "", 8, 1.0, 0.9, 40, 1.2, 3)
    client.reset_session()
    assert answer == expected == ask(client, "What is a fever?", "", 8, 1.0, 0.9, 40, 1.2, 3)
    # -1 (what the page starts with) is a new seed for each answer, never one fixed seed
    unseeded = set()
    for _ in range(3):
        client.reset_session()
        unseeded.add(ask(client, "What is a fever?", "", 8, 2.0, 1.0, 0, 1.0, -1))
    assert len(unseeded) > 1


def test_page_shows_retrieval_sources(page):
    client, _ = page
    client.reset_session()
    answer = ask(client, "How do I use my inhaler?", max_new_tokens=4)
    assert answer.endswith("Sources:\n[1] kb/asthma.txt: Rinse after steroid inhalers.")


def components(client) -> dict[str, dict]:
    """The page's components by label (the props the browser renders)."""
    return {c["props"].get("label"): c["props"] for c in client.config["components"] if c["props"].get("label")}


def test_page_shows_the_loaded_model_and_every_setting(page, tiny_model):
    client, engine = page
    page_text = str(client.config)
    assert f"**Model** model ({engine.folder})" in page_text and "**Adapter** none" in page_text
    assert f"**Template** {engine.template.name}" in page_text
    assert "**dtype** float32" in page_text and "**Device** cpu" in page_text
    assert "**Generation** greedy, repetition penalty 1, max new tokens 8" in page_text
    props = components(client)
    expected = {"Max new tokens": 8, "Temperature": 0.0, "Top-p": 1.0, "Top-k": 0, "Repetition penalty": 1.0,
                "Seed": -1, "Stop strings": "", "System prompt": "Be brief."}
    assert {label: props[label].get("value") for label in expected} == expected


def test_page_starts_from_the_model_generation_config(tiny_model, tmp_path):
    from medgpt.infer.webui import build_demo
    from _inference import with_generation_config

    folder = with_generation_config(tiny_model, tmp_path / "shipped", do_sample=True, temperature=0.6, top_k=20)
    engine = load_engine(folder, dtype="fp32")
    for client, _ in serve_page(build_demo(engine), engine):
        props = components(client)
        assert (props["Temperature"]["value"], props["Top-k"]["value"]) == (0.6, 20)
        assert props["Temperature"]["info"].startswith("default 0.6: the model's generation_config")
        assert props["Top-p"]["value"] == 0.9 and props["Top-p"]["info"] == "default 0.9: medgpt's chat default"
        assert props["Repetition penalty"]["value"] == 1.1 and props["Max new tokens"]["value"] == 512


def test_history_from_gradio_messages():
    from medgpt.infer.webui import history_messages

    history = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
               {"role": "assistant", "content": "Hello", "metadata": None},
               {"role": "user", "content": {"path": "scan.png"}}]
    assert history_messages(history) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


# --- serving: login, same-origin only, no uploads, bounded bodies, no telemetry, loopback by default ---

EVIL = {"Origin": "http://evil.example"}
CHAT = ["What is a fever?", "", 4, 0.0, 1.0, 0, 1.0, -1, ""]  # the /chat inputs, as in `ask`


def call_chat(http: httpx.Client, data: list, headers: dict | None = None) -> str:
    """Gradio's documented REST API (POST /gradio_api/call/chat, then its event stream): the final answer."""
    started = http.post("/gradio_api/call/chat", json={"data": data}, headers=headers)
    assert started.status_code == 200, started.text
    events = http.get(f"/gradio_api/call/chat/{started.json()['event_id']}", headers=headers).text
    complete = events.split("event: complete\ndata: ", 1)[1].split("\n", 1)[0]
    return json.loads(complete)[0]


def test_page_refuses_cross_site_requests_and_serves_its_own_origin(page):
    """A page on another site (the browser sends its Origin, or Sec-Fetch-Site) must not make the model answer
    or store a file; the page's own origin, links from elsewhere and non-browser clients work."""
    client, engine = page
    url = client.src.rstrip("/")
    expected = engine.generate([[{"role": "user", "content": CHAT[0]}]], GenerationParams(max_new_tokens=4))[0]
    with httpx.Client(base_url=url) as http:
        assert call_chat(http, CHAT, {"Origin": url}) == shown(expected)  # the page's own origin
        assert call_chat(http, CHAT, {"Sec-Fetch-Site": "same-origin", "Origin": url}) == shown(expected)
        for headers in (EVIL, {"Origin": "null"}, {"Origin": url.replace("127.0.0.1", "localhost.evil.example")},
                        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"},
                        {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors"}):
            refused = http.post("/gradio_api/call/chat", json={"data": CHAT}, headers=headers)
            assert (refused.status_code, refused.text) == (
                403, "cross-site request refused: use the page from its own address"), headers
        upload = http.post("/gradio_api/upload", files={"files": ("note.txt", b"hello")}, headers=EVIL)
        assert upload.status_code == 403
        config = http.get("/config", headers=EVIL)  # another site's script reading the page's settings
        assert config.status_code == 403
        # a link from another site opens the page (a top-level navigation)
        opened = http.get("/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
        assert opened.status_code == 200 and "<html" in opened.text


def test_page_takes_no_uploads_and_bounds_request_bodies(page):
    from medgpt.infer.webui import MAX_REQUEST_BYTES

    client, _ = page
    with httpx.Client(base_url=client.src) as http:
        for size in (5, 2 * MAX_REQUEST_BYTES):  # the page has no file input: every upload is refused
            upload = http.post("/gradio_api/upload", files={"files": ("scan.pdf", b"%" * size)})
            assert (upload.status_code, upload.text) == (403, "this page takes no file uploads")
        too_large = f"request body over {MAX_REQUEST_BYTES} bytes refused"
        message = "x" * MAX_REQUEST_BYTES  # a chat message bigger than the limit, with a Content-Length
        refused = http.post("/gradio_api/call/chat", json={"data": [message, *CHAT[1:]]})
        assert (refused.status_code, refused.text) == (413, too_large)
        body = json.dumps({"data": [message, *CHAT[1:]]}).encode()
        chunked = http.post("/gradio_api/call/chat", content=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                            headers={"Content-Type": "application/json"})  # no Content-Length: counted as it comes
        assert (chunked.status_code, chunked.text) == (413, too_large)
        assert call_chat(http, ["y" * 1000, *CHAT[1:]])  # a long message under the limit is answered


def test_page_login(engine, caplog):
    """With logins, every route but the login page answers 401 until Gradio's /login accepts the password;
    gradio_client (Gradio's own client) logs in with it. The password is never logged."""
    from gradio_client import Client

    from medgpt.infer.webui import build_demo

    demo = build_demo(engine, GenerationParams(max_new_tokens=4))
    with caplog.at_level("INFO", logger="medgpt.infer.webui"):
        for client, _ in serve_page(demo, engine, logins=[("nurse", "n1ght-shift"), ("doc", "s3cr:et pw")]):
            url = client.src.rstrip("/")
            with httpx.Client(base_url=url) as http:
                for route in ("/config", "/gradio_api/info"):
                    assert http.get(route).status_code == 401
                assert http.post("/gradio_api/call/chat", json={"data": CHAT}).status_code == 401
                wrong = http.post("/login", data={"username": "doc", "password": "s3cr"}, headers={"Origin": url})
                assert wrong.status_code == 400 and http.get("/config").status_code == 401
                forged = http.post("/login", data={"username": "doc", "password": "s3cr:et pw"}, headers=EVIL)
                assert forged.status_code == 403 and http.get("/config").status_code == 401  # login CSRF
                login = http.post("/login", data={"username": "doc", "password": "s3cr:et pw"}, headers={"Origin": url})
                assert login.status_code == 200 and http.get("/config").status_code == 200
                expected = engine.generate([[{"role": "user", "content": CHAT[0]}]],
                                           GenerationParams(max_new_tokens=4))[0]
                assert call_chat(http, CHAT, {"Origin": url}) == shown(expected)
            assert ask(client, CHAT[0], max_new_tokens=4) == shown(expected)  # logged in as nurse
            with pytest.raises(ValueError, match="Could not login"):
                Client(url, verbose=False, auth=("doc", "wrong"))
    logged = caplog.text
    assert "login required: 2 user(s) (nurse, doc)" in logged and "s3cr" not in logged and "n1ght-shift" not in logged


def test_page_telemetry_is_off_and_binds_to_loopback(engine, monkeypatch):
    """Gradio's telemetry (its `analytics_enabled`, which it reads from GRADIO_ANALYTICS_ENABLED and which is
    on when that is unset) is off, and no name but this machine's is looked up while the page starts and
    answers; no run history, monitoring or MCP routes; it binds to 127.0.0.1 when no host is given."""
    from medgpt.infer.webui import build_demo, gradio_analytics

    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    looked_up = []
    real_getaddrinfo = socket.getaddrinfo

    def recording(host, *args, **kwargs):
        looked_up.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    demo = build_demo(engine, GenerationParams(max_new_tokens=4))
    assert demo.analytics_enabled is False
    for client, _ in serve_page(demo, engine):
        assert client.config["analytics_enabled"] is False  # what the browser side reads
        assert client.config["run_history"] is False  # no conversations kept in the browser or sent to a bucket
        with httpx.Client(base_url=client.src) as http:
            for route, status in (("/gradio_api/run-history/buckets", 404), ("/monitoring", 403),
                                  ("/gradio_api/mcp/schema", 404)):
                assert http.get(route).status_code == status, route
        assert ask(client, CHAT[0], max_new_tokens=4)
        assert demo.server_name == "127.0.0.1" and client.src.startswith("http://127.0.0.1:")
        time.sleep(0.5)  # Gradio's analytics threads would have looked up their servers by now
    assert set(looked_up) <= {"127.0.0.1", "localhost", "::1", None}, set(looked_up)
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")  # Gradio's own switch still opts in
    assert gradio_analytics() is True


def test_warning_when_the_page_is_open_without_a_login():
    from medgpt.infer.webui import exposure_warning

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host, login=False, share=False) is None
    for host in ("0.0.0.0", "192.168.1.20", "::", "medgpt.example"):
        warning = exposure_warning(host, login=False, share=False)
        assert warning and host in warning and "--auth" in warning
        assert exposure_warning(host, login=True, share=False) is None
    assert "gradio.live" in exposure_warning("127.0.0.1", login=False, share=True)
    assert exposure_warning("127.0.0.1", login=True, share=True) is None


def test_login_flags_and_file(tmp_path, capsys):
    from medgpt.cli import build_parser
    from medgpt.errors import UserError
    from medgpt.infer.webui import check_logins, read_login_file

    logins = tmp_path / "logins.txt"
    logins.write_text("# users of the ward page\ndoc:pa:ss\n\n  nurse : night shift \n", encoding="utf-8")
    assert read_login_file(logins) == [("doc", "pa:ss"), ("nurse", " night shift")]
    for text, line in (("doc:ok\nhunter2\n", 2), ("# c\n:hunter2\n", 2), ("doc:\n", 1)):
        logins.write_text(text, encoding="utf-8")
        with pytest.raises(UserError) as bad:
            read_login_file(logins)
        assert str(bad.value) == f"{logins}:{line}: expected user:password with a non-empty user and password"
    logins.write_text("# nobody yet\n", encoding="utf-8")
    with pytest.raises(UserError, match="no user:password line"):
        read_login_file(logins)
    with pytest.raises(UserError, match="cannot read the login file"):
        read_login_file(tmp_path / "missing.txt")
    with pytest.raises(UserError, match="login user doc is given more than once"):
        check_logins([("doc", "a"), ("nurse", "b"), ("doc", "c")])

    parser = build_parser("webui")
    args = parser.parse_args(["webui", "--auth", "doc:pa:ss", "--auth", "nurse:x"])
    assert args.auth == [("doc", "pa:ss"), ("nurse", "x")] and args.host == "127.0.0.1"
    with pytest.raises(SystemExit):
        parser.parse_args(["webui", "--auth", "hunter2"])
    error = capsys.readouterr().err
    assert "argument --auth: expected user:password" in error and "hunter2" not in error


def test_webui_command_serves_the_page_behind_its_login(tiny_model, tmp_path, monkeypatch, caplog):
    """`medgpt webui --auth-file` end to end (in a thread; the page it launches is closed to end it): on
    127.0.0.1, 401 until logged in, then answering; the password never printed or logged."""
    import threading

    from gradio_client import Client

    from medgpt import cli
    from medgpt.infer import webui
    from medgpt.infer.server import free_port

    launched, real_launch = [], webui.launch_page
    monkeypatch.setattr(webui, "launch_page", lambda demo, **kw: launched.append(demo) or real_launch(demo, **kw))
    port = free_port()
    (tmp_path / "logins.txt").write_text("doc:pw-from-file\n", encoding="utf-8")
    argv = ["webui", "--model", tiny_model, "--dtype", "fp32", "--port", str(port),
            "--auth-file", str(tmp_path / "logins.txt"), "--max-new-tokens", "3"]
    result = []
    with caplog.at_level("INFO"), closes_its_engines():  # stopping the page closes the engine
        thread = threading.Thread(target=lambda: result.append(cli.main(argv)), daemon=True)
        thread.start()
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        try:
            with httpx.Client(base_url=url, timeout=5) as http:
                while True:
                    assert thread.is_alive(), "the command ended before serving"
                    try:
                        status = http.get("/config").status_code
                        break
                    except httpx.TransportError:
                        assert time.monotonic() < deadline, "the page did not start"
                        time.sleep(0.2)
            assert status == 401 and launched[0].server_name == "127.0.0.1"
            client = Client(url, verbose=False, auth=("doc", "pw-from-file"))
            assert isinstance(client.predict(CHAT[0], "", 3, 0.0, 1.0, 0, 1.0, -1, "", api_name="/chat"), str)
        finally:
            for demo in launched:
                demo.close()
            thread.join(timeout=30)
    assert result == [0]
    assert "login required: 1 user(s) (doc)" in caplog.text and "pw-from-file" not in caplog.text
