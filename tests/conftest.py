"""Shared fixtures: a tiny random Llama with the bundled tokenizer (fast tests) and the bundled model."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin on shared cores
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a tiny random causal LM (seconds to train on a CPU)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def bundled_model() -> str:
    """Path of the bundled SmolLM2-135M-Instruct, converted to safetensors once per machine."""
    from medgpt.models import resolve_model

    return resolve_model()


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return SAMPLE_DATA
