"""Medical multiple-choice benchmarks read from their own published layouts into one `Question`.

Each format names the fields its benchmark publishes (`FORMATS`); a file's format is `--format NAME` or the first
format whose fields its first row holds. A row that fits none is an error naming the formats tried. Subjects and
categories come from the benchmark's own fields (MedMCQA's `subject_name`, MMLU's `subject`, CMB's `exam_type`
and `exam_class`, CMExam's annotations, MedXpertQA's `question_type` and `medical_task`), so a summary breaks down
as the papers report. A question has 2 to 10 options (letters A-J) and one answer (`rule` "single"), a set of
answers that must be named exactly (`rule` "set", OpenCompass's CMB scoring), or a yes/no/maybe label (`rule`
"label", PubMedQA).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgpt.data.records import mcq_options
from medgpt.data.rows import RecordError, item_rows
from medgpt.errors import UserError

LETTERS = "ABCDEFGHIJ"
PUBMEDQA_LABELS = ("yes", "no", "maybe")
RULES = ("single", "set", "label")
FILE_TYPES = (".csv", ".jsonl", ".json", ".parquet")


@dataclass
class Question:
    id: str
    subject: str
    question: str
    choices: tuple[str, ...]  # option texts, lettered A, B, ... (empty for label questions)
    answer: str  # a letter, sorted letters of a set ("ABD"), or a label ("yes")
    loc: str
    explanation: str = ""
    rule: str = "single"  # single | set | label
    context: str = ""  # PubMedQA's abstract
    labels: tuple[str, ...] = ()  # the answers of a label question
    kind: str = ""  # the benchmark's own name of the question type, shown in the prompt (CMB's 多项选择题)
    meta: dict[str, str] = field(default_factory=dict)  # categories for the summary's breakdowns

    @property
    def letters(self) -> str:
        return LETTERS[:len(self.choices)]

    @property
    def keys(self) -> tuple[str, ...]:
        """What the model chooses among: the option letters, or the labels."""
        return self.labels if self.rule == "label" else tuple(self.letters)


@dataclass(frozen=True)
class Format:
    name: str
    fields: tuple[str, ...]  # every row of this layout holds these (the detection rule)
    read: Callable[[dict, str], Question]  # (row, loc) -> Question; id and subject may be left empty
    style: str  # the prompt wording it is scored with by default (medgpt.eval.mcq.PROMPT_STYLES)
    about: str


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def _options(values: list[Any], where: str) -> tuple[str, ...]:
    """Option texts with empty trailing options dropped; 2-10 of them, none empty in between."""
    texts = [_text(v) for v in values]
    while texts and not texts[-1]:
        texts.pop()
    if not 2 <= len(texts) <= len(LETTERS):
        raise RecordError("wrong type", f"{where}: {len(texts)} options, expected 2 to {len(LETTERS)}")
    if "" in texts:
        raise RecordError("missing field", f"{where}: option {LETTERS[texts.index('')]} is empty")
    return tuple(texts)


def _option_dict(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, dict) or not value:
        raise RecordError("wrong type", f"{where} must be an object of options {{\"A\": ..., \"B\": ...}}")
    keys = [str(k).strip().upper() for k in value]
    if keys != list(LETTERS[:len(keys)]):
        raise RecordError("wrong type", f"{where}: option keys {', '.join(keys)}, expected A, B, ... in order")
    return _options(list(value.values()), where)


def _letter(value: Any, letters: str, where: str) -> str:
    text = _text(value).upper()
    if text not in letters or not text:
        raise RecordError("wrong type", f"{where} {value!r} is not one of {', '.join(letters)}")
    return text


def _index(value: Any, letters: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit() \
            or int(value) >= len(letters):
        raise RecordError("wrong type", f"{where} {value!r} is not an option index 0-{len(letters) - 1}")
    return letters[int(value)]


def _letter_set(value: Any, letters: str, where: str) -> str:
    found = re.findall(r"[A-Za-z]", _text(value))
    if not found or any(c.upper() not in letters for c in found) or len(set(found)) != len(found):
        raise RecordError("wrong type", f"{where} {value!r} is not a set of options among {', '.join(letters)}")
    return "".join(sorted(c.upper() for c in found))


def _q(row: dict, loc: str, question: str, choices: tuple[str, ...], answer: str, **extra: Any) -> Question:
    if not question:
        raise RecordError("missing field", "the question is empty")
    return Question(_text(row.get("id", row.get("idx", row.get("pubid", "")))), "", question, choices, answer, loc,
                    **extra)


def _meta(row: dict, *names: str) -> dict[str, str]:
    return {n: _text(row[n]) for n in names if _text(row.get(n))}


# ---- the layouts ---------------------------------------------------------------------------------


def _ceval(row: dict, loc: str) -> Question:
    """C-Eval (id, question, A-D, answer, explanation) and CMMLU (Question, A-D, Answer)."""
    cells = {k.lower(): v for k, v in row.items() if isinstance(k, str)}
    options = mcq_options(row)  # the GRPO reader's rule: option columns A-D
    missing = [c for c in ("question", "A", "B", "C", "D", "answer")
               if not (options.get(c) if len(c) == 1 else _text(cells.get(c)))]
    if missing:
        raise RecordError("missing field", f"{', '.join(missing)} (expected columns id, question, A, B, C, D, "
                                           f"answer; or CMMLU's Question, A, B, C, D, Answer)")
    letters = "ABCD"
    q = _q(cells, loc, _text(cells["question"]), tuple(options[c] for c in letters),
           _letter(cells["answer"], letters, "answer"), explanation=_text(cells.get("explanation")))
    q.subject = _text(cells.get("subject"))
    return q


def _medqa_hf(row: dict, loc: str) -> Question:
    """GBaker/MedQA-USMLE-4-options-hf: sent1, ending0..N, label (index); lm-eval reads sent1 alone."""
    endings = [row[k] for k in sorted((k for k in row if re.fullmatch(r"ending\d+", k)), key=lambda k: int(k[6:]))]
    choices = _options(endings, "ending0..")
    return _q(row, loc, _text(row["sent1"]), choices, _index(row["label"], LETTERS[:len(choices)], "label"))


def _medqa(row: dict, loc: str) -> Question:
    """MedQA's own JSONL (US and Mainland): question, options {A: ...}, answer_idx, meta_info."""
    choices = _option_dict(row["options"], "options")
    q = _q(row, loc, _text(row["question"]), choices, _letter(row["answer_idx"], LETTERS[:len(choices)],
                                                                "answer_idx"), meta=_meta(row, "meta_info"))
    q.subject = "physician" if _cjk(q.question) else _text(row.get("meta_info"))  # MCMLE: 医师资格
    return q


def _medmcqa(row: dict, loc: str) -> Question:
    """openlifescienceai/medmcqa: question, opa..opd, cop (0-3), subject_name, topic_name, exp."""
    choices = _options([row.get(k) for k in ("opa", "opb", "opc", "opd")], "opa..opd")
    q = _q(row, loc, _text(row["question"]), choices, _index(row["cop"], "ABCD", "cop"),
           explanation=_text(row.get("exp")), meta=_meta(row, "topic_name"))
    q.subject = _text(row.get("subject_name"))
    return q


def _pubmedqa(row: dict, loc: str) -> Question:
    """PubMedQA PQA-L: bigbio's source layout (QUESTION, CONTEXTS, final_decision), the original ori_pqal.json
    records (the same fields), or qiaojin/PubMedQA's (question, context {contexts}, final_decision)."""
    question = _text(row.get("QUESTION", row.get("question")))
    contexts = row.get("CONTEXTS")
    if contexts is None:
        context = row.get("context")
        contexts = context.get("contexts") if isinstance(context, dict) else context
    if isinstance(contexts, str):
        contexts = [contexts]
    if not isinstance(contexts, list) or not contexts:
        raise RecordError("missing field", "CONTEXTS (or context.contexts): a list of abstract paragraphs")
    decision = _text(row["final_decision"]).lower()
    if decision not in PUBMEDQA_LABELS:
        raise RecordError("wrong type", f"final_decision {row['final_decision']!r} is not yes, no or maybe")
    q = _q(row, loc, question, (), decision, rule="label", context="\n".join(map(_text, contexts)),
           labels=PUBMEDQA_LABELS, explanation=_text(row.get("LONG_ANSWER", row.get("long_answer"))))
    q.subject = "pubmedqa"
    return q


def _mmlu(row: dict, loc: str) -> Question:
    """cais/mmlu: question, subject, choices [..], answer (index)."""
    if not isinstance(row["choices"], list):
        raise RecordError("wrong type", "choices must be a list of option texts")
    choices = _options(row["choices"], "choices")
    q = _q(row, loc, _text(row["question"]), choices, _index(row["answer"], LETTERS[:len(choices)], "answer"))
    q.subject = _text(row.get("subject"))
    return q


CMB_KINDS = {"单项选择题": "single", "多项选择题": "set"}


def _cmb(row: dict, loc: str) -> Question:
    """FreedomIntelligence/CMB, CMB-Exam: exam_type, exam_class, exam_subject, question_type (单项选择题 or
    多项选择题), question, option {A..E}, answer."""
    kind = _text(row["question_type"])
    if kind not in CMB_KINDS:
        raise RecordError("wrong type", f"question_type {kind!r} is not one of {', '.join(CMB_KINDS)}")
    choices = _option_dict(row["option"], "option")
    letters = LETTERS[:len(choices)]
    answer = _letter(row["answer"], letters, "answer") if CMB_KINDS[kind] == "single" else \
        _letter_set(row["answer"], letters, "answer")
    q = _q(row, loc, _text(row["question"]), choices, answer, rule=CMB_KINDS[kind], kind=kind,
           explanation=_text(row.get("explanation")), meta=_meta(row, "exam_class", "exam_subject"))
    q.subject = _text(row.get("exam_type"))
    return q


CMEXAM_ANNOTATIONS = ("Disease Group", "Clinical Department", "Medical Discipline", "Competency", "Difficulty level")


def _cmexam(row: dict, loc: str) -> Question:
    """CMExam (williamliujl/CMExam CSVs): Question, Options ("A 文本" per line), Answer (one letter or several),
    Explanation, and the five annotations. The layout does not mark which questions allow several answers, so every
    question is scored as a set (an answer "B" is right only as exactly {B})."""
    lines = [line.strip() for line in _text(row["Options"]).splitlines() if line.strip()]
    parsed = [re.match(r"([A-J])[\s.、:：)]+(.*)", line) for line in lines]
    if not parsed or not all(parsed) or "".join(m.group(1) for m in parsed) != LETTERS[:len(parsed)]:
        raise RecordError("wrong type", "Options must be lines 'A text', 'B text', ... in order")
    choices = _options([m.group(2) for m in parsed], "Options")
    q = _q(row, loc, _text(row["Question"]), choices, _letter_set(row["Answer"], LETTERS[:len(choices)], "Answer"),
           rule="set", kind="不定项选择题", explanation=_text(row.get("Explanation")),
           meta=_meta(row, *CMEXAM_ANNOTATIONS))
    q.subject = q.meta.get("Medical Discipline", "")
    return q


def _medxpertqa(row: dict, loc: str) -> Question:
    """TsinghuaC3I/MedXpertQA, Text: id, question (its options repeated after "Answer Choices:"), options {A..J},
    label, medical_task, body_system, question_type."""
    choices = _option_dict(row["options"], "options")
    question = re.split(r"\s*Answer Choices:", _text(row["question"]))[0]
    q = _q(row, loc, question, choices, _letter(row["label"], LETTERS[:len(choices)], "label"),
           meta=_meta(row, "medical_task", "body_system"))
    q.subject = _text(row.get("question_type"))
    return q


FORMATS = {f.name: f for f in (
    Format("medqa_hf", ("sent1", "ending0", "ending1", "label"), _medqa_hf, "medqa",
           "MedQA-USMLE, Hugging Face layout (lm-eval medqa_4options)"),
    Format("medqa_mcmle", ("question", "options", "answer_idx"), _medqa, "ceval",
           "MedQA-MCMLE (Mainland China), MedQA's own JSONL, Chinese"),
    Format("medqa", ("question", "options", "answer_idx"), _medqa, "medqa", "MedQA (USMLE), MedQA's own JSONL"),
    Format("medmcqa", ("question", "opa", "opb", "cop"), _medmcqa, "medmcqa", "MedMCQA (lm-eval medmcqa)"),
    Format("pubmedqa", ("final_decision",), _pubmedqa, "pubmedqa", "PubMedQA PQA-L (lm-eval pubmedqa)"),
    Format("mmlu", ("question", "choices", "answer"), _mmlu, "mmlu", "MMLU (lm-eval mmlu_*)"),
    Format("cmb", ("exam_type", "question_type", "question", "option", "answer"), _cmb, "cmb", "CMB-Exam"),
    Format("cmexam", ("Question", "Options", "Answer"), _cmexam, "cmb", "CMExam"),
    Format("medxpertqa", ("question", "options", "label"), _medxpertqa, "medqa", "MedXpertQA, Text"),
    Format("ceval", ("question", "a", "b", "answer"), _ceval, "ceval", "C-Eval and CMMLU (id, question, A-D, answer)"),
)}
FORMAT_NAMES = tuple(FORMATS)


def _fits(fmt: Format, row: dict) -> bool:
    keys = set(row) if fmt.name != "ceval" else {str(k).lower() for k in row}
    if fmt.name in ("medqa", "medqa_mcmle"):
        return set(fmt.fields) <= keys and _cjk(_text(row.get("question"))) == (fmt.name == "medqa_mcmle")
    return set(fmt.fields) <= keys


def detect_format(row: dict, where: str) -> str:
    """The first format whose fields the row holds; none is an error naming every format tried."""
    for fmt in FORMATS.values():
        if _fits(fmt, row):
            return fmt.name
    tried = "; ".join(f"{f.name} ({', '.join(f.fields)})" for f in FORMATS.values())
    raise UserError(f"{where}: fields {', '.join(map(str, row))} match no multiple-choice format; tried {tried} "
                    f"(name one with --format)")


def _expand(raw: Any) -> list[tuple[str, Any]]:
    """PubMedQA's ori_pqal.json is one object {PMID: record}: its records, each with its PMID as id."""
    if isinstance(raw, dict) and raw and all(isinstance(v, dict) and "final_decision" in v for v in raw.values()):
        return [(str(k), {"id": str(k), **v}) for k, v in raw.items()]
    return [("", raw)]


def question_rows(file: Path | str, fmt: str | None = None, subset: str | None = None,
                  split: str = "test") -> tuple[str, list[Question]]:
    """(format, questions) of one file, or of a hub data set when `file` is a name; a question without an id
    gets its row number, without a subject the empty string."""
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out: list[Question] = []
    for loc, raw in item_rows(file, subset, split):
        for key, row in _expand(raw):
            loc_key = f"{loc}:{key}" if key else loc
            if row is None:
                continue
            if isinstance(row, RecordError):
                raise UserError(f"{loc}: {row}")
            if not isinstance(row, dict):
                raise UserError(f"{loc}: not an object")
            fmt = fmt or detect_format(row, loc)
            try:
                keys = {str(k).lower() for k in row} if fmt == "ceval" else set(row)
                if fmt != "ceval" and (missing := [f for f in FORMATS[fmt].fields if f not in keys]):
                    raise RecordError("missing field", ", ".join(missing))
                q = FORMATS[fmt].read(row, loc_key)
            except RecordError as exc:
                raise UserError(f"{loc_key}: {exc} (format {fmt}: {FORMATS[fmt].about})") from None
            q.id = q.id or str(len(out))
            out.append(q)
    return fmt or "ceval", out
