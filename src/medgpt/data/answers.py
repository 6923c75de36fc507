"""Which option a multiple-choice reply commits to: the one reader of `eval mcq --method generate` and of the
GRPO/PPO rewards, so that a reply scored right in evaluation is rewarded as right in training.

The reply is read as a person would read it, most explicit statement first:

1. a stated answer: "答案是B", "故选C", "正确的选项是A", "Answer: B", "The answer is (B)", "**Answer:** B",
   "I would choose D", "\\boxed{B}" (all of them must agree: a reply that states two answers has chosen none);
2. else an option called right: "B选项正确", "C符合题意", "Option B is correct" (all of them must agree);
3. else a reply that opens with a letter: "B", "B. 柏油样便", "(C) because ..." (not one that lists the options);
4. else the only option letter it names, leaving out the options it rules out ("A错误", "not C").

Full-width and lowercase letters count ("ｂ", "Ｂ", "answer: b"); a letter inside a word or a name is no option
("维生素B12", "HbA1c", "hepatitis B", the article in "A patient with ..."). A hedge ("B和C", "B or C", "答案是A或B")
is no answer, nor is a stated letter that is not one of the options. Options run from A to J (MedXpertQA's ten).

`extract_choices` reads the set of options a multiple-answer reply commits to ("ABD", "A、B、D", "答案：BD",
"A, B and D"), as a string of sorted letters; `extract_label` the yes/no/maybe of a PubMedQA reply. Standard
library only.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["extract_choice", "extract_choices", "extract_label"]

_L = r"(?P<l>[A-Ja-j])"
_OPEN, _CLOSE = r"[(\[【]?\s*", r"\s*[)\]】]?"
_LETTER = _OPEN + _L + _CLOSE + r"(?![A-Za-z0-9])"
_STATED = [re.compile(p, re.IGNORECASE) for p in (
    r"答案(?:应该|应当|应)?(?:是|为|选择|选项|选)?\s*[:：]?\s*(?:选项|选)?\s*" + _LETTER,
    r"(?:选择|选)(?:答案)?\s*[:：]?\s*(?:选项)?\s*" + _LETTER,
    r"正确(?:的)?(?:一项|选项|选择)(?:应该|应)?(?:是|为)\s*[:：]?\s*(?:选项)?\s*" + _LETTER,
    r"\banswer\b(?:\s+to\s+(?:this|the)\s+question)?\s*(?:is|would\s+be|should\s+be|will\s+be|must\s+be)?\s*"
    r"[:\-]?\s*(?:option\s+|choice\s+)?" + _LETTER,
    r"\b(?:correct|right|best|final)\s+(?:option|choice)\s*(?:is|would\s+be|should\s+be)?\s*[:\-]?\s*" + _LETTER,
    r"\b(?:choose|pick|select|go\s+with)\s+(?:option\s+|choice\s+)?" + _LETTER,
    r"\\boxed\{\s*" + _L + r"\s*\}",
)]
_CALLED_RIGHT = [re.compile(p, re.IGNORECASE) for p in (
    r"(?<![A-Za-z0-9])" + _LETTER + r"\s*(?:选?项)?\s*(?:是|为)?\s*(?:正确|对的|符合题意|当选|最恰当|最合适|最佳|最准确)",
    r"\b(?:option\s+|choice\s+)?" + _LETTER + r"\s+is\s+(?:the\s+)?(?:correct|right|best)\b",
)]
_LEAD = re.compile(r"\s*" + _LETTER + r"(?=$|[\s.。:：,，、;；!！?？)）])")
_ITEM = re.compile(r"^\s*[(\[【]?\s*([A-J])\s*[)\]】.。:：、]", re.MULTILINE)  # a line that lists an option
_RULED_OUT = [re.compile(p, re.IGNORECASE) for p in (
    r"(?<![A-Za-z0-9])" + _LETTER + r"\s*(?:选?项)?\s*(?:是)?\s*(?:错误|错的|不正确|不对|不符合|不选|排除)",
    r"(?:不是|不选|排除|并非|\bnot)\s*(?:选项|option\s+)?" + _LETTER,
    r"(?<![A-Za-z0-9])" + _LETTER + r"\s+is\s+(?:wrong|incorrect|false|not\b)",
)]
_NAMED = re.compile(r"(?<![A-Za-z0-9])(?P<l>[A-J])(?![A-Za-z0-9])")
# after a letter: "或C", "和 C", "、C", "/C", " or C", " and (C)" make it a hedge
_HEDGE = re.compile(r"\s*[)\]】]?\s*(?:或者|或|还是|和|与|及|、|/|&|\bor\b|\band\b)\s*(?:选项|option\s+)?\s*"
                    r"[(\[【]?\s*[A-Ja-j](?![A-Za-z0-9])", re.IGNORECASE)
_NEGATED = re.compile(r"(?:不|不应|不应该|不能|不要|并非|不是|\bnot|n't|\bnever)\s*$", re.IGNORECASE)
# a capital letter after these words, or before these characters, is part of a name, not an option
_NAME_WORDS = {"vitamin", "hepatitis", "type", "types", "group", "class", "grade", "stage", "category", "factor",
               "phase", "lead", "protein", "plan", "influenza", "strep", "hemophilia", "haemophilia", "zone", "blood",
               "fraction", "component", "serotype", "subtype", "schedule", "list"}
_NAME_BEFORE, _NAME_AFTER = ("维生素", "乙肝", "甲肝"), tuple("型族组类级期因")
# words after which a sentence-opening "A" is still a letter ("A is correct", "A or B"), not the article
_AFTER_LETTER_A = {"is", "or", "and", "was", "would", "seems", "should", "because", "since", "looks"}


def _clean(text: str) -> str:
    """Full-width forms as ASCII (NFKC: "Ｂ" -> "B", "（" -> "("), markdown emphasis and code marks removed."""
    return re.sub(r"\*\*|__|[*`]", "", unicodedata.normalize("NFKC", text))


def _is_letter(text: str, match: re.Match, opening: bool = False) -> bool:
    """Whether the matched letter names an option rather than being the English article or pronoun: a lowercase
    "a" or "i" followed by a word ("is a combination") is not; nor is "I'm", nor a capital "A" or "I" followed by
    a lowercase word where the letter stands alone (`opening`: "A patient with ...", "I think ..."), unless that
    word is one that follows a letter."""
    letter, rest = match.group("l"), text[match.end("l"):]
    word = re.match(r"\s+([A-Za-z]+)", rest)
    if letter in ("a", "i"):
        return word is None
    if letter == "I" and rest[:1] in ("'", "\u2019"):  # "I'm", "I'd": the pronoun
        return False
    if letter in ("A", "I") and opening and word and word.group(1).islower():
        return word.group(1) in _AFTER_LETTER_A
    return True


def _found(patterns: list[re.Pattern], text: str) -> list[tuple[str, bool]]:
    """(letter, hedged) for every match that is not negated, in reading order."""
    out = []
    for pattern in patterns:
        for m in pattern.finditer(text):
            if _NEGATED.search(text[:m.start()]) or not _is_letter(text, m):
                continue
            out.append((m.start(), m.group("l").upper(), bool(_HEDGE.match(text, m.end()))))
    return [(letter, hedged) for _, letter, hedged in sorted(out)]


def _named(text: str) -> set[str]:
    """Capital letters the reply names as options: not inside words, not the article, not part of a name such
    as "hepatitis B", "维生素B" or "A型"."""
    names = set()
    for m in _NAMED.finditer(text):
        before = re.search(r"([A-Za-z]+)\s+$", text[:m.start()])
        if (before and before.group(1).lower() in _NAME_WORDS) or text[:m.start()].endswith(_NAME_BEFORE) \
                or text[m.end():m.end() + 1] in _NAME_AFTER or not _is_letter(text, m, opening=True):
            continue
        names.add(m.group("l"))
    return names


def _agreed(found: list[tuple[str, bool]], letters: str) -> str | None:
    """The one letter all statements give, when none hedges and it is an option."""
    chosen = {letter for letter, _ in found}
    if any(hedged for _, hedged in found) or len(chosen) != 1:
        return None
    letter = chosen.pop()
    return letter if letter in letters else None


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The option letter (uppercase) a reply commits to, or None when it commits to none of `letters`."""
    text = _clean(text or "").strip()
    for patterns in (_STATED, _CALLED_RIGHT):
        if found := _found(patterns, text):
            return _agreed(found, letters)
    lead = _LEAD.match(text)
    if lead and _is_letter(text, lead, opening=True) and len(set(_ITEM.findall(text))) <= 1:
        if _HEDGE.match(text, lead.end()):
            return None
        letter = lead.group("l").upper()
        return letter if letter in letters else None
    ruled_out = {letter for letter, _ in _found(_RULED_OUT, text)}
    named = (_named(text) & set(letters)) - ruled_out
    return named.pop() if len(named) == 1 else None


# a run of option letters: "ABD", "A、B、D", "A, B and D", "B/C"
_SEP = r"\s*(?:[、,，/&+;；]\s*)?(?:(?:and|以及|和|与|及)\s*)?"
_RUN = r"(?P<set>[A-Ja-j](?:" + _SEP + r"[A-Ja-j])*)(?![A-Za-z0-9])"
_STATED_SET = [re.compile(p, re.IGNORECASE) for p in (
    r"答案(?:应该|应当|应)?(?:是|为|选择|选项|选)?\s*[:：]?\s*(?:选项)?\s*" + _RUN,
    r"(?:选择|故选|应选|选)(?:答案)?\s*[:：]?\s*(?:选项)?\s*" + _RUN,
    r"正确(?:的)?(?:答案|选项|选择)(?:应该|应)?(?:是|为|有)\s*[:：]?\s*(?:选项)?\s*" + _RUN,
    r"\banswers?\b\s*(?:is|are|would\s+be|should\s+be)?\s*[:\-]?\s*(?:options?\s+|choices?\s+)?" + _RUN,
    r"\b(?:correct|right)\s+(?:options|choices|answers)\s*(?:are|would\s+be)?\s*[:\-]?\s*" + _RUN,
)]
_LEAD_SET = re.compile(r"\s*[(\[【]?\s*(?P<set>[A-J](?:" + _SEP + r"[A-J])*)\s*[)\]】]?(?=$|[\s.。:：,，;；!！)])")


def _letters_of(run: str) -> set[str]:
    return set(re.findall(r"[A-J]", run.upper().replace("AND", "")))


def extract_choices(text: str, letters: str = "ABCDE") -> str | None:
    """The set of options (sorted letters, "ABD") a multiple-answer reply commits to: a stated answer ("答案：BD",
    "The answers are A, B and D"; every statement must agree), else a reply that opens with the letters ("ABD",
    "A、B、D"), else the single option `extract_choice` reads; None when it commits to none, or names a letter that
    is not one of `letters`."""
    text = _clean(text or "").strip()
    found = []
    for pattern in _STATED_SET:
        for m in pattern.finditer(text):
            run = m.group("set")
            if _NEGATED.search(text[:m.start()]) or (run in ("a", "i") and re.match(r"\s+[A-Za-z]", text[m.end():])):
                continue  # "not A", the article in "the answer is a combination"
            found.append(frozenset(_letters_of(run)))
    chosen = set(found)
    if len(chosen) > 1:
        return None
    if not chosen and (lead := _LEAD_SET.match(text)) and len(_letters_of(lead.group("set"))) > 1 \
            and len(set(_ITEM.findall(text))) <= 1:
        chosen = {frozenset(_letters_of(lead.group("set")))}
    if not chosen:
        return extract_choice(text, letters)
    picked = chosen.pop()
    return "".join(sorted(picked)) if picked <= set(letters) else None


_LABEL_STATED = r"\b(?:answer|decision|conclusion)\b\s*(?:is|would\s+be)?\s*[:\-]?\s*"


def extract_label(text: str, labels: tuple[str, ...] = ("yes", "no", "maybe")) -> str | None:
    """The label (one of `labels`, as given) a reply commits to: a stated answer ("Answer: yes"; all must agree),
    else a reply that opens with a label ("No, the trial found ..."); None otherwise."""
    text = _clean(text or "").strip()
    words = "|".join(re.escape(label) for label in labels)
    stated = {m.group(1).lower() for m in re.finditer(_LABEL_STATED + r"(" + words + r")\b", text, re.IGNORECASE)}
    if not stated and (lead := re.match(r"[(\[]?(" + words + r")\b(?![-'])", text, re.IGNORECASE)):
        stated = {lead.group(1).lower()}
    by_lower = {label.lower(): label for label in labels}
    return by_lower[stated.pop()] if len(stated) == 1 else None
