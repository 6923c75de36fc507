"""Multiple-choice accuracy on C-Eval / CMMLU-form data, zero- or few-shot.

Questions are scored by the log-likelihood of the answer letters at the position right after the
prompt (the C-Eval/CMMLU "answer only" protocol: softmax over the logits of A/B/C/D), or by generating
a reply and reading the letter it commits to with `medgpt.data.answers.extract_choice` (the reader the GRPO/PPO
rewards use; a reply without one counts as wrong, never as a random guess). Prompts follow the official
wording of each benchmark; with a chat template, few-shot examples become earlier user/assistant turns.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgpt.data.answers import extract_choice
from medgpt.data.readers import as_object, hub_rows, read_records
from medgpt.errors import UserError

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
STYLES = ("ceval", "cmmlu", "mmlu")
SCORING = ("loglik", "generate")  # how a question is scored: letter log-likelihood or a generated reply
SPLITS = ("val", "dev", "test")
CEVAL_MEDICAL = ("clinical_medicine", "basic_medicine", "physician")
CMMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_medicine", "genetics", "nutrition",
                 "professional_medicine", "traditional_chinese_medicine", "virology")
HUB_DEFAULT_SUBJECTS = {"ceval/ceval-exam": CEVAL_MEDICAL, "haonan-li/cmmlu": CMMLU_MEDICAL}
SUBJECT_ZH = {
    "clinical_medicine": "临床医学", "basic_medicine": "基础医学", "physician": "医师资格",
    "veterinary_medicine": "兽医学", "anatomy": "解剖学", "clinical_knowledge": "临床知识",
    "college_medicine": "大学医学", "genetics": "遗传学", "nutrition": "营养学", "professional_medicine": "专业医学",
    "traditional_chinese_medicine": "中医中药", "virology": "病毒学", "college_medical_statistics": "大学医学统计",
    "high_school_biology": "高中生物", "college_biology": "大学生物学",
}


@dataclass
class Question:
    id: str
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str
    loc: str
    explanation: str = ""


@dataclass
class McqArgs:
    data: str
    split: str = "val"
    dev: str | None = None  # few-shot source; default: the sibling dev split
    subjects: list[str] | None = None
    shots: int = 0
    style: str = "ceval"
    method: str = "loglik"
    batch_size: int = 8
    max_length: int = 2048
    max_new_tokens: int = 32
    limit: int | None = None  # questions per subject (quick checks)


# ---- data ----------------------------------------------------------------------------------------


def _subject_of(path: Path) -> str:
    """`clinical_medicine_val.csv` (C-Eval) and `anatomy.csv` (CMMLU) name their subject."""
    stem = path.stem
    for split in SPLITS:
        stem = stem.removesuffix(f"_{split}")
    return stem


def _cell(row: dict, *names: str) -> str:
    for name in names:
        for key in (name, name.lower(), name.capitalize()):
            if key in row and row[key] is not None:
                return str(row[key]).strip()
    return ""


def _question(row: dict, subject: str, loc: str, index: int) -> Question:
    missing = [c for c in ("question", *LETTERS, "answer") if not _cell(row, c)]
    if missing:
        raise UserError(f"{loc}: missing {', '.join(missing)} (expected columns id, question, A, B, C, D, answer; "
                        f"or CMMLU's Question, A, B, C, D, Answer)")
    answer = _cell(row, "answer").upper()
    if answer not in LETTERS:
        raise UserError(f"{loc}: answer {answer!r} is not one of A, B, C, D")
    qid = _cell(row, "id") or str(index)
    return Question(qid, subject, _cell(row, "question"), tuple(_cell(row, c) for c in LETTERS), answer, loc,
                    _cell(row, "explanation"))


def _file_rows(path: Path) -> list[tuple[str, dict]]:
    """(location, row) for each row of a question file (CSV, jsonl); a row that is not an object is an error."""
    rows, _ = read_records(str(path), "mcq", normalize=as_object)
    return [(row.pop("_loc"), row) for row in rows]


def _split_files(source: Path, split: str) -> list[Path]:
    """The question files of `split` under `source` (a file, a split folder, or a C-Eval/CMMLU root)."""
    if source.is_file():
        return [source]
    folder = source / split if (source / split).is_dir() else source
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".csv", ".jsonl"))
    if not files:
        raise UserError(f"{source}: no .csv or .jsonl question files (for split {split!r})")
    return files


def _dev_source(source: Path, split: str) -> Path | None:
    """Where few-shot examples live by default: the `dev` folder beside the evaluated split."""
    root = source.parent if source.is_file() else source
    if (root / "dev").is_dir():
        return root / "dev"
    if root.name == split and (root.parent / "dev").is_dir():
        return root.parent / "dev"
    return None


def load_questions(source: str, split: str = "val", subjects: list[str] | None = None,
                   limit: int | None = None) -> dict[str, list[Question]]:
    """Questions by subject from local files or a hub data set (subset = subject)."""
    path = Path(source).expanduser()
    by_subject: dict[str, list[Question]] = defaultdict(list)
    if path.exists():
        for file in _split_files(path, split):
            subject = _subject_of(file)
            if subjects and subject not in subjects:
                continue
            rows = _file_rows(file)
            by_subject[subject] += [_question(row, subject, loc, i) for i, (loc, row) in enumerate(rows)]
    elif source.startswith((".", "/", "~")) or path.suffix.lower() in (".csv", ".jsonl") or source.count("/") != 1:
        raise UserError(f"{source}: no such file or folder (and not a hub data set name owner/name)")
    else:
        for subject in subjects or HUB_DEFAULT_SUBJECTS.get(source, ()):
            rows = _hub_rows(source, subject, split)
            by_subject[subject] = [_question(row, subject, loc, i) for i, (loc, row) in enumerate(rows)]
    if not by_subject:
        raise UserError(f"{source}: no questions" + (f" for subjects {', '.join(subjects)}" if subjects else
                                                     "; name the hub subsets with --subjects"))
    return {s: qs[:limit] if limit else qs for s, qs in sorted(by_subject.items())}


def _hub_rows(name: str, subject: str, split: str) -> list[tuple[str, dict]]:
    """The rows of one hub subset (subject), located as `name/subject/split:index`."""
    return [(f"{name}/{subject}/{split}:{i}", row) for i, (_, row) in enumerate(hub_rows(name, subject, split))]


def load_shots(args: McqArgs, subjects: list[str]) -> dict[str, list[Question]]:
    if args.shots <= 0:
        return {}
    path = Path(args.data).expanduser()
    if args.dev:
        source: str | Path | None = args.dev
    elif path.exists():
        source = _dev_source(path, args.split)
        if source is None:
            raise UserError(f"{args.data}: --shots {args.shots} needs dev examples: no dev folder beside the data; "
                            f"pass --dev PATH")
    else:
        source = args.data
    split = "dev" if not Path(str(source)).expanduser().is_file() else args.split
    shots = load_questions(str(source), split, subjects)
    short = [s for s in subjects if len(shots.get(s, [])) < args.shots]
    if short:
        raise UserError(f"{source}: fewer than {args.shots} dev examples for {', '.join(short)}")
    return {s: shots[s][:args.shots] for s in subjects}


# ---- prompts -------------------------------------------------------------------------------------


def header(style: str, subject: str) -> str:
    """The official instruction line of each benchmark."""
    name = SUBJECT_ZH.get(subject, subject.replace("_", " "))
    if style == "ceval":
        return f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n"
    if style == "cmmlu":
        return f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n"
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def format_question(q: Question, style: str) -> str:
    """The question and options, ending where the answer letter goes."""
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, q.choices))
    if style == "ceval":
        return f"{q.question}{options}\n答案："
    if style == "cmmlu":
        return f"题目：{q.question}{options}\n答案是："
    return f"{q.question}{options}\nAnswer:"


def _answer_suffix(style: str, letter: str) -> str:
    return f" {letter}\n\n" if style == "mmlu" else f"{letter}\n\n"


def prompt_text(q: Question, shots: list[Question], style: str) -> str:
    """A plain-text prompt (base models): header, solved examples, the question."""
    solved = "".join(format_question(s, style) + _answer_suffix(style, s.answer) for s in shots)
    return header(style, q.subject) + solved + format_question(q, style)


def question_messages(q: Question, shots: list[Question], style: str) -> list[dict]:
    """A chat prompt: each solved example is a user turn answered by an assistant turn."""
    messages: list[dict] = []
    for s in [*shots, q]:
        content = format_question(s, style)
        messages.append({"role": "user", "content": (header(style, q.subject) if not messages else "") + content})
        if s is not q:
            messages.append({"role": "assistant", "content": s.answer})
    return messages


# ---- scoring -------------------------------------------------------------------------------------


def letter_token_ids(tokenizer) -> list[list[int]]:
    """Single-token spellings of each letter ("A" and " A"); a letter's score pools them."""
    ids = []
    for letter in LETTERS:
        found = {t[0] for t in (tokenizer.encode(v, add_special_tokens=False) for v in (letter, f" {letter}"))
                 if len(t) == 1}
        if not found:
            raise UserError(f"the tokenizer has no single token for {letter!r}; use --method generate")
        ids.append(sorted(found))
    return ids


def _fit(build, encode, shots: list[Question], max_length: int) -> tuple[list[int], int]:
    """Prompt ids with as many shots as fit in max_length (longest shots go first, as CMMLU does)."""
    kept = list(shots)
    while True:
        ids = encode(build(kept))
        if len(ids) <= max_length or not kept:
            return ids[-max_length:], len(kept)
        kept.remove(max(kept, key=lambda s: len(s.question) + sum(map(len, s.choices))))


class LoglikScorer:
    """Batched next-token scoring with left padding; position ids follow the padding.

    The letter logits are recomputed in float32 from the hidden state the output layer receives, so a
    bf16 model does not tie letters (bf16 logits often round two letters to the same value).
    """

    def __init__(self, model, tokenizer, template, batch_size: int = 8):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.batch_size = max(1, batch_size)
        self.letter_ids = letter_token_ids(tokenizer)

    def encode(self, prompt: str | list[dict]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(self.template.encode_prompt(self.tokenizer, prompt))

    def _next_token_logits(self, ids, mask, positions):
        """Logits of the letter tokens (flat, in letter_ids order) at the last position, in float32."""
        import torch

        flat = [t for ids_ in self.letter_ids for t in ids_]
        head = self.model.get_output_embeddings()
        captured: list = []
        hook = head.register_forward_hook(lambda module, args, out: captured.append(args[0][:, -1])) \
            if type(head) is torch.nn.Linear else None
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
        finally:
            if hook is not None:
                hook.remove()
        if not captured:
            return logits[:, -1, flat].float()
        out = captured[0].float() @ head.weight[flat].float().T
        return out + head.bias[flat].float() if head.bias is not None else out

    def letter_logprobs(self, prompts: list[list[int]], progress: bool = False):
        """(n, 4) log-probabilities over A-D at the next position, each letter pooled over its spellings."""
        import torch
        from tqdm.auto import tqdm

        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = torch.zeros(len(prompts), len(LETTERS))
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        spans, start_ = [], 0
        for ids_ in self.letter_ids:
            spans.append(slice(start_, start_ + len(ids_)))
            start_ += len(ids_)
        for start in tqdm(range(0, len(order), self.batch_size), desc="mcq", unit="batch", disable=not progress):
            chunk = order[start:start + self.batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk],
                                device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self._next_token_logits(ids, mask, positions).cpu()
            pooled = torch.stack([torch.logsumexp(logits[:, span], dim=-1) for span in spans], dim=-1)
            out[chunk] = torch.log_softmax(pooled, dim=-1)
        return out


def _item(q: Question, pred: str | None, shots_used: int, **extra: Any) -> dict:
    return {"subject": q.subject, "id": q.id, "loc": q.loc, "answer": q.answer, "pred": pred,
            "correct": pred == q.answer, "shots": shots_used, **extra}


def summarize(items: list[dict]) -> dict:
    """Per-subject and overall accuracy (percent); overall is over questions, `average` over subjects."""
    subjects: dict[str, dict] = {}
    for item in items:
        s = subjects.setdefault(item["subject"], {"correct": 0, "total": 0})
        s["correct"] += bool(item["correct"])
        s["total"] += 1
    for s in subjects.values():
        s["accuracy"] = round(100 * s["correct"] / s["total"], 2)
    correct = sum(s["correct"] for s in subjects.values())
    total = sum(s["total"] for s in subjects.values())
    overall = {"correct": correct, "total": total, "accuracy": round(100 * correct / max(total, 1), 2),
               "average": round(sum(s["accuracy"] for s in subjects.values()) / max(len(subjects), 1), 2)}
    metrics = {"accuracy": overall["accuracy"], "average": overall["average"],
               **{f"accuracy/{name}": s["accuracy"] for name, s in sorted(subjects.items())}}
    if any("pred" in i and i["pred"] is None for i in items):
        metrics["unanswered"] = sum(i["pred"] is None for i in items)
    return {"overall": overall, "subjects": dict(sorted(subjects.items())), "metrics": metrics}


def evaluate_loglik(scorer: LoglikScorer, questions: dict[str, list[Question]], shots: dict[str, list[Question]],
                    style: str, chat: bool, max_length: int) -> list[dict]:
    render = question_messages if chat else prompt_text
    build = lambda q: lambda s: render(q, s, style)  # noqa: E731
    flat = [q for qs in questions.values() for q in qs]
    prompts, used = [], []
    for q in flat:
        ids, n = _fit(build(q), scorer.encode, shots.get(q.subject, []), max_length)
        prompts.append(ids)
        used.append(n)
    logprobs = scorer.letter_logprobs(prompts, progress=True)
    probs = logprobs.softmax(-1)
    items = []
    for q, n, row, p in zip(flat, used, logprobs, probs):
        pred = LETTERS[int(row.argmax())]
        items.append(_item(q, pred, n, probs={k: round(float(v), 4) for k, v in zip(LETTERS, p)}))
    return items


def evaluate_generate(engine, questions: dict[str, list[Question]], shots: dict[str, list[Question]], style: str,
                      max_new_tokens: int) -> list[dict]:
    from medgpt.infer.base import GenerationParams

    flat = [q for qs in questions.values() for q in qs]
    batch = [question_messages(q, shots.get(q.subject, []), style) for q in flat]
    completions = engine.generate(batch, GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0))
    return [_item(q, extract_choice(c.text), len(shots.get(q.subject, [])), output=c.text)
            for q, c in zip(flat, completions)]


def run_mcq(model: str, args: McqArgs, adapter: str | None = None, template: str | None = None,
            dtype: str = "auto", trust_remote_code: bool = False) -> dict:
    """Evaluate `model` on args.data; returns the result dict (summary + items)."""
    for name, value, allowed in (("style", args.style, STYLES), ("method", args.method, SCORING)):
        if value not in allowed:
            raise UserError(f"{name} {value!r}: expected one of {', '.join(allowed)}")
    questions = load_questions(args.data, args.split, args.subjects, args.limit)
    shots = load_shots(args, list(questions))
    count = sum(map(len, questions.values()))
    log.info("mcq: %d questions in %d subjects, %d-shot, %s style, %s", count, len(questions), args.shots,
             args.style, args.method)
    chat = template != "none"
    if args.method == "generate":
        if not chat:
            raise UserError("--method generate needs a chat template (not --template none)")
        from medgpt.infer.engine import load_engine

        engine = load_engine(model, adapter=adapter, template=template, dtype=dtype,
                             trust_remote_code=trust_remote_code, max_batch_size=args.batch_size)
        items = evaluate_generate(engine, questions, shots, args.style, args.max_new_tokens)
    else:
        from medgpt.models import open_model

        opened = open_model(model, adapter, template, dtype=dtype, trust_remote_code=trust_remote_code)
        scorer = LoglikScorer(opened.model, opened.tokenizer, opened.template, args.batch_size)
        items = evaluate_loglik(scorer, questions, shots, args.style, chat, args.max_length)
    summary = summarize(items)
    return {"task": "mcq", "model": model, "adapter": adapter, "data": args.data, "split": args.split,
            "style": args.style, "shots": args.shots, "method": args.method, "template": template or "model's",
            **summary, "items": items}
