"""medgpt: turn a general LLM into a medical assistant and serve it."""

__version__ = "0.1.0"
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
