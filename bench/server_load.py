"""The API server under concurrent clients, measured as vLLM's and EvalScope's serving benchmarks measure it.

A real `medgpt serve` app (uvicorn on loopback, transformers engine with continuous batching) answers streamed
chat completions from 1, 4 and 16 concurrent clients over a fixed prompt set (the shipped QA questions, the same
prompts in the same order at every concurrency). Per concurrency: request throughput, output tokens/s, time to
first token (TTFT), time per output token after the first (TPOT), inter-token latency (ITL, the gaps between
streamed chunks), p50/p95, and failed or lost requests (not 200, no `[DONE]`, no tokens, or no answer at all).
Output tokens come from the stream's usage chunk (`stream_options.include_usage`). Results go to
bench/results/server_load.json; its `previous_static_batcher` section is this bench (`--url`) against the server as
it was before continuous batching (commit 66aae1b: a worker thread running each batch of waiting requests as one
padded `generate`).

    python bench/server_load.py                          # bundled SmolLM2-135M, concurrency 1,4,16, 32 tokens
    python bench/server_load.py --concurrency 1,8 --max-tokens 64 --threads 2
    python bench/server_load.py --url http://127.0.0.1:8000 --label other   # any running OpenAI-compatible server
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from infer_throughput import ROOT, add_common_arguments, machine, questions, save, set_threads  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "server_load.json"
log = logging.getLogger("bench")


def ask(url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion: its timings and whether it came back whole."""
    import httpx

    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals: list[float] = []  # when each chunk with text arrived
    tokens, done, status, error = 0, False, None, None
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as reply:
            status = reply.status_code
            for line in reply.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[len("data: "):])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    arrivals.append(time.perf_counter())
    except (httpx.HTTPError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    ok = status == 200 and done and tokens > 0 and bool(arrivals)
    return {"ok": ok, "status": status, "error": error, "tokens": tokens, "latency": end - start,
            "ttft": arrivals[0] - start if arrivals else None,
            "tpot": (end - arrivals[0]) / (tokens - 1) if arrivals and tokens > 1 else None,
            "itl": [b - a for a, b in zip(arrivals, arrivals[1:])]}


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation, as numpy's default), in milliseconds."""
    if not values:
        return None
    if len(values) == 1:
        return round(values[0] * 1000, 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000, 1)


def load(url: str, model: str, prompts: list[list[dict]], clients: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda m: ask(url, model, m, max_tokens), prompts))
    wall = time.perf_counter() - start
    good = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in good)
    report = {"concurrency": clients, "requests": len(prompts), "completed": len(good),
              "failed": len(results) - len(good), "lost": len(prompts) - len(results), "seconds": round(wall, 2),
              "requests_per_s": round(len(good) / wall, 3), "output_tokens": tokens,
              "output_tokens_per_s": round(tokens / wall, 2)}
    for name, values in (("ttft", [r["ttft"] for r in good]), ("tpot", [r["tpot"] for r in good if r["tpot"]]),
                         ("itl", [gap for r in good for gap in r["itl"]]), ("latency", [r["latency"] for r in good])):
        report[f"{name}_p50_ms"], report[f"{name}_p95_ms"] = percentile(values, 50), percentile(values, 95)
    errors = sorted({r["error"] or f"status {r['status']}" for r in results if not r["ok"]})
    if errors:
        report["errors"] = errors[:5]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--requests-per-client", type=int, default=2,
                        help="requests = this x concurrency (at least --min-requests)")
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--url", help="bench this running server instead of starting one")
    parser.add_argument("--label", default="server_load", help="the section of the results file to write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = questions(max(max(args.requests_per_client * c, args.min_requests) for c in levels))
    result: dict = {"max_tokens": args.max_tokens, "greedy": True, "stream": True, "runs": []}

    def run_all(url: str, model: str) -> None:
        load(url, model, prompts[:2], 2, 4)  # warm-up
        for clients in levels:
            n = max(args.requests_per_client * clients, args.min_requests)
            log.info("concurrency %d: %d requests", clients, n)
            run = load(url, model, prompts[:n], clients, args.max_tokens)
            log.info("%s", run)
            result["runs"].append(run)

    if args.url:
        import httpx

        model = httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"][0]["id"]
        result.update(server=args.url, model=model)
        run_all(args.url.rstrip("/"), model)
    else:
        from medgpt.infer.engine import load_engine
        from medgpt.infer.server import ServerSettings, create_app, running_server

        engine = load_engine(args.model, dtype=args.dtype, max_batch_size=args.batch_size)
        result.update(model=args.model or "HuggingFaceTB/SmolLM2-135M-Instruct", dtype=engine.dtype,
                      engine="transformers (continuous batching)", max_batch_size=engine.max_batch_size)
        with running_server(create_app(engine, ServerSettings())) as url:
            run_all(url, engine.name)
        engine.close()
    by = {run["concurrency"]: run for run in result["runs"]}
    if 1 in by:
        result["output_tokens_per_s_over_concurrency_1"] = {
            c: round(run["output_tokens_per_s"] / by[1]["output_tokens_per_s"], 2) for c, run in by.items()}
    result["machine"] = machine()
    save(args.label, result, RESULTS)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
