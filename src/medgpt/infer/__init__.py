"""Inference: one engine interface (transformers, vLLM) behind chat, predict, serve, webui and evaluation."""
