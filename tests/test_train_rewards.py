"""medgpt.train.rewards: the GRPO and PPO reward functions on fixed completions (the answer letter read as
`medgpt.data.answers.extract_choice` reads it), alone and summed as TRL's GRPOConfig sums them; a trained reward
model as a reward; reward functions by name or import path."""

from __future__ import annotations

import pytest

from medgpt.data.answers import extract_choice
from medgpt.errors import UserError
from medgpt.train.rewards import (AUTO, REWARD_FUNCTIONS, answer_format, keyword_reward, length_reward, mcq_accuracy,
                                  reward_function)


def test_reward_model_is_a_grpo_reward(reward_model):
    from medgpt.train.rewards import RewardArgs, build_rewards

    folder, _ = reward_model
    funcs = build_rewards(RewardArgs(reward_fn="auto", reward_model=str(folder)))
    assert [getattr(f, "__name__", None) for f in funcs] == ["mcq_accuracy", "answer_format", "reward_model"]
    prompt = [{"role": "user", "content": "What should I do about my cough?"}]
    replies = [[{"role": "assistant", "content": "See a doctor about the cough."}],
               [{"role": "assistant", "content": "Ignore the cough."}]]
    good, bad = funcs[2](prompts=[prompt, prompt], completions=replies, answer=[None, None])
    assert good > bad
    with pytest.raises(UserError, match="reward_model needs"):
        build_rewards(RewardArgs(reward_fn="mcq_accuracy,reward_model"))
    with pytest.raises(UserError, match="expected auto or"):
        build_rewards(RewardArgs(reward_fn="accuracy"))


def test_mcq_accuracy_on_fixed_completions():
    completions = ["B", "答案是C。", "The answer is (D) because...", "A. Aspirin", "[{]", "A or B?",
                   "Vitamin B12 deficiency; the correct option is A"]
    answers = ["B", "C", "A", "A", "A", "A", "A"]
    assert mcq_accuracy(completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    chat = [[{"role": "assistant", "content": "选B"}]]
    assert mcq_accuracy(chat, answer=["B"]) == [1.0]
    assert mcq_accuracy(["B", "B"], answer=[None, "B"]) == [None, 1.0]  # open questions are left out
    assert mcq_accuracy(["E", "E"], answer=["E", "B"], options=["ABCDE", "ABCD"]) == [1.0, 0.0]
    assert extract_choice("The answer is a combination of two drugs.") is None


# explained, lowercase and full-width answers to a question whose key is B (the letters as a reader reads them)
RIGHT = ["B", "选项A错误，选项C错误，所以答案是B", "Answer: B. Option A is a distractor.",
         "The answer is (B). However option C is also reasonable in patients with renal impairment.", "**Answer:** B",
         "ｂ", "Ｂ", "答案：b", "分析：A项描述的是一期愈合，不符合；C项和D项均为并发症，与题干无关。" * 6 + "所以答案是B。"]


NO_ANSWER = ["", "   ", "我不知道", "答案是维生素B12", "B和C", "B or C", "The answer depends on the patient.",
             "Vitamin B12 deficiency causes megaloblastic anaemia."]


def test_rewards_never_tie_an_unanswered_reply_with_a_correct_one():
    """Per reward function and summed as GRPO sums them with its default weights (TRL's GRPOConfig: reward_weights
    unset = 1 each), every correct reply scores above every empty or unanswered one."""
    from trl import GRPOConfig

    assert GRPOConfig(output_dir="unused", use_cpu=True).reward_weights is None
    replies = RIGHT + NO_ANSWER
    scores = {name: REWARD_FUNCTIONS[name](replies, answer=["B"] * len(replies), options=["ABCD"] * len(replies))
              for name in AUTO}
    assert scores["mcq_accuracy"] == [1.0] * len(RIGHT) + [0.0] * len(NO_ANSWER)
    summed = [sum(column) for column in zip(*scores.values())]
    for values in (*scores.values(), summed):
        assert min(values[:len(RIGHT)]) > max(values[len(RIGHT):]), values
    assert answer_format(RIGHT[-1:], answer=["B"])[0] == 0.5  # explained past 200 characters: still above no answer
    lengths = length_reward(RIGHT + ["", " "])
    assert min(lengths[:len(RIGHT)]) > max(lengths[len(RIGHT):]) == 0.0


def test_format_and_length_rewards():
    assert answer_format(["B", "I think A or maybe B"], answer=["B", "B"]) == [1.0, 0.0]
    open_ = answer_format(["Rest and drink water.", "Rest and drink water and", ""], answer=[None] * 3)
    assert open_[0] == 1.0 and open_[1] < 1.0 and open_[2] == 0.0
    assert answer_format(["Take it. " * 10], answer=[None])[0] < 1.0  # repetition
    assert length_reward(["x" * 10, "x" * 40, ""], target_chars=20) == [1.0, 0.5, 0.0]


def test_reward_functions_by_name_or_import_path():
    assert reward_function("length") is REWARD_FUNCTIONS["length"]
    from medgpt.train import rewards

    assert reward_function("medgpt.train.rewards:answer_format") is rewards.answer_format
    scores = keyword_reward([[{"role": "assistant", "content": "See a Doctor about the fever."}]],
                            keywords=["doctor", "fever", "rest"])
    assert scores == [pytest.approx(2 / 3)]
    with pytest.raises(UserError, match="cannot import"):
        reward_function("medgpt.nothing:here")
    with pytest.raises(UserError, match="expected one of"):
        reward_function("nonsense")


def test_answer_rewards_read_only_the_answer_after_the_reasoning():
    """A reasoning model weighs options in its think block: mcq_accuracy, keyword and length read the answer after
    `</think>` (TRL's conversational completions may carry the thought as `reasoning_content`); a reply cut inside
    its reasoning has no answer."""
    from medgpt.train.rewards import keyword_reward, length_reward, mcq_accuracy, reasoning_format

    thought = "<think>\nA looks tempting, but insulin dosing points to B.\n</think>\n\n"
    replies = [thought + "The answer is B.", thought + "The answer is A.", "<think>\nA or B? Insulin",
               [{"role": "assistant", "reasoning_content": "A looks tempting", "content": "B"}]]
    assert mcq_accuracy(replies, answer=["B"] * 4) == [1.0, 0.0, 0.0, 1.0]
    assert keyword_reward(replies, keywords=["insulin"]) == [0.0, 0.0, 0.0, 0.0]
    assert length_reward(replies, target_chars=5)[2] == 0.0
    # reasoning then a committed answer: full; no think block or cut inside it: 0; an empty thought: half
    assert reasoning_format(replies + ["B", "<think>\n\n</think>\n\nB"], answer=["B"] * 6) == [
        1.0, 1.0, 0.0, 1.0, 0.0, 0.5]
    assert reasoning_format([thought + "I cannot say.", thought], answer=[None, None]) == [1.0, 0.5]
