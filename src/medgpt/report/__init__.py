"""Run reports: what each stage was set to (hyperparameters), what it was fed (data counts), what it learned
(curves, final metrics), and how its answers differ from the base model's on the same prompts.

A report is `report.md` (plots as PNG files beside it, in plots/) and `report.html`, self-contained (plots
embedded as base64 PNG) so it can be mailed or archived alone. Answers are cached in answers.json, keyed
by the model's files, the prompts and the generation settings, so writing a report again is cheap.
Every curve is named as a reader knows it (not by its log key) and every axis says what it measures.

Modules: `labels` (what the metrics are), `answers`, `plots`, `settings` (hyperparameters), `document`
(sections, Markdown and HTML); this package's top writes a report and a training run's report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from medgpt.errors import UserError
from medgpt.files import atomic_write, write_json
from medgpt.report.answers import ANSWERS_FILE, MAX_NEW_TOKENS, ModelRef, generate_answers, load_prompts
from medgpt.report.document import (StageResult, answers_section, evaluation_section, parity_section, safety_section,
                                    stage_section, to_html, to_markdown)
from medgpt.report.labels import facts_of
from medgpt.report.settings import SETTINGS_FILE, settled_settings

log = logging.getLogger(__name__)


def write_report(folder: str | Path, results: list[StageResult], base: ModelRef | None = None,
                 prompts: list[list[dict]] | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
                 title: str = "medgpt run report", summary: list[list] | None = None,
                 evaluation: dict[str, Any] | None = None, parity: dict[str, Any] | None = None,
                 safety: dict[str, dict] | None = None) -> Path:
    """Write folder/report.md (+ plots/) and folder/report.html; returns the markdown path.

    `base` and each stage's `answers_from` answer `prompts` (none: no answers section); `summary` is an
    optional table of stages (name, stage, status, seconds) shown first; `evaluation` (the pipeline's
    `evaluate_pipeline`) adds the held-out results of every model and what each stage changed; `parity` (a
    `medgpt parity` result) adds the final model's parity table; `safety` (`eval safety` results by model) adds
    each model's refusal and over-refusal rates.
    """
    folder = Path(folder)
    sections: list[tuple[str, list]] = []
    intro: list = [("text", f"Run folder `{folder.resolve()}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}.")]
    if summary:
        intro.append(("table", ["stage", "type", "status", "seconds", "output"], summary))
    sections.append(("Overview", intro))
    if evaluation:
        sections.append(evaluation_section(evaluation))
    if parity:
        sections.append(parity_section(parity))
    if safety:
        sections.append(safety_section(safety))
    sections += [stage_section(r) for r in results]
    refs = {"base": base} if base else {}
    refs.update({r.name: r.answers_from for r in results if r.answers_from})
    if prompts and refs:
        answers = generate_answers(refs, prompts, folder / ANSWERS_FILE, max_new_tokens)
        sections.append(answers_section(prompts, answers, max_new_tokens))
    for _, blocks in sections:
        for block in blocks:
            if block[0] == "image":
                atomic_write(folder / "plots" / block[1], block[2])
    atomic_write(folder / "report.html", to_html(title, sections))
    report = folder / "report.md"
    atomic_write(report, to_markdown(title, sections))
    log.info("report written: %s and %s", report, folder / "report.html")
    return report


def trained_model(cfg, folder: Path) -> ModelRef:
    """The model a finished stage produced: its LoRA adapter on the stage's model, or the full model."""
    if (folder / "adapter_config.json").exists():
        return ModelRef(cfg.model.model, str(folder), cfg.model.template)
    return ModelRef(str(folder), None, cfg.model.template)


def write_training_report(cfg) -> Path | None:
    """The report of one `medgpt train` run, in its output folder: the stage's settled settings (also kept in
    hyperparameters.json for later reports), curves, metrics and data, and the answers of the starting model
    and of the trained one (`report_prompts: none` turns answers off).

    Called by the command that trained (`medgpt train`, the pipeline) once the model is saved, on the main
    process only, so a failure here is logged and never loses a finished training.
    """
    folder = cfg.output_dir
    try:
        write_json(folder / SETTINGS_FILE, settled_settings(cfg))
        prompts = load_prompts(cfg.run.report_prompts)
        answers = not facts_of(cfg.run.stage).score_head  # a reward model scores, it does not answer
        result = StageResult(cfg.run.stage, cfg.run.stage, folder, trained_model(cfg, folder) if answers else None)
        base = ModelRef(cfg.model.model, cfg.model.adapter, cfg.model.template) if answers else None
        return write_report(folder, [result], base, prompts, title=f"medgpt {cfg.run.stage} report")
    except UserError as exc:
        log.error("the report of %s was not written: %s", folder, exc)
    except Exception:
        log.exception("the report of %s was not written", folder)
    return None
