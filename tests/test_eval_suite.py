"""medgpt.eval.suite: the eval sets a training run is scored on (`eval_sets`), parsed and checked; evaluated once,
cached and read back without loading a model again, and compared before and after with paired intervals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medgpt.errors import UserError
from medgpt.eval import mcq


def test_suite_parse_eval_sets(sample_data):
    from medgpt.eval import suite

    assert suite.parse_eval_sets("none") == [] and suite.parse_eval_sets(None) == []
    sets = suite.parse_eval_sets([{"name": "m", "kind": "mcq", "data": str(sample_data / "mcq"), "limit": 3}])
    assert sets == [suite.EvalSet("m", "mcq", str(sample_data / "mcq"), limit=3)]
    assert [s.name for s in suite.default_eval_sets()] == ["mcq", "qa"]
    for bad, message in [("x", "expected a list"), ([{"name": "m", "kind": "bleu", "data": "."}], r"\(m\): kind"),
                         ([{"name": "m", "kind": "qa"}], r"\(m\): missing data"),
                         ([{"name": "m", "kind": "qa", "data": "/nope"}], "no such file"),
                         ([{"name": "m", "kind": "qa", "data": ".", "limit": 0}], "positive integer"),
                         ([{"name": "m", "kind": "qa", "data": ".", "shots": 1}], "unknown key shots"),
                         ([{"name": "m", "kind": "qa", "data": "."}] * 2, "used twice")]:
        with pytest.raises(UserError, match=message):
            suite.parse_eval_sets(bad)


def test_suite_evaluates_once_caches_and_compares(tiny_model, answers_c_model, sample_data, tmp_path,
                                                  monkeypatch):
    from medgpt.eval import suite
    from medgpt.models import cache_dir

    monkeypatch.setenv("MEDGPT_CACHE", str(tmp_path / "cache"))
    assert str(cache_dir()).startswith(str(tmp_path))
    sets = [suite.EvalSet("mcq", "mcq", str(sample_data / "mcq"), limit=4),
            suite.EvalSet("qa", "qa", str(sample_data / "qa" / "medical_qa.jsonl"), limit=4, max_new_tokens=4)]
    base = suite.evaluate(tiny_model, None, None, sets, tmp_path / "base")
    assert base["mcq"]["n"] == 12 and set(base["qa"]["metrics"]) == {"bleu", "rouge-l", "rouge-1", "rouge-2",
                                                                     "nll", "ppl"}
    assert json.loads((tmp_path / "base" / "qa.json").read_text())["items"][0]["prediction"] is not None
    alone = mcq.run_mcq(tiny_model, mcq.McqArgs(data=str(sample_data / "mcq"), limit=4), dtype="fp32")
    assert base["mcq"]["metrics"]["accuracy"] == alone["accuracy"]
    lo, hi = base["mcq"]["ci95"]["accuracy"]
    assert lo <= base["mcq"]["metrics"]["accuracy"] <= hi
    # the same inputs again: read back without loading a model
    import medgpt.infer.engine

    monkeypatch.setattr(medgpt.infer.engine, "load_engine", lambda *a, **k: pytest.fail("model loaded again"))
    assert suite.evaluate(tiny_model, None, None, sets, tmp_path / "base") == base
    assert suite.evaluate(tiny_model, None, None, sets, tmp_path / "elsewhere") == base  # the shared cache
    monkeypatch.undo()
    after = suite.evaluate(answers_c_model, None, None, sets[:1], tmp_path / "c")
    changes = suite.compare_results(base, after)
    c = changes["mcq"]["accuracy"]
    assert c["diff"] == pytest.approx(after["mcq"]["metrics"]["accuracy"] - base["mcq"]["metrics"]["accuracy"])
    assert c["ci95"][0] <= c["diff"] <= c["ci95"][1] and c["significant"] == (c["ci95"][0] > 0 or c["ci95"][1] < 0)
    assert 0 <= c["p_mcnemar"] <= 1 and "qa" not in changes
    same = suite.compare_results(base, base)["qa"]
    assert all(v["diff"] == 0 and v["ci95"] == [0, 0] and not v["significant"] for v in same.values())


def test_a_result_cached_in_one_precision_is_not_read_back_for_another(tiny_model, sample_data, tmp_path,
                                                                       monkeypatch):
    """The same model gives other numbers in bf16 than in fp32 (an NLL of 2.6118 against 2.6230 was measured):
    a cached result is keyed by the precision the model would run in."""
    import medgpt.infer.engine
    import medgpt.models
    from medgpt.eval import suite

    monkeypatch.setenv("MEDGPT_CACHE", str(tmp_path / "cache"))
    sets = [suite.EvalSet("mcq", "mcq", str(sample_data / "mcq"), limit=1)]
    monkeypatch.setattr(medgpt.models, "inference_precision", lambda dtype="auto": "fp32")
    suite.evaluate(tiny_model, None, None, sets, tmp_path / "fp32")
    monkeypatch.setattr(medgpt.infer.engine, "load_engine", lambda *a, **k: pytest.fail("model loaded again"))
    suite.evaluate(tiny_model, None, None, sets, tmp_path / "fp32")  # the same precision: read back
    monkeypatch.setattr(medgpt.models, "inference_precision", lambda dtype="auto": "bf16")

    class Loaded(Exception):
        pass

    def load(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(medgpt.infer.engine, "load_engine", load)
    with pytest.raises(Loaded):
        suite.evaluate(tiny_model, None, None, sets, tmp_path / "fp32")


def test_eval_sets_take_any_benchmark_format(answers_c_model, tmp_path):
    """A pipeline's `eval_sets:` reads every `eval mcq` format (detected, or named with `format:`)."""
    from medgpt.eval import suite

    fixtures = Path(__file__).parent / "fixtures" / "benchmarks"
    sets = suite.parse_eval_sets([{"name": "cmb", "kind": "mcq", "data": str(fixtures / "cmb")},
                                  {"name": "pubmedqa", "kind": "mcq", "data": str(fixtures / "pubmedqa"),
                                   "format": "pubmedqa"}])
    assert [s.format for s in sets] == [None, "pubmedqa"]
    with pytest.raises(UserError, match="format 'medqa_usmle': an mcq set's format is one of medqa_hf"):
        suite.parse_eval_sets([{"name": "x", "kind": "mcq", "data": str(fixtures / "cmb"), "format": "medqa_usmle"}])
    results = suite.evaluate(answers_c_model, None, None, sets, tmp_path / "eval")
    assert results["cmb"]["format"] == "cmb" and results["pubmedqa"]["format"] == "pubmedqa"
    assert {i["rule"] for i in results["cmb"]["items"]} == {"single", "set"}
    assert set(results["cmb"]["by"]) == {"rule", "exam_class", "exam_subject"}
    assert {i["rule"] for i in results["pubmedqa"]["items"]} == {"label"}
    assert "accuracy" in results["pubmedqa"]["ci95"]
