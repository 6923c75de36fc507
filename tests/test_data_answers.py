"""medgpt.data.answers: `extract_choice` takes from a reply the letter a reader takes from it, or None where the
reply commits to no single option (the reader `eval mcq --method generate` and the GRPO/PPO rewards use). The
reference is a table of replies and letters written by hand: the phrasings C-Eval's and CMMLU's official extraction
patterns are written for, and explained, hedged and letter-free replies of chat models, in Chinese and English."""

from __future__ import annotations

import pytest

from medgpt.data.answers import extract_choice


# Replies to four-option questions (A-D) and the letter a reader takes from each, written by hand: None where
# the reply commits to no single option. The first block follows the phrasings C-Eval's and CMMLU's official
# extraction patterns are written for (答案是/答案为/答案应为/答案选/答案：, 故选, 正确的选项是, 正确的一项是,
# X选项正确, X符合题意, X当选, a reply that opens with the letter); the rest are explained, hedged and
# letter-free replies of chat models, in Chinese and English.
REPLIES = [
    ("答案是B", "B"), ("答案是：B", "B"), ("答案为 C。因为肾素-血管紧张素系统被激活。", "C"), ("答案应为D", "D"),
    ("答案选A", "A"), ("答案是选项C", "C"), ("答案选项：B", "B"), ("答案：A\n解析：阿司匹林抑制环氧化酶。", "A"),
    ("故选D。", "D"), ("选择答案C", "C"), ("正确的选项是A", "A"), ("正确的一项是D", "D"), ("B选项正确", "B"),
    ("选项B正确", "B"), ("C符合题意", "C"), ("A当选，其余选项均与题干不符。", "A"), ("应该是C", "C"),
    ("C的说法是正确的", "C"), ("D\n\n解析：糖化血红蛋白反映近2-3个月的平均血糖。", "D"), ("B. 柏油样便", "B"),
    # explained answers
    ("选项A错误，选项C错误，所以答案是B", "B"), ("A项错误，C项错误，D项错误，B项正确。", "B"),
    ("首先分析A选项，它描述的是一期愈合；B选项描述的是二期愈合；因此选C。", "C"), ("答案：A。B、C、D均错误。", "A"),
    ("应选B，因为华法林与胺碘酮合用会升高INR。", "B"), ("我认为应该选B", "B"), ("不应选A，应选C。", "C"),
    ("答案不是A，是D。", "D"), ("Answer: B. Option A is a distractor.", "B"),
    ("The answer is (B). However option C is also reasonable in some patients.", "B"), ("**Answer:** B", "B"),
    ("**B**", "B"), ("Final answer: \\boxed{C}", "C"), ("The answer is D.", "D"),
    ("The answer to this question is A because ACE inhibitors cause a dry cough.", "A"),
    ("Vitamin B12 deficiency; the correct option is A", "A"), ("Option B is correct: metformin is first-line.", "B"),
    ("B is the correct answer since the INR is above range.", "B"), ("I would choose D.", "D"),
    ("(A) because it lowers blood pressure.", "A"), ("C. Insulin", "C"),
    ("Option A is wrong, option C is wrong, so B.", "B"), ("The answer is not A; it is C.", "C"),
    # lowercase and full-width letters
    ("b", "B"), ("Ｂ", "B"), ("ｂ", "B"), ("（Ｂ）", "B"), ("答案：Ｃ", "C"), ("The correct answer is c.", "C"),
    ("answer: b", "B"), ("Correct answer: (d)", "D"), ("答案 B", "B"),
    # no single option
    ("答案是维生素B12", None), ("维生素B12缺乏可引起巨幼细胞贫血。", None), ("B和C", None), ("B和C都正确", None),
    ("答案是A或B", None), ("A、B都有可能", None), ("A 或 B", None), ("我不知道", None), ("", None),
    ("答案是E", None), ("答案：BC", None), ("A. 阿司匹林\nB. 华法林\nC. 肝素\nD. 氯吡格雷", None),
    ("The answer is a combination of two drugs.", None),
    ("A patient with hepatitis B should be vaccinated against hepatitis A.", None), ("A or B?", None),
    ("B or C", None), ("I think A or maybe B", None), ("Both B and D could be right.", None), ("I'm not sure.", None),
    ("The answer is E.", None), ("HbA1c above 6.5% confirms diabetes.", None),
]


@pytest.mark.parametrize("reply,letter", REPLIES)
def test_extract_choice_reads_replies_as_a_reader_does(reply, letter):
    assert extract_choice(reply) == letter


def test_extract_choice_table_covers_both_languages_and_refusals():
    cjk = [r for r, _ in REPLIES if any("\u4e00" <= ch <= "\u9fff" for ch in r)]
    assert len(REPLIES) >= 40 and 20 <= len(cjk) <= len(REPLIES) - 20
    assert sum(letter is None for _, letter in REPLIES) >= 15
    assert extract_choice("E", "ABCDE") == "E" and extract_choice("E") is None


# Replies to multiple-answer questions (options A-E) and the set a reader takes from each, written by hand.
SETS = [
    ("ABD", "ABD"), ("A、B、D", "ABD"), ("答案：BD", "BD"), ("A, B and D", "ABD"), ("答案是A、C、E。", "ACE"),
    ("The answers are A, B, and D.", "ABD"), ("正确答案为ACE", "ACE"), ("故选BC", "BC"), ("B", "B"), ("答案：A", "A"),
    ("选项A错误，答案是CD", "CD"), ("答案：BD。B和D均正确。", "BD"),
    ("答案：BD。不对，答案是BC", None), ("A. 阿司匹林\nB. 华法林", None), ("ABF", None), ("我不确定", None),
    ("The answer is a combination of drugs.", None),
]


@pytest.mark.parametrize("reply,answer", SETS)
def test_extract_choices_reads_answer_sets(reply, answer):
    from medgpt.data.answers import extract_choices

    assert extract_choices(reply, "ABCDE") == answer


def test_letters_past_d_and_yes_no_maybe():
    from medgpt.data.answers import extract_label

    letters = "ABCDEFGHIJ"  # MedXpertQA's ten options
    assert extract_choice("The answer is J.", letters) == "J" and extract_choice("I think it is G.", letters) == "G"
    assert extract_choice("I'm fairly sure: H", letters) == "H" and extract_choice("I", letters) == "I"
    assert extract_choice("The answer is J.") is None  # not one of A-D
    assert [extract_label(t) for t in ("yes", "No, it did not.", "Answer: maybe", "The answer is yes.", "unclear",
                                       "Answer: yes. Answer: no.")] == ["yes", "no", "maybe", "yes", None, None]
