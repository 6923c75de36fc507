"""Domain vocabulary extension (the seeds' extend_vocab step): pieces trained on a domain corpus with the
`sentencepiece` trainer (and, optionally, its most frequent jieba words) are added to a model's tokenizer in the
tokenizer's own kind, and the model's embeddings and LM head are resized to match.

The pieces become vocabulary entries of the tokenizer's BPE model, each reachable through merges ranked after
every merge of the base (the base's own merges always apply first; a piece no split of two known entries spells
brings the prefixes it needs), so every runtime that implements BPE (transformers, vLLM, llama.cpp) tokenizes
the same way:
- byte-level BPE (GPT-2 style: SmolLM2, Qwen, Llama-3): the pieces spelled in the byte-level alphabet;
- SentencePiece-style BPE (Llama-2, Mistral, Baichuan, Yi: `▁` for spaces, byte fallback): the pieces as they
  are, also appended to `tokenizer.model` where the folder has one, scored below every base piece.

Only pieces made wholly of CJK characters (Han, CJK punctuation, full-width forms) that the base tokenizer does
not already produce as one token are added, so text without CJK characters keeps exactly its old token ids. Each
new embedding (and LM-head) row is the mean of the rows of the old tokens that spelled the piece, so the model's
predictions on old text barely move: a new token's logit is the mean of its pieces' logits, and its probability
at most the mean of theirs.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgpt.data.rows import RecordError, iter_rows
from medgpt.data.stats import DataStats
from medgpt.errors import UserError
from medgpt.files import save_atomic, write_json
from medgpt.models import read_meta, resolve_model, tokenizer_from, write_meta

log = logging.getLogger(__name__)

HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
CJK = HAN + "\u3000-\u303f\uff00-\uffef"
HAN_RUNS = re.compile(f"[{HAN}]+")
CJK_RUNS = re.compile(f"[{CJK}]+")
REPORT = "vocab_report.json"
TOKENIZER_KEY = "medgpt_vocab_extension"  # in tokenizer_config.json: {"base_merges": N, "entries_added": M}
LOSS_LINES = 256  # lines of each language the loss figures are measured on


@dataclass
class ExtendArgs:
    model: str
    corpus: list[str]
    out: str
    vocab_size: int = 8000  # pieces the sentencepiece trainer is asked for (before the filter)
    jieba_words: int = 0  # the K most frequent jieba words of the corpus (two characters or more)
    heldout: list[str] = field(default_factory=list)
    character_coverage: float = 0.9995
    max_sentences: int = 2_000_000  # corpus lines the trainer samples (sentencepiece's input_sentence_size)
    trust_remote_code: bool = False


# ---- the corpus -------------------------------------------------------------------------------------


def strings_of(value: Any) -> Iterator[str]:
    """Every string in a parsed record (a JSON object's values, recursively)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_of(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_of(item)


def corpus_lines(paths: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(location, line) of every non-empty line of text in the files: a .txt file's lines, and every string
    of each record of a .jsonl/.json/.csv/.parquet file split into lines."""
    for location, row in iter_rows(list(paths), "pt", DataStats()):
        if isinstance(row, RecordError):
            raise UserError(f"{location}: {row}")
        for text in strings_of(row):
            for line in text.splitlines():
                if line.strip():
                    yield location, line


def is_chinese(line: str) -> bool:
    return bool(HAN_RUNS.search(line))


# ---- pieces -----------------------------------------------------------------------------------------


def trained_pieces(lines: Iterable[str], args: ExtendArgs) -> list[str]:
    """CJK pieces learned by sentencepiece's BPE trainer from the corpus's CJK runs, in the order it learned them
    (single characters by frequency, then each merge)."""
    import sentencepiece as spm

    runs = (run for line in lines for run in CJK_RUNS.findall(line))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=runs, model_writer=model, model_type="bpe", vocab_size=args.vocab_size,
            character_coverage=args.character_coverage, hard_vocab_limit=False, byte_fallback=False,
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            input_sentence_size=args.max_sentences, shuffle_input_sentence=True, max_sentence_length=1 << 16,
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, num_threads=1, minloglevel=2)
    except RuntimeError as exc:
        if short := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(exc)):
            raise UserError(f"--vocab-size {short[1]} is smaller than the {short[2]} distinct characters the corpus "
                            "needs: raise it, or lower --character-coverage") from None
        raise UserError(f"sentencepiece could not learn pieces from {', '.join(args.corpus)}: {exc}") from None
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = (processor.id_to_piece(i) for i in range(processor.get_piece_size()) if not processor.is_unused(i))
    return [p for p in pieces if CJK_RUNS.fullmatch(p)]


def frequent_words(lines: Iterable[str], k: int) -> list[str]:
    """The k most frequent jieba words of two or more CJK characters."""
    if k <= 0:
        return []
    import jieba

    jieba.setLogLevel(logging.WARNING)
    counts = Counter(w for line in lines for run in CJK_RUNS.findall(line) for w in jieba.lcut(run)
                     if len(w) > 1 and CJK_RUNS.fullmatch(w))
    return [w for w, _ in counts.most_common(k)]


def new_pieces(candidates: Iterable[str], tokenizer) -> list[str]:
    """The candidates (in order, once each) the tokenizer does not already produce as a single token."""
    return [p for p in dict.fromkeys(candidates) if len(tokenizer.encode(p, add_special_tokens=False)) != 1]


# ---- the tokenizer, in its own kind -----------------------------------------------------------------


def tokenizer_kind(spec: dict) -> str:
    """`byte_level` or `sentencepiece` for a tokenizer.json's BPE model; anything else is an error."""
    model_type = spec.get("model", {}).get("type")
    text = json.dumps({k: spec.get(k) for k in ("pre_tokenizer", "decoder", "normalizer")})
    if model_type == "BPE" and '"ByteLevel"' in text:
        return "byte_level"
    if model_type == "BPE" and (spec["model"].get("byte_fallback") or "\u2581" in text or "Metaspace" in text):
        return "sentencepiece"
    raise UserError(f"tokenizer model {model_type or 'unknown'} ({text[:120]}...): vocabulary extension supports "
                    "byte-level BPE (GPT-2, Qwen, Llama-3, SmolLM2) and SentencePiece-style BPE (Llama-2, Mistral)")


def closed_pieces(pieces: list[str], vocab: dict[str, int]) -> list[str]:
    """The pieces in an order where each multi-character piece splits into two entries already present (the
    base's or earlier new ones), adding the prefixes a piece needs to be reachable by merges."""
    have, ordered = set(vocab), []

    def add(piece: str) -> None:
        if piece in have:
            return
        if len(piece) > 1 and not any(piece[:i] in have and piece[i:] in have for i in range(1, len(piece))):
            add(piece[:-1])
            add(piece[-1])
        have.add(piece)
        ordered.append(piece)

    for piece in pieces:
        add(piece)
    return ordered


def merges_of(spec: dict) -> list[list[str]]:
    return [m.split(" ", 1) if isinstance(m, str) else list(m) for m in spec["model"]["merges"]]


def extend_bpe_model(spec: dict, pieces: list[str]) -> list[str]:
    """Add pieces to a SentencePiece-style BPE model in place: vocabulary entries with new ids, and for each
    multi-character piece every split into two known entries as a merge, ranked after the base's merges."""
    vocab: dict[str, int] = spec["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in spec.get("added_tokens", [])}
    next_id = max(taken) + 1
    merges = merges_of(spec)
    added = []
    for piece in closed_pieces(pieces, vocab):
        splits = [[piece[:i], piece[i:]] for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        vocab[piece] = next_id
        next_id += 1
        merges.extend(splits)
        added.append(piece)
    spec["model"]["merges"] = merges
    return added


def extend_sentencepiece_file(path: Path, pieces: list[str]) -> None:
    """Append pieces to a SentencePiece model file, scored below every base piece (merged after them)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    known = {p.piece for p in proto.pieces}
    score = min((p.score for p in proto.pieces), default=0.0)
    for piece in pieces:
        if piece not in known:
            score -= 1.0
            proto.pieces.append(sp_pb2.ModelProto.SentencePiece(piece=piece, score=score))
    path.write_bytes(proto.SerializeToString())


@dataclass
class Extended:
    tokenizer: Any  # read back from the folder it was saved in
    kind: str  # byte_level | sentencepiece
    added: list[str]  # the new BPE entries as the model spells them (byte-level strings for byte-level BPE)
    prefixes: int  # entries added only so that a piece's merges reach it
    base_merges: int


def extended_tokenizer(source: str, pieces: list[str], folder: Path) -> Extended:
    """Save the tokenizer of the model folder `source` with the pieces added to its BPE model into `folder`."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokenizer = tokenizer_from(source)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = tokenizer_kind(spec)
    base_merges = len(spec["model"]["merges"])
    if kind == "byte_level":  # the piece's UTF-8 bytes in the byte-level alphabet, as the BPE model sees text
        spell = ByteLevel(add_prefix_space=False, use_regex=False)
        pieces = [spell.pre_tokenize_str(p)[0][0] for p in pieces]
    tokenizer.save_pretrained(folder)
    added = extend_bpe_model(spec, pieces)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    if kind == "sentencepiece" and (Path(source) / "tokenizer.model").exists():  # what llama.cpp's converter reads
        shutil.copyfile(Path(source) / "tokenizer.model", folder / "tokenizer.model")
        extend_sentencepiece_file(folder / "tokenizer.model", added)
    # recorded with the tokenizer (it travels with it through training, merge and export): an exporter
    # identifies the pre-tokenizer by the base's merges alone, as llama.cpp's converter hashes the base's ids
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config[TOKENIZER_KEY] = {"base_merges": base_merges, "entries_added": len(added)}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    return Extended(tokenizer_from(folder), kind, added, len(set(added) - set(pieces)), base_merges)


# ---- the model ----------------------------------------------------------------------------------------


def resize_with_mean_rows(model, old_tokenizer, new_tokenizer, added: list[str]) -> int:
    """Grow the embeddings (and an untied LM head) to the new tokenizer and set each new token's rows to the
    mean of the rows of the old tokens that spelled it (the base BPE model's tokens of the new entry); returns
    the number of rows set."""
    import torch

    ids = new_tokenizer.convert_tokens_to_ids(added) if added else []
    if any(i is None or i == new_tokenizer.unk_token_id for i in ids):
        raise UserError("an added piece did not get its own id in the saved tokenizer")
    rows = max([model.get_input_embeddings().weight.shape[0] - 1, *ids]) + 1
    if rows > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(head.weight)
    spell = old_tokenizer.backend_tokenizer.model  # the base's BPE model on the entry's own symbols
    with torch.no_grad():
        for piece, new_id in zip(added, ids):
            spelled = [t.id for t in spell.tokenize(piece)]
            for weight in matrices:
                weight[new_id] = weight[spelled].float().mean(0).to(weight.dtype)
    return len(ids)


def mean_loss(model, tokenizer, lines: list[str]) -> dict:
    """Next-token loss of the lines, each scored alone after the document separator (BOS, else EOS) so every
    token of the line is predicted: nats per token and per character."""
    import torch

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    nats = tokens = chars = 0
    with torch.no_grad():
        for line in lines:
            ids = [start, *tokenizer.encode(line, add_special_tokens=False)]
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            nats += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
            tokens += len(ids) - 1
            chars += len(line)
    return {"per_token": nats / tokens if tokens else None, "per_char": nats / chars if chars else None,
            "lines": len(lines)}


# ---- measurements -------------------------------------------------------------------------------------


def compare_tokenizers(base, new, located: Iterable[tuple[str, str]]) -> dict:
    """One pass over (location, line): tokens per character before and after (Chinese: the Han runs, each
    tokenized alone; English: the lines without Han characters), the `path:line` of every line the new tokenizer
    does not decode back to itself, and of every line without CJK characters whose ids changed."""
    tokens = {"before": {"zh": 0, "en": 0}, "after": {"zh": 0, "en": 0}}
    chars, lines, failures, changed = {"zh": 0, "en": 0}, 0, [], []

    def count(tokenizer, text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    for location, line in located:
        lines += 1
        ids = new.encode(line, add_special_tokens=False)
        if new.decode(ids) != line:
            failures.append(location)
        if is_chinese(line):
            for run in HAN_RUNS.findall(line):
                chars["zh"] += len(run)
                tokens["before"]["zh"] += count(base, run)
                tokens["after"]["zh"] += count(new, run)
            continue
        before = base.encode(line, add_special_tokens=False)
        chars["en"] += len(line)
        tokens["before"]["en"] += len(before)
        tokens["after"]["en"] += len(ids)
        if ids != before and not CJK_RUNS.search(line):
            changed.append(location)

    def ratios(counted: dict) -> dict:
        return {**{lang: round(counted[lang] / chars[lang], 4) if chars[lang] else None for lang in chars},
                "zh_chars": chars["zh"], "en_chars": chars["en"]}

    return {"lines": lines, "tokens_per_char": {"before": ratios(tokens["before"]), "after": ratios(tokens["after"])},
            "failures": failures, "changed": changed}


def segmentation(tokenizer, line: str) -> list[str]:
    return [tokenizer.decode([i]) for i in tokenizer.encode(line, add_special_tokens=False)]


# ---- the command ----------------------------------------------------------------------------------------


def extend_vocabulary(args: ExtendArgs) -> dict:
    """Train pieces on the corpus, add them to the model's tokenizer, resize the model, check and measure; write
    the extended model folder (with vocab_report.json) at `args.out`, whole or not at all. Returns the report."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.vocab_size < 1 or args.jieba_words < 0:
        raise UserError("--vocab-size must be positive and --jieba-words not negative")
    if not args.corpus:
        raise UserError("give the domain corpus: --corpus FILE [FILE ...]")
    folder = resolve_model(args.model, args.trust_remote_code)
    base = tokenizer_from(folder, args.trust_remote_code)

    def corpus() -> Iterator[str]:  # read again for each pass: the corpus is never held in memory
        return (line for _, line in corpus_lines(args.corpus))

    if not any(is_chinese(line) for line in corpus()):
        raise UserError(f"{', '.join(args.corpus)}: no Chinese (CJK) text to learn pieces from")
    log.info("training up to %d pieces on the Chinese text of %s", args.vocab_size, ", ".join(args.corpus))
    trained = trained_pieces(corpus(), args)
    words = frequent_words(corpus(), args.jieba_words)
    candidates = new_pieces([*trained, *words], base)
    # fp32 on any CPU (exact means, a loss measured at fp32 speed), saved back in the model's own dtype
    stored = AutoConfig.from_pretrained(folder, trust_remote_code=args.trust_remote_code).dtype
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=args.trust_remote_code)
    model.eval()
    measured = (line for _, line in corpus_lines(args.heldout)) if args.heldout else corpus()
    zh_lines, en_lines = [], []  # the first LOSS_LINES lines of each language of the held-out text (or corpus)
    for line in measured:
        sample = zh_lines if is_chinese(line) else en_lines
        if len(sample) < LOSS_LINES:
            sample.append(line)
        if len(zh_lines) == len(en_lines) == LOSS_LINES:
            break
    loss_before = {"zh": mean_loss(model, base, zh_lines), "en": mean_loss(model, base, en_lines)}
    report: dict[str, Any] = {}

    def save(tmp: Path) -> None:
        extended = extended_tokenizer(folder, candidates, tmp)
        tokenizer, kind, added = extended.tokenizer, extended.kind, extended.added
        compared = {name: compare_tokenizers(base, tokenizer, corpus_lines(files))
                    for name, files in (("corpus", args.corpus), ("heldout", args.heldout)) if files}
        failures = [loc for c in compared.values() for loc in c["failures"]]
        if failures:
            raise UserError(f"{failures[0]}: the extended tokenizer does not decode this line back to itself "
                            f"({len(failures)} line(s) in all)")
        rows = resize_with_mean_rows(model, base, tokenizer, added)
        loss_after = {"zh": mean_loss(model, tokenizer, zh_lines), "en": mean_loss(model, tokenizer, en_lines)}
        model.to(stored if isinstance(stored, torch.dtype) else torch.float32).save_pretrained(tmp)
        report.update({
            "base_model": folder, "kind": kind, "base_tokens": len(base), "tokens": len(tokenizer),
            "pieces_added": len(added), "pieces_trained": len(trained), "jieba_words": len(words),
            "prefixes_added": extended.prefixes, "embedding_rows_set": rows,
            **{name: {"files": files, "lines": compared[name]["lines"],
                      "tokens_per_char": compared[name]["tokens_per_char"]}
               for name, files in (("corpus", args.corpus), ("heldout", args.heldout)) if files},
            "roundtrip": {"lines": sum(c["lines"] for c in compared.values()), "failures": 0},
            "english_lines_with_changed_ids": sum(len(c["changed"]) for c in compared.values()),
            "loss": {"measured_on": "heldout" if args.heldout else "corpus", "before": loss_before,
                     "after": loss_after},
            "examples": [{"text": line, "before": segmentation(base, line), "after": segmentation(tokenizer, line)}
                         for line in zh_lines[:3]],
        })
        meta = read_meta(folder)
        write_meta(tmp, **{**meta, "base_model": folder, "vocab_extension": {
            "base_model": folder, "base_tokens": len(base), "pieces_added": len(added), "kind": kind,
            "base_merges": extended.base_merges}})
        write_json(tmp / REPORT, report)

    save_atomic(args.out, save)
    return report


def base_merge_count(tokenizer) -> int | None:
    """How many of the tokenizer's BPE merges are its base's (None: not extended by medgpt)."""
    return (getattr(tokenizer, "init_kwargs", {}).get(TOKENIZER_KEY) or {}).get("base_merges")


def vocabulary_extension(folder: str | Path) -> dict | None:
    """What `medgpt tokenizer extend` recorded in a model folder's medgpt.json (None for a model it did not make)."""
    return read_meta(folder).get("vocab_extension")
