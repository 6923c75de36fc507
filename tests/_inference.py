"""Shared by the inference tests: chat questions (test_infer_engine.py, test_infer_chat.py), predict's input rows
in every format it reads (test_infer_predict.py, test_commands_predict.py), and a model copy with its own
generation_config (test_infer_base.py, test_commands_chat.py, test_infer_webui.py); `closes_its_engines`, the
check that a command or library entry has closed every engine it started (the command tests)."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
from pathlib import Path

ENGINE_THREADS = ("medgpt-engine", "medgpt-vllm")  # the scheduler threads of the engines

QUESTIONS = [
    [{"role": "user", "content": "What is hypertension?"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are a careful doctor."},
     {"role": "user", "content": "List three symptoms of influenza and say when to see a doctor."}],
]


ROWS = [
    {"id": "a", "query": "What is a fever?"},
    {"id": "b", "query": "And in children?", "system": "Be brief.", "history": [["What is a fever?", "A high temperature."]]},
    {"id": "c", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "reference"}]},
    {"id": "d", "conversations": [{"from": "human", "value": "What is asthma?"}]},
    {"question": "No id here: what is a stroke?"},
]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def with_generation_config(model: str, folder: Path, **fields) -> str:
    """A copy of `model` whose generation_config.json also sets `fields`, written as a model author would."""
    shutil.copytree(model, folder)
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}, indent=2))
    return str(folder)


@contextlib.contextmanager
def closes_its_engines():
    """Fails unless every engine scheduler thread started inside the block has ended by its end (the code in it
    closed its engines: an engine merely dropped keeps its thread for up to a second)."""
    before = set(threading.enumerate())
    yield
    left = [t.name for t in threading.enumerate() if t.name in ENGINE_THREADS and t not in before and t.is_alive()]
    assert left == [], "an engine was left running"


@contextlib.contextmanager
def serving(engine, settings, name: str):
    """`engine` behind a running medgpt server named `name`: yields (url, engine); the engine is closed after."""
    from medgpt.infer.server import create_app, running_server

    with running_server(create_app(engine, settings, model_name=name)) as url:
        yield url, engine
    engine.close()


def openai_client(url: str, api_key: str = "unused"):
    """The official `openai` client on a medgpt server, without retries."""
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=api_key, timeout=120, max_retries=0)
