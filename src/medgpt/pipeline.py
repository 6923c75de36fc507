"""Several training stages in order, each starting from the model the one before it produced.

A pipeline config is the flat config of `medgpt train` (shared by every stage) plus:

- `stages`: a list of mappings, each with `stage` (pt, sft, rm, ppo, dpo, orpo, kto, grpo), an optional
  `name` (default: the stage) and that stage's own keys (`data`, `max_steps`, `beta`, ...);
- `output_dir`: the run folder; a stage writes into RUN/<name> unless it sets its own `output_dir`;
- `handoff`: `merge` (default) merges a LoRA stage into RUN/<name>/merged and the next stage starts a new
  adapter on it (DPO's reference is then the SFT model); `adapter` trains the same adapter further;
- `report_max_new_tokens`: answer length in the report (the prompts come from `report_prompts`);
- `eval_sets`: held-out sets that the base model and every stage's model are evaluated on after training
  (MCQ accuracy, QA BLEU/ROUGE-L, answer perplexity; default: the shipped sample sets, `none` for none); the
  report shows each stage's change with a 95% confidence interval;
- `parity`: true runs `medgpt parity` on the final model after training (the engine and the GGUF in f16 and q8_0
  against the model in transformers; RUN/parity.json) and the report shows its table;
- `safety`: true (or a mapping of `eval safety`'s settings: classifier, judge_url, judge_model, judge_api_key_env,
  json_schema, sets, max_new_tokens, limit) answers the safety sets with the base model and every stage's model,
  and the report shows each one's refusal rate on harmful requests and over-refusal rate on benign ones
  (RUN/safety/<label>.json).

A reward-model stage (rm) is not the next policy: it starts on the current policy's model, and the next
stage that takes `reward_model` (ppo, grpo) gets its output. RUN/manifest.json records every finished
stage with a hash of its config and inputs (data file contents, the previous stage's entry): re-running
the same config skips finished stages, a changed stage re-runs with everything after it, `start_from`
forces a restart at a stage, and an interrupted stage resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import re
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgpt import DEFAULT_MODEL
from medgpt.config import ALIASES, Config, parse_overrides, read_yaml
from medgpt.errors import UserError
from medgpt.files import files_fingerprint, folder_digest, is_main_process, value_digest, write_json
from medgpt.stages import stage_facts

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
HANDOFFS = ("merge", "adapter")
DEFAULT_STAGES = [{"stage": "pt"}, {"stage": "sft"}, {"stage": "dpo"}]
PIPELINE_KEYS = ("stages", "handoff", "output_dir", "report_max_new_tokens", "eval_sets", "parity", "safety")
# Keys that change how a stage runs but not what it produces: left out of its hash.
CONTROL_KEYS = ("resume", "report_prompts")
DATA_KEYS = ("data", "eval_data")
MODEL_KEYS = ("model", "adapter", "reward_model")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Stage:
    """One stage, its flat config (validated) and the model it hands to the next stage."""

    name: str
    kind: str
    raw: dict[str, Any]
    cfg: Config
    merge: bool  # merge its adapter into output/merged when done
    produces: dict[str, str | None] | None  # the next policy {"model", "adapter"}; None for a reward model

    @property
    def output_dir(self) -> Path:
        return self.cfg.output_dir


@dataclass
class Pipeline:
    run_dir: Path
    handoff: str
    stages: list[Stage]
    base: dict[str, str | None]
    template: str
    report_prompts: str | None
    report_max_new_tokens: int
    eval_sets: list = field(default_factory=list)  # medgpt.eval.suite.EvalSet
    parity: bool = False  # run `medgpt parity` on the final model
    safety: dict | None = None  # `eval safety` settings: every model's refusal rates in the report


@dataclass
class Step:
    """What a run will do with one stage: skip | resume | finish (merge only) | train."""

    stage: Stage
    action: str
    hash: str
    entry: dict[str, Any] = field(default_factory=dict)


# ---- building ----------------------------------------------------------------------------------


def load_pipeline(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None) -> Pipeline:
    """A pipeline from YAML plus command-line overrides (see `build_pipeline`)."""
    raw = read_yaml(path) if path else {}
    return build_pipeline(raw, parse_overrides(overrides) if isinstance(overrides, list) else overrides)


def _canonical(raw: dict[str, Any]) -> dict[str, Any]:
    return {ALIASES.get(k, k): v for k, v in raw.items()}


def _accepts(kind: str, key: str) -> bool:
    """Whether stage `kind`'s config has the option `key` (e.g. reward_model)."""
    from medgpt.train import stage_module

    module = stage_module(kind)
    classes = [module.CONFIG_CLASS, *filter(None, [getattr(module, "STAGE_ARGS", None)])]
    return any(key in {f.name for f in dataclasses.fields(cls)} for cls in classes)


def build_pipeline(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> Pipeline:
    """Validate every stage (unknown keys, values, each stage's own `configure` checks, missing data) before
    any of them runs, and wire each stage's model to the one before it.

    `overrides` win over the config: `key` over the shared keys and every stage's own, `NAME.key` over
    stage NAME's.
    """
    per_stage: dict[str, dict[str, Any]] = defaultdict(dict)
    everywhere: dict[str, Any] = {}
    for key, value in _canonical(overrides or {}).items():
        name, dot, sub = key.partition(".")
        if dot:
            per_stage[name][ALIASES.get(sub, sub)] = value
        elif key in PIPELINE_KEYS or key in ("model", "adapter", "report_prompts"):
            raw = {**raw, key: value}
        else:
            everywhere[key] = value
    shared = _canonical(raw)
    items = shared.pop("stages", DEFAULT_STAGES)
    handoff = str(shared.pop("handoff", "merge"))
    if handoff not in HANDOFFS:
        raise UserError(f"handoff {handoff!r}: expected one of {', '.join(HANDOFFS)}")
    run_dir = Path(str(shared.pop("output_dir", "outputs/pipeline")))
    max_new_tokens = shared.pop("report_max_new_tokens", 128)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"report_max_new_tokens {max_new_tokens!r}: expected a positive integer")
    if not isinstance(items, list) or not items:
        raise UserError("stages: expected a non-empty list of mappings, each with `stage:`")
    eval_sets = _eval_sets(shared.pop("eval_sets", None))
    parity = shared.pop("parity", False)
    if not isinstance(parity, bool):
        raise UserError(f"parity {parity!r}: expected true or false")
    safety = _safety(shared.pop("safety", None))
    report_prompts = shared.pop("report_prompts", None)
    if report_prompts is not None:
        report_prompts = str(report_prompts)
    policy: dict[str, str | None] = {"model": str(shared.pop("model", DEFAULT_MODEL)),
                                     "adapter": shared.pop("adapter", None)}
    base = dict(policy)
    reward_model: str | None = None
    stages: list[Stage] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "stage" not in item:
            raise UserError(f"stages[{i}]: expected a mapping with `stage:` (one of pt, sft, rm, ppo, dpo, orpo, kto, grpo)")
        own = _canonical(item)
        name = str(own.pop("name", own["stage"]))
        if not NAME.match(name):
            raise UserError(f"stages[{i}]: name {name!r}: use letters, digits, '.', '_' or '-'")
        if any(s.name == name for s in stages):
            raise UserError(f"stages[{i}]: two stages are named {name!r}: give one a `name:`")
        own.update({**everywhere, **per_stage.pop(name, {})})
        stage = _build_stage(name, own, shared, policy, reward_model, handoff, run_dir)
        if any(s.output_dir == stage.output_dir for s in stages):
            raise UserError(f"stage {name}: output_dir {stage.output_dir} is used by another stage")
        stages.append(stage)
        if stage.produces is None:
            reward_model = str(stage.output_dir)
        else:
            policy = stage.produces
    if per_stage:
        raise UserError(f"overrides for unknown stage(s) {', '.join(sorted(per_stage))}: the stages are "
                        f"{', '.join(s.name for s in stages)}")
    return Pipeline(run_dir=run_dir, handoff=handoff, stages=stages, base=base,
                    template=str(stages[0].cfg.model.template), report_prompts=report_prompts,
                    report_max_new_tokens=max_new_tokens, eval_sets=eval_sets, parity=parity, safety=safety)


SAFETY_KEYS = ("classifier", "judge_url", "judge_model", "judge_api_key_env", "json_schema", "sets", "max_new_tokens",
               "limit")


def _safety(value: Any) -> dict | None:
    """The `safety:` of a pipeline config: false/absent = none, true = the phrase classifier on the shipped sets,
    or a mapping of SAFETY_KEYS."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict) or set(value) - set(SAFETY_KEYS):
        raise UserError(f"safety {value!r}: expected true, false or a mapping of {', '.join(SAFETY_KEYS)}")
    if value.get("classifier") not in (None, "judge", "phrases"):
        raise UserError(f"safety.classifier {value['classifier']!r}: expected judge or phrases")
    if value.get("classifier") == "judge" and not value.get("judge_url"):
        raise UserError("safety.classifier judge needs safety.judge_url")
    return dict(value)


def _eval_sets(value: Any) -> list:
    """The `eval_sets:` of a pipeline config: None = the shipped sample sets, `none` = no evaluation."""
    from medgpt.eval.suite import default_eval_sets, parse_eval_sets

    return default_eval_sets() if value is None else parse_eval_sets(value)


def _build_stage(name: str, own: dict[str, Any], shared: dict[str, Any], policy: dict[str, str | None],
                 reward_model: str | None, handoff: str, run_dir: Path) -> Stage:
    from medgpt.train import build_config

    kind = str(own["stage"])
    raw = {**shared, **own}
    if "model" not in own and "adapter" not in own:
        raw["model"] = policy["model"]
        raw.pop("adapter", None)
        if policy["adapter"] and not stage_facts(kind).score_head:  # a reward model starts an adapter with its head
            raw["adapter"] = policy["adapter"]
    if reward_model and "reward_model" not in own and _accepts(kind, "reward_model"):
        raw["reward_model"] = reward_model
    raw.setdefault("output_dir", str(run_dir / name))
    raw["report_prompts"] = "none"  # the pipeline writes one report for all stages
    try:
        cfg = build_config(dict(raw))
    except UserError as exc:
        raise UserError(f"stage {name}: {exc}") from None
    if not cfg.data.data:
        raise UserError(f"stage {name}: no training data: set `data:` in its entry (or --{name}.data PATH)")
    out = str(cfg.output_dir)
    lora = cfg.run.method != "full"
    if stage_facts(kind).score_head:  # a reward model: what later stages take as reward_model, not as policy
        produces = None
    elif lora and handoff == "merge":
        produces = {"model": str(Path(out) / "merged"), "adapter": None}
    elif lora:
        produces = {"model": cfg.model.model, "adapter": out}
    else:
        produces = {"model": out, "adapter": None}
    return Stage(name=name, kind=kind, raw=raw, cfg=cfg, merge=lora and handoff == "merge" and produces is not None,
                 produces=produces)


# ---- hashing and the manifest ------------------------------------------------------------------


def _inputs(value: Any) -> list:
    """Content hashes of the local files a data option names; a hub name stands for itself."""
    items = value if isinstance(value, list) else str(value).split(",")
    out = []
    for item in (str(i).strip() for i in items):
        path = Path(item).expanduser()
        out.append([item, folder_digest(path) if path.exists() else None])
    return out


def stage_hash(stage: Stage, previous: dict[str, Any] | None, made: set[str] = frozenset()) -> str:
    """The hash of what a stage produces from: its config, its data files' contents, the models it starts
    from (local folders by their files; those in `made`, which earlier stages wrote, through the previous
    stage's manifest entry) and the medgpt version."""
    from medgpt import __version__
    from medgpt.report.answers import REPORT_FILES

    config = {k: v for k, v in stage.raw.items() if k not in CONTROL_KEYS}
    local = [k for k in MODEL_KEYS if config.get(k) and str(config[k]) not in made
             and Path(str(config[k])).expanduser().exists()]
    parts = {
        "config": config,
        "data": {k: _inputs(config[k]) for k in DATA_KEYS if config.get(k)},
        "models": {k: files_fingerprint(config[k], skip=REPORT_FILES) for k in local},
        "previous": previous,
        "medgpt": __version__,
    }
    return value_digest(parts)[:16]


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST
    if not path.exists():
        return {"stages": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg}); delete it to start the run again") from None
    manifest.setdefault("stages", {})
    return manifest


def _complete(stage: Stage) -> bool:
    from medgpt.models import read_meta

    trained = bool(read_meta(stage.output_dir).get("complete"))
    return trained and (not stage.merge or (stage.output_dir / "merged" / "config.json").exists())


def plan_steps(p: Pipeline, start_from: str | None = None, manifest: dict | None = None) -> list[Step]:
    """What a run would do with each stage, from the manifest (computed before anything runs)."""
    names = [s.name for s in p.stages]
    if start_from is not None and start_from not in names:
        kinds = [s.name for s in p.stages if s.kind == start_from]
        if len(kinds) != 1:
            raise UserError(f"--from {start_from}: expected one of the stage names {', '.join(names)}")
        start_from = kinds[0]
    manifest = manifest if manifest is not None else read_manifest(p.run_dir)
    steps: list[Step] = []
    previous: dict[str, Any] | None = None
    made: set[str] = set()
    forced = False
    for stage in p.stages:
        forced = forced or stage.name == start_from
        h = stage_hash(stage, previous, made)
        made.update({str(stage.output_dir), str(stage.output_dir / "merged")})
        entry = dict(manifest["stages"].get(stage.name) or {})
        same = entry.get("hash") == h and not forced
        status = entry.get("status")
        if same and status == "done" and _complete(stage):
            action = "skip"
        elif same and status == "trained" and (stage.output_dir / "medgpt.json").exists():
            action = "finish"
        elif same and status == "running":
            action = "resume"
        else:
            action = "train"
        runs = int(entry.get("run", 0))  # completed runs so far, under any config
        steps.append(Step(stage, action, h, {**entry, "hash": h, "run": runs}))
        previous = {"hash": h, "run": runs if action == "skip" else runs + 1}
    return steps


class _Processes:
    """Rank awareness under `accelerate launch` / `torchrun`: every process trains, the main one writes."""

    def __init__(self) -> None:
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            from medgpt.models import cuda_available

            self.state = PartialState(cpu=not cuda_available())

    @property
    def main(self) -> bool:
        return is_main_process()

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def _write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    write_json(run_dir / MANIFEST, manifest)


def _clear(stage: Stage) -> None:
    """A stage trained from scratch must not resume from, or hand over, what an older config left."""
    for old in [*stage.output_dir.glob("checkpoint-*"), stage.output_dir / "merged"]:
        shutil.rmtree(old, ignore_errors=True)
    (stage.output_dir / "medgpt.json").unlink(missing_ok=True)


# ---- running -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    stage: str
    action: str
    seconds: float
    output_dir: Path
    metrics: dict[str, Any]


def run_pipeline(p: Pipeline, start_from: str | None = None, report: bool = True) -> list[Outcome]:
    """Run the stages the plan says need running, record each in the manifest, then write the report."""
    from medgpt.models import cuda_available, merge_adapter
    from medgpt.report import write_training_report
    from medgpt.train import run_training

    procs = _Processes()
    manifest = read_manifest(p.run_dir)
    steps = plan_steps(p, start_from, manifest)
    if report:
        from medgpt.report.answers import load_prompts

        prompts = load_prompts(p.report_prompts)  # a bad prompts file fails before hours of training
    procs.wait()
    outcomes = []
    for step in steps:
        stage, entry = step.stage, step.entry
        started = time.time()
        log.info("stage %s (%s): %s", stage.name, stage.kind, step.action)
        if step.action in ("train", "resume"):
            if procs.main:
                if step.action == "train":
                    _clear(stage)
                entry.update(status="running", stage=stage.kind, output_dir=str(stage.output_dir),
                             started=time.strftime("%Y-%m-%dT%H:%M:%S"))
                manifest["stages"][stage.name] = entry
                _write_manifest(p.run_dir, manifest)
            procs.wait()
            cfg = dataclasses.replace(stage.cfg, run=dataclasses.replace(stage.cfg.run, resume=step.action == "resume"))
            metrics = run_training(cfg)
            if procs.main:
                write_training_report(cfg)
            del cfg
            gc.collect()
            entry.update(status="trained", metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            if procs.main:  # recorded before the merge: a run killed while merging resumes with the merge only
                manifest["stages"][stage.name] = entry
                _write_manifest(p.run_dir, manifest)
        if step.action != "skip":
            if procs.main:
                if stage.merge:
                    merge_adapter(str(stage.output_dir), str(stage.output_dir / "merged"), base=stage.cfg.model.model,
                                  dtype="bf16" if cuda_available() else "fp32",
                                  trust_remote_code=stage.cfg.model.trust_remote_code)
                entry.update(status="done", run=entry["run"] + 1, produces=stage.produces,
                             finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                             seconds=round(time.time() - started, 1))
                manifest["stages"][stage.name] = entry
                _write_manifest(p.run_dir, manifest)
            procs.wait()
        outcomes.append(Outcome(stage.name, stage.kind, step.action, time.time() - started, stage.output_dir,
                                entry.get("metrics", {})))
    if report and procs.main:
        evaluation = evaluate_pipeline(p)
        write_pipeline_report(p, manifest, prompts, evaluation, parity_of_final_model(p) if p.parity else None,
                              safety_of_models(p) if p.safety is not None else None)
    procs.wait()
    return outcomes


def policy_models(p: Pipeline) -> dict[str, Any]:
    """The models a pipeline's evaluation and report answers compare: the base model, then each policy stage's
    output, by label (a reward model scores rather than answers, and is left out)."""
    from medgpt.report.answers import ModelRef

    refs = {"base": ModelRef(str(p.base["model"]), p.base["adapter"], p.template)}
    for stage in p.stages:
        if stage.produces:
            refs[stage.name] = ModelRef(str(stage.produces["model"]), stage.produces["adapter"],
                                        stage.cfg.model.template)
    return refs


def evaluate_pipeline(p: Pipeline) -> dict[str, Any] | None:
    """Every model of the run on the `eval_sets`, one model in memory at a time (results cached under RUN/eval/,
    so a re-run evaluates only what changed), and what each stage changed against the model it started from:
    {"sets": [names], "models": {label: {set: result}}, "changes": [{"stage", "from", "set", "metric", ...}]}."""
    if not p.eval_sets:
        return None
    from medgpt.eval.suite import compare_results, evaluate

    refs = policy_models(p)
    results: dict[str, dict] = {}
    for label, ref in refs.items():
        started = time.time()
        results[label] = evaluate(ref.model, ref.adapter, ref.template, p.eval_sets, p.run_dir / "eval" / label)
        log.info("evaluated %s on %s in %.1fs", label, ", ".join(s.name for s in p.eval_sets), time.time() - started)
    labels = list(refs)
    pairs = [(after, before, after) for before, after in zip(labels, labels[1:])]
    if len(labels) > 2:
        pairs.append(("whole run", labels[0], labels[-1]))
    changes = [{"stage": name, "from": before, "to": after, "set": set_name, "metric": metric, **change}
               for name, before, after in pairs
               for set_name, metrics in compare_results(results[before], results[after]).items()
               for metric, change in metrics.items()]
    summary = {"sets": [s.name for s in p.eval_sets], "models": results, "changes": changes}
    slim = {**summary, "models": {label: {name: {k: v for k, v in r.items() if k != "items"} for name, r in sets.items()}
                                  for label, sets in results.items()}}
    write_json(p.run_dir / "eval" / "summary.json", slim)
    return summary


def safety_of_models(p: Pipeline) -> dict[str, dict]:
    """`eval safety` on the base model and every stage's model, by label, each written to RUN/safety/<label>.json
    (read back while the model's files, the sets and the settings are unchanged)."""
    from medgpt.eval.judge import AnswerSource
    from medgpt.eval.safety import default_sets, run_safety
    from medgpt.files import read_keyed
    from medgpt.judge import JudgeSettings

    s = p.safety or {}
    judge = JudgeSettings(url=s["judge_url"], model=s.get("judge_model"), json_schema=bool(s.get("json_schema")),
                          **({"api_key_env": s["judge_api_key_env"]} if s.get("judge_api_key_env") else {})) \
        if s.get("judge_url") else None
    results = {}
    for label, ref in policy_models(p).items():
        path = p.run_dir / "safety" / f"{label}.json"
        key = value_digest([ref.model, files_fingerprint(ref.model), ref.adapter,
                            files_fingerprint(ref.adapter) if ref.adapter else None, ref.template, s,
                            folder_digest(s.get("sets") or default_sets())])
        result = read_keyed(path, key)
        if result is None:
            answers = AnswerSource(model=ref.model, adapter=ref.adapter, template=ref.template,
                                   max_new_tokens=int(s.get("max_new_tokens", 256)),
                                   partial=p.run_dir / "safety" / f".{label}.partial.jsonl")
            result = run_safety(answers, judge=judge, classifier=s.get("classifier"), sets=s.get("sets"),
                                limit=s.get("limit"))
            write_json(path, {**result, "key": key})
        results[label] = {k: v for k, v in result.items() if k != "items"}
    return results


def final_model(p: Pipeline) -> dict[str, str | None]:
    """The model the last policy stage produced ({"model", "adapter"})."""
    produced = [s.produces for s in p.stages if s.produces is not None]
    return produced[-1] if produced else p.base


def parity_of_final_model(p: Pipeline) -> dict[str, Any]:
    """`medgpt parity` on the final model (its GGUF files exported under RUN/parity/), written to RUN/parity.json."""
    from medgpt.eval.parity import PARITY_FILE, run_parity
    from medgpt.report.answers import NO_PROMPTS

    final = final_model(p)
    template = next((s.cfg.model.template for s in reversed(p.stages) if s.produces), p.template)
    prompts = None if str(p.report_prompts).strip().lower() in NO_PROMPTS else p.report_prompts  # shipped ones
    result = run_parity(str(final["model"]), final["adapter"], prompts,
                        template=None if template == "auto" else template, work_dir=str(p.run_dir / "parity"))
    write_json(p.run_dir / PARITY_FILE, result)
    if not result["passed"]:
        log.warning("parity: the final model differs across runtimes beyond the tolerances (%s)",
                    p.run_dir / PARITY_FILE)
    return result


def write_pipeline_report(p: Pipeline, manifest: dict[str, Any], prompts: list[list[dict]],
                          evaluation: dict[str, Any] | None = None, parity: dict[str, Any] | None = None,
                          safety: dict[str, dict] | None = None) -> Path:
    from medgpt.report import write_report
    from medgpt.report.document import StageResult

    refs = policy_models(p)
    results, summary = [], []
    for stage in p.stages:
        entry = manifest["stages"].get(stage.name, {})
        results.append(StageResult(stage.name, stage.kind, stage.output_dir, refs.get(stage.name)))
        summary.append([stage.name, stage.kind, entry.get("status", "not run"), entry.get("seconds", ""),
                        str(stage.output_dir)])
    return write_report(p.run_dir, results, refs["base"], prompts, p.report_max_new_tokens,
                        title=f"medgpt pipeline report: {' -> '.join(s.name for s in p.stages)}", summary=summary,
                        evaluation=evaluation, parity=parity, safety=safety)
