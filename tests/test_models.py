"""Model resolution and load options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medgpt import DEFAULT_MODEL
from medgpt.errors import UserError
from medgpt.models import ModelArgs, load_model, lora_config, LoraArgs, model_config, resolve_model


def test_local_folder_wins(tiny_model):
    assert resolve_model(tiny_model) == tiny_model


def test_default_resolves_offline_to_the_bundled_safetensors_copy(bundled_model):
    assert resolve_model(DEFAULT_MODEL) == bundled_model
    config = json.loads((Path(bundled_model) / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert list(Path(bundled_model).glob("*.safetensors"))


@pytest.mark.parametrize("name, message", [
    ("./no/such/folder", "no such folder"),
    ("a/b/c", "no such folder"),
    ("nobody-offline/no-such-model", "hub download failed"),
])
def test_unresolvable_models_are_user_errors(name, message):
    with pytest.raises(UserError, match=message):
        resolve_model(name)


def test_a_file_is_not_a_model_folder(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(UserError, match="not a model folder"):
        resolve_model(str(tmp_path))


def test_quantization_without_cuda_is_a_clear_error(tiny_model):
    with pytest.raises(UserError, match="4-bit quantization needs bitsandbytes on a CUDA GPU"):
        load_model(ModelArgs(model=tiny_model, quantization_bit=4))


def test_rope_scaling_is_applied_to_the_config(tiny_model):
    config = model_config(ModelArgs(model=tiny_model, rope_scaling="linear", rope_factor=4.0), tiny_model)
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 4.0
    with pytest.raises(UserError, match="rope_scaling"):
        model_config(ModelArgs(model=tiny_model, rope_scaling="cubic"), tiny_model)


def test_trust_remote_code_is_off_by_default():
    assert ModelArgs().trust_remote_code is False


def test_lora_options_reach_peft():
    cfg = lora_config(LoraArgs(lora_rank=4, lora_target="q_proj, v_proj", modules_to_save="lm_head", use_dora=True, use_rslora=True))
    assert cfg.r == 4 and set(cfg.target_modules) == {"q_proj", "v_proj"}
    assert cfg.modules_to_save == ["lm_head"] and cfg.use_dora and cfg.use_rslora
    assert lora_config(LoraArgs()).target_modules == "all-linear"


def test_lora_target_is_a_list_or_a_comma_string_and_a_name_no_layer_has_is_an_error(tiny_model):
    from transformers import AutoModelForCausalLM

    assert set(lora_config(LoraArgs(lora_target=["q_proj", "v_proj"])).target_modules) == {"q_proj", "v_proj"}
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert set(lora_config(LoraArgs(lora_target="q_proj, v_proj"), model=model).target_modules) == {"q_proj", "v_proj"}
    with pytest.raises(UserError, match=r"lora_target nonexistent: .*names: .*k_proj.*q_proj"):
        lora_config(LoraArgs(lora_target="q_proj,nonexistent"), model=model)
