"""medgpt select: embedders, thresholds, deduplication, random baseline, resumable embedding, decontamination."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from medgpt.cli import main
from medgpt.select import contamination, embed, recall
from medgpt.select.sources import load_eval_items, record_text

RELATED = [("糖尿病患者应如何控制血糖？", "2型糖尿病的血糖管理方法有哪些？"),
           ("高血压的常见症状是什么？", "高血压病人会有哪些表现？"),
           ("被狗咬伤后需要打狂犬疫苗吗？", "被狗咬了要不要接种狂犬病疫苗？")]
UNRELATED = [("糖尿病患者应如何控制血糖？", "骨折后多久可以拆石膏？"),
             ("高血压的常见症状是什么？", "小儿发热时如何物理降温？"),
             ("被狗咬伤后需要打狂犬疫苗吗？", "孕妇可以吃感冒药吗？")]


def _pair_sims(embedder, pairs):
    a = embedder.encode([p[0] for p in pairs])
    b = embedder.encode([p[1] for p in pairs])
    return (a * b).sum(1)


@pytest.mark.parametrize("name", ["use", "tfidf"])
def test_embedders_separate_chinese_pairs(name):
    embedder = embed.get_embedder(name)
    if name == "tfidf":
        embedder.fit([t for p in RELATED + UNRELATED for t in p])
    vectors = embedder.encode(["高血压", "hypertension", ""], batch_size=2)
    assert vectors.dtype == np.float32 and vectors.shape == (3, embedder.dim)
    assert np.allclose(np.linalg.norm(vectors[:2], axis=1), 1, atol=1e-5)
    assert _pair_sims(embedder, RELATED).min() > _pair_sims(embedder, UNRELATED).max()


def test_tfidf_shares_one_space_across_processes():
    corpus = ["高血压患者要低盐饮食", "糖尿病需要监测血糖", "Asthma inhalers open the airways"]
    first = embed.get_embedder("tfidf", dim=256).fit(corpus)
    second = embed.get_embedder("tfidf", dim=256)
    second.load_state_dict(first.state_dict())
    query = ["高血压饮食"]
    assert np.array_equal(first.encode(query), second.encode(query))
    assert first.fingerprint() == second.fingerprint() != embed.get_embedder("tfidf", dim=256).fit(query).fingerprint()
    sims = first.encode(query) @ first.encode(corpus).T
    assert sims.argmax() == 0


@pytest.fixture()
def corpus(sample_data, tmp_path) -> Path:
    """The shipped conversations, one of them twice, and two copies of eval questions: the first verbatim
    (line 134: embedding similarity 1), the second with two characters added (line 135: similarity about
    0.81 with USE, but every 8-gram of the question is in it)."""
    lines = (sample_data / "sft" / "medical_sft.jsonl").read_text(encoding="utf-8").splitlines()
    leaks = [{"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
             for question, answer in [("有机磷农药中毒时，能使被抑制的胆碱酯酶恢复活性的药物是", "碘解磷定。"),
                                      ("霍乱患者典型的粪便性状是什么？", "米泔水样便。")]]
    path = tmp_path / "corpus.jsonl"
    rows = [*lines, lines[5], *(json.dumps(leak, ensure_ascii=False) for leak in leaks)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _key(row: dict) -> str:
    return json.dumps(row["conversations"], ensure_ascii=False)


def test_select_thresholds_dedup_baseline_and_leak_guard(corpus, sample_data, tmp_path):
    out = tmp_path / "out"
    code = main(["select", "--eval", str(sample_data / "mcq"), "--corpus", str(corpus), "--out", str(out),
                 "--top-k", "8", "--min-sim", "0.45", "--max-sim", "0.9", "--random-ratio", "0.25",
                 "--baseline", "random", "--cache-dir", str(tmp_path / "cache"), "--chunk-size", "50"])
    assert code == 0
    stats = json.loads((out / "select_stats.json").read_text())
    counts = stats["counts"]
    selected, baseline = _read(out / "selected.jsonl"), _read(out / "baseline_random.jsonl")
    rows = _read(out / "recall.jsonl")
    recalled = [r for r in rows if r["source"] == "recall"]

    # every recalled item lies within [min_sim, max_sim)
    assert recalled and all(0.45 <= r["similarity"] < 0.9 for r in recalled)
    # copies of eval questions are never written, in the selection or in the baseline: the verbatim one
    # by embedding similarity, the edited one by n-gram overlap
    assert counts["corpus_too_similar"] == 1 and stats["subjects"]["physician"]["too_similar"] >= 1
    assert counts["contaminated_dropped"] == 1 and stats["subjects"]["physician"]["contaminated"] == 1
    for leak in ("胆碱酯酶恢复活性的药物是", "霍乱患者典型的粪便性状是什么"):
        assert all(leak not in _key(r) for r in selected + baseline)
    # each conversation at most once (the corpus holds one twice)
    assert len({_key(r) for r in selected}) == len(selected) == counts["selected"]
    assert len({r["train"] for r in recalled}) == len(recalled)
    # a quarter random, and a baseline of the same size
    assert counts["random_added"] == round(counts["recalled_kept"] / 3)
    assert len(baseline) == len(selected) and len({_key(r) for r in baseline}) == len(baseline)
    # per-subject counts add up, with a histogram of the recalled similarities
    for s in stats["subjects"].values():
        assert s["recalled"] == s["eval_items"] * 8
        assert s["recalled"] == s["kept"] + s["below_min_sim"] + s["too_similar"] + s["duplicate"] + s["contaminated"]
        assert sum(s["histogram"]["counts"]) == s["recalled"]
    assert stats["contamination"]["written"]["contaminated_train"] == 0


def test_select_agrees_with_brute_force(corpus, sample_data, tmp_path):
    """Kept pairs are exactly the top-k pairs within the thresholds (FAISS against numpy)."""
    out = tmp_path / "out"
    args = recall.SelectArgs(eval=str(sample_data / "mcq"), corpus=str(corpus), out=str(out), top_k=3,
                             min_sim=0.4, max_sim=0.9, cache_dir=str(tmp_path / "cache"), keep_contaminated=True)
    recall.select(args)
    from medgpt.select.sources import read_corpus

    items = load_eval_items(args.eval)
    records, _ = read_corpus(args.corpus)
    embedder = embed.get_embedder("use")
    sims = embedder.encode([e.text for e in items]) @ embedder.encode([record_text(r) for r in records]).T
    leaking = sims.max(0) >= 0.9
    expected: dict[str, tuple[str, float]] = {}  # conversation -> (eval item, similarity); duplicates count once
    for e, row in enumerate(sims):
        for t in np.argsort(-row, kind="stable")[:3]:
            if 0.4 <= row[t] < 0.9 and not leaking[t]:
                key = record_text(records[t], "conversation")
                if key not in expected or expected[key][1] < row[t]:
                    expected[key] = (items[e].id, row[t])
    by_loc = {r["_loc"]: record_text(r, "conversation") for r in records}
    got = {by_loc[r["train"]]: (r["eval"], r["similarity"]) for r in _read(out / "recall.jsonl")}
    assert got.keys() == expected.keys()
    for key, (eval_id, sim) in got.items():
        assert sim == pytest.approx(expected[key][1], abs=1e-3)
        assert eval_id == expected[key][0] or sims[[i.id for i in items].index(eval_id)].max() == pytest.approx(sim)


def test_embedding_resumes_after_interruption(sample_data, tmp_path, monkeypatch):
    texts = [record_text(r) for r in _records(sample_data)]
    embedder = embed.get_embedder("use")
    cache = recall.EmbeddingCache(tmp_path, embedder, chunk_size=20)
    calls = {"n": 0}
    original = embedder.encode

    def flaky(batch, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(batch, **kwargs)

    monkeypatch.setattr(embedder, "encode", flaky)
    with pytest.raises(KeyboardInterrupt):
        cache.fill(texts)
    assert len(list(tmp_path.glob("*.npy"))) == 3 and not list(tmp_path.glob(".*"))  # no half-written chunk
    assert cache.fill(texts) == 4  # 7 chunks of 20 for 132 texts: only the 4 missing ones are embedded
    monkeypatch.setattr(embedder, "encode", original)
    assert np.allclose(cache.load(texts), original(texts), atol=1e-5)
    assert cache.fill(texts) == 0
    # shards split the work: each embeds its own chunks
    fresh = recall.EmbeddingCache(tmp_path / "sharded", embedder, chunk_size=20)
    assert fresh.fill(texts, shard=(0, 2)) == 4 and fresh.fill(texts, shard=(1, 2)) == 3 and fresh.fill(texts) == 0


def _records(sample_data):
    from medgpt.select.sources import read_corpus

    return read_corpus(str(sample_data / "sft" / "medical_sft.jsonl"))[0]


def test_ngram_index():
    questions = ["霍乱患者典型的粪便性状是",
                 "What is the recommended compression rate for adult CPR performed by a single rescuer",
                 "什么是高血压"]
    index = contamination.NgramIndex(questions)
    assert index.overlaps("问：霍乱患者典型的粪便性状是什么？答：米泔水样便") == {0: 1.0}
    assert index.overlaps("霍乱病人的大便是什么样的？") == {}
    assert index.overlaps("Q: what is the recommended compression rate for adult CPR performed by a single "
                          "rescuer? A: 100-120/min") == {1: 1.0}
    # 14 words, so two 13-grams; this text holds the second one only
    assert index.overlaps("This is the recommended compression rate for adult CPR performed by a single rescuer") == {
        1: 0.5}
    assert index.overlaps("请问什么是高血压？") == {2: 1.0}  # shorter than n: must appear whole
    assert contamination.is_chinese("霍乱 cholera 患者") and not contamination.is_chinese("CPR 心肺复苏 rate for adults")


def test_contamination_command(corpus, sample_data, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    contamination.add_contamination_arguments(parser)
    report_path = tmp_path / "report.json"
    args = parser.parse_args([str(corpus), "--against", str(sample_data / "mcq"), "--output", str(report_path),
                              "--fail", "--text", "user"])
    assert contamination.run_contamination(args) == 1
    report = json.loads(report_path.read_text())
    flagged = {p["train"]: p for p in report["pairs"]}
    verbatim, edited = flagged[f"{corpus}:134"], flagged[f"{corpus}:135"]
    assert verbatim["eval"] == "physician/1" and verbatim["ngram_overlap"] == 1.0 and verbatim["similarity"] > 0.99
    assert edited["eval"] == "physician/0" and edited["ngram_overlap"] == 1.0
    assert report["summary"]["contaminated_eval"] == 2 and report["summary"]["contaminated_train"] == 2
    assert "physician/0" in capsys.readouterr().out
    args = parser.parse_args([str(sample_data / "sft" / "medical_sft.jsonl"), "--against", str(sample_data / "mcq"),
                              "--output", str(report_path), "--fail", "--embedder", "none"])
    assert contamination.run_contamination(args) == 0


def test_select_reports_bad_input(sample_data, tmp_path, capsys):
    base = ["select", "--corpus", str(sample_data / "sft" / "medical_sft.jsonl"), "--out", str(tmp_path)]
    assert main([*base, "--eval", str(tmp_path / "nope.csv")]) == 2
    assert main([*base, "--eval", str(sample_data / "mcq"), "--random-ratio", "1"]) == 2
    assert main([*base, "--eval", str(sample_data / "mcq"), "--shard", "3/2"]) == 2
    err = capsys.readouterr().err
    assert "nope.csv: no such file" in err and "--random-ratio 1.0" in err and "--shard '3/2'" in err
