"""Export for offline runtimes: a GGUF file (llama.cpp, Ollama) with the tokenizer and chat template in its metadata
(`export.gguf`), and an Ollama Modelfile whose TEMPLATE renders what the medgpt template renders
(`export.modelfile`)."""
