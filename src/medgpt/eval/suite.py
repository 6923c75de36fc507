"""A model's held-out evaluation on several sets at once, cached, and the paired comparison of two models.

`evaluate` loads the model once (one engine; the log-likelihood and perplexity scorers use its weights),
runs every set and writes `out_dir/<set>.json` with its items. A result is keyed by a hash of the model's
files (names, sizes, modification times), the data's bytes and the set's settings; with the same key it is
read back (from `out_dir`, else from the shared cache under `~/.cache/medgpt/eval`) without loading the
model. `compare_results` pairs two models' results item by item and gives each metric's difference with
its 95% paired-bootstrap interval (and McNemar's exact test for accuracy).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from medgpt.errors import UserError
from medgpt.eval import stats
from medgpt.files import ResultCache, files_fingerprint, folder_digest, read_keyed, value_digest, write_json

log = logging.getLogger(__name__)

KINDS = ("mcq", "qa", "ppl")
FORMAT = 1  # bump when a result's meaning changes: old cached results are then recomputed


@dataclass
class EvalSet:
    name: str  # e.g. "mcq", "qa"
    kind: str  # "mcq" (log-likelihood accuracy), "qa" (greedy answers: BLEU-4, ROUGE-L; plus "ppl"), "ppl"
    data: str  # path (file or C-Eval-style folder)
    split: str = "val"  # for mcq folders
    max_new_tokens: int = 96  # for qa
    limit: int | None = None  # first N items (per subject for mcq, as `eval mcq --limit`)
    format: str | None = None  # for mcq: a benchmark layout (`eval mcq --format`); default: detected


def default_eval_sets() -> list[EvalSet]:
    """The shipped sample sets: the MCQ val split (72 questions) and the QA file (48 answers)."""
    import medgpt

    sample = Path(medgpt.__file__).parent / "sample_data"
    return [EvalSet("mcq", "mcq", str(sample / "mcq")), EvalSet("qa", "qa", str(sample / "qa" / "medical_qa.jsonl"))]


def parse_eval_sets(value: Any) -> list[EvalSet]:
    """A pipeline config's `eval_sets:`: a list of mappings (name, kind, data, split, max_new_tokens, limit, and
    for mcq sets `format`: any layout `eval mcq --format` reads, detected when absent), or "none" for none."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return []
    if not isinstance(value, list):
        raise UserError(f"eval_sets: expected a list of {{name, kind, data}} mappings or 'none', got {value!r}")
    known = {f.name: f for f in fields(EvalSet)}
    sets: list[EvalSet] = []
    for i, entry in enumerate(value):
        where = f"eval_sets[{i}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a mapping with name, kind and data, got {entry!r}")
        where = f"eval_sets[{i}] ({entry.get('name', '?')})"
        unknown = sorted(set(entry) - set(known))
        if unknown:
            raise UserError(f"{where}: unknown key {', '.join(unknown)} (known: {', '.join(known)})")
        missing = [k for k in ("name", "kind", "data") if not entry.get(k)]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)}")
        if entry["kind"] not in KINDS:
            raise UserError(f"{where}: kind {entry['kind']!r}: expected one of {', '.join(KINDS)}")
        for key in ("max_new_tokens", "limit"):
            if entry.get(key) is not None and (isinstance(entry[key], bool) or not isinstance(entry[key], int)
                                               or entry[key] < 1):
                raise UserError(f"{where}: {key} must be a positive integer, got {entry[key]!r}")
        if not isinstance(entry["name"], str) or "/" in entry["name"] or entry["name"].startswith("."):
            raise UserError(f"{where}: name must be a plain word (it names the result file), got {entry['name']!r}")
        if any(s.name == entry["name"] for s in sets):
            raise UserError(f"{where}: the name {entry['name']!r} is used twice")
        if entry.get("format") is not None:
            from medgpt.eval.benchmarks import FORMATS

            if entry["kind"] != "mcq" or entry["format"] not in FORMATS:
                raise UserError(f"{where}: format {entry['format']!r}: an mcq set's format is one of "
                                f"{', '.join(FORMATS)}")
        if not Path(str(entry["data"])).expanduser().exists():
            raise UserError(f"{where}: data {entry['data']}: no such file or folder")
        sets.append(EvalSet(**{k: (str(v) if k in ("name", "kind", "data", "split", "format") else v)
                               for k, v in entry.items()}))
    return sets


# ---- caching -------------------------------------------------------------------------------------


def _model_files(model: str | None, adapter: str | None) -> list:
    from medgpt.models import resolve_model
    from medgpt.report.answers import REPORT_FILES

    folders = [resolve_model(model)] + ([resolve_model(adapter)] if adapter else [])
    return [files_fingerprint(f, skip=REPORT_FILES) for f in folders]


def set_key(model_files: list, template: str | None, s: EvalSet, precision: str) -> str:
    """What a set's result depends on: the model's files, template, the set and its data, and the precision the
    model runs in here (the same model gives other numbers in bf16 than in fp32)."""
    data = Path(s.data).expanduser()
    return value_digest({"format": FORMAT, "model": model_files, "template": template, "set": asdict(s),
                         "data": folder_digest(data) if data.exists() else None, "precision": precision})


# ---- running the sets ----------------------------------------------------------------------------


def _mcq(engine, s: EvalSet) -> dict:
    from medgpt.eval.benchmarks import FORMATS
    from medgpt.eval.mcq import LoglikScorer, evaluate_loglik, load_set, summarize

    fmt, questions = load_set(s.data, s.split, limit=s.limit, fmt=s.format)
    scorer = LoglikScorer(engine.model, engine.tokenizer, engine.template, batch_size=8)
    items = evaluate_loglik(scorer, questions, {}, FORMATS[fmt].style, True, 2048)
    summary = summarize(items)
    return {"metrics": {"accuracy": summary["overall"]["accuracy"]}, "format": fmt, "subjects": summary["subjects"],
            "by": summary["by"], "items": items}


def _qa(engine, s: EvalSet) -> dict:
    from medgpt.eval.gen import read_rows, score_pairs
    from medgpt.infer.base import GenerationParams

    rows = read_rows(s.data, ("question", "answer"))[:s.limit]
    log.info("eval %s: %d greedy answers, at most %d new tokens each", s.name, len(rows), s.max_new_tokens)
    completions = engine.generate([[{"role": "user", "content": r["question"]}] for r in rows],
                                  GenerationParams(max_new_tokens=s.max_new_tokens, temperature=0.0))
    preds = [c.text for c in completions]
    metrics, scores = score_pairs(preds, [r["answer"] for r in rows])
    items = [{"id": str(i), "loc": r["_loc"], "question": r["question"], "answer": r["answer"], "prediction": p,
              "finish_reason": c.finish_reason, **sc}
             for i, (r, p, c, sc) in enumerate(zip(rows, preds, completions, scores))]
    return {"metrics": {"bleu": metrics["bleu-4"], "rouge-l": metrics["rouge-l"], "rouge-1": metrics["rouge-1"],
                        "rouge-2": metrics["rouge-2"]}, "items": items}


def _ppl(engine, s: EvalSet) -> dict:
    from medgpt.eval.ppl import answer_nll, read_conversations, summarize

    conversations = read_conversations(s.data, s.limit)
    scores = answer_nll(engine.model, engine.tokenizer, engine.template, [m for _, m in conversations])
    return summarize([loc for loc, _ in conversations], scores)


def evaluate(model: str | None, adapter: str | None, template: str | None, sets: list[EvalSet],
             out_dir: Path) -> dict:
    """Run every set on one loaded model; returns {set name: result} and writes out_dir/<set>.json each.

    A "qa" set gives BLEU-4 and ROUGE of greedy answers and, on the same rows, the answer perplexity."""
    from medgpt.models import cache_dir, inference_precision

    out_dir = Path(out_dir)
    model_files = _model_files(model, adapter)
    precision = inference_precision()
    shared = ResultCache(cache_dir() / "eval")
    results: dict[str, dict] = {}
    todo: list[tuple[EvalSet, str]] = []
    for s in sets:
        key = set_key(model_files, template, s, precision)
        cached = read_keyed(out_dir / f"{s.name}.json", key) or shared.get(key)
        if cached is not None:
            log.info("eval %s: cached (%s)", s.name, out_dir / f"{s.name}.json")
            results[s.name] = cached
            if not (out_dir / f"{s.name}.json").exists():
                write_json(out_dir / f"{s.name}.json", cached)
        else:
            todo.append((s, key))
    if todo:
        from medgpt.infer.engine import load_engine

        engine = load_engine(model, adapter=adapter, template=template, max_batch_size=64)
        try:
            for s, key in todo:
                started = time.perf_counter()
                if s.kind == "mcq":
                    result = _mcq(engine, s)
                elif s.kind == "ppl":
                    result = _ppl(engine, s)
                else:
                    result = _qa(engine, s)
                    ppl = _ppl(engine, s)
                    result["metrics"].update(ppl["metrics"])
                    for item, p in zip(result["items"], ppl["items"]):
                        item.update({k: p[k] for k in ("nll", "nll_sum", "tokens")})
                result = {"key": key, "set": asdict(s), "model": model, "adapter": adapter, "template": template,
                          "n": len(result["items"]), "seconds": round(time.perf_counter() - started, 1), **result}
                result["ci95"] = intervals(result)
                log.info("eval %s: %s (%d items, %.0f s)", s.name,
                         ", ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items()), result["n"],
                         result["seconds"])
                write_json(out_dir / f"{s.name}.json", result)
                shared.put(key, result)
                results[s.name] = result
        finally:
            engine.close()
    return {s.name: results[s.name] for s in sets}


# ---- intervals and paired comparison -------------------------------------------------------------


def intervals(result: dict) -> dict[str, list[float]]:
    """The 95% bootstrap interval of each metric of one result."""
    return {m: ci for m in result["metrics"] if (ci := stats.interval(m, result["items"])) is not None}


def compare_results(before: dict, after: dict) -> dict:
    """Per set and metric: before, after, diff, ci95 (paired bootstrap over the items both have, by id),
    significant (the interval excludes 0), and p_mcnemar for accuracy."""
    out: dict[str, dict] = {}
    for name in [n for n in before if n in after]:
        b_items, a_items = before[name]["items"], after[name]["items"]
        if len(b_items) != len(a_items):
            log.warning("eval %s: %d items before, %d after; comparing the ones both hold", name, len(b_items),
                        len(a_items))
        out[name] = {}
        for metric in [m for m in before[name]["metrics"] if m in after[name]["metrics"]]:
            test = stats.paired(metric, b_items, a_items)
            if test is not None:
                b_value, a_value = before[name]["metrics"][metric], after[name]["metrics"][metric]
                out[name][metric] = {"before": b_value, "after": a_value, "diff": a_value - b_value, **test}
    return out
