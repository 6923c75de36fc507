"""`medgpt tokenizer extend` from the command line: the summary it prints (counts, tokens per character, loss,
segmentations) agrees with the vocab_report.json it writes, and a bad corpus is an error with exit status 2."""

from __future__ import annotations

import json

from medgpt.cli import main


def test_extend_prints_the_report_it_writes(tiny_model, sample_data, tmp_path, capsys):
    out = tmp_path / "extended"
    code = main(["tokenizer", "extend", "--model", tiny_model, "--corpus", str(sample_data / "pt" / "medical_corpus.txt"),
                 "--out", str(out), "--vocab-size", "1000"])
    printed = capsys.readouterr().out
    report = json.loads((out / "vocab_report.json").read_text(encoding="utf-8"))
    assert code == 0 and f"added {report['pieces_added']} pieces (byte_level tokenizer)" in printed
    ratio = report["corpus"]["tokens_per_char"]
    rows = {" ".join(line.split()[:2]): line.split()[2:] for line in printed.splitlines() if line.startswith("  corpus")}
    assert rows["corpus zh"] == [f"{ratio['before']['zh']:.3f}", f"{ratio['after']['zh']:.3f}"]
    assert f"round trip: {report['roundtrip']['lines']} lines decode to themselves" in printed
    assert report["examples"][0]["text"][:60] in printed and f"extended model written to {out}" in printed


def test_a_corpus_without_chinese_is_an_error(tiny_model, tmp_path, capsys):
    english = tmp_path / "en.txt"
    english.write_text("Blood pressure is measured in mmHg.\n", encoding="utf-8")
    code = main(["tokenizer", "extend", "--model", tiny_model, "--corpus", str(english), "--out", str(tmp_path / "o")])
    assert code == 2 and "no Chinese (CJK) text" in capsys.readouterr().err and not (tmp_path / "o").exists()
