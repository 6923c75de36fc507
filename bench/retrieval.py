"""Retrieval recall on the sample knowledge base: dense, BM25 and hybrid, into bench/results/retrieval.json.

The questions are `kb/QUESTIONS.json`: Chinese and English questions about Chinese and English documents
(an English question whose answer is only in a Chinese document, and the reverse), each with the file that
answers it, plus off-topic questions the documents do not answer (`"file": null`). recall@k is the share of
answerable questions whose file is among the first k sources; "answer chunk" counts a hit only when a
returned chunk of that file holds the answer text. Off-topic questions should get no sources.

For comparison the table also has "rrf, no floors": the fusion without relevance floors (every chunk BM25
scores above 0 gets a BM25 vote, every chunk a dense one), and the floors are swept to show how much the
choice of each matters. `EDGE` lists where the dense floor is a trade-off: keyword queries in one language
against documents in the other, and chit-chat; the report gives their cosines and what hybrid returns.

Run: python bench/retrieval.py [--embedder use] [--index DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from medgpt.rag import BM25_FLOOR, DEFAULT_MODE, MODES
from medgpt.rag.index import build_index
from medgpt.rag.retrieve import open_retriever, rank_chunks, ranks, reciprocal_rank_fusion

KB = Path(__file__).resolve().parents[1] / "src" / "medgpt" / "sample_data" / "kb"
RESULTS = Path(__file__).resolve().parent / "results" / "retrieval.json"
KS = (1, 3)
UNFLOORED = "rrf, no floors"
EDGE = [("储雾罐", "asthma_inhaler_use.txt"), ("华法林", "warfarin_interactions.md"),
        ("维生素K和华法林", "warfarin_interactions.md"), ("华法林的INR目标范围是多少？", "warfarin_interactions.md"),
        ("盐摄入量", "hypertension_guide.md"),
        ("flu vaccine", "influenza_vaccination.md"), ("hypoglycemia", "diabetes_care.md"),
        ("What's the weather tomorrow?", None), ("How to fix a flat tire?", None), ("What time is it?", None),
        ("Tell me a joke", None), ("怎么养猫？", None), ("你好", None)]


def group(q: dict) -> str:
    return f"{q['lang']}->{q['doc_lang']}"


def score_all(retriever, questions: list[dict]) -> list[dict]:
    """Dense cosines, BM25 scores and term shares of every chunk, per question (computed once)."""
    rows = []
    for q in questions:
        bm25, share = retriever.bm25_scores(q["question"])
        rows.append({"dense": retriever.dense_scores(q["question"]), "bm25": bm25, "share": share})
    return rows


def rankings(rows: list[dict], mode: str, dense_floor: float | None, bm25_floor: float) -> list[list[int]]:
    if mode == UNFLOORED:
        out = []
        for r in rows:
            fused = reciprocal_rank_fusion(ranks(r["dense"], np.ones(len(r["dense"]), dtype=bool)),
                                           ranks(r["bm25"], r["bm25"] > 0))
            out.append([int(i) for i in np.lexsort((-r["dense"], -fused))])
        return out
    return [rank_chunks(r["dense"], r["bm25"], r["share"], mode, dense_floor, bm25_floor)[0] for r in rows]


def measure(chunks, questions: list[dict], order: list[list[int]]) -> dict:
    """recall@k per question group and overall, answer-chunk recall@3, and off-topic questions left alone."""
    groups: dict[str, dict[str, list[bool]]] = {}
    answer_hits, off_topic = [], []
    for q, ids in zip(questions, order):
        if q["file"] is None:
            off_topic.append(not ids)
            continue
        files = [chunks[i].file for i in ids]
        for name in ("all", group(q)):
            for k in KS:
                groups.setdefault(name, {}).setdefault(f"recall@{k}", []).append(q["file"] in files[:k])
        answer_hits.append(any(chunks[i].file == q["file"] and q["answer_contains"] in chunks[i].text
                               for i in ids[:3]))
    out = {name: {key: round(float(np.mean(v)), 3) for key, v in metrics.items()} for name, metrics in groups.items()}
    out["all"]["answer_chunk@3"] = round(float(np.mean(answer_hits)), 3)
    out["all"]["off_topic_without_sources"] = round(float(np.mean(off_topic)), 3) if off_topic else None
    return out


def misses(chunks, questions: list[dict], order: list[list[int]]) -> list[dict]:
    return [{"question": q["question"], "expected": q["file"], "got": [chunks[i].file for i in ids[:3]]}
            for q, ids in zip(questions, order) if q["file"] and (not ids or chunks[ids[0]].file != q["file"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedder", default="use")
    parser.add_argument("--index", help="index folder to (re)build (default: a temporary one)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    questions = json.loads((KB / "QUESTIONS.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(args.index or Path(tmp) / "index")
        start = time.perf_counter()
        build_index([KB], index, embedder=args.embedder)
        index_s = time.perf_counter() - start
        retriever = open_retriever(index)
        chunks = retriever.kb.chunks
        start = time.perf_counter()
        rows = score_all(retriever, questions)
        query_ms = (time.perf_counter() - start) / len(questions) * 1000
        edge = [{"question": q, "expected": f, "best_cosine": round(float(retriever.dense_scores(q).max()), 3),
                 "expected_cosine": round(float(max(retriever.dense_scores(q)[i] for i, c in
                                                    enumerate(retriever.kb.chunks) if c.file == f)), 3) if f else None,
                 "hybrid": [s.file for s in retriever.search(q, k=3)]} for q, f in EDGE]
    floor = retriever.dense_floor

    results, bad = {}, {}
    for mode in (*MODES, UNFLOORED):
        order = rankings(rows, mode, floor, BM25_FLOOR)
        results[mode], bad[mode] = measure(chunks, questions, order), misses(chunks, questions, order)
    singles = [m for m in MODES if m != "hybrid"]
    hybrid_ok = all(results["hybrid"]["all"][f"recall@{k}"] >= max(results[m]["all"][f"recall@{k}"] for m in singles)
                    for k in KS)
    sweep = {"bm25_floor": {}, "dense_floor": {}}
    for value in (0.2, 0.3, 0.4, 0.5, 0.6):
        sweep["bm25_floor"][str(value)] = measure(chunks, questions, rankings(rows, "hybrid", floor, value))["all"]
    for value in (0.1, 0.15, 0.2, 0.25, 0.3):
        order = rankings(rows, "hybrid", value, BM25_FLOOR)
        sweep["dense_floor"][str(value)] = measure(chunks, questions, order)["all"]
    answerable = [q for q in questions if q["file"]]
    gold = [float(max(r["dense"][i] for i, c in enumerate(chunks) if c.file == q["file"]))
            for q, r in zip(questions, rows) if q["file"]]
    off = [float(r["dense"].max()) for q, r in zip(questions, rows) if not q["file"]]
    report = {
        "embedder": args.embedder, "chunks": len(chunks), "files": len({c.file for c in chunks}),
        "questions": {"answerable": len(answerable), "off_topic": len(questions) - len(answerable),
                      **{g: sum(group(q) == g for q in answerable) for g in sorted({group(q) for q in answerable})}},
        "floors": {"dense_cosine": floor, "bm25_term_share": BM25_FLOOR},
        "cosine": {"right_file_best_min": round(min(gold), 3), "off_topic_best_max": round(max(off), 3)},
        "modes": results, "default_mode": DEFAULT_MODE, "hybrid_at_least_best_single": hybrid_ok,
        "misses_at_1": bad, "sweep_hybrid": sweep, "edge_cases": edge,
        "seconds": {"index": round(index_s, 2), "query_ms": round(query_ms, 1)},
        "platform": {"python": platform.python_version(), "machine": platform.machine()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    names = ["all", *sorted(g for g in results["dense"] if g != "all")]
    counts = ", ".join(f"{g}: {report['questions'][g]}" for g in names[1:])
    print(f"{len(answerable)} answerable questions ({counts}), {report['questions']['off_topic']} off-topic; "
          f"{len(chunks)} chunks; embedder {args.embedder}")
    print(f"{'mode':<16}" + "".join(f"{n + ' R@' + str(k):>12}" for n in names for k in KS)
          + f"{'answer@3':>10}{'off-topic':>11}")
    for mode, res in results.items():
        print(f"{mode:<16}" + "".join(f"{res[n][f'recall@{k}']:>12.3f}" for n in names for k in KS)
              + f"{res['all']['answer_chunk@3']:>10.3f}{res['all']['off_topic_without_sources']:>11.3f}")
    print(f"default mode {DEFAULT_MODE}; hybrid at least as good as the best single retriever: {hybrid_ok}")
    print(f"dense floor {floor}: the right file's best chunk >= {report['cosine']['right_file_best_min']}, "
          f"off-topic questions' best chunk <= {report['cosine']['off_topic_best_max']}")
    for e in edge:
        print(f"  {e['question']:<30} best cosine {e['best_cosine']:.3f}  expected {e['expected'] or '(none)'}  "
              f"hybrid -> {', '.join(e['hybrid']) or '(no sources)'}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
