"""Which sampling settings keep a small chat model from looping: the evidence behind medgpt's chat defaults.

English and Chinese medical questions go through the transformers engine under several generation settings
(greedy, sampling with and without a repetition penalty), each question with a few seeds, all rows of one
setting in one batch. For each setting it counts the answers that looped (one sentence three times or more)
and the answers cut at the token limit. Results go to bench/results/chat_defaults.json.

    python bench/chat_defaults.py                     # bundled SmolLM2-135M-Instruct, 8 questions x 2 seeds
    python bench/chat_defaults.py --seeds 3 --max-new-tokens 512 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "chat_defaults.json"

QUESTIONS = [
    "What are the symptoms of the flu?",
    "How is high blood pressure treated?",
    "What should I do if I have a fever?",
    "What causes type 2 diabetes?",
    "流感有哪些症状？",
    "高血压应该怎么治疗？",
    "发烧了应该怎么办？",
    "糖尿病患者饮食要注意什么？",
]

SETTINGS = {  # name -> GenerationParams fields
    "greedy": {},
    "greedy, repetition penalty 1.1": {"repetition_penalty": 1.1},
    "t0.7 p0.9": {"temperature": 0.7, "top_p": 0.9},
    "t0.7 p0.9 rp1.1": {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1},
    "t0.5 p0.9 rp1.1": {"temperature": 0.5, "top_p": 0.9, "repetition_penalty": 1.1},
    "t0.7 p0.9 rp1.2": {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.2},
}
DEFAULT_SETTINGS = ["greedy", "greedy, repetition penalty 1.1", "t0.7 p0.9", "t0.5 p0.9 rp1.1", "t0.7 p0.9 rp1.1"]


def sentences(text: str) -> list[str]:
    """Sentences of English or Chinese text, whitespace-normalised; very short fragments are left out."""
    parts = re.split(r"(?<=[.!?。！？；;])\s*|\n+", text)
    return [p for p in (" ".join(s.split()) for s in parts) if len(p) >= 8]


def loops(text: str) -> bool:
    """One sentence said three times or more: the answer is going round in circles."""
    counts = Counter(sentences(text))
    return bool(counts) and max(counts.values()) >= 3


def repeated_share(text: str, n: int = 4) -> float:
    """Share of the answer's n-grams (words; single characters for Chinese) that it already said before."""
    units = re.findall(r"[\u4e00-\u9fff]|[^\s\u4e00-\u9fff]+", text)
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--only", action="append", help=f"run these settings (by name, repeatable; default: "
                                                        f"{', '.join(DEFAULT_SETTINGS)}; all: {', '.join(SETTINGS)})")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from medgpt.infer.base import GenerationParams, Request, chat_defaults
    from medgpt.infer.engine import load_engine

    engine = load_engine(args.model, dtype=args.dtype, max_batch_size=len(QUESTIONS) * args.seeds)
    chosen = chat_defaults(engine)
    defaults = {"temperature": chosen.temperature, "top_p": chosen.top_p, "top_k": chosen.top_k,
                "repetition_penalty": chosen.repetition_penalty}
    neutral = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    same = [name for name, fields in SETTINGS.items() if {**neutral, **fields} == defaults]
    settings = SETTINGS if same else {**SETTINGS, "medgpt chat defaults": defaults}
    wanted = (args.only or DEFAULT_SETTINGS) + ([] if same else ["medgpt chat defaults"])
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    run_name = f"max_new_tokens={args.max_new_tokens}, seeds={args.seeds}"
    results = previous.get("runs", {}).get(run_name, {}).get("settings", {})
    for name, fields in settings.items():
        if name not in wanted:
            continue
        rows = [(q, seed) for q in QUESTIONS for seed in range(args.seeds)]
        batch = [[{"role": "user", "content": q}] for q, _ in rows]
        params = [GenerationParams(max_new_tokens=args.max_new_tokens, seed=seed, **fields) for _, seed in rows]
        start = time.perf_counter()
        completions = engine.run([Request(engine.encode(m), p.validate()) for m, p in zip(batch, params)])
        seconds = time.perf_counter() - start
        looped = [loops(c.text) for c in completions]
        results[name] = {
            "params": fields, "answers": len(completions), "looped": sum(looped),
            "cut_at_limit": sum(c.finish_reason == "length" for c in completions),
            "looped_en": sum(x for x, (q, _) in zip(looped, rows) if q.isascii()),
            "looped_zh": sum(x for x, (q, _) in zip(looped, rows) if not q.isascii()),
            "mean_tokens": round(sum(c.completion_tokens for c in completions) / len(completions), 1),
            "mean_repeated_4gram_share": round(sum(repeated_share(c.text) for c in completions) / len(completions), 3),
            "seconds": round(seconds, 1),
            "answers_by_seed": {q: [c.text for (q2, _), c in zip(rows, completions) if q2 == q] for q in QUESTIONS},
        }
        print(f"{name}: looped {sum(looped)}/{len(completions)}, cut {results[name]['cut_at_limit']}, "
              f"{seconds:.0f} s", flush=True)
    run = {"model": args.model or "HuggingFaceTB/SmolLM2-135M-Instruct", "dtype": str(engine.model.dtype),
           "questions": QUESTIONS, "seeds": args.seeds, "max_new_tokens": args.max_new_tokens,
           "chat_defaults": {"params": defaults, "same_as": same[0] if same else "medgpt chat defaults"},
           "settings": results, "cpu_count": os.cpu_count(), "torch": torch.__version__}
    out = {"loop_rule": "a sentence (8+ characters) said 3 or more times",
           "repeated_4gram_share": "share of an answer's 4-grams (words; characters for Chinese) said before in it",
           "runs": {**previous.get("runs", {}), run_name: run}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, RESULTS)


if __name__ == "__main__":
    main()
