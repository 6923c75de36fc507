"""`medgpt tokenizer extend --model M --corpus FILES --out DIR`: a model whose tokenizer holds the domain's
Chinese vocabulary, with its embeddings and LM head resized to match (the seeds' extend_vocab step)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    extend = sub.add_parser(
        "extend", help="add pieces learned on a domain corpus to a model's tokenizer and resize the model",
        description="Train pieces on the corpus's Chinese text with sentencepiece (plus the K most frequent jieba "
                    "words), keep those the tokenizer does not already have as one token, add them in the "
                    "tokenizer's own kind, resize the embeddings and LM head (each new row the mean of the rows "
                    "of the old tokens that spelled it) and write the model folder with vocab_report.json. "
                    "Continue pretraining on it next (stage pt; LoRA trains embed_tokens and lm_head in full).")
    extend.add_argument("--model", required=True, help="base model (folder or name)")
    extend.add_argument("--corpus", nargs="+", required=True,
                        help="domain text: .txt lines, or .jsonl/.json/.csv/.parquet records (every string)")
    extend.add_argument("--out", required=True, help="output model folder (written whole or not at all)")
    extend.add_argument("--vocab-size", type=int, default=8000,
                        help="pieces the sentencepiece trainer learns before the filter (default 8000)")
    extend.add_argument("--jieba-words", type=int, default=0, metavar="K",
                        help="also add the K most frequent jieba words of the corpus (default 0)")
    extend.add_argument("--heldout", nargs="+", default=[],
                        help="text not trained on, for the tokens-per-character and loss figures")
    extend.add_argument("--character-coverage", type=float, default=0.9995,
                        help="share of the corpus's characters the pieces must cover (sentencepiece; default 0.9995)")
    extend.add_argument("--trust-remote-code", action="store_true")
    extend.add_argument("--json", action="store_true", help="print the report as JSON")


def summary(report: dict) -> str:
    """The report as the seeds' doc shows it: counts, tokens per character, loss, segmentations."""
    lines = [f"added {report['pieces_added']} pieces ({report['kind']} tokenizer): {report['base_tokens']} -> "
             f"{report['tokens']} tokens; {report['pieces_trained']} trained, {report['jieba_words']} jieba words, "
             f"{report['prefixes_added']} prefixes for merges",
             "", "tokens per character   before   after"]
    for name in ("corpus", "heldout"):
        if name in report:
            ratio = report[name]["tokens_per_char"]
            for lang in ("zh", "en"):
                if ratio["before"][lang] is not None:
                    lines.append(f"  {name} {lang:<14} {ratio['before'][lang]:>7.3f} {ratio['after'][lang]:>7.3f}")
    loss = report["loss"]
    lines += ["", f"loss on the {loss['measured_on']} (nats)   before   after"]
    for lang, unit in (("en", "per_token"), ("zh", "per_char")):
        if loss["before"][lang][unit] is not None:
            lines.append(f"  {lang} {unit:<22} {loss['before'][lang][unit]:>7.4f} {loss['after'][lang][unit]:>7.4f}")
    lines.append(f"\nround trip: {report['roundtrip']['lines']} lines decode to themselves; English lines with "
                 f"changed ids: {report['english_lines_with_changed_ids']}")
    for example in report["examples"]:
        lines += ["", f"  {example['text'][:60]}", f"  before ({len(example['before'])}): {' / '.join(example['before'][:24])}",
                  f"  after  ({len(example['after'])}): {' / '.join(example['after'][:24])}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from medgpt.vocab import ExtendArgs, extend_vocabulary

    report = extend_vocabulary(ExtendArgs(
        model=args.model, corpus=args.corpus, out=args.out, vocab_size=args.vocab_size, jieba_words=args.jieba_words,
        heldout=args.heldout, character_coverage=args.character_coverage, trust_remote_code=args.trust_remote_code))
    print(json.dumps(report, ensure_ascii=False, indent=1) if args.json else summary(report))
    print(f"extended model written to {args.out}")
    return 0
