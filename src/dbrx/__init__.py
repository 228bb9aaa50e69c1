"""dbrx: an open, complete and fast implementation of Databricks' DBRX mixture-of-experts language model."""

from dbrx.config import PRESETS, DbrxAttentionConfig, DbrxConfig, DbrxFFNConfig
from dbrx.model import CausalLMOutput, DbrxForCausalLM, KVCache

__all__ = [
    "PRESETS", "CausalLMOutput", "DbrxAttentionConfig", "DbrxConfig", "DbrxFFNConfig", "DbrxForCausalLM",
    "KVCache",
]
