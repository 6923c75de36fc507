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
import math
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgpt.data.answers import extract_choice, extract_choices, extract_label
from medgpt.data.messages import reply_parts
from medgpt.data.records import OPTION_LETTERS
from medgpt.errors import UserError
from medgpt.eval import stats
from medgpt.eval.benchmarks import FILE_TYPES, FORMATS, Question, question_rows
from medgpt.files import atomic_write

log = logging.getLogger(__name__)

LETTERS = tuple(OPTION_LETTERS)  # the options of a C-Eval/CMMLU row
STYLES = ("ceval", "cmmlu", "mmlu", "medqa", "medmcqa", "pubmedqa", "cmb")  # the keys of PROMPT_STYLES
MAX_SET_OPTIONS = 5  # a multiple-answer question is scored by log-likelihood over its 2^n - 1 answer sets up to here
SCORING = ("loglik", "generate")  # how a question is scored: letter log-likelihood or a generated reply
SPLITS = ("val", "dev", "test")
CEVAL_MEDICAL = ("clinical_medicine", "basic_medicine", "physician")
CMMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_medicine", "genetics", "nutrition",
                 "professional_medicine", "traditional_chinese_medicine", "virology")
HUB_DEFAULT_SUBJECTS: dict[str, tuple[str | None, ...]] = {"ceval/ceval-exam": CEVAL_MEDICAL,
                                                            "haonan-li/cmmlu": CMMLU_MEDICAL}
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
class McqArgs:
    data: str
    split: str = "val"
    dev: str | None = None  # few-shot source; default: the sibling dev split
    subjects: list[str] | None = None
    subject: str | None = None  # the subject of every question (else each row's own, else the file name)
    shots: int = 0
    style: str | None = None  # default: the format's own (ceval for C-Eval/CMMLU rows)
    method: str = "loglik"
    batch_size: int = 8
    max_length: int = 2048
    max_new_tokens: int = 32
    limit: int | None = None  # questions per subject (quick checks)
    format: str | None = None  # a layout of medgpt.eval.benchmarks.FORMATS; default: detected from the fields


# ---- data ----------------------------------------------------------------------------------------


def _subject_of(path: Path) -> str:
    """`clinical_medicine_val.csv` (C-Eval) and `anatomy.csv` (CMMLU) name their subject (the fallback for rows
    without a `subject` field)."""
    stem = path.stem
    for split in SPLITS:
        stem = stem.removesuffix(f"_{split}")
    return stem


def _split_files(source: Path, split: str) -> list[Path]:
    """The question files of `split` under `source` (a file, a split folder, or a C-Eval/CMMLU root)."""
    if source.is_file():
        return [source]
    folder = source / split if (source / split).is_dir() else source
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FILE_TYPES)
    if not files:
        raise UserError(f"{source}: no {', '.join(FILE_TYPES)} question files (for split {split!r})")
    return files


def _dev_source(source: Path, split: str) -> Path | None:
    """Where few-shot examples live by default: the `dev` folder beside the evaluated split."""
    root = source.parent if source.is_file() else source
    if (root / "dev").is_dir():
        return root / "dev"
    if root.name == split and (root.parent / "dev").is_dir():
        return root.parent / "dev"
    return None


def load_set(source: str, split: str = "val", subjects: list[str] | None = None, limit: int | None = None,
             subject: str | None = None, fmt: str | None = None) -> tuple[str, dict[str, list[Question]]]:
    """(format, questions by subject) from local files (CSV, JSON, JSONL, parquet, a folder of them) or a hub data
    set (subset = subject). A question's subject is `subject` when given, else its benchmark's own subject field,
    else (C-Eval/CMMLU) its file's name, else the format's name."""
    path = Path(source).expanduser()
    by_subject: dict[str, list[Question]] = defaultdict(list)
    found: list[str] = []
    if path.exists():
        for file in _split_files(path, split):
            name, qs = question_rows(file, fmt)
            found.append(name)
            for q in qs:
                q.subject = subject or q.subject or (_subject_of(file) if name == "ceval" else name)
                if not subjects or q.subject in subjects:
                    by_subject[q.subject].append(q)
    elif source.startswith((".", "/", "~")) or path.suffix.lower() in FILE_TYPES or source.count("/") != 1:
        raise UserError(f"{source}: no such file or folder (and not a hub data set name owner/name)")
    else:
        for subset in subjects or HUB_DEFAULT_SUBJECTS.get(source, (None,)):
            name, qs = question_rows(source, fmt, subset, split)
            found.append(name)
            for i, q in enumerate(qs):
                q.loc = f"{source}/{subset or ''}/{split}:{i}"
                q.subject = subject or subset or q.subject or name
                by_subject[q.subject].append(q)
    if len(set(found)) > 1:
        raise UserError(f"{source}: files of different formats ({', '.join(sorted(set(found)))}); "
                        f"evaluate them one at a time")
    if not by_subject:
        raise UserError(f"{source}: no questions" + (f" for subjects {', '.join(subjects)}" if subjects else
                                                     "; name the hub subsets with --subjects"))
    return found[0], {s: qs[:limit] if limit else qs for s, qs in sorted(by_subject.items())}


def load_questions(source: str, split: str = "val", subjects: list[str] | None = None,
                   limit: int | None = None, subject: str | None = None,
                   fmt: str | None = None) -> dict[str, list[Question]]:
    """Questions by subject (`load_set` without the format's name)."""
    return load_set(source, split, subjects, limit, subject, fmt)[1]


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
    shots = load_questions(str(source), split, subjects, subject=args.subject, fmt=args.format)
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
    # lm-evaluation-harness's medqa_4options, medmcqa and pubmedqa (no header; MedXpertQA uses medqa's)
    "medqa": PromptStyle("", "Question: {question}{options}\nAnswer:", " {letter}\n\n"),
    "medmcqa": PromptStyle("", "Question: {question}\nChoices:{options}\nAnswer:", " {letter}\n\n"),
    "pubmedqa": PromptStyle("", "Abstract: {context}\nQuestion: {question}\nAnswer:", " {letter}\n\n"),
    # CMB and CMExam: C-Eval's wording with the question type each question states (单项选择题, 多项选择题)
    "cmb": PromptStyle("以下是中国{name}中的选择题，请选出其中的正确答案。\n\n", "{kind}{question}{options}\n答案：",
                       "{letter}\n\n"),
}


def header(style: str, subject: str) -> str:
    """The official instruction line of each benchmark."""
    name = subject.replace("_", " ") if style == "mmlu" else subject_name(style, subject)
    return PROMPT_STYLES[style].header.format(name=name)


def format_question(q: Question, style: str) -> str:
    """The question and options (or PubMedQA's abstract), ending where the answer goes."""
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(q.letters, q.choices))
    return PROMPT_STYLES[style].question.format(question=q.question, options=options, context=q.context,
                                                kind=f"（{q.kind}）" if q.kind else "")


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

    def candidates(self, prompt: str | list[dict], ids: list[int] | None = None,
                   letters: tuple[str, ...] | str = LETTERS) -> list[list[int]]:
        """Per letter, the ids it may start the reply with: for each spelling, encode(prompt + spelling)
        minus encode(prompt) where that is one token."""
        ids = self.encode(prompt) if ids is None else ids
        out = []
        for letter in letters:
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

    def _logits(self, ids, mask, positions, keep: int = 1):
        """The model's output logits at the last `keep` positions, in float32."""
        import torch

        head = self.model.get_output_embeddings()
        hook = None
        if isinstance(head, torch.nn.Linear) and head.weight.dtype != torch.float32:
            def fp32_head(module, args, out):
                return torch.nn.functional.linear(args[0].float(), module.weight.float(),
                                                  None if module.bias is None else module.bias.float())
            hook = head.register_forward_hook(fp32_head)
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                logits_to_keep=keep).logits
        finally:
            if hook is not None:
                hook.remove()
        return logits[:, -keep:].float()

    def letter_loglik(self, prompts: list[list[int]], letter_ids: list[list[list[int]]] | None = None,
                      progress: bool = False):
        """(n, k) raw log-likelihoods of the letters at the next position (log-softmax over the whole vocabulary,
        each letter pooled over its spellings by logsumexp); letter_ids per prompt, default self.letter_ids (A-D);
        a prompt with fewer letters than the widest is padded with -inf."""
        import torch
        from tqdm.auto import tqdm

        from medgpt.models import left_padded

        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        width = max((len(c) for c in letter_ids), default=len(LETTERS)) if letter_ids else len(self.letter_ids)
        out = torch.full((len(prompts), width), float("-inf"))
        device = next(self.model.parameters()).device
        for start in tqdm(range(0, len(order), self.batch_size), desc="mcq", unit="batch", disable=not progress):
            chunk = order[start:start + self.batch_size]
            ids, mask, positions = left_padded([prompts[i] for i in chunk], self.tokenizer.pad_token_id, device)
            with torch.inference_mode():
                logprobs = torch.log_softmax(self._logits(ids, mask, positions)[:, -1], dim=-1).cpu()
            for row, i in zip(logprobs, chunk):
                cands = letter_ids[i] if letter_ids is not None else self.letter_ids
                out[i, :len(cands)] = torch.stack([torch.logsumexp(row[c], dim=0) for c in cands])
        return out

    def continuation_loglik(self, prompts: list[list[int]], continuations: list[list[list[int]]],
                            progress: bool = False) -> list[list[float]]:
        """Per prompt, the summed log-likelihood of each continuation's tokens after it (lm-evaluation-harness's
        `loglikelihood`): one left-padded forward of prompt + continuation per candidate."""
        import torch
        from tqdm.auto import tqdm

        from medgpt.models import left_padded

        flat = [(i, j, prompts[i] + cont) for i, conts in enumerate(continuations) for j, cont in enumerate(conts)]
        for i, j, _ in flat:
            if not continuations[i][j]:
                raise UserError("an answer adds no tokens after its prompt; use --method generate")
        order = sorted(range(len(flat)), key=lambda k: len(flat[k][2]))
        out = [[0.0] * len(conts) for conts in continuations]
        device = next(self.model.parameters()).device
        for start in tqdm(range(0, len(order), self.batch_size), desc="mcq", unit="batch", disable=not progress):
            chunk = [flat[k] for k in order[start:start + self.batch_size]]
            keep = max(len(continuations[i][j]) for i, j, _ in chunk) + 1
            ids, mask, positions = left_padded([seq for _, _, seq in chunk], self.tokenizer.pad_token_id, device)
            with torch.inference_mode():
                logprobs = torch.log_softmax(self._logits(ids, mask, positions, keep), dim=-1).cpu()
            for row, (i, j, _) in zip(logprobs, chunk):
                cont = continuations[i][j]
                picked = row[-len(cont) - 1:-1].gather(1, torch.tensor(cont).unsqueeze(1))
                out[i][j] = float(picked.sum())
        return out


def answer_sets(letters: str) -> list[str]:
    """Every answer a multiple-answer question allows: each non-empty set of its options, as sorted letters,
    singles first (2^n - 1 of them)."""
    from itertools import combinations

    return ["".join(c) for size in range(1, len(letters) + 1) for c in combinations(letters, size)]


def choices_scored(q: Question) -> list[str]:
    """What a question's log-likelihood is computed for: its letters, its labels, or its answer sets."""
    if q.rule == "set":
        if len(q.choices) > MAX_SET_OPTIONS:
            raise UserError(f"{q.loc}: a multiple-answer question with {len(q.choices)} options has "
                            f"{2 ** len(q.choices) - 1} answer sets, too many to score by log-likelihood "
                            f"(at most {MAX_SET_OPTIONS} options); use --method generate")
        return answer_sets(q.letters)
    return list(q.keys)


def _item(q: Question, pred: str | None, shots_used: int, **extra: Any) -> dict:
    item = {"subject": q.subject, "id": q.id, "loc": q.loc, "answer": q.answer, "pred": pred,
            "correct": pred == q.answer, "rule": q.rule, "shots": shots_used, **extra}
    if q.meta:
        item["meta"] = q.meta
    return item


def _tally(items: list[dict], key) -> dict[str, dict]:
    groups: dict[str, dict] = {}
    for item in items:
        g = groups.setdefault(key(item), {"correct": 0, "total": 0})
        g["correct"] += bool(item["correct"])
        g["total"] += 1
    for g in groups.values():
        g["accuracy"] = round(100 * g["correct"] / g["total"], 2)
    return dict(sorted(groups.items()))


def summarize(items: list[dict]) -> dict:
    """Per-subject and overall accuracy (percent); overall is over questions, `average` over subjects;
    `by` breaks accuracy down by each category field the benchmark gives (CMB's exam_class, CMExam's
    annotations) and by scoring rule; `ci95` is the bootstrap interval of the overall accuracy."""
    subjects = _tally(items, lambda i: i["subject"])
    correct = sum(s["correct"] for s in subjects.values())
    total = sum(s["total"] for s in subjects.values())
    overall = {"correct": correct, "total": total, "accuracy": round(100 * correct / max(total, 1), 2),
               "average": round(sum(s["accuracy"] for s in subjects.values()) / max(len(subjects), 1), 2)}
    metrics = {"accuracy": overall["accuracy"], "average": overall["average"],
               **{f"accuracy/{name}": s["accuracy"] for name, s in subjects.items()}}
    if any("pred" in i and i["pred"] is None for i in items):
        metrics["unanswered"] = sum(i["pred"] is None for i in items)
    fields = sorted({k for i in items for k in i.get("meta", {})})
    by = {"rule": _tally(items, lambda i: i.get("rule", "single")),
          **{f: _tally(items, lambda i, f=f: i.get("meta", {}).get(f, "")) for f in fields}}
    out = {"overall": overall, "subjects": subjects, "by": by, "metrics": metrics}
    if items and (ci := stats.interval("accuracy", items)) is not None:
        out["ci95"] = {"accuracy": ci}
    reasoned = [i for i in items if "reasoning" in i]
    if reasoned:
        lengths = [len(i["reasoning"] or "") for i in reasoned]
        out["reasoning"] = {"replies": len(reasoned), "with_reasoning": sum(i["reasoning"] is not None for i in reasoned),
                            "mean_chars": round(sum(lengths) / len(lengths), 1),
                            "cut_in_reasoning": sum(not i["complete"] for i in reasoned)}
        metrics["reasoning_chars"] = out["reasoning"]["mean_chars"]
    return out


def _flat_with_shots(questions: dict[str, list[Question]], shots: dict[str, list[Question]],
                     n: int) -> list[tuple[Question, list[Question]]]:
    return [(q, shots_for(q, shots[q.subject], n) if n else []) for qs in questions.values() for q in qs]


def _answer_prefix(style: str, chat: bool) -> str:
    """What goes between the prompt and an answer: the style's delimiter (" " for the English styles, as
    lm-evaluation-harness's target_delimiter), nothing where the answer starts a chat reply."""
    return "" if chat else _answer_suffix(style, "").rstrip("\n")


def evaluate_loglik(scorer: LoglikScorer, questions: dict[str, list[Question]], shots: dict[str, list[Question]],
                    style: str, chat: bool, max_length: int, n_shots: int = 0) -> list[dict]:
    """Single-answer questions: the likeliest option letter at the next position (pooled over its spellings);
    yes/no/maybe and multiple-answer questions: the likeliest continuation among the labels or the answer sets
    (summed token log-likelihood, lm-evaluation-harness's `acc`)."""
    render = question_messages if chat else prompt_text
    prefix = _answer_prefix(style, chat)
    letters, conts = [], []  # (index, prompt ids, candidate ids) for the two kinds of scoring
    used, flat, keys = [], [], []
    for q, pool in _flat_with_shots(questions, shots, n_shots):
        build = lambda s, q=q: render(q, s, style)  # noqa: E731
        whole, kept = _fit(build, scorer.encode, pool, max_length)
        ids = whole[-max_length:]
        options = choices_scored(q)
        if q.rule == "single":
            letters.append((len(flat), ids, scorer.candidates(build(kept), whole, q.letters)))
        else:
            conts.append((len(flat), ids, [continuation_ids(scorer.encode(build(kept), prefix + o), whole)
                                           for o in options]))
        used.append(len(kept))
        flat.append(q)
        keys.append(options)
    scores: list[list[float]] = [[] for _ in flat]
    if letters:
        rows = scorer.letter_loglik([ids for _, ids, _ in letters], [c for _, _, c in letters], progress=True)
        for (i, _, cands), row in zip(letters, rows):
            scores[i] = [float(v) for v in row[:len(cands)]]
    if conts:
        for (i, _, _), row in zip(conts, scorer.continuation_loglik([ids for _, ids, _ in conts],
                                                                   [c for _, _, c in conts], progress=True)):
            scores[i] = row
    items = []
    for q, n, options, row in zip(flat, used, keys, scores):
        best = max(range(len(row)), key=row.__getitem__)
        top = max(row)
        total = sum(math.exp(v - top) for v in row)
        items.append(_item(q, options[best], n, loglik=dict(zip(options, row)),
                           probs={k: round(math.exp(v - top) / total, 4) for k, v in zip(options, row)}))
    return items


def read_answer(q: Question, reply: str) -> str | None:
    """The answer a reply commits to, read by the rule of the question: a letter, a set of letters, a label."""
    if q.rule == "set":
        return extract_choices(reply, q.letters)
    if q.rule == "label":
        return extract_label(reply, q.labels)
    return extract_choice(reply, q.letters)


def evaluate_generate(engine, questions: dict[str, list[Question]], shots: dict[str, list[Question]], style: str,
                      max_new_tokens: int, n_shots: int = 0) -> list[dict]:
    """Greedy replies; the answer is read after the reasoning (`reply_parts`); a reply cut inside its reasoning
    is unanswered (pred None), not read."""
    from medgpt.infer.base import GenerationParams
    from medgpt.infer.reasoning import prompt_think_state

    pairs = _flat_with_shots(questions, shots, n_shots)
    batch = [question_messages(q, pool, style) for q, pool in pairs]
    completions = engine.generate(batch, GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0))
    items = []
    for (q, pool), messages, c in zip(pairs, batch, completions):
        rendered = "".join(text for text, _ in engine.template.segments(messages, add_generation_prompt=True)) \
            if engine.template is not None else ""
        reasoning, answer, complete = reply_parts(c.text, opened=prompt_think_state(engine.template, rendered)
                                                  == "opened")
        pred = read_answer(q, answer) if complete else None
        items.append(_item(q, pred, len(pool), output=c.text, reasoning=reasoning, complete=complete))
    return items


def run_mcq(model: str, args: McqArgs, adapter: str | None = None, template: str | None = None,
            dtype: str = "auto", trust_remote_code: bool = False) -> dict:
    """Evaluate `model` on args.data; returns the result dict (summary + items)."""
    for name, value, allowed in (("style", args.style or "ceval", STYLES), ("method", args.method, SCORING),
                                 ("format", args.format or "ceval", tuple(FORMATS))):
        if value not in allowed:
            raise UserError(f"{name} {value!r}: expected one of {', '.join(allowed)}")
    fmt, questions = load_set(args.data, args.split, args.subjects, args.limit, args.subject, args.format)
    style = args.style or FORMATS[fmt].style
    shots = load_shots(args, list(questions))
    count = sum(map(len, questions.values()))
    log.info("mcq: %d %s questions in %d subjects, %d-shot, %s style, %s", count, fmt, len(questions), args.shots,
             style, args.method)
    chat = template != "none"
    if args.method == "generate":
        if not chat:
            raise UserError("--method generate needs a chat template (not --template none)")
        from medgpt.infer.engine import load_engine

        with load_engine(model, adapter=adapter, template=template, dtype=dtype,
                         trust_remote_code=trust_remote_code, max_batch_size=args.batch_size) as engine:
            items = evaluate_generate(engine, questions, shots, style, args.max_new_tokens, args.shots)
    else:
        for qs in questions.values():
            for q in qs:
                choices_scored(q)  # too many answer sets is an error before the model loads
        from medgpt.models import open_model

        opened = open_model(model, adapter, template, dtype=dtype, trust_remote_code=trust_remote_code)
        scorer = LoglikScorer(opened.model, opened.tokenizer, opened.template, args.batch_size)
        items = evaluate_loglik(scorer, questions, shots, style, chat, args.max_length, args.shots)
    summary = summarize(items)
    return {"task": "mcq", "model": model, "adapter": adapter, "data": args.data, "format": fmt, "split": args.split,
            "style": style, "shots": args.shots, "method": args.method, "template": template or "model's",
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
    fmt, questions = load_set(args.data, args.split, args.subjects, args.limit, args.subject, args.format)
    style = args.style or FORMATS[fmt].style
    odd = next((q for qs in questions.values() for q in qs if q.rule != "single" or len(q.choices) != 4), None)
    if odd is not None:
        raise UserError(f"{odd.loc}: --emit-lm-eval-task writes four-option single-answer tasks; lm-eval has its "
                        f"own medqa_4options, medmcqa, pubmedqa and mmlu_* tasks for those benchmarks")
    shots = load_shots(args, list(questions))
    written = []

    def row(q: Question) -> dict:
        return {"id": q.id, "question": q.question, **dict(zip(LETTERS, q.choices)), "answer": q.answer}

    for subject, qs in questions.items():
        name = "medgpt_" + "".join(c if c.isalnum() else "_" for c in subject)
        write_jsonl(out / f"{name}.jsonl", [row(q) for q in qs])
        files = {"test": str((out / f"{name}.jsonl").resolve())}
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files}, "test_split": "test",
                "output_type": "multiple_choice", "description": header(style, subject),
                "doc_to_text": _lm_eval_text(style), "doc_to_choice": list(LETTERS),
                "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer)}}",
                "target_delimiter": _answer_suffix(style, "").rstrip("\n"), "fewshot_delimiter": "\n\n",
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
