"""Run reports: what each stage learned (curves, final metrics), what it was fed (data counts), and how its
answers differ from the base model's on the same prompts.

A report is `report.md` (plots as PNG files beside it, in plots/) and `report.html`, self-contained (plots
embedded as base64 PNG) so it can be mailed or archived alone. Answers are cached in answers.json, keyed
by the model's files, the prompts and the generation settings, so writing a report again is cheap.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import html
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medgpt.data.readers import read_log
from medgpt.errors import UserError

log = logging.getLogger(__name__)

SAMPLE_PROMPTS = Path(__file__).parent / "sample_data" / "prompts.jsonl"
NO_PROMPTS = ("none", "off", "false", "no", "")
MAX_NEW_TOKENS = 128
ANSWERS_FILE = "answers.json"
# Curves worth plotting, by panel: a metric goes to the first panel whose test accepts its name.
PANELS: list[tuple[str, Any]] = [
    ("loss", lambda k: k.endswith("loss") and not k.startswith("train_")),
    ("margin", lambda k: "margin" in k),
    ("accuracy", lambda k: "accurac" in k),
    ("KL", lambda k: k == "kl" or k.endswith(("/kl", "_kl")) or k.startswith("kl")),
    ("reward", lambda k: "reward" in k and not k.endswith("std")),
]


@dataclass
class ModelRef:
    """A model to answer with: a folder or hub id, optionally a LoRA adapter on it, and the chat template."""

    model: str
    adapter: str | None = None
    template: str | None = None


@dataclass
class StageResult:
    """One trained stage: its output folder (metrics.jsonl, final_metrics.json, data_stats.json) and the
    model that answers for it (None for a reward model, which scores rather than answers)."""

    name: str
    stage: str
    folder: Path
    answers_from: ModelRef | None = None


# ---- inputs ------------------------------------------------------------------------------------


def load_prompts(source: str | None) -> list[list[dict]]:
    """The report's prompts as message lists: `source` (jsonl of {"query"}, {"question"}, {"prompt"} or
    conversations), the shipped sample prompts when None, no prompts for `none`."""
    if source is not None and str(source).strip().lower() in NO_PROMPTS:
        return []
    from medgpt.data.records import read_prompts

    records, _ = read_prompts(str(source or SAMPLE_PROMPTS), "prompts")
    return [r["prompt"] for r in records]


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def files_fingerprint(path: str | Path) -> list:
    """Names, sizes and modification times of a folder's files (not its checkpoints): changes when a model
    is trained again, without reading gigabytes of weights."""
    path = Path(path).expanduser()
    if path.is_file():
        stat = path.stat()
        return [[path.name, stat.st_size, stat.st_mtime_ns]]
    if not path.is_dir():
        return []
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.iterdir()) if p.is_file()]


# ---- answers -----------------------------------------------------------------------------------


def _answers_key(ref: ModelRef, prompts: list[list[dict]], max_new_tokens: int) -> str:
    parts = {"ref": asdict(ref), "files": [files_fingerprint(p) for p in (ref.model, ref.adapter) if p],
             "prompts": prompts, "max_new_tokens": max_new_tokens}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def generate_answers(refs: dict[str, ModelRef], prompts: list[list[dict]], cache_file: Path,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, list[str]]:
    """Greedy answers of each model to the prompts, one model in memory at a time; cached answers are reused."""
    from tqdm.auto import tqdm

    from medgpt.infer.base import GenerationParams
    from medgpt.infer.engine import load_engine

    cache = read_json(cache_file)
    out: dict[str, list[str]] = {}
    for label, ref in tqdm(refs.items(), desc="report answers", disable=not refs):
        key = _answers_key(ref, prompts, max_new_tokens)
        if cache.get(label, {}).get("key") == key:
            out[label] = cache[label]["answers"]
            continue
        started = time.time()
        engine = load_engine(ref.model, adapter=ref.adapter, template=ref.template)
        completions = engine.generate(prompts, GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0))
        del engine
        gc.collect()
        out[label] = [c.text.strip() for c in completions]
        cache[label] = {"key": key, "answers": out[label]}
        write_text(cache_file, json.dumps(cache, indent=2, ensure_ascii=False))
        log.info("report: %s answered %d prompts in %.1fs", label, len(prompts), time.time() - started)
    return out


# ---- plots -------------------------------------------------------------------------------------


def plot_curves(rows: list[dict], title: str) -> bytes | None:
    """One PNG with a panel per kind of curve (loss, margin, reward, KL, accuracy) present in the log."""
    panels: dict[str, dict[str, tuple[list, list]]] = {}
    for row in rows:
        step = row.get("step")
        for key, value in row.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            panel = next((name for name, accepts in PANELS if accepts(key)), None)
            if panel is None or step is None:
                continue
            xs, ys = panels.setdefault(panel, {}).setdefault(key, ([], []))
            xs.append(step)
            ys.append(value)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _ in PANELS if name in panels]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for key, (xs, ys) in sorted(panels[name].items()):
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


# ---- document ----------------------------------------------------------------------------------
# A report is a list of sections; a section is (title, blocks); a block is ("text", str),
# ("table", headers, rows) or ("image", file name, png bytes). Both renderers walk the same structure.


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def stage_section(result: StageResult) -> tuple[str, list]:
    """Curves, final metrics and data counts of one stage."""
    blocks: list = [("text", f"Stage `{result.stage}`, output `{result.folder}`.")]
    png = plot_curves(read_log(result.folder / "metrics.jsonl"), f"{result.name} ({result.stage})")
    if png:
        blocks.append(("image", f"{result.name}.png", png))
    else:
        blocks.append(("text", "No training curves logged (metrics.jsonl is empty or missing)."))
    metrics = read_json(result.folder / "final_metrics.json")
    numeric = [[k, _number(v)] for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    if numeric:
        blocks.append(("table", ["final metric", "value"], numeric))
    stats = read_json(result.folder / "data_stats.json")
    if stats:
        rows = []
        for split, s in stats.items():
            if not isinstance(s, dict):
                continue
            reasons = ", ".join(f"{reason}: {n}" for reason, n in (s.get("dropped") or {}).items()) or "-"
            rows.append([split, s.get("read", "?"), s.get("kept", "?"), sum((s.get("dropped") or {}).values()),
                         s.get("truncated", 0), reasons])
        blocks.append(("table", ["data", "read", "kept", "dropped", "truncated", "dropped by reason"], rows))
    return f"{result.name} ({result.stage})", blocks


def answers_section(prompts: list[list[dict]], answers: dict[str, list[str]]) -> tuple[str, list]:
    headers = ["prompt", *answers]
    rows = [[messages[-1]["content"], *(answers[label][i] or "(empty)" for label in answers)]
            for i, messages in enumerate(prompts)]
    return "Answers side by side", [("text", "Greedy decoding, the same prompts for every model."),
                                    ("table", headers, rows)]


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def to_markdown(title: str, sections: list[tuple[str, list]]) -> str:
    lines = [f"# {title}", ""]
    for heading, blocks in sections:
        lines += [f"## {heading}", ""]
        for block in blocks:
            if block[0] == "text":
                lines += [block[1], ""]
            elif block[0] == "image":
                lines += [f"![{block[1]}](plots/{block[1]})", ""]
            else:
                headers, rows = block[1], block[2]
                lines.append("| " + " | ".join(map(_md_cell, headers)) + " |")
                lines.append("|" + "---|" * len(headers))
                lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
                lines.append("")
    return "\n".join(lines)


HTML_STYLE = """body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1400px;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.2rem}td,th{border:1px solid #ccc;padding:.35rem .6rem;
vertical-align:top;text-align:left}th{background:#f3f3f3}td{white-space:pre-wrap}img{max-width:100%}
code{background:#f3f3f3;padding:0 .2rem}"""


def _inline_code(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def to_html(title: str, sections: list[tuple[str, list]]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, blocks in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for block in blocks:
            if block[0] == "text":
                body.append(f"<p>{_inline_code(block[1])}</p>")
            elif block[0] == "image":
                data = base64.b64encode(block[2]).decode("ascii")
                body.append(f'<img alt="{html.escape(block[1])}" src="data:image/png;base64,{data}">')
            else:
                head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                               for row in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{HTML_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_text(path: Path, content: str | bytes) -> None:
    """Write to a temporary name and rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    tmp.replace(path)


def write_report(folder: str | Path, results: list[StageResult], base: ModelRef | None = None,
                 prompts: list[list[dict]] | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
                 title: str = "medgpt run report", summary: list[list] | None = None) -> Path:
    """Write folder/report.md (+ plots/) and folder/report.html; returns the markdown path.

    `base` and each stage's `answers_from` answer `prompts` (none: no answers section); `summary` is an
    optional table of stages (name, stage, status, seconds) shown first.
    """
    folder = Path(folder)
    sections: list[tuple[str, list]] = []
    intro: list = [("text", f"Run folder `{folder.resolve()}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}.")]
    if summary:
        intro.append(("table", ["stage", "type", "status", "seconds", "output"], summary))
    sections.append(("Overview", intro))
    sections += [stage_section(r) for r in results]
    refs = {"base": base} if base else {}
    refs.update({r.name: r.answers_from for r in results if r.answers_from})
    if prompts and refs:
        answers = generate_answers(refs, prompts, folder / ANSWERS_FILE, max_new_tokens)
        sections.append(answers_section(prompts, answers))
    for _, blocks in sections:
        for block in blocks:
            if block[0] == "image":
                write_text(folder / "plots" / block[1], block[2])
    write_text(folder / "report.html", to_html(title, sections))
    report = folder / "report.md"
    write_text(report, to_markdown(title, sections))
    log.info("report written: %s and %s", report, folder / "report.html")
    return report


def trained_model(cfg, folder: Path) -> ModelRef:
    """The model a finished stage produced: its LoRA adapter on the stage's model, or the full model."""
    if (folder / "adapter_config.json").exists():
        return ModelRef(cfg.model.model, str(folder), cfg.model.template)
    return ModelRef(str(folder), None, cfg.model.template)


def write_training_report(cfg) -> Path | None:
    """The report of one `medgpt train` run, in its output folder: the stage's curves, metrics and data,
    and the answers of the starting model and of the trained one (`report_prompts: none` turns answers off).

    Called after the model is saved, so a failure here is logged and never loses a finished training.
    """
    folder = cfg.output_dir
    try:
        prompts = load_prompts(cfg.run.report_prompts)
        answers = cfg.run.stage != "rm"
        result = StageResult(cfg.run.stage, cfg.run.stage, folder, trained_model(cfg, folder) if answers else None)
        base = ModelRef(cfg.model.model, cfg.model.adapter, cfg.model.template) if answers else None
        return write_report(folder, [result], base, prompts, title=f"medgpt {cfg.run.stage} report")
    except UserError as exc:
        log.error("the report of %s was not written: %s", folder, exc)
    except Exception:
        log.exception("the report of %s was not written", folder)
    return None
