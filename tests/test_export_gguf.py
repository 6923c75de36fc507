"""GGUF export, checked against an outside reader: transformers' GGUF loader (`from_pretrained(..., gguf_file=...)`,
which reads the file with the `gguf` package, undoes llama.cpp's q/k permutation and de-quantizes) must give back
the model's log-probs, and its GGUF tokenizer the model's token ids; the `gguf` package's reader checks the
metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medgpt.errors import UserError
from medgpt.export.gguf import export_model

TEXT = "<|im_start|>user\n孩子发烧39度，怎么办？What about ibuprofen?<|im_end|>\n<|im_start|>assistant\n"


def tiny_arch(folder: Path, model_type: str) -> str:
    """A 2-layer random model of `model_type` with the bundled byte-level BPE tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from medgpt.models import load_tokenizer

    tokenizer = load_tokenizer()
    # head_dim 128 as every Qwen3 has (transformers' GGUF loader takes Qwen3Config's default, not key_length)
    extra = {"qwen3": {"head_dim": 128}, "mistral": {"sliding_window": None}}.get(model_type, {})
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, tie_word_embeddings=model_type != "mistral",
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def log_probs(model, ids):
    import torch

    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def load_gguf(path: Path, tokenizer: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if tokenizer else None


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_every_architecture_reads_back_as_the_same_model(model_type, tmp_path, tokenizer):
    """f32: the same weights, so the same log-probs (to float rounding) once the GGUF loader has undone the q/k
    permutation (llama, mistral), with the attention biases (qwen2) and q/k norms (qwen3); the GGUF tokenizer gives
    the same ids. (The bundled tokenizer is written with every architecture: transformers would open it as a
    Qwen2Tokenizer, another pre-tokenizer, from a qwen2 folder.)"""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from medgpt.export.gguf import GgufModel, write_gguf

    folder = tiny_arch(tmp_path / model_type, model_type)
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    path = write_gguf(GgufModel(original, tokenizer, None, f"tiny-{model_type}"), tmp_path / "m.gguf", "f32")
    loaded, gguf_tokenizer = load_gguf(path, tokenizer=model_type == "llama")
    ids = tokenizer(TEXT)["input_ids"]
    if gguf_tokenizer is not None:
        assert gguf_tokenizer(TEXT)["input_ids"] == ids
    assert (log_probs(loaded, ids) - log_probs(original, ids)).abs().max() < 1e-4
    assert loaded.config.model_type == {"mistral": "llama"}.get(model_type, model_type)  # GGUF has no mistral
    if gguf_tokenizer is not None:  # one reading of the metadata is enough (49,152 tokens take seconds)
        fields = gguf.GGUFReader(str(path)).fields
        assert fields["general.architecture"].contents() == "llama"
        assert fields["tokenizer.ggml.pre"].contents() == "smollm"
        assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id


def test_metadata_holds_the_medgpt_template_and_the_tokenizer(tiny_model, tmp_path):
    import gguf

    from medgpt.data.templates import get_template

    done = export_model(tiny_model, tmp_path / "out", quant="q8_0", template="qwen")
    fields = gguf.GGUFReader(str(done.gguf)).fields
    assert fields["tokenizer.chat_template"].contents() == get_template("qwen").chat_template()
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].data) == 49152 and len(fields["tokenizer.ggml.merges"].data) > 40000
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert sorted(p.name for p in done.folder.iterdir()) == ["Modelfile", done.gguf.name]
    assert "SYSTEM \"\"\"You are Qwen" in done.modelfile.read_text()


def test_an_unknown_architecture_is_an_error_naming_it(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from medgpt.models import load_tokenizer

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=49152)).save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    with pytest.raises(UserError, match="architecture 'gpt2'.*GPT2LMHeadModel.*supported: llama"):
        export_model(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_quantizations_are_errors(tiny_model, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="quantization 'q3': expected one of f32, f16"):
        export_model(tiny_model, tmp_path / "out", quant="q3")
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-quantize
    with pytest.raises(UserError, match="llama-quantize, which is not on PATH"):
        export_model(tiny_model, tmp_path / "out", quant="q4_k_m")


def test_an_interrupted_export_leaves_the_previous_output(tiny_model, tmp_path, monkeypatch):
    import medgpt.export.gguf as export_gguf

    out = tmp_path / "out"
    first = export_model(tiny_model, out, quant="f16")
    before = first.gguf.read_bytes()

    def broken(*args, **kwargs):
        yield from []
        raise KeyboardInterrupt

    monkeypatch.setattr(export_gguf, "_tensors", broken)
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny_model, out, quant="f16")
    assert first.gguf.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind


class BundledExports(dict):
    """The bundled model's GGUF file per precision, exported when first asked for."""

    def __init__(self, model: str, folder: Path):
        super().__init__()
        self.model, self.folder = model, folder

    def __missing__(self, quant: str) -> Path:
        self[quant] = export_model(self.model, self.folder / quant, quant=quant).gguf
        return self[quant]


@pytest.fixture(scope="module")
def bundled_exports(bundled_model, tmp_path_factory):
    return BundledExports(bundled_model, tmp_path_factory.mktemp("bundled-gguf"))


@pytest.mark.slow
@pytest.mark.parametrize("quant, tolerance", [("f16", 0.1)])  # q8_0: test_eval_parity.py's trained adapter
def test_bundled_model_in_gguf_gives_its_log_probs_and_greedy_answers(quant, tolerance, bundled_exports,
                                                                       bundled_model):
    """SmolLM2-135M-Instruct exported to f16: on the first two shipped prompts (rendered with its template)
    the next-token log-probs of the prompt and of the original's greedy answer are within the stated tolerance
    (medgpt.eval.parity.TOLERANCES) of the original's, and the greedy answers (16 tokens) are the same."""
    import torch

    from medgpt.eval.parity import TOLERANCES
    from medgpt.models import open_model
    from medgpt.report.answers import load_prompts

    assert TOLERANCES[quant].logprob == tolerance
    opened = open_model(bundled_model, dtype="fp32")
    original = opened.model
    loaded, _ = load_gguf(bundled_exports[quant])
    for messages in load_prompts(None)[:2]:
        prompt = opened.template.encode_prompt(opened.tokenizer, messages)
        ids = torch.tensor([prompt])
        kwargs = dict(max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
        answer = original.generate(ids, **kwargs)[0].tolist()
        assert loaded.generate(ids, **kwargs)[0].tolist() == answer
        row = torch.tensor(answer[1:])[:, None]
        a, b = log_probs(original, answer)[:-1].gather(1, row), log_probs(loaded, answer)[:-1].gather(1, row)
        assert (a - b).abs().max() < tolerance, json.dumps({"max": float((a - b).abs().max())})


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llama_cpp_runs_the_export_as_the_model_does(quant, bundled_exports, bundled_model):
    """llama.cpp itself (llama-cpp-python) on the exported file: it tokenizes the rendered prompt into the same ids
    (the pre-tokenizer and special tokens came through), and its most likely next token agrees with the original's
    wherever the original's two best tokens are not within 2x the tolerance of each other (a near-tie)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("SKIP reason: llama-cpp-python is not installed (pip install 'medgpt[export]')")
        pytest.skip("llama-cpp-python is not installed (pip install 'medgpt[export]')")
    import numpy as np
    import torch

    from medgpt.eval.parity import TOLERANCES
    from medgpt.models import open_model
    from medgpt.report.answers import load_prompts

    tie = 2 * TOLERANCES[quant].logprob
    opened = open_model(bundled_model, dtype="fp32")
    llm = Llama(model_path=str(bundled_exports[quant]), n_ctx=512, logits_all=True, verbose=False, n_gpu_layers=0)
    agree = total = 0
    for messages in load_prompts(None)[:2]:
        text = opened.template.render(messages, add_generation_prompt=True)
        ids = opened.template.encode_prompt(opened.tokenizer, messages)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[:len(ids)]).argmax(-1)
        best = log_probs(opened.model, ids).topk(2, dim=-1)
        ours, margin = best.indices[:, 0], best.values[:, 0] - best.values[:, 1]
        decided = margin > tie
        assert (torch.tensor(theirs)[decided] == ours[decided]).all()
        agree += int((torch.tensor(theirs) == ours).sum())
        total += len(ids)
    print(f"llama.cpp {quant}: top-1 agreement {agree / total:.4f} over {total} positions")


def test_a_sentencepiece_tokenizer_exports_as_llamas(sample_data, tmp_path):
    """A Llama-2/Mistral style tokenizer (SentencePiece BPE with byte fallback, trained here on the shipped text,
    as Llama-2's tokenizer.json) goes in as llama.cpp's `llama` tokenizer with scores: transformers' GGUF loader
    rebuilds it from the tokens and scores and must give the model's ids (byte-fallback Chinese included), and
    llama.cpp, where installed, its own SPM tokenizer's."""
    import io

    import sentencepiece as spm
    import torch
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    lines = [x for x in (sample_data / "pt" / "medical_corpus.txt").read_text(encoding="utf-8").splitlines() if x]
    english = [x for x in lines if x.isascii()]
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(english), model_writer=model_file, model_type="bpe", vocab_size=600,
        byte_fallback=True, character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    (tmp_path / "sp.model").write_bytes(model_file.getvalue())
    extracted = SentencePieceExtractor(str(tmp_path / "sp.model")).extract(BPE)
    backend = Tokenizer(BPE(vocab=extracted["vocab"], merges=extracted["merges"], unk_token="<unk>", fuse_unk=True,
                            byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    folder = tmp_path / "llama2"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, bos_token_id=1,
                                 eos_token_id=2)).save_pretrained(folder)

    exported = export_model(str(folder), tmp_path / "gguf", quant="f32", template="llama2")
    reference = PreTrainedTokenizerFast.from_pretrained(folder)
    loaded, gguf_tokenizer = load_gguf(exported.gguf, tokenizer=True)
    for line in lines[:20]:
        assert gguf_tokenizer.encode(line) == reference.encode(line), line
    ids = reference.encode(lines[0])
    original = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert (log_probs(loaded, ids) - log_probs(original, ids)).abs().max() < 1e-4
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp check skipped: llama-cpp-python is not installed (pip install medgpt[export])")
        return
    runtime = Llama(str(exported.gguf), vocab_only=True, verbose=False)
    for line in lines[:20]:
        assert runtime.tokenize(line.encode(), add_bos=True, special=False) == reference.encode(line), line
