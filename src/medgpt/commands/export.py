"""`medgpt export --model M [--adapter A] --to gguf --out DIR [--quant Q]`: a GGUF file and an Ollama Modelfile."""

from __future__ import annotations

import argparse

QUANT_HELP = ("f16 (default), bf16, q8_0, f32; k-quants (q4_k_m, q5_k_m, q6_k, ...) through llama.cpp's "
              "llama-quantize where it is installed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder or hub id (default: the bundled SmolLM2-135M-Instruct); "
                                        "may be a LoRA adapter folder")
    parser.add_argument("--adapter", help="LoRA adapter folder, merged into --model first")
    parser.add_argument("--to", default="gguf", choices=("gguf",), help="format (gguf: llama.cpp and Ollama)")
    parser.add_argument("--out", required=True, help="output folder (written whole: the GGUF and the Modelfile)")
    parser.add_argument("--quant", default="f16", help=QUANT_HELP)
    parser.add_argument("--template", help="chat template (default: the one saved with the model, else the "
                                           "tokenizer's own)")
    parser.add_argument("--trust-remote-code", action="store_true")


def run(args: argparse.Namespace) -> int:
    from medgpt.export.gguf import check_quant, export_model

    check_quant(args.quant)  # before loading anything
    done = export_model(args.model, args.out, adapter=args.adapter, quant=args.quant, template=args.template,
                        trust_remote_code=args.trust_remote_code)
    size = done.gguf.stat().st_size / 2**20
    print(f"written: {done.gguf} ({size:.1f} MiB), {done.modelfile} (template {done.template})")
    print(f"Ollama: cd {done.folder} && ollama create NAME -f Modelfile && ollama run NAME")
    return 0
