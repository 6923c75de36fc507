"""Multiple-choice accuracy on C-Eval / CMMLU-form data, zero- or few-shot.

Questions are scored by the log-likelihood of the answer letters at the position right after the
prompt (the C-Eval/CMMLU "answer only" protocol, as lm-evaluation-harness computes it: each letter's
tokens are encode(prompt + letter) minus encode(prompt), scored from the model's own output logits), or by generating
a reply and reading the letter it commits to with `medgpt.data.answers.extract_choice` (the reader the GRPO/PPO
rewards use; a reply without one counts as wrong, never as a random guess). Prompts follow the official
wording of each benchmark; with a chat template, few-shot examples become earlier user/assistant turns.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgpt.data.answers import extract_choice
from medgpt.data.readers import as_object, read_records
from medgpt.data.records import OPTION_LETTERS, mcq_options
from medgpt.data.rows import RecordError, hub_rows
from medgpt.errors import UserError
from medgpt.files import atomic_write

log = logging.getLogger(__name__)

LETTERS = tuple(OPTION_LETTERS)
STYLES = ("ceval", "cmmlu", "mmlu")  # the keys of PROMPT_STYLES
SCORING = ("loglik", "generate")  # how a question is scored: letter log-likelihood or a generated reply
SPLITS = ("val", "dev", "test")
CEVAL_MEDICAL = ("clinical_medicine", "basic_medicine", "physician")
CMMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_medicine", "genetics", "nutrition",
                 "professional_medicine", "traditional_chinese_medicine", "virology")
HUB_DEFAULT_SUBJECTS = {"ceval/ceval-exam": CEVAL_MEDICAL, "haonan-li/cmmlu": CMMLU_MEDICAL}
# The official subject names, as the benchmarks publish them (C-Eval's subject_mapping.json, CMMLU's
# name_en2zh): the Chinese name goes into the prompt header.
CEVAL_SUBJECTS = {
    "computer_network": "计算机网络", "operating_system": "操作系统", "computer_architecture": "计算机组成",
    "college_programming": "大学编程", "college_physics": "大学物理", "college_chemistry": "大学化学",
    "advanced_mathematics": "高等数学", "probability_and_statistics": "概率统计", "discrete_mathematics": "离散数学",
    "electrical_engineer": "注册电气工程师", "metrology_engineer": "注册计量师", "high_school_mathematics": "高中数学",
    "high_school_physics": "高中物理", "high_school_chemistry": "高中化学", "high_school_biology": "高中生物",
    "middle_school_mathematics": "初中数学", "middle_school_biology": "初中生物", "middle_school_physics": "初中物理",
    "middle_school_chemistry": "初中化学", "veterinary_medicine": "兽医学", "college_economics": "大学经济学",
    "business_administration": "工商管理", "marxism": "马克思主义基本原理",
    "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论", "education_science": "教育学",
    "teacher_qualification": "教师资格", "high_school_politics": "高中政治", "high_school_geography": "高中地理",
    "middle_school_politics": "初中政治", "middle_school_geography": "初中地理", "modern_chinese_history": "近代史纲要",
    "ideological_and_moral_cultivation": "思想道德修养与法律基础", "logic": "逻辑学", "law": "法学",
    "chinese_language_and_literature": "中国语言文学", "art_studies": "艺术学", "professional_tour_guide": "导游资格",
    "legal_professional": "法律职业资格", "high_school_chinese": "高中语文", "high_school_history": "高中历史",
    "middle_school_history": "初中历史", "civil_servant": "公务员", "sports_science": "体育学",
    "plant_protection": "植物保护", "basic_medicine": "基础医学", "clinical_medicine": "临床医学",
    "urban_and_rural_planner": "注册城乡规划师", "accountant": "注册会计师", "fire_engineer": "注册消防工程师",
    "environmental_impact_assessment_engineer": "环境影响评价工程师", "tax_accountant": "税务师",
    "physician": "医师资格",
}
CMMLU_SUBJECTS = {
    "agronomy": "农学", "anatomy": "解剖学", "ancient_chinese": "古汉语", "arts": "艺术学", "astronomy": "天文学",
    "business_ethics": "商业伦理", "chinese_civil_service_exam": "中国公务员考试", "chinese_driving_rule": "中国驾驶规则",
    "chinese_food_culture": "中国饮食文化", "chinese_foreign_policy": "中国外交政策", "chinese_history": "中国历史",
    "chinese_literature": "中国文学", "chinese_teacher_qualification": "中国教师资格", "clinical_knowledge": "临床知识",
    "college_actuarial_science": "大学精算学", "college_education": "大学教育学",
    "college_engineering_hydrology": "大学工程水文学", "college_law": "大学法律", "college_mathematics": "大学数学",
    "college_medical_statistics": "大学医学统计", "college_medicine": "大学医学", "computer_science": "计算机科学",
    "computer_security": "计算机安全", "conceptual_physics": "概念物理学", "construction_project_management": "建设工程管理",
    "economics": "经济学", "education": "教育学", "electrical_engineering": "电气工程", "elementary_chinese": "小学语文",
    "elementary_commonsense": "小学常识", "elementary_information_and_technology": "小学信息技术",
    "elementary_mathematics": "初等数学", "ethnology": "民族学", "food_science": "食品科学", "genetics": "遗传学",
    "global_facts": "全球事实", "high_school_biology": "高中生物", "high_school_chemistry": "高中化学",
    "high_school_geography": "高中地理", "high_school_mathematics": "高中数学", "high_school_physics": "高中物理学",
    "high_school_politics": "高中政治", "human_sexuality": "人类性行为", "international_law": "国际法学",
    "journalism": "新闻学", "jurisprudence": "法理学", "legal_and_moral_basis": "法律与道德基础", "logical": "逻辑学",
    "machine_learning": "机器学习", "management": "管理学", "marketing": "市场营销", "marxist_theory": "马克思主义理论",
    "modern_chinese": "现代汉语", "nutrition": "营养学", "philosophy": "哲学", "professional_accounting": "专业会计",
    "professional_law": "专业法学", "professional_medicine": "专业医学", "professional_psychology": "专业心理学",
    "public_relations": "公共关系", "security_study": "安全研究", "sociology": "社会学", "sports_science": "体育学",
    "traditional_chinese_medicine": "中医中药", "virology": "病毒学", "world_history": "世界历史",
    "world_religions": "世界宗教",
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
    subject: str | None = None  # the subject of every question (else each row's `subject`, else the file name)
    shots: int = 0
    style: str = "ceval"
    method: str = "loglik"
    batch_size: int = 8
    max_length: int = 2048
    max_new_tokens: int = 32
    limit: int | None = None  # questions per subject (quick checks)


# ---- data ----------------------------------------------------------------------------------------


def _subject_of(path: Path) -> str:
    """`clinical_medicine_val.csv` (C-Eval) and `anatomy.csv` (CMMLU) name their subject (the fallback for rows
    without a `subject` field)."""
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
    try:
        options = mcq_options(row)  # the GRPO reader's rule: options A-D, an option column past D an error
    except RecordError as exc:
        raise UserError(f"{loc}: {exc}") from None
    missing = [c for c in ("question", *LETTERS, "answer") if not (options.get(c) if c in LETTERS else _cell(row, c))]
    if missing:
        raise UserError(f"{loc}: missing {', '.join(missing)} (expected columns id, question, A, B, C, D, answer; "
                        f"or CMMLU's Question, A, B, C, D, Answer)")
    answer = _cell(row, "answer").upper()
    if answer not in LETTERS:
        raise UserError(f"{loc}: answer {answer!r} is not one of A, B, C, D")
    qid = _cell(row, "id") or str(index)
    subject = _cell(row, "subject") or subject
    return Question(qid, subject, _cell(row, "question"), tuple(options[c] for c in LETTERS), answer, loc,
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
                   limit: int | None = None, subject: str | None = None) -> dict[str, list[Question]]:
    """Questions by subject from local files or a hub data set (subset = subject).

    A question's subject is `subject` when given, else its row's `subject` field, else its file's name."""
    path = Path(source).expanduser()
    by_subject: dict[str, list[Question]] = defaultdict(list)
    if path.exists():
        for file in _split_files(path, split):
            for i, (loc, row) in enumerate(_file_rows(file)):
                q = _question(row, _subject_of(file), loc, i)
                q.subject = subject or q.subject
                if not subjects or q.subject in subjects:
                    by_subject[q.subject].append(q)
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
    """The few-shot pool of each subject (every dev question, in file order); `shots_for` picks from it."""
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
    shots = load_questions(str(source), split, subjects, subject=args.subject)
    short = [s for s in subjects if len(shots.get(s, [])) < args.shots]
    if short:
        raise UserError(f"{source}: fewer than {args.shots} dev examples for {', '.join(short)}")
    return {s: shots[s] for s in subjects}


def _normalized(text: str) -> str:
    return "".join(unicodedata.normalize("NFKC", text).lower().split())


def _origin(q: Question) -> tuple[str, str]:
    """Which file (or hub subset) and which id a question is: the same pair means the same item."""
    return q.loc.rsplit(":", 1)[0], q.id


def shots_for(q: Question, pool: list[Question], n: int) -> list[Question]:
    """The first n examples of the pool that are not the scored question itself (the same file and id, or the
    same question text once normalized): a question never sees its own answer."""
    text = _normalized(q.question)
    picked = [s for s in pool if _origin(s) != _origin(q) and _normalized(s.question) != text][:n]
    if len(picked) < n:
        raise UserError(f"{q.loc}: fewer than {n} few-shot examples other than this question for {q.subject}")
    return picked


# ---- prompts -------------------------------------------------------------------------------------


def subject_name(style: str, subject: str) -> str:
    """The Chinese name of an official C-Eval/CMMLU subject (the style's table first); any other subject as given."""
    tables = (CMMLU_SUBJECTS, CEVAL_SUBJECTS) if style == "cmmlu" else (CEVAL_SUBJECTS, CMMLU_SUBJECTS)
    return next((t[subject] for t in tables if subject in t), subject)


@dataclass(frozen=True)
class PromptStyle:
    """One benchmark's official prompt wording: `{name}` the subject, `{question}{options}` the question, `{letter}`
    the answer letter (with the delimiter before it)."""

    header: str
    question: str
    answer: str


PROMPT_STYLES = {
    "ceval": PromptStyle("以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n", "{question}{options}\n答案：",
                         "{letter}\n\n"),
    "cmmlu": PromptStyle("以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n", "题目：{question}{options}\n答案是：",
                         "{letter}\n\n"),
    "mmlu": PromptStyle("The following are multiple choice questions (with answers) about {name}.\n\n",
                        "{question}{options}\nAnswer:", " {letter}\n\n"),
}


def header(style: str, subject: str) -> str:
    """The official instruction line of each benchmark."""
    name = subject.replace("_", " ") if style == "mmlu" else subject_name(style, subject)
    return PROMPT_STYLES[style].header.format(name=name)


def format_question(q: Question, style: str) -> str:
    """The question and options, ending where the answer letter goes."""
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, q.choices))
    return PROMPT_STYLES[style].question.format(question=q.question, options=options)


def _answer_suffix(style: str, letter: str) -> str:
    return PROMPT_STYLES[style].answer.format(letter=letter)


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


SPELLINGS = ("{}", " {}")  # how a reply may write a letter: bare, or after a space; a letter's score pools them


def continuation_ids(whole: list[int], prompt: list[int]) -> list[int]:
    """The ids a continuation adds: encode(prompt + continuation) minus encode(prompt), split at the prompt's
    length as lm-evaluation-harness does (a tokenizer may spell a letter differently after the prompt than
    alone: SentencePiece's `▁A` alone, the bare piece `A` after `答案：`)."""
    return whole[len(prompt):]


def _fit(build, encode, shots: list[Question], max_length: int) -> tuple[list[int], list[Question]]:
    """Prompt ids with as many shots as fit in max_length (longest shots go first, as CMMLU does), and the
    shots kept; the ids may still be longer than max_length when no shot is left to drop."""
    kept = list(shots)
    while True:
        ids = encode(build(kept))
        if len(ids) <= max_length or not kept:
            return ids, kept
        kept.remove(max(kept, key=lambda s: len(s.question) + sum(map(len, s.choices))))


class LoglikScorer:
    """Batched next-token scoring with left padding; position ids follow the padding.

    Scores are the log-softmax of the model's own output logits at the answer position, so every logit
    post-processing the model applies (Gemma-2's soft-capping, Cohere's `logit_scale`, Granite's scaling)
    is in them; a bf16/fp16 output layer is run in float32 (the model's post-processing then applies to
    the float32 logits), so letters do not tie on rounding.
    """

    PROBE = "答案："  # what letter_ids is computed after, for callers that score token ids directly

    def __init__(self, model, tokenizer, template, batch_size: int = 8):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.batch_size = max(1, batch_size)
        self.letter_ids = self.candidates(self.PROBE)

    def encode(self, prompt: str | list[dict], answer: str = "") -> list[int]:
        """Ids of a plain-text prompt, or of a chat prompt through the template, with `answer` appended as
        the start of the reply."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt + answer, add_special_tokens=True)
        from medgpt.data.templates import encode_segments

        segments = self.template.segments(prompt, add_generation_prompt=True)
        return encode_segments(self.tokenizer, [*segments, (answer, True)] if answer else segments)["input_ids"]

    def candidates(self, prompt: str | list[dict], ids: list[int] | None = None) -> list[list[int]]:
        """Per letter, the ids it may start the reply with: for each spelling, encode(prompt + spelling)
        minus encode(prompt) where that is one token."""
        ids = self.encode(prompt) if ids is None else ids
        out = []
        for letter in LETTERS:
            found = set()
            for spelling in SPELLINGS:
                extra = continuation_ids(self.encode(prompt, spelling.format(letter)), ids)
                if len(extra) == 1:
                    found.add(extra[0])
            if not found:
                raise UserError(f"the tokenizer spells {letter!r} after the prompt in more than one token; "
                                "use --method generate")
            out.append(sorted(found))
        return out

    def _last_logits(self, ids, mask, positions):
        """The model's output logits at the last position, in float32."""
        import torch

        head = self.model.get_output_embeddings()
        hook = None
        if isinstance(head, torch.nn.Linear) and head.weight.dtype != torch.float32:
            def fp32_head(module, args, out):
                return torch.nn.functional.linear(args[0].float(), module.weight.float(),
                                                  None if module.bias is None else module.bias.float())
            hook = head.register_forward_hook(fp32_head)
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
        finally:
            if hook is not None:
                hook.remove()
        return logits[:, -1].float()

    def letter_loglik(self, prompts: list[list[int]], letter_ids: list[list[list[int]]] | None = None,
                      progress: bool = False):
        """(n, 4) raw log-likelihoods of A-D at the next position (log-softmax over the whole vocabulary,
        each letter pooled over its spellings by logsumexp); letter_ids per prompt, default self.letter_ids."""
        import torch
        from tqdm.auto import tqdm

        from medgpt.models import left_padded

        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = torch.zeros(len(prompts), len(LETTERS))
        device = next(self.model.parameters()).device
        for start in tqdm(range(0, len(order), self.batch_size), desc="mcq", unit="batch", disable=not progress):
            chunk = order[start:start + self.batch_size]
            ids, mask, positions = left_padded([prompts[i] for i in chunk], self.tokenizer.pad_token_id, device)
            with torch.inference_mode():
                logprobs = torch.log_softmax(self._last_logits(ids, mask, positions), dim=-1).cpu()
            for row, i in zip(logprobs, chunk):
                cands = letter_ids[i] if letter_ids is not None else self.letter_ids
                out[i] = torch.stack([torch.logsumexp(row[c], dim=0) for c in cands])
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


def _flat_with_shots(questions: dict[str, list[Question]], shots: dict[str, list[Question]],
                     n: int) -> list[tuple[Question, list[Question]]]:
    return [(q, shots_for(q, shots[q.subject], n) if n else []) for qs in questions.values() for q in qs]


def evaluate_loglik(scorer: LoglikScorer, questions: dict[str, list[Question]], shots: dict[str, list[Question]],
                    style: str, chat: bool, max_length: int, n_shots: int = 0) -> list[dict]:
    render = question_messages if chat else prompt_text
    prompts, used, cands, flat = [], [], [], []
    for q, pool in _flat_with_shots(questions, shots, n_shots):
        build = lambda s, q=q: render(q, s, style)  # noqa: E731
        ids, kept = _fit(build, scorer.encode, pool, max_length)
        prompts.append(ids[-max_length:])
        used.append(len(kept))
        cands.append(scorer.candidates(build(kept), ids))
        flat.append(q)
    loglik = scorer.letter_loglik(prompts, cands, progress=True)
    probs = loglik.softmax(-1)
    items = []
    for q, n, row, p in zip(flat, used, loglik, probs):
        pred = LETTERS[int(row.argmax())]
        items.append(_item(q, pred, n, loglik={k: float(v) for k, v in zip(LETTERS, row)},
                           probs={k: round(float(v), 4) for k, v in zip(LETTERS, p)}))
    return items


def evaluate_generate(engine, questions: dict[str, list[Question]], shots: dict[str, list[Question]], style: str,
                      max_new_tokens: int, n_shots: int = 0) -> list[dict]:
    from medgpt.infer.base import GenerationParams

    pairs = _flat_with_shots(questions, shots, n_shots)
    batch = [question_messages(q, pool, style) for q, pool in pairs]
    completions = engine.generate(batch, GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0))
    return [_item(q, extract_choice(c.text), len(pool), output=c.text) for (q, pool), c in zip(pairs, completions)]


def run_mcq(model: str, args: McqArgs, adapter: str | None = None, template: str | None = None,
            dtype: str = "auto", trust_remote_code: bool = False) -> dict:
    """Evaluate `model` on args.data; returns the result dict (summary + items)."""
    for name, value, allowed in (("style", args.style, STYLES), ("method", args.method, SCORING)):
        if value not in allowed:
            raise UserError(f"{name} {value!r}: expected one of {', '.join(allowed)}")
    questions = load_questions(args.data, args.split, args.subjects, args.limit, args.subject)
    shots = load_shots(args, list(questions))
    count = sum(map(len, questions.values()))
    log.info("mcq: %d questions in %d subjects, %d-shot, %s style, %s", count, len(questions), args.shots,
             args.style, args.method)
    chat = template != "none"
    if args.method == "generate":
        if not chat:
            raise UserError("--method generate needs a chat template (not --template none)")
        from medgpt.infer.engine import load_engine

        with load_engine(model, adapter=adapter, template=template, dtype=dtype,
                         trust_remote_code=trust_remote_code, max_batch_size=args.batch_size) as engine:
            items = evaluate_generate(engine, questions, shots, args.style, args.max_new_tokens, args.shots)
    else:
        from medgpt.models import open_model

        opened = open_model(model, adapter, template, dtype=dtype, trust_remote_code=trust_remote_code)
        scorer = LoglikScorer(opened.model, opened.tokenizer, opened.template, args.batch_size)
        items = evaluate_loglik(scorer, questions, shots, args.style, chat, args.max_length, args.shots)
    summary = summarize(items)
    return {"task": "mcq", "model": model, "adapter": adapter, "data": args.data, "split": args.split,
            "style": args.style, "shots": args.shots, "method": args.method, "template": template or "model's",
            "accuracy": summary["overall"]["accuracy"], **summary, "items": items}


# ---- lm-evaluation-harness ------------------------------------------------------------------------


def _lm_eval_text(style: str) -> str:
    """format_question as an lm-eval Jinja template over the rows written by `write_lm_eval_tasks`."""
    q = Question("", "", "{{question}}", ("{{A}}", "{{B}}", "{{C}}", "{{D}}"), "A", "")
    return format_question(q, style)


def write_lm_eval_tasks(args: McqArgs, out_dir: str | Path) -> list[Path]:
    """lm-evaluation-harness tasks that score exactly what `eval mcq --template none` scores (the same prompt,
    header and letters; few-shot examples from the same dev rows): one task per subject, its questions as
    jsonl beside its YAML. Run them with `lm_eval --model hf --include_path DIR --tasks medgpt_SUBJECT`."""
    from medgpt.data.rows import write_jsonl

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    questions = load_questions(args.data, args.split, args.subjects, args.limit, args.subject)
    shots = load_shots(args, list(questions))
    written = []

    def row(q: Question) -> dict:
        return {"id": q.id, "question": q.question, **dict(zip(LETTERS, q.choices)), "answer": q.answer}

    for subject, qs in questions.items():
        name = "medgpt_" + "".join(c if c.isalnum() else "_" for c in subject)
        write_jsonl(out / f"{name}.jsonl", [row(q) for q in qs])
        files = {"test": str((out / f"{name}.jsonl").resolve())}
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files}, "test_split": "test",
                "output_type": "multiple_choice", "description": header(args.style, subject),
                "doc_to_text": _lm_eval_text(args.style), "doc_to_choice": list(LETTERS),
                "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer)}}",
                "target_delimiter": _answer_suffix(args.style, "").rstrip("\n"), "fewshot_delimiter": "\n\n",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
        if args.shots:
            write_jsonl(out / f"{name}_dev.jsonl", [row(q) for q in shots[subject]])
            files["dev"] = str((out / f"{name}_dev.jsonl").resolve())
            task.update({"fewshot_split": "dev", "num_fewshot": args.shots, "fewshot_config": {"sampler": "first_n"}})
        path = out / f"{name}.yaml"
        # JSON is YAML: every string is quoted exactly, newlines and Jinja braces included
        atomic_write(path, "\n".join(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in task.items()) + "\n")
        written.append(path)
    return written
