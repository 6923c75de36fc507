"""medgpt.eval.compare: result files side by side (`eval compare`, printed and as Markdown), with paired intervals
and McNemar's test on the items, so a real change is told from noise."""

from __future__ import annotations

import json
import math

from medgpt.cli import main
from medgpt.eval import compare


def test_compare_table(tmp_path, capsys):
    a, b = tmp_path / "base.json", tmp_path / "tuned.json"
    a.write_text(json.dumps({"metrics": {"accuracy": 25.0, "accuracy/physician": 20.0}, "items_file": "x"}))
    b.write_text(json.dumps({"metrics": {"accuracy": 31.5, "accuracy/physician": 20.0, "bleu-1": 3.0}}))
    table = compare.compare([a, b])
    rows = {r["metric"]: r for r in table["rows"]}
    assert rows["accuracy"]["deltas"] == [6.5] and rows["bleu-1"]["values"] == [None, 3.0]
    md = tmp_path / "cmp.md"
    assert main(["eval", "compare", str(a), str(b), "--markdown", str(md)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "+6.50" in printed
    assert md.read_text().splitlines()[0] == "| metric | base | tuned | Δ tuned |"
    assert "| accuracy | 25.00 | 31.50 | +6.50 |" in md.read_text()
    assert math.isclose(compare.load_metrics(b)[1]["bleu-1"], 3.0)
    (tmp_path / "bad.json").write_text("{")
    assert main(["eval", "compare", str(tmp_path / "bad.json")]) == 2


def test_compare_reports_paired_intervals(tmp_path, capsys):
    def write(name, correct):
        items = [{"subject": "s", "id": str(i), "correct": c} for i, c in enumerate(correct)]
        (tmp_path / f"{name}.items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"metrics": {"accuracy": 100 * sum(correct) / len(correct)}, "items_file": f"{name}.items.jsonl"}))
        return tmp_path / f"{name}.json"

    base = write("base", [False] * 30 + [True] * 10)
    same_ish = write("noise", [True] + [False] * 29 + [True] * 9 + [False])
    better = write("better", [True] * 20 + [False] * 10 + [True] * 10)
    table = compare.compare([base, same_ish, better])
    row = next(r for r in table["rows"] if r["metric"] == "accuracy")
    noise, real = row["tests"]
    assert not noise["significant"] and noise["ci95"][0] < 0 < noise["ci95"][1] and noise["p_mcnemar"] == 1
    assert real["significant"] and real["ci95"][0] > 0 and real["p_mcnemar"] < 1e-4
    assert main(["eval", "compare", str(base), str(same_ish), str(better)]) == 0
    printed = capsys.readouterr().out
    assert "+0.00 [" in printed and "not significant" in printed and "+50.00 [" in printed
