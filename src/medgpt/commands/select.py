"""`medgpt select --eval E --corpus C --out DIR`: the training items nearest to an eval set, with a leakage guard."""

from __future__ import annotations

import argparse

from medgpt.data.readers import ON_ERROR  # the standard library only: fast --help
from medgpt.errors import UserError
from medgpt.select.index import ANN_MIN_CORPUS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Embed the eval set and the corpus (cached per chunk: an interrupted run continues), recall the top-k "
        "training conversations per eval item within [--min-sim, --max-sim), deduplicate, optionally mix in random "
        "items, drop n-gram copies of eval questions, and write DIR/selected.jsonl (ShareGPT), "
        "DIR/baseline_random.jsonl (--baseline random), DIR/select_stats.json, DIR/recall.jsonl and "
        "DIR/contamination.json.")
    parser.add_argument("--eval", required=True,
                        help="eval set: C-Eval/CMMLU CSV file or folder, hub MCQ set, {question,answer} jsonl, or sft data")
    parser.add_argument("--corpus", required=True, help="training corpus (anything `medgpt data check` reads as sft)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default="val", help="split of a C-Eval-style eval set (default: val)")
    parser.add_argument("--subjects", help="comma-separated subjects (hub MCQ sets: default the medical ones)")
    parser.add_argument("--embedder", default="use",
                        help="use (default; multilingual, offline), tfidf (character n-grams), minilm (English only), "
                             "openai:MODEL, or a sentence-transformers model name/path")
    parser.add_argument("--embed-base-url", help="base URL of an OpenAI-compatible embeddings API (else OPENAI_BASE_URL)")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per embedding call")
    parser.add_argument("--cache-dir", help="embedding cache (default: ~/.cache/medgpt/embeddings)")
    parser.add_argument("--chunk-size", type=int, default=8192, help="texts per cached chunk (the unit of resume)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes that embed chunks in parallel (default 1: on 2 shared cores a second one "
                             "gained 11%% with use and lost with tfidf, see bench/results/select_scale.json)")
    parser.add_argument("--device", help="device of a sentence-transformers embedder (default: CUDA when there is one)")
    parser.add_argument("--index", default="auto", choices=("auto", "exact", "ivf", "hnsw"),
                        help="corpus index: exact inner product, approximate IVF or HNSW, or auto (default): IVF "
                             "from --ann-min-corpus vectors when the eval set has at least 2 x sqrt(corpus size) "
                             "items (where it was measured to pay), exact otherwise")
    parser.add_argument("--ann-min-corpus", type=int, default=ANN_MIN_CORPUS,
                        help=f"smallest corpus for which --index auto may use IVF (default {ANN_MIN_CORPUS:,}, "
                             "measured in bench/select_scale.py)")
    parser.add_argument("--corpus-text", default="user", choices=("user", "conversation"),
                        help="what of a training conversation is embedded: its user turns (default) or all turns")
    parser.add_argument("--top-k", type=int, default=50, help="training items recalled per eval item (default 50)")
    parser.add_argument("--min-sim", type=float, default=0.5, help="lowest similarity kept (default 0.5, calibrated for `use`)")
    parser.add_argument("--max-sim", type=float, default=0.9,
                        help="similarity at which a training item counts as a copy of an eval item and is never "
                             "written (default 0.9, calibrated for `use`)")
    parser.add_argument("--random-ratio", type=float, default=0.0,
                        help="share of the output drawn at random from the rest of the corpus (default 0)")
    parser.add_argument("--baseline", choices=("random",), help="also write a random sample of the same size")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-samples", type=int, help="read at most this many corpus records")
    parser.add_argument("--on-error", default="skip", choices=ON_ERROR,
                        help="a bad corpus record: skip and count it (default), or stop")
    parser.add_argument("--shard", help="I/N: embed only every N-th chunk starting at I, then stop (parallel embedding)")
    parser.add_argument("--ngram-ratio", type=float, default=0.5,
                        help="drop items holding this share of an eval question's n-grams (default 0.5)")
    parser.add_argument("--zh-ngram", type=int, default=8, help="character n-gram size for Chinese (default 8)")
    parser.add_argument("--en-ngram", type=int, default=13, help="word n-gram size for English (default 13)")
    parser.add_argument("--keep-contaminated", action="store_true", help="report n-gram copies but keep them")


def _shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise UserError(f"--shard {text!r}: I must be in 0..N-1")
    return index, count


def run(args: argparse.Namespace) -> int:
    import logging

    from medgpt.select.contamination import ContaminationArgs
    from medgpt.select.recall import SelectArgs, select

    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    settings = SelectArgs(
        eval=args.eval, corpus=args.corpus, out=args.out, split=args.split, subjects=subjects, embedder=args.embedder,
        embed_base_url=args.embed_base_url, batch_size=args.batch_size, cache_dir=args.cache_dir,
        chunk_size=args.chunk_size, corpus_text=args.corpus_text, top_k=args.top_k, min_sim=args.min_sim,
        max_sim=args.max_sim, random_ratio=args.random_ratio, baseline=args.baseline, seed=args.seed,
        max_samples=args.max_samples, on_error=args.on_error, shard=_shard(args.shard),
        keep_contaminated=args.keep_contaminated, workers=args.workers, device=args.device, index=args.index,
        ann_min_corpus=args.ann_min_corpus,
        contamination=ContaminationArgs(zh_ngram=args.zh_ngram, en_ngram=args.en_ngram, ngram_ratio=args.ngram_ratio,
                                        sim_threshold=args.max_sim))
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    stats = select(settings)
    if "shard" in stats:
        print(f"shard {args.shard}: embedded {stats['embedded_chunks']} chunk(s) into {stats['cache']}")
        return 0
    c = stats["counts"]
    print(f"eval items {c['eval_items']}, corpus {c['corpus']} ({c['corpus_too_similar']} too similar to an eval item)")
    print(f"{'subject':28s} {'recalled':>8s} {'kept':>6s} {'<min':>6s} {'>=max':>6s} {'dup':>6s} {'ngram':>6s}")
    for name, s in stats["subjects"].items():
        print(f"{name:28s} {s['recalled']:8d} {s['kept']:6d} {s['below_min_sim']:6d} {s['too_similar']:6d} "
              f"{s['duplicate']:6d} {s['contaminated']:6d}")
    print(f"selected {c['selected']} ({c['recalled_kept']} recalled + {c['random_added']} random)"
          + (f", baseline {c['baseline']}" if args.baseline else ""))
    written = stats["contamination"]["written"]
    print(f"contamination check of the output: {written['contaminated_train']} item(s) overlap "
          f"{written['contaminated_eval']} eval item(s)")
    for name, path in stats["files"].items():
        if path:
            print(f"written: {path}")
    return 0
