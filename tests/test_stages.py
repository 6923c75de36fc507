"""`medgpt.stages`: each stage's facts agree with the stage's own code and with TRL's configs, which the planner, the
trainer builder and the report rely on without checking. The references are the stage modules' TRL config
classes (their fields and TRL's `disable_dropout` defaults), not medgpt's table itself."""

from __future__ import annotations

import dataclasses
import string

import pytest

from medgpt.errors import UserError
from medgpt.stages import STAGES, STAGES_BY_NAME, stage_facts
from medgpt.train import stage_module


def config_fields(name: str) -> set[str]:
    """Every option a stage's config takes: its TRL config class and its own STAGE_ARGS."""
    module = stage_module(name)
    classes = [module.CONFIG_CLASS, *filter(None, [getattr(module, "STAGE_ARGS", None)])]
    return {f.name for cls in classes for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_has_its_module_and_its_report_names_real_options(name):
    facts, fields = stage_facts(name), config_fields(name)
    assert callable(stage_module(name).run)
    assert set(facts.options) <= fields  # the report's "<stage> options" row reads these settings
    placeholders = {p for _, p, _, _ in string.Formatter().parse(facts.length) if p}
    assert placeholders - {"overlong"} <= fields | {"max_length"}  # its length text is filled from its settings
    assert facts.length_key in fields | {"max_length"}


@pytest.mark.parametrize("name", [n for n in STAGES if "disable_dropout" in config_fields(n)])
def test_dropout_off_is_what_trl_switches_off(name):
    """The planner counts no dropout masks for a trainer that switches dropout off by default."""
    module = stage_module(name)
    default = next(f.default for f in dataclasses.fields(module.CONFIG_CLASS) if f.name == "disable_dropout")
    assert stage_facts(name).dropout_off is default


def test_stages_that_generate_or_score_take_the_options_they_need():
    for name in STAGES:
        facts, fields = stage_facts(name), config_fields(name)
        if facts.generates:  # the planner counts a generation KV cache
            assert fields & {"num_generations", "max_new_tokens"}, name
        if facts.reward_model:  # a reward model loaded by default
            assert "reward_model" in fields, name
    assert [n for n in STAGES if STAGES_BY_NAME[n].score_head] == ["rm"]


def test_an_unknown_stage_is_an_error_naming_the_stages():
    with pytest.raises(UserError, match="expected one of pt, sft"):
        stage_facts("rlhf")
