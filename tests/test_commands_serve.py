"""The `medgpt serve` command: once the server stops, the engine it started is closed; --no-enable-thinking is the
engine's default thinking switch."""

from __future__ import annotations

from _inference import closes_its_engines


def test_serve_closes_its_engine_when_the_server_stops(tiny_model, monkeypatch):
    import medgpt.infer.server
    from medgpt.cli import main

    served = []
    monkeypatch.setattr(medgpt.infer.server, "serve", lambda app, **kw: served.append(kw))  # stops at once
    with closes_its_engines():
        assert main(["serve", "--model", tiny_model, "--dtype", "fp32", "--port", "0"]) == 0
    assert served == [{"host": "127.0.0.1", "port": 0}]


def test_serve_thinking_default(tiny_model, monkeypatch, capsys):
    import medgpt.infer.server
    from medgpt.cli import main

    engines = []
    monkeypatch.setattr(medgpt.infer.server, "serve", lambda app, **kw: engines.append(app.state.engine))
    assert main(["serve", "--model", tiny_model, "--dtype", "fp32", "--template", "qwen3", "--no-enable-thinking"]) == 0
    assert engines[0].enable_thinking is False and "thinking off" in capsys.readouterr().out
    question = [{"role": "user", "content": "Hi"}]
    assert engines[0].tokenizer.decode(engines[0].encode(question)).endswith("<think>\n\n</think>\n\n")
