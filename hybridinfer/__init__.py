"""hybridinfer: hybrid CPU-GPU inference for activation-sparse LLMs."""
__version__ = "0.1.0"
