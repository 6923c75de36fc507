"""medgpt data dedup: exact and MinHash near-duplicate removal, checked against plain-Python references."""

import json
import random

import pytest

from medgpt.cli import main
from medgpt.data.readers import read_records
from medgpt.data.stats import DataStats
from medgpt.select import dedup

WORDS = [f"w{i}" for i in range(2000)]


def _question(rng: random.Random, n: int = 40) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _sft(question: str, answer: str = "see a doctor") -> dict:
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """200 distinct conversations, 40 copies with changed case and spacing, 30 with one word of 80 changed."""
    rng = random.Random(0)
    rows = [_sft(_question(rng, 80)) for _ in range(200)]
    for i in rng.sample(range(200), 40):
        q = rows[i]["conversations"][0]["value"]
        rows.append(_sft("  " + q.upper().replace(" ", "  ") + " "))
    for i in rng.sample(range(200), 30):
        words = rows[i]["conversations"][0]["value"].split()
        words[rng.randrange(len(words))] = "changed"
        rows.append(_sft(" ".join(words)))
    path = tmp_path_factory.mktemp("dedup") / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _exact_jaccard(a: str, b: str) -> float:
    x, y = dedup.shingles(dedup.record_text({"text": a})), dedup.shingles(dedup.record_text({"text": b}))
    return len(x & y) / len(x | y)


def test_minhash_estimate_agrees_with_exact_jaccard(corpus):
    """Reference: the Jaccard similarity of the shingle sets computed with Python sets."""
    _, rows = corpus
    keeper = dedup.Deduplicator(DataStats(), num_perm=256)
    texts = [r["conversations"][0]["value"] for r in rows]
    pairs = [(texts[i], texts[j]) for i, j in [(0, 1), (0, 250), (5, 6)]] + [(texts[k], texts[k + 30])
                                                                               for k in range(200, 210)]
    for a, b in pairs:
        estimate = keeper.signature(dedup.record_text({"text": a})).jaccard(
            keeper.signature(dedup.record_text({"text": b})))
        assert estimate == pytest.approx(_exact_jaccard(a, b), abs=0.1)


def test_dedup_command_against_references(corpus, tmp_path, capsys):
    path, rows = corpus
    out = tmp_path / "kept.jsonl"
    assert main(["data", "dedup", str(path), "--out", str(out)]) == 0
    stats = json.loads((tmp_path / "data_stats.json").read_text())
    # exact reference: a plain set of the whitespace-collapsed, lowercased texts
    seen, exact = set(), 0
    for r in rows:
        key = " ".join(" ".join(t["value"] for t in r["conversations"]).lower().split())
        exact += key in seen
        seen.add(key)
    assert stats["dropped"][dedup.EXACT] == exact == 40
    near = stats["dropped"][dedup.near_reason(0.8)]
    # every one-word edit of an 80-word question has an exact Jaccard above 0.9 with its original (the
    # estimate's standard error at 128 permutations is about 0.025): all are near duplicates;
    # no two original questions share 20% of their shingles
    texts = [r["conversations"][0]["value"] for r in rows]
    originals = {" ".join(t.split()[:3]): t for t in texts[:200]}
    assert all(_exact_jaccard(t, originals.get(" ".join(t.split()[:3]), t)) > 0.9 for t in texts[240:]
               if not t.startswith("changed"))
    assert all(_exact_jaccard(texts[i], texts[j]) < 0.2 for i in range(20) for j in range(i + 1, 20))
    assert near == 30
    assert stats["read"] == len(rows) and stats["kept"] == 200
    assert stats["examples"][dedup.EXACT][0].endswith(")") and f"(of {path}:" in stats["examples"][dedup.EXACT][0]
    kept, _ = read_records(str(out), "sft")
    assert [r["messages"][0]["content"] for r in kept] == texts[:200]  # the first of each copy, in order
    assert "kept 200" in capsys.readouterr().out
    # exact only: the near copies stay
    assert main(["data", "dedup", str(path), "--out", str(out), "--exact-only"]) == 0
    assert len(read_records(str(out), "sft")[0]) == 230


def test_dedup_pt_and_pref(tmp_path):
    pt = tmp_path / "pt.jsonl"
    pt.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a b c d", "A  b c d", "x y z"]))
    assert main(["data", "dedup", str(pt), "--kind", "pt", "--out", str(tmp_path / "pt" / "out.jsonl")]) == 0
    assert [json.loads(line) for line in (tmp_path / "pt" / "out.jsonl").read_text().splitlines()] == [
        {"text": "a b c d"}, {"text": "x y z"}]
    pref = tmp_path / "pref.jsonl"
    row = {"question": "q1", "response_chosen": "good", "response_rejected": "bad"}
    pref.write_text("".join(json.dumps(r) + "\n" for r in [row, row, {**row, "response_rejected": "worse"}]))
    assert main(["data", "dedup", str(pref), "--out", str(tmp_path / "pref" / "out.jsonl")]) == 0
    stats = json.loads((tmp_path / "pref" / "data_stats.json").read_text())
    assert stats["dropped"] == {dedup.EXACT: 1} and stats["kept"] == 2


def test_dedup_bad_input(corpus, tmp_path, capsys):
    path, _ = corpus
    assert main(["data", "dedup", str(path), "--out", str(tmp_path / "o.jsonl"), "--threshold", "1.5"]) == 2
    assert main(["data", "dedup", str(path), "--out", str(tmp_path / "o.jsonl"), "--kind", "pt", "--to", "sharegpt"]) == 2
    err = capsys.readouterr().err
    assert "--threshold 1.5" in err and not (tmp_path / "o.jsonl").exists()
