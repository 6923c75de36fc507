"""`medgpt rag index|search|ask`: answer questions from a folder of documents, citing the passages used."""

from __future__ import annotations

import argparse
import json
import sys

from medgpt.rag import DEFAULT_CHUNK_SIZE, DEFAULT_EMBEDDER, DEFAULT_MODE, DEFAULT_OVERLAP, DEFAULT_TOP_K, MODES

NOTHING_RELEVANT = "No passage in the knowledge base is relevant to this question."


def _retrieval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", help="index folder written by `medgpt rag index`")
    parser.add_argument("question", help="the question (Chinese or English)")
    parser.add_argument("-k", "--top-k", type=int, default=DEFAULT_TOP_K,
                        help=f"chunks put in the prompt (default: {DEFAULT_TOP_K})")
    parser.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                        help=f"hybrid: dense + BM25, each voting only for passages it finds relevant, fused by "
                             f"reciprocal rank; dense; bm25 (default: {DEFAULT_MODE})")
    parser.add_argument("--min-score", type=float, metavar="COSINE",
                        help="dense relevance floor (default: the embedder's own; -1 turns it off)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    index = sub.add_parser("index", help="index .txt/.md/.pdf/.docx files (only changed files are re-embedded)",
                           description="Split documents into overlapping chunks at sentence boundaries, embed them "
                                       "and build a BM25 index. Re-running embeds only new and changed files.")
    index.add_argument("paths", nargs="+", help="folders and files to index")
    index.add_argument("--out", required=True, help="index folder (written atomically)")
    index.add_argument("--embedder", default=DEFAULT_EMBEDDER,
                       help="use (multilingual, default), tfidf, minilm, openai:MODEL or a sentence-transformers name")
    index.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                       help="chunk size in approximate tokens: 1 per CJK character, 1 per word "
                            f"(default: {DEFAULT_CHUNK_SIZE})")
    index.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP,
                       help=f"tokens repeated from the previous chunk (default: {DEFAULT_OVERLAP})")
    index.add_argument("--rebuild", action="store_true", help="re-embed every file, even unchanged ones")
    index.add_argument("--json", action="store_true", help="print the report as JSON")

    search = sub.add_parser("search", help="show the chunks retrieved for a question (no model)")
    _retrieval_arguments(search)

    ask = sub.add_parser("ask", help="answer a question from the index, citing sources as [1], [2]")
    _retrieval_arguments(ask)
    ask.add_argument("--model", help="model folder or hub id (default: the bundled SmolLM2-135M-Instruct)")
    ask.add_argument("--adapter", help="LoRA adapter folder")
    ask.add_argument("--template", help="chat template (default: the one saved with the model, else its own)")
    ask.add_argument("--max-new-tokens", type=int, default=256)
    ask.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ask.add_argument("--trust-remote-code", action="store_true")


def run(args: argparse.Namespace) -> int:
    return {"index": _index, "search": _search, "ask": _ask}[args.action](args)


def _index(args: argparse.Namespace) -> int:
    from medgpt.rag.index import build_index

    report = build_index(args.paths, args.out, embedder=args.embedder, chunk_size=args.chunk_size,
                         overlap=args.overlap, rebuild=args.rebuild)
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
        return 0
    print(f"{report.out}: {report.chunks} chunks; embedded {report.embedded}, reused {report.chunks - report.embedded}")
    for label, names in (("added", report.added), ("changed", report.changed), ("unchanged", report.unchanged),
                         ("removed", report.removed)):
        if names:
            print(f"  {label:<9} {len(names):>4}  {', '.join(names)}")
    for name, reason in report.skipped.items():
        print(f"  skipped   {name}: {reason}")
    return 0


def _print_sources(sources: list[dict], used: list[int] | None = None) -> None:
    for s in sources:
        mark = "*" if used and s["n"] in used else " "
        print(f"{mark}[{s['n']}] {s['source']}  score {s['score']:.4f}  cosine {s['dense']:.3f}  bm25 {s['bm25']:.2f}")


def _search(args: argparse.Namespace) -> int:
    from medgpt.rag.retrieve import open_retriever

    sources = [s.to_dict() for s in open_retriever(args.index).search(args.question, k=args.top_k, mode=args.mode,
                                                                     min_score=args.min_score)]
    if args.json:
        print(json.dumps({"question": args.question, "sources": sources}, ensure_ascii=False, indent=2))
        return 0
    if not sources:
        print(NOTHING_RELEVANT)
    for s in sources:
        _print_sources([s])
        print("    " + s["text"].replace("\n", "\n    ") + "\n")
    return 0


def _ask(args: argparse.Namespace) -> int:
    from medgpt.infer.base import GenerationParams
    from medgpt.infer.engine import load_engine
    from medgpt.rag.retrieve import augment, cited

    messages, sources = augment([{"role": "user", "content": args.question}], args.index, k=args.top_k,
                                mode=args.mode, min_score=args.min_score)
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    with load_engine(model=args.model, adapter=args.adapter, template=args.template,
                     trust_remote_code=args.trust_remote_code) as engine:
        if args.json:
            answer = engine.generate([messages], params)[0].text
        else:
            pieces = []
            for delta in engine.stream(messages, params):
                pieces.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
            answer = "".join(pieces)
            print()
    used = cited(answer, len(sources))
    if args.json:
        print(json.dumps({"question": args.question, "answer": answer, "cited": used, "sources": sources},
                         ensure_ascii=False, indent=2))
        return 0
    if not sources:
        print("\n" + NOTHING_RELEVANT)
        return 0
    print("\nSources" + (" (* = cited in the answer)" if used else " (the answer cites none of them)") + ":")
    _print_sources(sources, used)
    return 0
