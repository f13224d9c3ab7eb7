"""hybridinfer: hybrid CPU-GPU inference for activation-sparse LLMs.

    import hybridinfer
    llm = hybridinfer.load("TurboSparse-Mixtral-Instruct", device="cuda")
    print(llm.generate("The capital of France is", max_new_tokens=20))
"""
from .errors import HybridInferError
from .generate import GenerationConfig
from .llm import LLM, load

__version__ = "0.1.0"
__all__ = ["load", "LLM", "GenerationConfig", "HybridInferError", "__version__"]
