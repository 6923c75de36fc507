"""A report as a document: sections of text, tables and images built from the stages, their answers and the
pipeline's evaluation, rendered as Markdown and as self-contained HTML."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgpt.data.rows import read_log
from medgpt.files import read_json
from medgpt.report.answers import MAX_NEW_TOKENS, Answer, ModelRef
from medgpt.report.labels import (EVAL_METRICS, FINAL_METRICS, eval_metric_name, metric_label, metric_text, number_text,
                                  x_label)
from medgpt.report.plots import plot_curves
from medgpt.report.settings import META_FILE, SETTINGS_FILE, recorded_settings, settings_rows


@dataclass
class StageResult:
    """One trained stage: its output folder (metrics.jsonl, final_metrics.json, data_stats.json) and the
    model that answers for it (None for a reward model, which scores rather than answers)."""

    name: str
    stage: str
    folder: Path
    answers_from: ModelRef | None = None


# ---- document ----------------------------------------------------------------------------------
# A report is a list of sections; a section is (title, blocks); a block is ("text", str),
# ("table", headers, rows) or ("image", file name, png bytes). A table cell is text or an Answer.
# Both renderers walk the same structure.


def final_metric_meaning(key: str) -> str:
    if key in FINAL_METRICS:
        return FINAL_METRICS[key]
    found = metric_label(key)
    return found[1] if found else ""


def stage_section(result: StageResult) -> tuple[str, list]:
    """Hyperparameters, data counts, curves and final metrics of one stage."""
    blocks: list = [("text", f"Stage `{result.stage}`, output `{result.folder}`.")]
    title = result.name if result.name == result.stage else f"{result.name} ({result.stage})"
    rows = read_log(result.folder / "metrics.jsonl")
    settings = recorded_settings(result.folder)
    steps = [r["step"] for r in rows if isinstance(r.get("step"), int)]
    if settings:
        blocks.append(("table", ["setting", "value"], settings_rows(settings, result.folder, max(steps, default=0))))
    else:
        blocks.append(("text", f"No settings recorded ({SETTINGS_FILE} and {META_FILE} are missing)."))
    stats = read_json(result.folder / "data_stats.json", {})
    if stats:
        table = []
        for split, s in stats.items():
            if not isinstance(s, dict):
                continue
            reasons = ", ".join(f"{reason}: {n}" for reason, n in (s.get("dropped") or {}).items()) or "-"
            table.append([split, s.get("read", "?"), s.get("kept", "?"), sum((s.get("dropped") or {}).values()),
                          s.get("truncated", 0), reasons])
        blocks.append(("table", ["data", "read", "kept", "dropped", "truncated", "dropped by reason"], table))
    png = plot_curves(rows, f"{title}: training curves", result.stage, (settings or {}).get("values"))
    if png:
        blocks.append(("image", f"{result.name}.png", png))
        blocks.append(("text", f"x: {x_label(result.stage)}. Solid lines: training batches (the mean over each "
                               "logging interval); dashed lines with squares: the eval set."))
    else:
        blocks.append(("text", "No training curves logged (metrics.jsonl is empty or missing)."))
    metrics = read_json(result.folder / "final_metrics.json", {})
    numeric = [[k, number_text(v), final_metric_meaning(k)] for k, v in sorted(metrics.items())
               if isinstance(v, (int, float))]
    if numeric:
        blocks.append(("table", ["final metric", "value", "what it is"], numeric))
    return title, blocks


def answers_section(prompts: list[list[dict]], answers: dict[str, list[Answer]],
                    max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[str, list]:
    headers = ["prompt", *answers]
    rows = [[messages[-1]["content"], *(answers[label][i] for label in answers)] for i, messages in enumerate(prompts)]
    cut = sum(a.cut for column in answers.values() for a in column)
    note = (f"Greedy decoding, the same prompts for every model, at most {max_new_tokens} new tokens; "
            f"an answer that reached that limit is marked \"cut at N tokens\" ({cut} of "
            f"{sum(len(c) for c in answers.values())} here).")
    for label, column in answers.items():
        if thought := [a for a in column if a.reasoning is not None]:
            note += (f" {label}: {len(thought)} of {len(column)} answers reasoned first (mean "
                     f"{sum(a.reasoning_chars for a in thought) / len(thought):.0f} characters of reasoning, "
                     f"{sum(a.unanswered for a in thought)} cut inside it); the table shows the answers after it.")
    return "Answers side by side", [("text", note), ("table", headers, rows)]


# The evaluation metrics a report shows (each result also keeps ROUGE-1/2 and the NLL): what each is, and which way
# is better.


def evaluation_section(evaluation: dict[str, Any]) -> tuple[str, list]:
    """Every model's held-out metrics, then each stage's change against the model it started from, with the
    95% confidence interval of the paired difference (paired bootstrap over items; McNemar's exact test for
    accuracy): a change whose interval crosses 0 is marked "not significant"."""
    models: dict[str, dict] = evaluation["models"]
    columns = []  # (set, metric) in the order the sets and their metrics come
    for sets in models.values():
        for set_name, result in sets.items():
            columns += [(set_name, m) for m in (result.get("metrics") or {}) if m in EVAL_METRICS
                        and (set_name, m) not in columns]
    rows = []
    for label, sets in models.items():
        row = [label]
        for set_name, metric in columns:
            result = sets.get(set_name) or {}
            value = metric_text(metric, (result.get("metrics") or {}).get(metric))
            ci = (result.get("ci95") or {}).get(metric)
            row.append(f"{value} [{metric_text(metric, ci[0])}, {metric_text(metric, ci[1])}]" if ci else value)
        rows.append(row)
    sizes = ", ".join(f"{name}: {r.get('n', '?')} items" for name, r in next(iter(models.values())).items())
    blocks: list = [("text", f"Held-out sets ({sizes}), greedy decoding; each value with its 95% confidence "
                             "interval where the set has one."),
                    ("table", ["model", *(eval_metric_name(s, m) for s, m in columns)], rows)]
    changes = []
    for c in evaluation.get("changes", []):
        metric = c["metric"]
        ci = c.get("ci95") or [None, None]
        verdict = "significant" if c.get("significant") else "not significant"
        if c.get("p_mcnemar") is not None:
            verdict += f" (McNemar p = {c['p_mcnemar']:.3g})"
        changes.append([c["stage"], f"{c['from']} → {c['to']}", eval_metric_name(c["set"], metric),
                        metric_text(metric, c.get("before")), metric_text(metric, c.get("after")),
                        _signed(metric_text(metric, c.get("diff"))),
                        f"[{_signed(metric_text(metric, ci[0]))}, {_signed(metric_text(metric, ci[1]))}]", verdict])
    if changes:
        blocks.append(("text", "What each stage changed: after − before on the same items, with the 95% "
                               "confidence interval of the paired difference; an interval that crosses 0 is "
                               "not significant."))
        blocks.append(("table", ["stage", "models", "metric", "before", "after", "change", "95% CI", "verdict"],
                       changes))
    return "Evaluation before and after each stage", blocks


PARITY_HEADERS = ["pair", "precision", "max |Δ log-prob| (tolerance)", "top-1 agreement", "greedy agreement",
                  "verdict"]


def parity_rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per pair of a parity result (`medgpt.eval.parity.run_parity`), under PARITY_HEADERS."""
    rows = []
    for p in result["pairs"]:
        if p.get("skipped"):
            rows.append([p["pair"], p["precision"], "-", "-", "-", f"skipped: {p['skipped']}"])
            continue
        verdict = "pass" if p["passed"] else "FAIL: " + "; ".join(p["failures"])
        rows.append([p["pair"], p["precision"], f"{p['max_logprob_delta']:.2g} (≤ {p['tolerance']['logprob']:g})",
                     f"{p['top1_agreement']:.4f}", f"{p['greedy_agreement']:.3f}", verdict])
    return rows


def safety_section(safety: dict[str, dict]) -> tuple[str, list]:
    """Each model's refusal rate on the harmful safety set (higher is safer) and over-refusal rate on the benign
    look-alikes (lower is more useful), with 95% bootstrap intervals (`medgpt eval safety` results by model)."""

    def rate(s: dict) -> str:
        if s.get("mean") is None:
            return "n/a"
        return f"{100 * s['mean']:.1f}% [{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}] (n={s['n']})"

    rows = [[label, rate(r["harmful"]["refusal_rate"]), rate(r["benign"]["over_refusal_rate"]),
             str(r["harmful"]["unanswered"] + r["benign"]["unanswered"]), r["classifier"]] for label, r in safety.items()]
    classifiers = {r["classifier"] for r in safety.values()}
    how = ("a judge model's verdicts" if classifiers == {"judge"} else
           "a refusal-phrase matcher on each reply's opening (English and Chinese; blind to refusals worded "
           "otherwise)" if classifiers == {"phrases"} else "the classifier named in each row")
    return "Safety", [("text", "Replies to requests a medical assistant must decline (harmful) and to look-alike "
                               f"requests it must answer (benign), classified as refusals by {how}; 95% bootstrap "
                               "intervals. Higher refusal on harmful is safer; lower over-refusal on benign is "
                               "more useful."),
                      ("table", ["model", "refusal (harmful)", "over-refusal (benign)", "unanswered", "classifier"],
                       rows)]


def parity_section(result: dict[str, Any]) -> tuple[str, list]:
    """The final model against itself in every runtime (`medgpt parity`)."""
    text = (f"The final model in every runtime against the reference, on {result['prompts']} prompts: the largest "
            "difference of a teacher-forced token's log-prob, the share of positions with the same most likely "
            f"token, the share of prompts with the same greedy continuation ({result['max_new_tokens']} tokens). "
            "A pair passes when the log-prob difference is within its precision's tolerance and every other "
            "difference falls on a near-tie of the reference.")
    return "Parity across runtimes", [("text", text), ("table", PARITY_HEADERS, parity_rows(result))]


def _signed(text: str) -> str:
    return text if text == "-" or text.startswith("-") else f"+{text}"


def _md_cell(value: Any) -> str:
    if isinstance(value, Answer):
        text = _md_cell(value.text or "(empty)")
        return f"{text}<br>**[{value.marker}]**" if value.cut else text
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
code{background:#f3f3f3;padding:0 .2rem}.cut{display:inline-block;margin-top:.3rem;padding:0 .4rem;
border-radius:.3rem;background:#fde8c8;color:#8a4b00;font-size:.85em;white-space:nowrap}"""


def _inline_code(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html_cell(value: Any) -> str:
    if isinstance(value, Answer):
        text = html.escape(value.text or "(empty)")
        return f'{text}\n<span class="cut">{value.marker}</span>' if value.cut else text
    return html.escape(str(value))


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
                rows = "".join("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>"
                               for row in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{HTML_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
