"""`medgpt.infer.chat`: the terminal chat session keeps the history, forgets it on /clear, passes each turn through
the retrieval hook and shows its sources, and marks an answer cut at the token limit; the reference is the engine's
own completion of the same prompt."""

from __future__ import annotations

import io

from _inference import QUESTIONS

from medgpt.infer.base import GenerationParams


def test_chat_session_history_clear_and_retrieval_hook(engine):
    from medgpt.infer.chat import ChatSession, run_chat

    seen = []

    def augment(messages):
        seen.append(messages)
        context = {"role": "system", "content": "Context: fevers are common."}
        return [context, *messages], [{"source": "kb/fever.md", "text": "Fevers are common."}]

    session = ChatSession(engine, GenerationParams(max_new_tokens=5), augment=augment)
    lines = iter(["What is a fever?", "And a cold?", "/clear", "Hi", "/exit", "never read"])
    out = io.StringIO()
    run_chat(session, read=lambda prompt: next(lines), out=out)
    first_answer = engine.generate([[{"role": "system", "content": "Context: fevers are common."},
                                     {"role": "user", "content": "What is a fever?"}]],
                                    GenerationParams(max_new_tokens=5))[0].text
    assert f"assistant> {first_answer}\n" in out.getvalue()
    assert "[1] kb/fever.md: Fevers are common." in out.getvalue()
    assert [len(m) for m in seen] == [1, 3, 1]  # the second turn saw the first; /clear forgot both
    assert seen[1][1] == {"role": "assistant", "content": first_answer}
    assert next(lines) == "never read" and len(session.history) == 2


def test_terminal_chat_marks_an_answer_cut_at_the_token_limit(engine):
    from medgpt.infer.chat import ChatSession, run_chat

    # the reference: the engine's own completion of the same prompt, cut at 5 tokens and one that stops first
    cut = engine.generate(QUESTIONS[:1], GenerationParams(max_new_tokens=5))[0]
    assert cut.finish_reason == "length" and cut.completion_tokens == 5
    stop = cut.text[1:3]
    assert stop.strip()
    for params, marked in ((GenerationParams(max_new_tokens=5), True),
                           (GenerationParams(max_new_tokens=5, stop=[stop]), False)):
        session = ChatSession(engine, params)
        lines = iter([QUESTIONS[0][0]["content"], "/exit"])
        out = io.StringIO()
        run_chat(session, read=lambda prompt: next(lines), out=out)
        assert ("(cut at 5 tokens" in out.getvalue()) is marked, out.getvalue()
        assert session.completion.finish_reason == ("length" if marked else "stop")
