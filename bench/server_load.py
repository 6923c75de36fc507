"""The API server under concurrent clients: requests per second, p50/p95 latency, nothing lost.

A real `medgpt serve` app (uvicorn on loopback, transformers engine) answers `--requests` chat
completions sent by `--clients` concurrent clients, some streaming; each answer is checked (status 200,
non-empty usage). The run is repeated with the batcher limited to one request per generate call, to show
what batching buys. Results are merged into bench/results/infer.json under "server".

    python bench/server_load.py                       # bundled SmolLM2-135M, 8 clients, 32 requests
    python bench/server_load.py --clients 16 --requests 64 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from infer_throughput import add_common_arguments, machine, questions, save, set_threads  # noqa: E402


def load(url: str, prompts: list[list[dict]], clients: int, max_tokens: int) -> dict:
    import httpx

    def ask(i: int) -> tuple[float, bool]:
        body = {"messages": prompts[i % len(prompts)], "max_tokens": max_tokens, "stream": i % 4 == 0}
        start = time.perf_counter()
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as reply:
                text = reply.read().decode()
            ok = reply.status_code == 200 and (text.rstrip().endswith("data: [DONE]") if body["stream"]
                                               else json.loads(text)["usage"]["completion_tokens"] > 0)
        except httpx.HTTPError:
            ok = False
        return time.perf_counter() - start, ok

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(ask, range(len(prompts))))
    wall = time.perf_counter() - start
    latencies = sorted(t for t, _ in results)
    return {"requests": len(results), "failed": sum(not ok for _, ok in results), "seconds": round(wall, 2),
            "requests_per_s": round(len(results) / wall, 3),
            "latency_p50_s": round(statistics.median(latencies), 2),
            "latency_p95_s": round(latencies[max(0, int(0.95 * len(latencies)) - 1)], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    set_threads(args.threads)

    from medgpt.infer.base import GenerationParams
    from medgpt.infer.engine import load_engine
    from medgpt.infer.server import ServerSettings, create_app, running_server

    engine = load_engine(args.model, dtype=args.dtype, max_batch_size=args.batch_size)
    engine.generate(questions(2), GenerationParams(max_new_tokens=4))  # warm-up
    prompts = questions(args.requests)
    result = {"model": args.model or "HuggingFaceTB/SmolLM2-135M-Instruct", "dtype": str(engine.model.dtype),
              "clients": args.clients, "max_tokens": args.max_tokens}
    for name, batch_size in (("batched", args.batch_size), ("one_at_a_time", 1)):
        app = create_app(engine, ServerSettings())
        app.state.batcher.max_batch_size = batch_size
        with running_server(app) as url:
            result[name] = load(url, prompts, args.clients, args.max_tokens)
        sizes = app.state.batcher.batches
        result[name]["mean_batch_size"] = round(sum(sizes) / len(sizes), 2)
    result["machine"] = machine()
    save("server", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
