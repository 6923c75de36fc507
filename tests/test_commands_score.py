"""medgpt.commands.score: `medgpt score` with the session's trained reward model ranks the chosen reply of each
pair above the rejected one, from the command line and from files, and says where a bad row is."""

from __future__ import annotations

import json

from _stage_runs import keyword_pairs, write_jsonl

from medgpt.cli import main


def test_score_command_ranks_pairs(reward_model, tmp_path, capsys):
    folder, _ = reward_model
    scores = {}
    for reply in ("See a doctor about the fever.", "Ignore the fever."):
        assert main(["score", "--model", str(folder), "--prompt", "What should I do about my fever?",
                     "--response", reply]) == 0
        scores[reply] = float(capsys.readouterr().out)
    assert scores["See a doctor about the fever."] > scores["Ignore the fever."]

    pairs = keyword_pairs(tmp_path / "pairs.jsonl")
    single = write_jsonl(tmp_path / "single.jsonl", [{"prompt": "My rash?", "response": "See a doctor about the rash."}])
    assert main(["score", "--model", str(folder), "--input", f"{pairs},{single}", "--output", str(tmp_path / "o.jsonl")]) == 0
    assert "pairwise accuracy 1.000 (12/12" in capsys.readouterr().err
    scored = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(scored) == 13 and all(r["chosen_score"] > r["rejected_score"] for r in scored[:12])
    assert isinstance(scored[-1]["score"], float)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q"}\n', encoding="utf-8")
    assert main(["score", "--model", str(folder), "--input", str(bad)]) == 2
    assert f"{bad}:1: missing field" in capsys.readouterr().err
