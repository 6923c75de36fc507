"""Embedding and recall numbers for `medgpt select`, written to bench/results/eval.json.

- per backend: rows/s embedding the shipped medical texts, and how well it separates related from
  unrelated Chinese medical questions (the reason for the default backend);
- FAISS exact inner-product recall: seconds to index and to search 1,000 queries over 100k and 1M
  random unit vectors (512-d, the size of the default backend's vectors).

Run: python bench/embed_recall.py [--backends use,tfidf,minilm] [--sizes 100000,1000000] [--rows 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from medgpt.select.embed import get_embedder
from medgpt.select.sources import load_eval_items, read_corpus, record_text

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "medgpt" / "sample_data"
RESULTS = Path(__file__).resolve().parent / "results" / "eval.json"

# Paraphrase pairs (same question); pairing each question with another pair's partner gives unrelated
# pairs that are still both Chinese medical questions, the case that fools an English-only model.
RELATED = [
    ("糖尿病患者应如何控制血糖？", "2型糖尿病的血糖管理方法有哪些？"),
    ("高血压的常见症状是什么？", "高血压病人会有哪些表现？"),
    ("被狗咬伤后需要打狂犬疫苗吗？", "被狗咬了要不要接种狂犬病疫苗？"),
    ("孕妇可以吃感冒药吗？", "怀孕期间感冒了能不能吃药？"),
    ("儿童发烧到多少度需要去医院？", "小孩发热多高应该就医？"),
    ("骨折后多久可以拆石膏？", "骨折打石膏一般要多长时间？"),
    ("长期失眠应该怎么办？", "总是睡不着觉有什么治疗办法？"),
    ("幽门螺杆菌感染需要治疗吗？", "查出幽门螺旋杆菌阳性要不要吃药？"),
]


def medical_texts(rows: int) -> list[str]:
    records, _ = read_corpus(str(SAMPLE / "sft" / "medical_sft.jsonl"))
    texts = [record_text(r, "conversation") for r in records] + [e.text for e in load_eval_items(str(SAMPLE / "mcq"))]
    return (texts * (rows // len(texts) + 1))[:rows]


def separation(embedder) -> dict:
    a = embedder.encode([p[0] for p in RELATED])
    b = embedder.encode([p[1] for p in RELATED])
    sims = a @ b.T
    related = np.diag(sims)
    unrelated = sims[~np.eye(len(RELATED), dtype=bool)]
    # share of (related, unrelated) pairs ordered correctly: 1.0 = a threshold separates them
    auc = float((related[:, None] > unrelated[None, :]).mean())
    return {"related_mean": round(float(related.mean()), 3), "related_min": round(float(related.min()), 3),
            "unrelated_mean": round(float(unrelated.mean()), 3), "unrelated_max": round(float(unrelated.max()), 3),
            "auc": round(auc, 3)}


def unk_share(embedder) -> float | None:
    """Share of [UNK] tokens in the Chinese questions, for backends with a WordPiece tokenizer."""
    tokenizer = getattr(getattr(embedder, "_model", None), "tokenizer", None)
    if tokenizer is None or tokenizer.unk_token_id is None:
        return None
    ids = [i for text, _ in RELATED for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return round(sum(i == tokenizer.unk_token_id for i in ids) / len(ids), 3)


def bench_backend(name: str, rows: int) -> dict:
    texts = medical_texts(rows)
    start = time.perf_counter()
    embedder = get_embedder(name)
    if hasattr(embedder, "fit"):
        embedder.fit(texts)
    load_s = time.perf_counter() - start
    embedder.encode(texts[:16])
    start = time.perf_counter()
    embedder.encode(texts, batch_size=64)
    seconds = time.perf_counter() - start
    result = {"dim": embedder.dim, "load_s": round(load_s, 2), "rows": rows, "rows_per_s": round(rows / seconds, 1),
              "load_avg_1m": round(os.getloadavg()[0], 1), "chinese_separation": separation(embedder)}
    share = unk_share(embedder)
    if share is not None:
        result["chinese_unk_share"] = share
    return result


def bench_recall(size: int, queries: int = 1000, dim: int = 512, top_k: int = 50) -> dict:
    import faiss

    rng = np.random.default_rng(0)
    index = faiss.IndexFlatIP(dim)
    build_s = 0.0
    for offset in range(0, size, 100_000):
        block = rng.standard_normal((min(100_000, size - offset), dim), dtype=np.float32)
        faiss.normalize_L2(block)
        start = time.perf_counter()
        index.add(block)
        build_s += time.perf_counter() - start
    q = rng.standard_normal((queries, dim), dtype=np.float32)
    faiss.normalize_L2(q)
    start = time.perf_counter()
    index.search(q, top_k)
    search_s = time.perf_counter() - start
    return {"vectors": size, "dim": dim, "queries": queries, "top_k": top_k, "index_s": round(build_s, 2),
            "search_s": round(search_s, 2), "queries_per_s": round(queries / search_s, 1),
            "memory_gb": round(size * dim * 4 / 2**30, 2), "load_avg_1m": round(os.getloadavg()[0], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="use,tfidf,minilm")
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--rows", type=int, default=2000, help="texts embedded per backend")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    import faiss

    out = Path(args.output)
    # sections not run this time keep their earlier numbers (e.g. --sizes "" re-measures embedders only)
    earlier = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    results = {
        "machine": {"cpus": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
                    "python": platform.python_version()},
        "embedding": earlier.get("embedding", {}),
        "recall": {str(r["vectors"]): r for r in earlier.get("recall", [])},
    }
    for name in [b for b in args.backends.split(",") if b]:
        results["embedding"][name] = bench_backend(name, args.rows)
        print(name, json.dumps(results["embedding"][name], ensure_ascii=False))
    for size in [int(s) for s in args.sizes.split(",") if s]:
        results["recall"][str(size)] = bench_recall(size)
        print(json.dumps(results["recall"][str(size)]))
    results["recall"] = sorted(results["recall"].values(), key=lambda r: r["vectors"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
