"""The pipeline: stages wired to each other, every stage validated before any trains, a manifest that skips
finished stages, re-runs what a config change affects, restarts with --from and resumes an interrupted stage (a
stage killed while merging resumes with the merge only)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from medgpt.cli import main
from medgpt.errors import UserError
from medgpt.pipeline import build_pipeline, load_pipeline, plan_steps, read_manifest, run_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def tiny_config(model: str, sample_data: Path, run_dir: Path, **dpo) -> dict:
    """SFT -> DPO on the tiny model, two steps each, a checkpoint every step."""
    return {
        "output_dir": str(run_dir), "model": model, "per_device_train_batch_size": 2, "logging_steps": 1,
        "save_steps": 1, "report_to": "none", "report_max_new_tokens": 4, "eval_sets": "none",
        "stages": [
            {"stage": "sft", "data": str(sample_data / "sft" / "medical_sft.jsonl"), "max_length": 128, "max_steps": 2},
            {"stage": "dpo", "data": str(sample_data / "pref" / "medical_pref.jsonl"), "max_length": 128,
             "max_steps": 2, **dpo},
        ],
    }


def actions(steps) -> dict[str, str]:
    return {s.stage.name: s.action for s in steps}


@pytest.mark.slow
def test_pipeline_skips_restarts_and_resumes(tiny_model, sample_data, tmp_path, caplog):
    run_dir = tmp_path / "run"
    raw = tiny_config(tiny_model, sample_data, run_dir)
    first = run_pipeline(build_pipeline(raw))
    assert [(o.name, o.action) for o in first] == [("sft", "train"), ("dpo", "train")]
    manifest = read_manifest(run_dir)
    assert {e["status"] for e in manifest["stages"].values()} == {"done"}
    # DPO started from the merged SFT model, and trained its own adapter on it
    sft_merged = run_dir / "sft" / "merged"
    assert (sft_merged / "model.safetensors").exists()
    dpo_adapter = json.loads((run_dir / "dpo" / "adapter_config.json").read_text())
    assert Path(dpo_adapter["base_model_name_or_path"]) == sft_merged
    assert (run_dir / "dpo" / "merged" / "config.json").exists()
    # one report for the run, and each stage's own (written by `train`, without answers)
    assert "## Answers side by side" in (run_dir / "report.md").read_text()
    assert (run_dir / "sft" / "report.html").exists()

    # the same config again: nothing trains, the manifest is unchanged
    dpo_weights = run_dir / "dpo" / "adapter_model.safetensors"
    mtime = dpo_weights.stat().st_mtime_ns
    again = run_pipeline(build_pipeline(raw), report=False)
    assert [o.action for o in again] == ["skip", "skip"]
    assert read_manifest(run_dir) == manifest
    assert dpo_weights.stat().st_mtime_ns == mtime

    # a changed DPO option changes DPO's hash only; a changed SFT option re-runs everything after it too
    changed = plan_steps(build_pipeline(tiny_config(tiny_model, sample_data, run_dir, beta=0.5)))
    assert actions(changed) == {"sft": "skip", "dpo": "train"}
    assert changed[1].hash != manifest["stages"]["dpo"]["hash"]
    assert changed[0].hash == manifest["stages"]["sft"]["hash"]
    sft_changed = tiny_config(tiny_model, sample_data, run_dir)
    sft_changed["stages"][0]["learning_rate"] = 1e-3
    assert actions(plan_steps(build_pipeline(sft_changed))) == {"sft": "train", "dpo": "train"}

    # --from dpo trains DPO again from scratch and keeps SFT
    restarted = run_pipeline(build_pipeline(raw), start_from="dpo", report=False)
    assert [o.action for o in restarted] == ["skip", "train"]
    assert dpo_weights.stat().st_mtime_ns != mtime
    manifest = read_manifest(run_dir)
    assert (manifest["stages"]["sft"]["run"], manifest["stages"]["dpo"]["run"]) == (1, 2)

    # DPO interrupted after its first checkpoint: the next run resumes it there and trains only step 2
    entry = manifest["stages"]["dpo"]
    entry["status"] = "running"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(run_dir / "dpo" / "checkpoint-2")
    (run_dir / "dpo" / "medgpt.json").unlink()
    metrics = run_dir / "dpo" / "metrics.jsonl"
    before = [json.loads(line) for line in metrics.read_text().splitlines()]
    with caplog.at_level(logging.INFO, logger="medgpt"):
        resumed = run_pipeline(build_pipeline(raw), report=False)
    assert [o.action for o in resumed] == ["skip", "resume"]
    assert any("checkpoint-1" in r.getMessage() for r in caplog.records if r.getMessage().startswith("resume"))
    after = [json.loads(line) for line in metrics.read_text().splitlines()]
    kept = [row for row in before if row["step"] <= 1]
    assert after[:len(kept)] == kept  # the log of the interrupted run is kept up to its checkpoint
    new_steps = [row["step"] for row in after[len(kept):] if "loss" in row]
    assert new_steps == [2]  # step 2 is trained again and logged once, replacing the interrupted run's row
    assert read_manifest(run_dir)["stages"]["dpo"]["status"] == "done"


@pytest.mark.slow
def test_report_shows_what_each_stage_changed_on_held_out_sets(tiny_model, sample_data, tmp_path):
    """The pipeline evaluates the base model and every stage's model on its eval sets; the report's before/after
    table agrees with `medgpt eval mcq` run on its own on the same models (a separate code path: the command)."""
    run_dir = tmp_path / "run"
    raw = tiny_config(tiny_model, sample_data, run_dir)
    raw["stages"][1]["max_steps"] = 1
    raw["eval_sets"] = [
        {"name": "mcq", "kind": "mcq", "data": str(sample_data / "mcq"), "limit": 12},
        {"name": "qa", "kind": "qa", "data": str(sample_data / "qa" / "medical_qa.jsonl"), "limit": 6,
         "max_new_tokens": 8},
    ]
    raw["report_prompts"] = "none"
    raw["safety"] = {"limit": 1, "max_new_tokens": 4}  # the phrase classifier on the first item of each set
    run_pipeline(build_pipeline(raw))
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert list(summary["models"]) == ["base", "sft", "dpo"]
    stages = {(c["stage"], c["set"], c["metric"]) for c in summary["changes"]}
    for stage in ("sft", "dpo", "whole run"):
        assert {(stage, "mcq", "accuracy"), (stage, "qa", "rouge-l"), (stage, "qa", "ppl")} <= stages
    for c in summary["changes"]:
        lo, hi = c["ci95"]
        assert c["significant"] == (lo > 0 or hi < 0)
        before = summary["models"][c["from"]][c["set"]]["metrics"][c["metric"]]
        after = summary["models"][c["to"]][c["set"]]["metrics"][c["metric"]]
        assert c["diff"] == pytest.approx(after - before)
    # the same accuracy as the eval command on the SFT model
    out = tmp_path / "sft_mcq.json"
    assert main(["eval", "mcq", "--model", str(run_dir / "sft" / "merged"), "--data", str(sample_data / "mcq"),
                 "--split", "val", "--limit", "12", "--output", str(out)]) == 0
    alone = json.loads(out.read_text())
    assert summary["models"]["sft"]["mcq"]["metrics"]["accuracy"] == pytest.approx(alone["accuracy"])
    md = (run_dir / "report.md").read_text()
    assert "## Evaluation before and after each stage" in md
    assert "| sft | base → sft | mcq: accuracy (%) (higher is better) |" in md
    assert "answer perplexity (lower is better)" in md
    assert "## Safety" in md and all(f"| {label} | " in md.split("## Safety")[1] for label in ("base", "sft", "dpo"))
    assert json.loads((run_dir / "safety" / "dpo.json").read_text())["harmful"]["items"] == 1
    # a second run evaluates nothing again (cached by model files and data contents)
    mtime = (run_dir / "eval" / "sft" / "mcq.json").stat().st_mtime_ns
    run_pipeline(build_pipeline(raw))
    assert (run_dir / "eval" / "sft" / "mcq.json").stat().st_mtime_ns == mtime


def test_handoff_adapter_and_reward_model_wiring(tiny_model, sample_data, tmp_path):
    sft = str(sample_data / "sft" / "medical_sft.jsonl")
    pref = str(sample_data / "pref" / "medical_pref.jsonl")
    p = build_pipeline({"output_dir": str(tmp_path), "model": tiny_model, "handoff": "adapter", "stages": [
        {"stage": "sft", "data": sft}, {"stage": "rm", "data": pref},
        {"stage": "ppo", "data": sft}, {"stage": "dpo", "name": "dpo2", "data": pref}]})
    sft_stage, rm, ppo, dpo = p.stages
    assert (sft_stage.raw["model"], sft_stage.raw.get("adapter")) == (tiny_model, None)
    assert (rm.raw["model"], rm.raw.get("adapter")) == (tiny_model, None)  # a new adapter with a score head
    assert (ppo.raw["model"], ppo.raw["adapter"]) == (tiny_model, str(tmp_path / "sft"))
    assert ppo.raw["reward_model"] == str(tmp_path / "rm")
    assert dpo.raw["adapter"] == str(tmp_path / "ppo")  # the reward model is not the next policy
    assert dpo.output_dir == tmp_path / "dpo2"
    assert not any(s.merge for s in p.stages)


@pytest.mark.parametrize("change, message", [
    ({"stages": [{"stage": "sft", "data": "x.jsonl"}, {"stage": "dpo", "data": "y.jsonl", "betta": 0.1}]},
     "stage dpo: unknown config key(s) for stage dpo: betta (did you mean beta?)"),
    ({"stages": [{"stage": "sft", "data": "x.jsonl"}, {"stage": "dpo"}]}, "stage dpo: no training data"),
    ({"stages": [{"stage": "sft", "data": "x"}, {"stage": "sft", "data": "y"}]}, "two stages are named 'sft'"),
    ({"handoff": "copy"}, "handoff 'copy'"),
    ({"stages": [{"data": "x"}]}, "stages[0]: expected a mapping with `stage:`"),
    ({"stages": []}, "stages: expected a non-empty list"),
    ({"eval_sets": [{"name": "x", "kind": "essay", "data": "y"}]}, "eval_sets[0] (x): kind 'essay'"),
    # each stage's own checks (its `configure`) run for every stage before the first one starts
    ({"stages": [{"stage": "sft", "data": "x"}, {"stage": "ppo", "data": "y", "reward_fn": "length", "val_size": 0.1}]},
     "stage ppo: ppo has no evaluation split"),
    ({"stages": [{"stage": "sft", "data": "x"}, {"stage": "ppo", "data": "y"}]}, "stage ppo: ppo needs a reward"),
    ({"stages": [{"stage": "sft", "data": "x"}, {"stage": "grpo", "data": "y", "val_size": 0.1,
                                                  "per_device_eval_batch_size": 3}]},
     "stage grpo: invalid training options: The global eval batch size (3 * 1) must be divisible"),
    ({"stages": [{"stage": "sft", "data": "x"}, {"stage": "grpo", "data": "y", "reward_fn": "accuracy"}]},
     "stage grpo: reward_fn"),
    ({"stages": [{"stage": "pt", "data": "x", "block_size": 64, "max_length": 128}, {"stage": "sft", "data": "y"}]},
     "stage pt: block_size 64 and max_length 128 disagree"),
])
def test_bad_config_fails_before_anything_runs(tmp_path, change, message):
    raw = {"output_dir": str(tmp_path / "run"), "stages": [{"stage": "sft", "data": "x.jsonl"}], **change}
    with pytest.raises(UserError) as exc:
        build_pipeline(raw)
    assert message in str(exc.value)
    assert not (tmp_path / "run").exists()


def test_shipped_pipeline_configs_validate():
    configs = sorted(EXAMPLES.glob("pipeline_*.yaml"))
    assert len(configs) >= 10
    for path in configs:
        p = load_pipeline(path)
        assert p.stages, path
        assert all(s.cfg.data.data for s in p.stages), path
    default = load_pipeline(EXAMPLES / "pipeline_smollm2.yaml")
    assert [s.kind for s in default.stages] == ["pt", "sft", "dpo"]


def test_cli_dry_run_with_overrides(tiny_model, sample_data, tmp_path, capsys):
    import yaml

    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_model, sample_data, tmp_path / "run")))
    assert main(["pipeline", str(config), "--dry-run", "--max_steps", "3", "--dpo.beta", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "sft" in out and "dpo" in out and out.count(" train ") == 2
    p = load_pipeline(config, ["--max_steps", "3", "--dpo.beta", "0.3"])
    assert [s.cfg.train.max_steps for s in p.stages] == [3, 3]
    assert p.stages[1].cfg.train.beta == 0.3
    assert main(["pipeline", str(config), "--from", "nope", "--dry-run"]) == 2
    assert "--from nope" in capsys.readouterr().err
    assert main(["pipeline", str(config), "--dry-run", "--ppo.kl_coef", "0.1"]) == 2
    assert "unknown stage(s) ppo" in capsys.readouterr().err


def test_a_pipeline_stage_killed_while_merging_resumes_with_the_merge_only(tmp_path, sample_data, monkeypatch):
    from medgpt import models, train
    from medgpt.pipeline import build_pipeline, plan_steps, read_manifest, run_pipeline

    run_dir = tmp_path / "run"
    p = build_pipeline({"output_dir": str(run_dir), "report_to": "none", "stages": [
        {"stage": "sft", "data": str(sample_data / "sft" / "medical_sft.jsonl")}]})

    def trained(cfg):  # stands in for training: the stage's folder as a finished `train` leaves it
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        (cfg.output_dir / "medgpt.json").write_text(json.dumps({"stage": "sft", "complete": True}))
        return {"train_loss": 1.0}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run_training", trained)
    monkeypatch.setattr(models, "merge_adapter", killed)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(p, report=False)
    assert read_manifest(run_dir)["stages"]["sft"]["status"] == "trained"
    assert [s.action for s in plan_steps(p)] == ["finish"]  # no second training, only the merge
