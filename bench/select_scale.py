"""Selection, decontamination and dedup at the size users train on, on synthetic data with planted copies.

Parts (each a separate `medgpt` process, timed whole, its peak RSS from the kernel's own count):
- contamination: `medgpt data contamination` of 1,000 eval questions against N records (default 1M), n-grams
  only (`--embedder none`); 100 eval questions are planted verbatim in the corpus, so the findings are known.
- select: `medgpt select` with each embedder (tfidf on 100k records; the slower `use` and the bundled English
  `minilm` on fewer): rows/s embedded, the time to search and select.
- resume: `medgpt select` killed once some chunks are on disk, then run again: chunks embedded by each run.
- index: exact (FAISS flat) against IVF and HNSW top-k search of 1,000 eval vectors over corpora of several
  sizes (synthetic 512-d vectors of low intrinsic dimension): build and search time, recall@k against exact search.
- workers: embedding with 1 and 2 worker processes.
- dedup: `medgpt data dedup` on N records (default 100k) with planted exact and near copies.
Results merge into bench/results/select_scale.json (a part rerun replaces its own entry).

    .venv/bin/python bench/select_scale.py --parts contamination select resume index workers dedup
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "select_scale.json"
PY = sys.executable
ZH_CHARS = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
EN_WORDS = ["".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=random.Random(-i).randint(3, 9)))
            for i in range(5000)]
PLANTED_EVAL = 100


def _text(rng: random.Random, zh: bool, lo: int, hi: int) -> str:
    n = rng.randint(lo, hi)
    return "".join(rng.choices(ZH_CHARS, k=n)) if zh else " ".join(rng.choices(EN_WORDS, k=n))


def eval_questions(count: int = 1000, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [_text(rng, i % 2 == 0, 15, 40) for i in range(count)]


def generate(path: Path, count: int, seed: int = 0, questions: list[str] | None = None,
             copies: float = 0.0) -> dict:
    """ShareGPT records (1-2 turns, half Chinese, half English); `copies` of them repeat an earlier record
    exactly (changed case and spacing) and as many nearly (one unit of the question changed); the first
    PLANTED_EVAL `questions` are planted verbatim in user turns. Returns what was planted."""
    rng = random.Random(seed)
    recent: list[dict] = []
    planted = {"exact": 0, "near": 0, "eval": 0}
    plant_at = set(rng.sample(range(count), PLANTED_EVAL)) if questions else set()
    with path.open("w", encoding="utf-8") as f:
        for i in range(count):
            roll = rng.random()
            if recent and roll < copies:
                turns = [dict(t) for t in rng.choice(recent)["conversations"]]
                turns[0]["value"] = "  " + turns[0]["value"].upper() + " "
                planted["exact"] += 1
            elif recent and roll < 2 * copies:
                turns = [dict(t) for t in rng.choice(recent)["conversations"]]
                q = turns[0]["value"]
                zh = " " not in q
                units = list(q) if zh else q.split()
                units[rng.randrange(len(units))] = "变" if zh else "changed"
                turns[0]["value"] = "".join(units) if zh else " ".join(units)
                planted["near"] += 1
            else:
                zh = rng.random() < 0.5
                turns = []
                for _ in range(rng.randint(1, 2)):
                    turns.append({"from": "human", "value": _text(rng, zh, 15, 40)})
                    turns.append({"from": "gpt", "value": _text(rng, zh, 30, 120)})
            if i in plant_at:
                turns[0] = {"from": "human", "value": "Q: " + questions[planted["eval"]] + " ?"}
                planted["eval"] += 1
            row = {"conversations": turns}
            if len(recent) < 5000:
                recent.append(row)
            else:
                recent[rng.randrange(5000)] = row
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return planted


def write_eval(path: Path, questions: list[str]) -> None:
    path.write_text("".join(json.dumps({"question": q, "answer": "x"}, ensure_ascii=False) + "\n"
                            for q in questions), encoding="utf-8")


def run_medgpt(args: list[str], timeout: int = 600, env: dict | None = None) -> dict:
    """Run `medgpt ARGS` under /usr/bin/time: wall seconds, peak RSS (MB) of the process, its output."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", PY, "-m", "medgpt.cli", *args],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, cwd=ROOT)
    wall = time.perf_counter() - start
    rss = re.search(r"MAXRSS_KB (\d+)", proc.stderr)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"medgpt {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None,
            "stdout": proc.stdout, "stderr": proc.stderr}


def part_contamination(work: Path, n: int) -> dict:
    corpus, evals = work / f"corpus_{n}.jsonl", work / "eval.jsonl"
    questions = eval_questions()
    write_eval(evals, questions)
    if not corpus.exists():
        generate(corpus, n, questions=questions)
    report = work / "contamination.json"
    run = run_medgpt(["data", "contamination", str(corpus), "--against", str(evals), "--embedder", "none",
                      "--text", "user", "--output", str(report)])
    summary = json.loads(report.read_text())["summary"]
    return {"records": n, "eval_items": len(questions), "corpus_mb": round(corpus.stat().st_size / 2**20),
            "wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"],
            "records_per_s": round(n / run["wall_s"]), "planted_verbatim": PLANTED_EVAL,
            "found": {k: summary[k] for k in ("contaminated_train", "contaminated_eval", "by_ngram")}}


def _chunks_embedded(stderr: str) -> int:
    found = re.findall(r"embedded (\d+) chunk", stderr)
    return int(found[-1]) if found else -1


def part_select(work: Path, plan: list[str]) -> dict:
    """`plan`: EMBEDDER:RECORDS items (the slow embedders on fewer records)."""
    evals = work / "eval.jsonl"
    write_eval(evals, eval_questions())
    out = {}
    for item in plan:
        name, n = item.split(":")[0], int(item.split(":")[1])
        corpus = work / f"corpus_{n}.jsonl"
        if not corpus.exists():
            generate(corpus, n)
        load = os.getloadavg()[0]
        for old in (work / f"cache_{name}").glob("*") if (work / f"cache_{name}").exists() else ():
            old.unlink()
        cache = work / f"cache_{name}"
        run = run_medgpt(["select", "--eval", str(evals), "--corpus", str(corpus), "--out", str(work / f"sel_{name}"),
                          "--embedder", name, "--cache-dir", str(cache), "--min-sim", "0", "--max-sim", "0.99"])
        timings = json.loads((work / f"sel_{name}" / "select_stats.json").read_text())["timings"]
        out[name] = {"records": n, "wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"], **timings,
                     "load_average_at_start": round(load, 2),
                     "corpus_rows_per_s_embedded": round(n / timings["embed_corpus_s"])}
    return out


def part_resume(work: Path, n: int, embedder: str = "tfidf", chunk: int = 5000) -> dict:
    corpus, evals = work / f"corpus_{n}.jsonl", work / "eval.jsonl"
    write_eval(evals, eval_questions())
    if not corpus.exists():
        generate(corpus, n)
    cache = work / f"resume_cache_{embedder}"
    for old in cache.glob("*") if cache.exists() else ():
        old.unlink()
    args = [PY, "-m", "medgpt.cli", "select", "--eval", str(evals), "--corpus", str(corpus), "--out",
            str(work / "resume_out"), "--embedder", embedder, "--cache-dir", str(cache), "--chunk-size", str(chunk)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    start = time.perf_counter()
    total = -(-n // chunk)
    while len(list(cache.glob("*.npy"))) < total // 2 and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = time.perf_counter() - start
    on_disk = sorted(cache.glob("*.npy"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in on_disk}
    run = run_medgpt(args[3:])
    stats = json.loads((work / "resume_out" / "select_stats.json").read_text())
    unchanged = all((cache / name).stat().st_mtime_ns == t for name, t in mtimes.items())
    return {"records": n, "embedder": embedder, "chunk_size": chunk, "chunks": total,
            "killed_after_s": round(killed_after, 1), "chunks_on_disk_at_kill": len(on_disk),
            "rerun_chunks_embedded": stats["embedding"]["corpus_chunks_embedded"],
            "finished_chunks_untouched": unchanged, "rerun_wall_s": run["wall_s"]}


def embedding_like(count: int, seed: int, basis: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Unit vectors of low intrinsic dimension, as sentence embeddings are: a point near one of `centers` in a
    latent space of len(basis) dimensions, mapped by `basis` into the full space, plus a little full-rank noise."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, basis.shape[1]), np.float32)
    for start in range(0, count, 100_000):
        n = min(100_000, count - start)
        latent = centers[rng.integers(0, len(centers), n)] + rng.normal(size=(n, basis.shape[0]))
        x = latent @ basis + 0.05 * rng.normal(size=(n, basis.shape[1]))
        out[start:start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def part_index(work: Path, sizes: list[int], k: int = 50, query_counts: tuple[int, ...] = (1000,), dim: int = 512,
               hnsw_max: int = 100_000, latent: int = 32) -> dict:
    """Exact against approximate top-k search of `queries` eval vectors over corpora of `sizes` vectors
    (512-d, as `use`; synthetic, of intrinsic dimension `latent`, around 100 topics): build and search time,
    recall@k against exact search. HNSW is built only up to `hnsw_max` vectors (its build is the slowest)."""
    from medgpt.select import index as ann

    rng = np.random.default_rng(0)
    basis = rng.normal(size=(latent, dim)) / np.sqrt(latent)
    centers = rng.normal(size=(100, latent))
    out = []
    for size, queries in [(size, q) for size in sizes for q in query_counts]:
        eval_vectors = embedding_like(queries, 1, basis, centers)
        corpus = embedding_like(size, 2, basis, centers)
        row = {"corpus": size, "queries": queries, "k": k, "dim": dim}
        exact_ids = None
        for kind in ("exact", "ivf", "hnsw"):
            if kind == "hnsw" and (size > hnsw_max or queries != query_counts[0]):
                continue
            start = time.perf_counter()
            index = ann.build(kind, dim, size)
            for _ in ann.add_chunks(index, np.array_split(corpus, max(1, size // 8192))):
                pass
            built = time.perf_counter() - start
            start = time.perf_counter()
            _, ids = index.search(eval_vectors, k)
            searched = time.perf_counter() - start
            if kind == "exact":
                exact_ids = ids
            recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact_ids)])
            row[kind] = {"build_s": round(built, 2), "search_s": round(searched, 2),
                         "total_s": round(built + searched, 2), "recall_at_k": round(float(recall), 4)}
            if kind == "ivf":
                row[kind] |= {"lists": index.nlist, "nprobe": index.nprobe}
        out.append(row)
        print(json.dumps(row), flush=True)
        del corpus
    return {"vectors": f"synthetic {dim}-d unit vectors of intrinsic dimension {latent} around 100 topics",
            "rows": out}


def part_workers(work: Path, n: int, embedders: list[str]) -> dict:
    corpus, evals = work / f"corpus_{n}.jsonl", work / "eval.jsonl"
    write_eval(evals, eval_questions())
    if not corpus.exists():
        generate(corpus, n)
    out = {}
    for name in embedders:
        for workers in (1, 2):
            cache = work / f"workers_cache_{name}_{workers}"
            for old in cache.glob("*") if cache.exists() else ():
                old.unlink()
            run_medgpt(["select", "--eval", str(evals), "--corpus", str(corpus), "--out", str(work / "workers_out"),
                        "--embedder", name, "--cache-dir", str(cache), "--workers", str(workers),
                        "--chunk-size", "2000"])
            timings = json.loads((work / "workers_out" / "select_stats.json").read_text())["timings"]
            out[f"{name}_workers{workers}"] = {"records": n, "embed_corpus_s": timings["embed_corpus_s"],
                                               "rows_per_s": round(n / timings["embed_corpus_s"])}
    return out


def part_dedup(work: Path, n: int) -> dict:
    corpus = work / f"dedup_{n}.jsonl"
    planted = generate(corpus, n, seed=2, copies=0.05)
    run = run_medgpt(["data", "dedup", str(corpus), "--out", str(work / "dedup_out" / "kept.jsonl")])
    stats = json.loads((work / "dedup_out" / "data_stats.json").read_text())
    seen: set[str] = set()  # reference for exact copies: a plain set of the lowercased, space-collapsed turns
    exact = 0
    with corpus.open(encoding="utf-8") as f:
        for line in f:
            key = " ".join("\n".join(t["value"] for t in json.loads(line)["conversations"]).lower().split())
            exact += key in seen
            seen.add(key)
    return {"records": n, "wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"],
            "records_per_s": round(n / run["wall_s"]), "planted": planted, "exact_by_python_set": exact,
            "dropped": stats["dropped"],
            "kept": stats["kept"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["contamination", "select", "resume", "index", "workers",
                                                        "dedup"])
    parser.add_argument("--work", default="/tmp/medgpt_select_scale")
    parser.add_argument("--contamination-records", type=int, default=1_000_000)
    parser.add_argument("--select-records", type=int, default=100_000)
    parser.add_argument("--select", nargs="+", default=["tfidf:100000", "use:10000", "minilm:2000"],
                        help="EMBEDDER:RECORDS runs of medgpt select")
    parser.add_argument("--embedders", nargs="+", default=["tfidf", "use"], help="of the workers part")
    parser.add_argument("--index-sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--index-queries", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--workers-records", type=int, default=20_000)
    parser.add_argument("--dedup-records", type=int, default=100_000)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "processor": platform.processor() or platform.machine()}
    for part in args.parts:
        load = os.getloadavg()[0]
        if part == "contamination":
            entry = part_contamination(work, args.contamination_records)
        elif part == "select":
            entry = {**results.get("select", {}), **part_select(work, args.select)}
        elif part == "resume":
            entry = part_resume(work, args.select_records)
        elif part == "index":
            entry = part_index(work, args.index_sizes, query_counts=tuple(args.index_queries))
        elif part == "workers":
            entry = {**results.get("workers", {}), **part_workers(work, args.workers_records, args.embedders)}
        elif part == "dedup":
            entry = part_dedup(work, args.dedup_records)
        else:
            raise SystemExit(f"unknown part {part}")
        entry = {**entry, "load_average_at_start": round(load, 2), "finished": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                             time.gmtime())}
        results[part] = entry
        print(json.dumps({part: entry}, indent=2, ensure_ascii=False), flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
