"""Pretraining on a corpus larger than memory: `streaming: true` keeps peak memory flat as the corpus grows.

Writes synthetic plain-text corpora (Chinese and English medical sentences, one document a line) of each size and
runs `medgpt train` (stage pt, `streaming: true`, a tiny random Llama with the bundled tokenizer, block_size 128,
batch 4, --steps optimizer steps) on each, in its own process. Reports each run's wall time and peak RSS (the
process's own maximum resident set, from wait4; the stream is read in that process, no data workers). Results in
bench/results/pt_streaming.json.

    .venv/bin/python bench/pt_streaming.py [--sizes-mb 200 1000] [--steps 30] [--work /tmp/medgpt-bench-pt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

ZH = ["高血压患者应定期测量血压，并遵医嘱服药。", "糖尿病人需要控制饮食，规律运动，监测血糖。",
      "发热伴咳嗽超过三天，应及时就医检查。", "服用华法林期间应避免大量摄入富含维生素K的食物。",
      "儿童手足口病多由肠道病毒引起，注意手卫生。"]
EN = ["Aspirin thins the blood and relieves pain.", "Insulin lowers blood sugar after meals.",
      "Vaccines train the immune system to recognise germs before an infection happens.",
      "An asthma inhaler works best with a slow, deep breath and a spacer.",
      "Persistent chest pain on exertion needs an urgent cardiac assessment."]


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> int:
    """A corpus of about `megabytes` MB: documents of 1-12 random sentences, one a line; its size in bytes."""
    rng = random.Random(seed)
    target, size = megabytes * 1_000_000, 0
    with path.open("w", encoding="utf-8") as f:
        while size < target:
            lines = []
            for _ in range(10_000):
                pool = ZH if rng.random() < 0.5 else EN
                lines.append((" " if pool is EN else "").join(rng.choices(pool, k=rng.randint(1, 12))))
            chunk = "\n".join(lines) + "\n"
            f.write(chunk)
            size += len(chunk.encode("utf-8"))
    return path.stat().st_size


def tiny_model(folder: Path) -> Path:
    """A 2-layer Llama (hidden 64) with the bundled tokenizer: training steps cost little next to the data."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from medgpt.models import load_tokenizer

    if (folder / "config.json").exists():
        return folder
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                         tie_word_embeddings=True))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train(corpus: Path, model: Path, out: Path, steps: int) -> dict:
    config = out.with_suffix(".yaml")
    config.write_text(json.dumps({"stage": "pt", "model": str(model), "data": str(corpus), "streaming": True,
                                  "max_steps": steps, "block_size": 128, "per_device_train_batch_size": 4,
                                  "learning_rate": 1e-3, "logging_steps": max(1, steps // 5), "save_strategy": "no",
                                  "report_to": "none", "report_prompts": "none", "dtype": "fp32",
                                  "output_dir": str(out)}))
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    with out.with_suffix(".log").open("w") as log:
        proc = subprocess.Popen([PY, "-m", "medgpt.cli", "train", str(config)], env=env, stdout=subprocess.DEVNULL,
                                stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"medgpt train failed on {corpus}: see {out.with_suffix('.log')}")
    stats = json.loads((out / "data_stats.json").read_text())
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "steps": steps,
            "documents_read": stats["train"]["read"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path("/tmp/medgpt-bench-pt"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "src"))
    model = tiny_model(args.work / "tiny-llama")
    runs = []
    for megabytes in args.sizes_mb:
        corpus = args.work / f"corpus-{megabytes}mb.txt"
        size = corpus.stat().st_size if corpus.exists() else write_corpus(corpus, megabytes)
        run = {"corpus_mb": round(size / 1e6), **train(corpus, model, args.work / f"run-{megabytes}mb", args.steps)}
        print(json.dumps(run), flush=True)
        runs.append(run)
    result = {"what": "medgpt train, stage pt, streaming: true (tiny Llama, block_size 128, batch 4)",
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "runs": runs}
    out = ROOT / "bench" / "results" / "pt_streaming.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
