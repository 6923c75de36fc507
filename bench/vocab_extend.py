"""Vocabulary extension on the bundled SmolLM2-135M-Instruct and the shipped medical text, then a short PT.

Every fifth line of the pretraining corpus is held out; the pieces are learned on the rest plus the shipped SFT,
QA and preference text. Measured: tokens per character (Chinese: Han runs; English: lines without Han) before and
after, on the corpus and the held-out lines; the held-out loss (English nats per token, Chinese nats per
character) of the base model, of the extended model before PT, and after a short LoRA PT (embeddings and LM head
trained in full) merged. Results in bench/results/vocab_extend.json.

    .venv/bin/python bench/vocab_extend.py [--vocab-size 8000] [--jieba-words 1000] [--steps 20] [--lr 3e-4]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "medgpt" / "sample_data"


def held_out_loss(folder: str, lines: list[str]) -> dict:
    """English nats per token and Chinese nats per character of the lines."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medgpt.vocab import is_chinese, mean_loss

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return {"en_per_token": mean_loss(model, tokenizer, [x for x in lines if not is_chinese(x)])["per_token"],
            "zh_per_char": mean_loss(model, tokenizer, [x for x in lines if is_chinese(x)])["per_char"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--jieba-words", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "vocab_extend.json"))
    args = parser.parse_args()

    from medgpt.files import write_json
    from medgpt.models import merge_adapter, resolve_model
    from medgpt.train import build_config, run_training
    from medgpt.vocab import ExtendArgs, extend_vocabulary

    work = Path(tempfile.mkdtemp(prefix="vocab-bench-"))
    lines = (DATA / "pt" / "medical_corpus.txt").read_text(encoding="utf-8").splitlines()
    train = [x for i, x in enumerate(lines) if i % 5 != 4]
    heldout = [x for i, x in enumerate(lines) if i % 5 == 4]
    (work / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (work / "heldout.txt").write_text("\n".join(heldout) + "\n", encoding="utf-8")
    corpus = [str(work / "train.txt"), *(str(DATA / f) for f in (
        "sft/medical_sft.jsonl", "qa/medical_qa.jsonl", "pref/medical_pref.jsonl"))]
    base = resolve_model()

    start = time.perf_counter()
    report = extend_vocabulary(ExtendArgs(model=base, corpus=corpus, heldout=[str(work / "heldout.txt")],
                                          out=str(work / "extended"), vocab_size=args.vocab_size,
                                          jieba_words=args.jieba_words))
    extend_s = time.perf_counter() - start
    cfg = build_config({"stage": "pt", "model": str(work / "extended"), "data": str(work / "train.txt"),
                        "output_dir": str(work / "pt"), "block_size": 128, "max_steps": args.steps,
                        "per_device_train_batch_size": 4, "learning_rate": args.lr, "logging_steps": 5,
                        "save_strategy": "no", "report_to": "none", "report_prompts": "none", "dtype": "fp32",
                        "seed": 0})
    start = time.perf_counter()
    metrics = run_training(cfg)
    pt_s = time.perf_counter() - start
    merged = merge_adapter(str(work / "pt"), str(work / "merged"))

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "settings": {"vocab_size": args.vocab_size, "jieba_words": args.jieba_words, "pt_steps": args.steps, "pt_learning_rate": args.lr,
                     "pt_modules_to_save": cfg.lora.modules_to_save},
        "pieces_added": report["pieces_added"], "tokens": [report["base_tokens"], report["tokens"]],
        "tokens_per_char": {"corpus": report["corpus"]["tokens_per_char"],
                            "heldout": report["heldout"]["tokens_per_char"]},
        "heldout_loss": {"base": held_out_loss(base, heldout), "extended": held_out_loss(str(work / "extended"), heldout),
                         "after_pt": held_out_loss(str(merged), heldout)},
        "pt_corpus_loss": {"extended": held_out_loss(str(work / "extended"), train),
                           "after_pt": held_out_loss(str(merged), train)},
        "pt_train_loss": metrics.get("train_loss"), "seconds": {"extend": round(extend_s, 1), "pt": round(pt_s, 1)},
        "examples": report["examples"][:2],
    }
    write_json(args.out, result)
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
