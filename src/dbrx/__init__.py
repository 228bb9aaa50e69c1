"""dbrx: an open, complete and fast implementation of Databricks' DBRX mixture-of-experts language model."""

from dbrx.config import PRESETS, DbrxAttentionConfig, DbrxConfig, DbrxFFNConfig
from dbrx.generate import generate, stream_generate  # noqa: F401  (dbrx.generate is the function)
from dbrx.model import CausalLMOutput, DbrxForCausalLM, KVCache
from dbrx.tokenizer import Tokenizer

__all__ = [
    "PRESETS", "CausalLMOutput", "DbrxAttentionConfig", "DbrxConfig", "DbrxFFNConfig", "DbrxForCausalLM",
    "KVCache", "Tokenizer", "generate", "stream_generate",
]
