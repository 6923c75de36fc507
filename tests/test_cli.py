"""Commands wired across modules: `medgpt data contamination` finds a copied eval question; `medgpt --help`
imports none of the heavy libraries."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from medgpt.cli import main


def test_data_contamination_lists_the_copied_item(tmp_path, sample_data, capsys):
    val = sample_data / "mcq" / "val" / "clinical_medicine_val.csv"
    question = next(csv.DictReader(val.open(encoding="utf-8")))["question"]
    train = tmp_path / "train.jsonl"
    rows = [
        {"conversations": [{"from": "human", "value": "感冒了应该多喝水吗？"}, {"from": "gpt", "value": "是的，注意休息并补充水分。"}]},
        {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "答案见教材。"}]},
    ]
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "report.json"
    code = main(["data", "contamination", str(train), "--against", str(val), "--embedder", "tfidf",
                 "--output", str(out), "--fail"])
    assert code == 1
    report = json.loads(out.read_text())
    assert {pair["train"] for pair in report["pairs"]} == {f"{train}:2"}
    assert "1 of 2 training items contaminate" in capsys.readouterr().out


def test_help_does_not_import_heavy_libraries():
    code = "import sys\nfrom medgpt.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nprint(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("[]")
    assert "train" in done.stdout and "serve" in done.stdout
