"""Domain vocabulary extension (`medgpt tokenizer extend`), on the two tokenizer kinds models ship.

- The bundled SmolLM2 (byte-level BPE): the shipped medical text, with every fifth line of the pretraining corpus
  held out. References: the `tokenizers` library's own Tokenizer loaded from the base tokenizer.json (English ids
  unchanged), transformers' forward pass of the base and the extended model (the loss figures), the base's
  embedding rows (the new rows are their means), and the exported GGUF read by transformers' GGUF loader and
  llama.cpp (the same ids).
- A SentencePiece BPE model (Llama-2 style, byte fallback) trained here on English text only, so Chinese text is
  byte fallback: the extension adds vocabulary entries and merges, and appends the pieces to tokenizer.model. The
  reference is the updated tokenizer.model itself, read by the `sentencepiece` library and converted by
  transformers' own `SentencePieceExtractor`: both must give the extended tokenizer's ids on every line.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from medgpt.vocab import HAN_RUNS, ExtendArgs, extend_vocabulary, is_chinese

HAN = re.compile(HAN_RUNS.pattern)


def split_corpus(sample_data: Path, folder: Path) -> tuple[list[str], str]:
    """The shipped medical text (the pretraining corpus without every fifth line, SFT, QA and preference data)
    and a held-out file of those fifth lines."""
    lines = (sample_data / "pt" / "medical_corpus.txt").read_text(encoding="utf-8").splitlines()
    (folder / "train.txt").write_text("\n".join(x for i, x in enumerate(lines) if i % 5 != 4) + "\n", encoding="utf-8")
    (folder / "heldout.txt").write_text("\n".join(x for i, x in enumerate(lines) if i % 5 == 4) + "\n",
                                        encoding="utf-8")
    corpus = [str(folder / "train.txt"), *(str(sample_data / f) for f in (
        "sft/medical_sft.jsonl", "qa/medical_qa.jsonl", "pref/medical_pref.jsonl"))]
    return corpus, str(folder / "heldout.txt")


def loss_per_token(folder: str, lines: list[str]) -> float:
    """transformers' own causal-LM loss of each line after the BOS token (else EOS), averaged over tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    total = count = 0
    with torch.no_grad():
        for line in lines:
            ids = torch.tensor([[start, *tokenizer.encode(line, add_special_tokens=False)]])
            n = ids.shape[1] - 1
            total += model(ids, labels=ids).loss.item() * n
            count += n
    return total / count


@pytest.fixture(scope="module")
def extended(bundled_model, sample_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    corpus, heldout = split_corpus(sample_data, folder)
    out = folder / "extended"
    report = extend_vocabulary(ExtendArgs(model=bundled_model, corpus=corpus, heldout=[heldout], out=str(out),
                                          vocab_size=4000, jieba_words=500))
    return report, out, heldout


@pytest.mark.slow
def test_bundled_model_halves_chinese_tokens_and_keeps_english(extended, bundled_model):
    from tokenizers import Tokenizer

    report, out, heldout = extended
    assert report["kind"] == "byte_level" and report["pieces_added"] > 1000 and report["prefixes_added"] > 0
    ratio = report["heldout"]["tokens_per_char"]
    assert ratio["before"]["zh"] > 1.9 and ratio["after"]["zh"] <= 1.0  # the goal: 2.05 -> at most 1.0
    assert ratio["after"]["en"] == ratio["before"]["en"]
    saved = json.loads((out / "vocab_report.json").read_text())
    assert saved["pieces_added"] == report["pieces_added"] and saved["roundtrip"]["failures"] == 0
    assert json.loads((out / "medgpt.json").read_text())["vocab_extension"]["pieces_added"] == report["pieces_added"]

    base = Tokenizer.from_file(str(Path(bundled_model) / "tokenizer.json"))
    new = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert new.get_vocab_size() == base.get_vocab_size() + report["pieces_added"]
    heldout_lines = Path(heldout).read_text(encoding="utf-8").splitlines()
    english = [x for x in heldout_lines if not is_chinese(x)] + [
        "Take 5 mg of amlodipine once daily; re-check BP in 2 weeks.", "  indented\ttext, émigré café — 25°C ≥ 3"]
    for line in english:
        assert new.encode(line).ids == base.encode(line).ids, line
    for line in heldout_lines:  # byte fallback kept: every line decodes to itself
        assert new.decode(new.encode(line).ids) == line
    chinese = [x for x in heldout_lines if is_chinese(x)]
    assert sum(len(new.encode(x).ids) for x in chinese) < 0.6 * sum(len(base.encode(x).ids) for x in chinese)

    from transformers import AutoTokenizer  # special tokens and the chat template are carried over

    before, after = AutoTokenizer.from_pretrained(bundled_model), AutoTokenizer.from_pretrained(out)
    assert after.chat_template == before.chat_template and after.all_special_tokens == before.all_special_tokens
    assert after.convert_tokens_to_ids(before.all_special_tokens) == before.all_special_ids
    conversation = [{"role": "user", "content": "Is 150/95 mmHg high?"}]
    assert after.apply_chat_template(conversation, add_generation_prompt=True) == \
        before.apply_chat_template(conversation, add_generation_prompt=True)


@pytest.mark.slow
def test_new_rows_are_means_and_english_loss_barely_moves(extended, bundled_model):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    report, out, heldout = extended
    old = load_file(str(Path(bundled_model) / "model.safetensors"))["model.embed_tokens.weight"]
    new = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    assert new.shape[0] == report["tokens"] and torch.equal(new[: old.shape[0]], old)
    base_tok, new_tok = AutoTokenizer.from_pretrained(bundled_model), AutoTokenizer.from_pretrained(out)
    for token in ["高血压", "患者", "胰岛素"]:
        ids = new_tok.encode(token, add_special_tokens=False)
        if len(ids) == 1 and ids[0] >= old.shape[0]:
            spelled = base_tok.encode(token, add_special_tokens=False)
            assert torch.allclose(new[ids[0]], old[spelled].mean(0), atol=1e-6)

    lines = Path(heldout).read_text(encoding="utf-8").splitlines()
    english = [x for x in lines if not is_chinese(x)]
    before, after = loss_per_token(bundled_model, english), loss_per_token(str(out), english)
    assert after == pytest.approx(report["loss"]["after"]["en"]["per_token"], abs=1e-5)
    # the new tokens take a little probability on English text: at most the mean of their pieces' probabilities
    # each, about 1e-7 apiece on the bundled model (measured: about +3e-4 nats for ~5,000 entries)
    assert 0 <= after - before < 1e-3
    # Chinese text starts close: its loss per character (the texts are tokenized differently) stays within 0.5 nats
    zh = report["loss"]
    assert zh["after"]["zh"]["per_char"] < zh["before"]["zh"]["per_char"] + 0.5


# ---- SentencePiece (Llama-2 style) -------------------------------------------------------------------


def english_lines(sample_data: Path) -> list[str]:
    text = (sample_data / "pt" / "medical_corpus.txt").read_text(encoding="utf-8").splitlines()
    qa = [json.loads(x)["answer"] for x in (sample_data / "qa" / "medical_qa.jsonl").read_text().splitlines()]
    return [x for x in text + qa if not is_chinese(x)]


def llama2_tokenizer(model_file: Path):
    """A fast tokenizer over the SentencePiece model as Llama-2's tokenizer.json is (transformers' converter)."""
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    spm = SentencePieceExtractor(str(model_file)).extract(BPE)
    backend = Tokenizer(BPE(vocab=spm["vocab"], merges=spm["merges"], unk_token="<unk>", fuse_unk=True,
                            byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def sentencepiece_model(sample_data, tmp_path_factory) -> Path:
    """A tiny random Llama whose tokenizer is a SentencePiece BPE model trained on English only."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama2")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(english_lines(sample_data)), model_writer=model, model_type="bpe", vocab_size=800,
        byte_fallback=True, character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = llama2_tokenizer(folder / "tokenizer.model")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_sentencepiece_tokenizer_gets_pieces_and_merges(sentencepiece_model, sample_data, tmp_path):
    import sentencepiece as spm
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    corpus, heldout = split_corpus(sample_data, tmp_path)
    out = tmp_path / "extended"
    report = extend_vocabulary(ExtendArgs(model=str(sentencepiece_model), corpus=corpus, heldout=[heldout],
                                          out=str(out), vocab_size=1500))
    assert report["kind"] == "sentencepiece" and report["pieces_added"] > 500
    ratio = report["corpus"]["tokens_per_char"]
    assert ratio["before"]["zh"] > 2.5 and ratio["after"]["zh"] < 0.5 * ratio["before"]["zh"]

    spec = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert not [t for t in spec["added_tokens"] if HAN.search(t["content"])]  # pieces of the model, not added tokens
    tokenizer, base = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(sentencepiece_model)
    assert len(tokenizer) == len(base) + report["pieces_added"]
    processor = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    converted = llama2_tokenizer(out / "tokenizer.model")
    lines = [x for x in english_lines(sample_data) + Path(heldout).read_text(encoding="utf-8").splitlines() if x]
    lines += [x for x in Path(corpus[0]).read_text(encoding="utf-8").splitlines() if x]
    for line in lines:
        ids = tokenizer.encode(line, add_special_tokens=False)
        assert ids == processor.encode(line), line  # the sentencepiece library on the appended tokenizer.model
        assert ids == converted.encode(line, add_special_tokens=False), line  # transformers' converter of it
        assert tokenizer.decode(ids) == line
        if not is_chinese(line):
            assert ids == base.encode(line, add_special_tokens=False)

    base_processor = spm.SentencePieceProcessor(model_file=str(sentencepiece_model / "tokenizer.model"))
    old = load_file(str(sentencepiece_model / "model.safetensors"))
    new = load_file(str(out / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # untied: both grow, each row a mean of its own
        assert new[name].shape[0] == len(tokenizer) and torch.equal(new[name][: len(base)], old[name])
        piece_id = tokenizer.convert_tokens_to_ids("血压")
        spelled = base_processor.encode("血压")  # the base SentencePiece model's own spelling, without its "▁"
        spelled = spelled[1:] if spelled[0] == base_processor.piece_to_id("▁") else spelled
        assert torch.allclose(new[name][piece_id], old[name][spelled].mean(0), atol=1e-6)


def test_bad_inputs_are_user_errors(tiny_model, tmp_path):
    from medgpt.errors import UserError

    english = tmp_path / "en.txt"
    english.write_text("Only English text here.\n", encoding="utf-8")
    with pytest.raises(UserError, match="no Chinese"):
        extend_vocabulary(ExtendArgs(model=tiny_model, corpus=[str(english)], out=str(tmp_path / "o")))
    broken = tmp_path / "bad.jsonl"
    broken.write_text('{"text": "高血压"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        extend_vocabulary(ExtendArgs(model=tiny_model, corpus=[str(broken)], out=str(tmp_path / "o")))
    chinese = tmp_path / "zh.txt"
    chinese.write_text("高血压患者应低盐饮食。\n糖尿病患者应监测血糖。\n", encoding="utf-8")
    with pytest.raises(UserError, match="--vocab-size 5 is smaller than the [0-9]+ distinct characters"):
        extend_vocabulary(ExtendArgs(model=tiny_model, corpus=[str(chinese)], out=str(tmp_path / "o"), vocab_size=5))
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_extended_model_serves_and_evaluates(extended, sample_data):
    from medgpt.eval.ppl import run_ppl
    from medgpt.infer.base import GenerationParams
    from medgpt.infer.engine import load_engine

    report, out, _ = extended
    with load_engine(str(out), dtype="fp32") as engine:
        messages = [{"role": "user", "content": "高血压患者应该注意什么？"}]
        prompt = engine.encode(messages)
        assert max(prompt) >= report["base_tokens"]  # the prompt uses the added tokens
        [completion] = engine.generate([messages], GenerationParams(max_new_tokens=8))
        assert completion.completion_tokens > 0 and completion.text == engine.tokenizer.decode(completion.token_ids)
    result = run_ppl(str(out), str(sample_data / "qa" / "medical_qa.jsonl"), limit=6, dtype="fp32")
    assert result["n"] == 6 and 1 < result["metrics"]["ppl"] < float("inf")


@pytest.mark.slow
def test_gguf_export_tokenizes_as_the_extended_tokenizer(extended, tmp_path):
    """The new entries are BPE merges, which every runtime applies alike: the exported GGUF, read by transformers'
    GGUF loader and (where installed) by llama.cpp, gives the extended tokenizer's ids on every held-out line."""
    from transformers import AutoTokenizer

    from medgpt.export.gguf import export_model

    report, out, heldout = extended
    exported = export_model(str(out), tmp_path / "gguf", quant="f16")
    lines = [x for x in Path(heldout).read_text(encoding="utf-8").splitlines() if x]
    reference = AutoTokenizer.from_pretrained(out)
    loaded = AutoTokenizer.from_pretrained(exported.folder, gguf_file=exported.gguf.name)
    for line in lines:
        assert loaded.encode(line, add_special_tokens=False) == reference.encode(line, add_special_tokens=False)
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp check skipped: llama-cpp-python is not installed (pip install medgpt[export])")
        return
    runtime = Llama(str(exported.gguf), vocab_only=True, verbose=False)
    for line in lines:
        assert runtime.tokenize(line.encode(), add_bos=False, special=False) == \
            reference.encode(line, add_special_tokens=False), line
