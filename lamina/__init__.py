"""lamina: a small, readable LLM inference engine."""
from lamina.sampling_params import RequestOutput, SamplingParams, StructuredOutputs

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputs", "RequestOutput", "__version__"]


def __getattr__(name):
    # importing torch and the engine is slow; `lamina --help` and the server's argument parsing need neither
    if name == "LLM":
        from lamina.llm import LLM
        return LLM
    raise AttributeError(name)
