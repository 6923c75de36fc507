"""Generation quality against reference answers: BLEU-1..4 (sacrebleu) and ROUGE-1/2/L.

BLEU: both libraries' default tokenizers score Chinese as zero (13a keeps a Chinese sentence as one
token), so text is tokenized here first and handed over pre-split: `char` splits CJK characters apart
and English into words (sacrebleu's own `zh` tokenizer), `jieba` splits into jieba words. BLEU-n is
cumulative BLEU with n-gram orders 1..n.

ROUGE, per pair: a reference with Chinese in it is scored the way the Chinese reference projects do
(ChatGLM's P-tuning evaluation and those built on it): the same tokens, punctuation removed, space-joined, scored by
`rouge-chinese`; any other pair is scored by `rouge-score` exactly as it ships (its tokenizer: lower-case,
letters and digits only; no stemming), so ROUGE of an English answer is the number everyone else reports.

A reasoning model's reply is scored on its answer after the think block; the reasoning is kept in the item, the
summary gives its mean length, and a reply that ended inside its reasoning is unanswered (scored as an empty
answer and counted).
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

from medgpt.data.readers import as_object, read_records
from medgpt.errors import UserError
from medgpt.eval.stats import bleu_stats
from medgpt.files import atomic_write, value_digest, write_json

log = logging.getLogger(__name__)

TOKENIZE = ("char", "jieba")
ORDERS = (1, 2, 3, 4)


@lru_cache(maxsize=None)
def _splitter(mode: str):
    if mode == "char":
        from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

        zh = TokenizerZh()
        return lambda text: zh(text).split()
    if mode == "jieba":
        import jieba

        jieba.setLogLevel(logging.WARNING)
        return lambda text: [w for w in jieba.lcut(text.strip()) if w.strip()]
    raise UserError(f"tokenize {mode!r}: expected one of {', '.join(TOKENIZE)}")


def tokenize(text: str, mode: str = "char") -> list[str]:
    return _splitter(mode)(text)


ROUGE = ("rouge-1", "rouge-2", "rouge-l")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _is_punctuation(token: str) -> bool:
    return all(unicodedata.category(ch)[0] in "PS" for ch in token)


def rouge_tokens(text: str, mode: str = "char") -> list[str]:
    """The tokens Chinese ROUGE counts: characters (or jieba words), English words, no punctuation."""
    return [t for t in tokenize(text, mode) if not _is_punctuation(t)]


_ROUGE_SCORE_KEYS = {"rouge-1": "rouge1", "rouge-2": "rouge2", "rouge-l": "rougeL"}


@lru_cache(maxsize=1)
def _rouge_score():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(list(_ROUGE_SCORE_KEYS.values()))


def rouge_scores(prediction: str, reference: str, mode: str = "char") -> dict[str, float]:
    """ROUGE-1/2/L F1 (0-100) of one pair: rouge-chinese on Chinese tokens when the reference holds Chinese,
    else rouge-score with its own tokenizer and defaults."""
    if _CJK.search(reference):
        try:
            from rouge_chinese import Rouge
        except ImportError:
            raise UserError("ROUGE of Chinese answers needs the rouge-chinese package: pip install rouge-chinese") \
                from None
        hyp, ref = " ".join(rouge_tokens(prediction, mode)), " ".join(rouge_tokens(reference, mode))
        if not hyp or not ref:
            return dict.fromkeys(ROUGE, 0.0)
        scores = Rouge().get_scores(hyp, ref)[0]
        return {k: round(100 * scores[k]["f"], 2) for k in ROUGE}
    scores = _rouge_score().score(reference, prediction)
    return {k: round(100 * scores[key].fmeasure, 2) for k, key in _ROUGE_SCORE_KEYS.items()}


def _bleu(order: int, sentence: bool):
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="none", max_ngram_order=order, effective_order=sentence)


def score_pairs(predictions: list[str], references: list[str], mode: str = "char") -> tuple[dict, list[dict]]:
    """Corpus BLEU-1..4 and mean ROUGE-1/2/L F1 (0-100), and the same per item."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    hyps = [" ".join(tokenize(p, mode)) for p in predictions]
    refs = [" ".join(tokenize(r, mode)) for r in references]
    items: list[dict] = [{} for _ in hyps]
    metrics: dict[str, float] = {}
    for n in ORDERS:
        metrics[f"bleu-{n}"] = round(_bleu(n, False).corpus_score(hyps, [refs]).score, 2)
        sentence = _bleu(n, True)
        for item, h, r in zip(items, hyps, refs):
            item[f"bleu-{n}"] = round(sentence.sentence_score(h, [r]).score, 2)
    for item, p, r, h, rt in zip(items, predictions, references, hyps, refs):
        item.update(rouge_scores(p, r, mode))
        item["bleu_stats"] = bleu_stats(h, rt)
    for key in ROUGE:
        metrics[key] = round(sum(i[key] for i in items) / max(len(items), 1), 2)
    return metrics, items


def read_rows(path: str | Path, fields: tuple[str, ...]) -> list[dict]:
    """Rows (jsonl, a JSON array, CSV or parquet) that must hold `fields` as strings; errors say path:line."""
    rows, _ = read_records(str(path), "rows", normalize=as_object)
    for row in rows:
        bad = [f for f in fields if not isinstance(row.get(f), str)]
        if bad:
            raise UserError(f"{row['_loc']}: missing or non-string field {', '.join(map(repr, bad))}")
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def reply_item(reasoning: str | None, answer: str, complete: bool) -> dict:
    """A reply as an item keeps it: the answer scored (`prediction`), its reasoning, and `unanswered` for a reply
    that ended inside its reasoning (scored as an empty answer)."""
    return {"prediction": answer, **({"reasoning": reasoning} if reasoning is not None else {}),
            **({} if complete else {"unanswered": True})}


def generate_replies(engine, rows: list[dict], max_new_tokens: int, system: str | None, partial: Path,
                     key: dict, chunk: int = 32) -> list[dict]:
    """Greedy replies in input order as `reply_item`s (a reasoning template's think block read apart by
    `medgpt.infer.reasoning`); finished chunks go to `partial` (headed by `key`, what produced them: the model,
    the settings and a hash of the questions) so an interrupted run with the same settings and the same
    questions picks up where it stopped; an edited data file starts again."""
    from tqdm.auto import tqdm

    from medgpt.infer.base import GenerationParams, Request
    from medgpt.infer.reasoning import read_reply, reply_reader

    lines = partial.read_text(encoding="utf-8").splitlines() if partial.exists() else []
    done: list[dict] = []
    if lines and json.loads(lines[0]) == key:
        done = [json.loads(line) for line in lines[1:] if line][:len(rows)]
        log.info("gen: resuming after %d answers found in %s", len(done), partial)
    atomic_write(partial, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in [key, *done]))
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)
    with partial.open("a", encoding="utf-8") as handle, tqdm(total=len(rows), initial=len(done), desc="gen") as bar:
        for start in range(len(done), len(rows), chunk):
            batch = rows[start:start + chunk]
            prompts = [engine.encode([{"role": "user", "content": r["question"]}], system) for r in batch]
            completions = engine.run([Request(ids, params) for ids in prompts])
            for ids, completion in zip(prompts, completions):
                item = reply_item(*read_reply(completion.text, reply_reader(engine.template, engine.tokenizer, ids)))
                handle.write(json.dumps(item, ensure_ascii=False) + "\n")
                done.append(item)
            handle.flush()
            bar.update(len(batch))
    return done


def generate_predictions(engine, rows: list[dict], max_new_tokens: int, system: str | None, partial: Path,
                         key: dict, chunk: int = 32) -> list[str]:
    """The answers of `generate_replies` (after any reasoning; "" for a reply that ended inside it)."""
    return [item["prediction"] for item in generate_replies(engine, rows, max_new_tokens, system, partial, key, chunk)]


def reasoning_summary(items: list[dict]) -> dict | None:
    """How the replies reasoned, in `eval mcq`'s terms: replies, how many carry reasoning, its mean length in
    characters over all replies, and how many ended inside it (unanswered); None where no reply reasoned."""
    with_reasoning = [i for i in items if i.get("reasoning") is not None]
    if not with_reasoning:
        return None
    return {"replies": len(items), "with_reasoning": len(with_reasoning),
            "mean_chars": round(sum(len(i["reasoning"]) for i in with_reasoning) / len(items), 1),
            "cut_in_reasoning": sum(bool(i.get("unanswered")) for i in items)}


def run_gen(data: str | None, model: str | None = None, predictions: str | None = None, adapter: str | None = None,
            template: str | None = None, mode: str = "char", max_new_tokens: int = 256, batch_size: int = 16,
            system: str | None = None, limit: int | None = None, dtype: str = "auto",
            trust_remote_code: bool = False, partial: Path | None = None) -> dict:
    """Generate for data's questions (or read --predictions) and score against the references."""
    _splitter(mode)
    if predictions:  # a reasoning model's raw replies: their think blocks read apart
        from medgpt.data.messages import reply_parts

        rows = read_rows(predictions, ("prediction", "answer"))[:limit]
        replies = [reply_item(*reply_parts(r["prediction"])) for r in rows]
    else:
        if not data:
            raise UserError("give --data QA.jsonl to generate answers, or --predictions FILE to score existing ones")
        rows = read_rows(data, ("question", "answer"))[:limit]
        from medgpt.infer.engine import load_engine
        from medgpt.models import inference_precision

        partial = partial or Path(f".gen-{Path(data).stem}.partial.jsonl")
        with load_engine(model, adapter=adapter, template=template, dtype=dtype,
                         trust_remote_code=trust_remote_code, max_batch_size=batch_size) as engine:
            key = {"model": model, "adapter": adapter, "template": template, "questions": value_digest(
                [r["question"] for r in rows]), "max_new_tokens": max_new_tokens, "system": system,
                   "precision": inference_precision(dtype)}  # a model answers differently in bf16 and in fp32
            replies = generate_replies(engine, rows, max_new_tokens, system, partial, key)
        partial.unlink(missing_ok=True)
    metrics, scores = score_pairs([r["prediction"] for r in replies], [r["answer"] for r in rows], mode)
    items = [{**({"question": r["question"]} if "question" in r else {}), "answer": r["answer"], **reply,
              "loc": r["_loc"], **s} for r, reply, s in zip(rows, replies, scores)]
    thinking = reasoning_summary(items)
    return {"task": "gen", "model": None if predictions else model, "adapter": adapter, "data": data or predictions,
            "tokenize": mode, "count": len(items), "metrics": metrics, **({"reasoning": thinking} if thinking else {}),
            "items": items}


def write_result(result: dict[str, Any], output: str | Path) -> tuple[Path, Path]:
    """The summary as JSON and the items as jsonl beside it (`X.json` + `X.items.jsonl`), each atomically."""
    from medgpt.data.rows import write_jsonl

    output = Path(output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    items_path = output.with_name(output.stem + ".items.jsonl")
    write_jsonl(items_path, result.get("items", []))
    summary = {k: v for k, v in result.items() if k != "items"}
    write_json(output, {**summary, "items_file": items_path.name})
    return output, items_path
