"""Shared fixtures: a tiny random Llama with the bundled tokenizer (fast tests), a sharpened copy of it and one
engine on that copy for the inference tests, the bundled tokenizer and the bundled model."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin on shared cores
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# prepared-data caches of this test session only (each test's data is prepared, never found from an earlier run)
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="medgpt-tests-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)

import pytest  # noqa: E402

import medgpt  # noqa: E402

SAMPLE_DATA = Path(medgpt.__file__).parent / "sample_data"


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64) with the bundled SmolLM2 tokenizer and chat template, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from medgpt.models import load_tokenizer

    tokenizer = load_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def sharpen(tiny_model: str, folder: Path, std: float = 0.2) -> str:
    """The tiny model with larger random weights: its greedy text then depends on the prompt (not just newlines)."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_model, folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() > 1):
            weight.normal_(0, std)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a tiny random causal LM (seconds to train on a CPU)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def sharp_model(tiny_model, tmp_path_factory) -> str:
    """Path of the tiny model sharpened (`sharpen`): greedy text that depends on the prompt."""
    return sharpen(tiny_model, tmp_path_factory.mktemp("sharp") / "model")


@pytest.fixture(scope="session")
def engine(sharp_model):
    """The transformers engine on the sharpened tiny model (fp32, batches of up to 8), one for the session."""
    from medgpt.infer.engine import load_engine

    engine = load_engine(sharp_model, dtype="fp32", max_batch_size=8)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled tokenizer (SmolLM2's, with its ChatML chat template)."""
    from medgpt.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def bundled_model() -> str:
    """Path of the bundled SmolLM2-135M-Instruct, converted to safetensors once per machine."""
    from medgpt.models import resolve_model

    return resolve_model()


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return SAMPLE_DATA


# ---- models crafted or trained once for several test files -----------------------------------------


@pytest.fixture(scope="session")
def answers_c_model(tiny_model, tmp_path_factory) -> str:
    """The tiny model rewired to answer "C" to every chat prompt.

    With attention and MLP outputs zeroed, the last hidden state is the embedding of the last prompt
    token (the newline after `<|im_start|>assistant`); making "C" and " C" point the same way as that
    embedding gives them the largest logit whatever the question.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "x"}]
    last = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    last = last["input_ids"][-1] if isinstance(last, dict) or hasattr(last, "keys") else last[-1]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.get_input_embeddings().weight
        for spelling in ("C", " C"):
            (token,) = tokenizer.encode(spelling, add_special_tokens=False)
            emb[token] = 10 * emb[last]
    out = tmp_path_factory.mktemp("answers-c")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def reward_model(tiny_model, tmp_path_factory) -> tuple[Path, list[dict]]:
    """A reward model trained on keyword preference pairs (test_train.py, test_train_rewards.py,
    test_commands_score.py); its folder and its metrics log."""
    from _stage_runs import keyword_pairs, train

    tmp = tmp_path_factory.mktemp("rm")
    data = keyword_pairs(tmp / "pairs.jsonl")
    rows = train("rm", tiny_model, tmp / "rm", data, max_steps=12, learning_rate=5e-3, val_size=4, eval_on_start=True)
    return tmp / "rm", rows
