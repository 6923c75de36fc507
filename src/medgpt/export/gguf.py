"""A model (or base + LoRA adapter, merged first) as one GGUF file for llama.cpp and Ollama, and the Ollama Modelfile
beside it.

Written with the `gguf` package, the writer llama.cpp's own `convert_hf_to_gguf.py` uses, the way that script writes
the architectures below: the tensors under GGUF names (`gguf.TensorNameMap`), Llama's q/k projections permuted into
GGML's rotary layout, the tied output head left out, 1-D tensors (norms, biases) in F32; the tokenizer as a
byte-level BPE vocabulary (`tokenizer.ggml.model = gpt2`: tokens, token types, merges, the pre-tokenizer named by
the hash of the ids of llama.cpp's check text) or a SentencePiece-style one (`llama`: pieces, scores, token types),
with the special token ids and whether BOS/EOS are added; the chat template (the Jinja twin of the medgpt
template) in `tokenizer.chat_template`.

Precisions: f32, f16, bf16 and q8_0 are written here (q8_0 through `gguf.quants`: blocks of 32 weights with one
f16 scale, as llama.cpp's converter writes `--outtype q8_0`); k-quants (q4_k_m, ...) go through llama.cpp's
`llama-quantize` from the f16 file, where it is installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgpt.errors import UserError

log = logging.getLogger(__name__)

# transformers model_type -> (GGUF architecture, q/k permuted into GGML's rotary layout): as convert_hf_to_gguf.py's
# LlamaModel (LlamaForCausalLM, MistralForCausalLM), Qwen2Model and Qwen3Model
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}
QUANTS = ("f32", "f16", "bf16", "q8_0")  # written here
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")  # llama-quantize
QUANTIZE_TOOL = "llama-quantize"

# llama.cpp's check text and the pre-tokenizers whose ids of it hash to these values (convert_hf_to_gguf.py's
# get_vocab_base_pre): llama.cpp splits text before BPE by the named rule, so the name must be the model's own
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
              '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s '
              'there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {  # SmolLM and SmolLM2; Llama-3; Qwen1.5, Qwen2, Qwen2.5; Qwen3; GPT-2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def quant_names() -> list[str]:
    return [*QUANTS, *K_QUANTS]


def check_quant(quant: str) -> str:
    """The quantization name, lower-case; an unknown one, or a k-quant without llama-quantize, is a UserError."""
    name = quant.lower()
    if name not in QUANTS and name not in K_QUANTS:
        raise UserError(f"quantization {quant!r}: expected one of {', '.join(quant_names())}")
    if name in K_QUANTS and shutil.which(QUANTIZE_TOOL) is None:
        raise UserError(f"quantization {name}: k-quants are made by llama.cpp's {QUANTIZE_TOOL}, which is not on "
                        f"PATH; install llama.cpp, or export {', '.join(QUANTS)}")
    return name


@dataclass
class GgufModel:
    """What goes into a GGUF file: the (merged) weights, the tokenizer and the chat template's Jinja."""

    model: Any  # a transformers causal LM, fp32, no adapter
    tokenizer: Any
    chat_template: str | None
    name: str


def write_gguf(source: GgufModel, path: str | Path, quant: str = "f16") -> Path:
    """Write `source` as a GGUF file at `path` (the caller makes it atomic); k-quants via llama-quantize."""
    import gguf

    quant = check_quant(quant)
    path = Path(path)
    if quant in K_QUANTS:
        full = path.with_name(path.stem + ".f16.gguf")
        write_gguf(source, full, "f16")
        done = subprocess.run([shutil.which(QUANTIZE_TOOL) or QUANTIZE_TOOL, str(full), str(path), quant.upper()],
                              capture_output=True, text=True)
        full.unlink(missing_ok=True)
        if done.returncode != 0:
            raise UserError(f"{QUANTIZE_TOOL} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        return path
    config = source.model.config
    arch, permute = architecture(config)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(source.name)
    writer.add_type(gguf.GGUFType.MODEL)
    _add_hyperparameters(writer, config, quant)
    _add_tokenizer(writer, source.tokenizer, int(config.vocab_size), source.chat_template)
    for name, data, qtype in _tensors(source.model, arch, permute, quant):
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def architecture(config: Any) -> tuple[str, bool]:
    """The GGUF architecture of a transformers config, and whether q/k are permuted; others are a UserError."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(f"architecture {model_type!r} ({', '.join(getattr(config, 'architectures', None) or [])}) "
                        f"cannot be exported to GGUF; supported: {', '.join(ARCHITECTURES)}")
    window = getattr(config, "sliding_window", None)
    if model_type == "mistral" and window and window < config.max_position_embeddings:
        raise UserError(f"mistral with a sliding window of {window} tokens: llama.cpp's llama architecture attends "
                        "to the whole context, so the GGUF would not compute what the model does")
    return ARCHITECTURES[model_type]


def _add_hyperparameters(writer: Any, config: Any, quant: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    kind = rope.get("rope_type") or "default"
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind != "default":
        raise UserError(f"RoPE scaling {kind!r} is not exported to GGUF (default and linear are)")
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tensors(model: Any, arch: str, permute: bool, quant: str):
    """(GGUF name, data, GGML type) of every weight, as convert_hf_to_gguf.py writes them."""
    import gguf
    import numpy as np
    import torch

    config = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output head from token_embd when there is none
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"tensor {hf_name!r} has no GGUF name in architecture {arch!r}")
        data = tensor.detach().to(torch.float32).cpu()
        if permute and re.search(r"self_attn\.q_proj\.weight$", hf_name):
            data = permute_rotary(data, heads)
        elif permute and re.search(r"self_attn\.k_proj\.weight$", hf_name):
            data = permute_rotary(data, kv_heads)
        array = data.numpy()
        yield (name, *_encode(array, quant, np))


def permute_rotary(weights, heads: int):
    """convert_hf_to_gguf.py's LlamaModel.permute: the rows of each head from HF's rotate-half order to GGML's
    interleaved pairs."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def _encode(array, quant: str, np):
    import gguf

    if array.ndim <= 1 or quant == "f32":
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    if quant == "bf16":
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if quant == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16  # f16, and q8_0 rows not a whole block


# -- the tokenizer -------------------------------------------------------------------------------------------------


def pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name of the tokenizer's pre-tokenizer (by the hash of its ids of CHECK_TEXT). A vocabulary
    `medgpt tokenizer extend` grew is hashed with its base's merges alone (the new merges come after them and
    change the ids of the check text's Chinese, not how text is split before BPE), and without non-special
    added tokens (both runtimes match those before the pre-tokenizer splits the rest)."""
    from tokenizers import Tokenizer

    from medgpt.vocab import base_merge_count

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t.get("special")]
    if (base := base_merge_count(tokenizer)) is not None:
        spec["model"]["merges"] = spec["model"]["merges"][:base]
    ids = Tokenizer.from_str(json.dumps(spec)).encode(CHECK_TEXT).ids
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: its pre-tokenizer (check hash "
                        f"{digest}) is not one llama.cpp is known to split text by here "
                        f"({', '.join(sorted(set(PRE_TOKENIZERS.values())))}); the GGUF would tokenize differently")
    return PRE_TOKENIZERS[digest]


def bpe_vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types as convert_hf_to_gguf.py's get_vocab_base writes them (ids without a token are
    `[PADi]`, unused; added special tokens, and ones that look special, are control tokens)."""
    import gguf

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())}, the model's vocabulary {vocab_size}")
    reverse = {i: token for token, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def sentencepiece_vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types of a SentencePiece-style BPE tokenizer as llama.cpp's SPM tokenizer reads them:
    it merges the adjacent pair whose joined piece scores highest, so a piece's score is minus the rank of the
    merge that makes it (the tokenizer.json merges' order; pieces no merge makes score 0); `<0xNN>` pieces are
    byte tokens, special tokens control tokens, other added tokens user-defined."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    rank = {}
    for position, merge in enumerate(spec["model"]["merges"]):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, position)
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    reverse = {i: token for token, i in vocab.items()}
    reverse.update({i: t["content"] for i, t in added.items()})
    if max(reverse) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(reverse)}, the model's vocabulary {vocab_size}")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]"), scores.append(-1000.0), types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        scores.append(-float(rank[token]) if token in rank else 0.0)
        if i in added and (added[i].get("special") or token == spec["model"].get("unk_token")):
            types.append(gguf.TokenType.UNKNOWN if token == spec["model"].get("unk_token") else gguf.TokenType.CONTROL)
        elif i in added:
            types.append(gguf.TokenType.USER_DEFINED)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types.append(gguf.TokenType.BYTE)
        elif token == spec["model"].get("unk_token"):
            types.append(gguf.TokenType.UNKNOWN)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, scores, types


def _sentencepiece_bpe(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    return spec.get("model", {}).get("type") == "BPE" and bool(spec["model"].get("byte_fallback")) \
        and "\u2581" in json.dumps(spec.get("normalizer") or spec.get("pre_tokenizer"), ensure_ascii=False)


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, chat_template: str | None) -> None:
    import gguf

    folder = getattr(tokenizer, "name_or_path", "")
    if _byte_level_bpe(tokenizer):
        tokens, types = bpe_vocabulary(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
        if not special.merges:
            raise UserError(f"tokenizer {folder!r}: no BPE merges found (tokenizer.json)")
    elif _sentencepiece_bpe(tokenizer):
        tokens, scores, types = sentencepiece_vocabulary(tokenizer, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(tokens))
    else:
        raise UserError(f"tokenizer {folder!r}: only BPE tokenizers are exported to GGUF, byte-level (Llama-3, "
                        "SmolLM, Qwen) or SentencePiece-style with byte fallback (Llama-2, Mistral)")
    special.chat_template = chat_template
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            special.special_token_ids[kind] = int(token_id)
    plain, marked = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a", add_special_tokens=True)
    special.add_special_token = {
        "bos": tokenizer.bos_token_id is not None and marked[:1] == [tokenizer.bos_token_id] and marked != plain,
        "eos": tokenizer.eos_token_id is not None and marked[-1:] == [tokenizer.eos_token_id] and marked != plain}
    special.add_to_gguf(writer, quiet=True)


def _byte_level_bpe(tokenizer: Any) -> bool:
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    return spec.get("model", {}).get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))


# -- the export: GGUF + Modelfile ----------------------------------------------------------------------------------


@dataclass
class Exported:
    folder: Path
    gguf: Path
    modelfile: Path
    template: str  # the medgpt template the Modelfile's TEMPLATE renders


def export_model(model: str | None, out: str | Path, adapter: str | None = None, quant: str = "f16",
                 template: str | None = None, trust_remote_code: bool = False) -> Exported:
    """Write `out/` (atomically, as one folder): NAME-QUANT.gguf of the model (an adapter merged into its base
    first, in fp32, as `medgpt merge` does) and its Ollama Modelfile."""
    from types import SimpleNamespace

    from medgpt.export.modelfile import modelfile, named_template, ollama_sampling
    from medgpt.files import atomic_write, save_atomic
    from medgpt.infer.base import chat_defaults, read_sampling
    from medgpt.models import open_model

    quant = check_quant(quant)
    opened = open_model(model, adapter, template, dtype="fp32", trust_remote_code=trust_remote_code, weights=False)
    architecture(_config(opened.folder, trust_remote_code))  # refuse an unknown architecture before loading
    chat = named_template(opened.template)
    weights = opened.load_weights()
    if opened.adapter:
        weights = weights.merge_and_unload()
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", opened.name).strip("-.") or "model"
    file_name = f"{name}-{quant}.gguf"
    stops = [*opened.template.stop_words, *([opened.tokenizer.eos_token] if opened.tokenizer.eos_token else [])]
    sampling = ollama_sampling(chat_defaults(SimpleNamespace(model_sampling=read_sampling(opened.folder),
                                                             name=opened.name)))
    source = GgufModel(weights, opened.tokenizer, opened.template.chat_template(), opened.name)

    def save(tmp: Path) -> None:
        write_gguf(source, tmp / file_name, quant)
        atomic_write(tmp / "Modelfile", modelfile(file_name, chat, stops, sampling))

    folder = save_atomic(out, save)
    return Exported(folder, folder / file_name, folder / "Modelfile", chat.name)


def _config(folder: str, trust_remote_code: bool):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
