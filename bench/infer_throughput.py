"""Batch prediction throughput: generated tokens per second, batched against one request at a time.

The same questions (the shipped QA set) go through the transformers engine once in batches and once one
by one, greedy, with the same token budget; both runs are preceded by a warm-up call. Results are merged
into bench/results/infer.json under "throughput".

    python bench/infer_throughput.py                          # bundled SmolLM2-135M, 16 questions
    python bench/infer_throughput.py --model merged/ --questions 32 --max-new-tokens 128 --dtype fp32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep: spinning ones stall a shared CPU
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "infer.json"


def save(section: str, result: dict) -> None:
    """Merge one section into the results file (written to a temp name, then renamed)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[section] = result
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, RESULTS)


def machine() -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "platform": platform.platform(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_1min": os.getloadavg()[0]}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 is far faster on a "
                                                    "CPU shared with other busy processes")


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def questions(n: int) -> list[list[dict]]:
    from medgpt.infer.predict import read_inputs

    rows = read_inputs(ROOT / "src/medgpt/sample_data/qa/medical_qa.jsonl")
    return [messages for _, messages in (rows * (n // len(rows) + 1))[:n]]


def timed(fn) -> tuple[float, list]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    set_threads(args.threads)

    from medgpt.infer.base import GenerationParams
    from medgpt.infer.engine import load_engine

    engine = load_engine(args.model, dtype=args.dtype, max_batch_size=args.batch_size)
    prompts = questions(args.questions)
    params = GenerationParams(max_new_tokens=args.max_new_tokens)
    engine.generate(prompts[:2], GenerationParams(max_new_tokens=4))  # warm-up
    batched_s, batched = timed(lambda: engine.generate(prompts, params))
    single_s, single = timed(lambda: [engine.generate([p], params)[0] for p in prompts])
    tokens = lambda completions: sum(c.completion_tokens for c in completions)  # noqa: E731
    result = {
        "model": args.model or "HuggingFaceTB/SmolLM2-135M-Instruct", "dtype": str(engine.model.dtype),
        "questions": len(prompts), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "batched": {"seconds": round(batched_s, 2), "generated_tokens": tokens(batched),
                    "tokens_per_s": round(tokens(batched) / batched_s, 1)},
        "one_by_one": {"seconds": round(single_s, 2), "generated_tokens": tokens(single),
                       "tokens_per_s": round(tokens(single) / single_s, 1)},
        "identical_answers": sum(a.text == b.text for a, b in zip(batched, single)),  # bf16 batches may differ slightly
        "machine": machine(),
    }
    result["speedup"] = round(result["batched"]["tokens_per_s"] / result["one_by_one"]["tokens_per_s"], 2)
    save("throughput", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
