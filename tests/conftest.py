"""Shared helpers: tiny DBRX configs whose sizes are all pairwise different (a transformers DBRX bug once hid
behind a config where d_model equalled the expert width), and reference models built with transformers."""

from __future__ import annotations

import pytest
import torch

from dbrx import DbrxConfig

# d_model, n_heads, kv heads, head dim, layers, expert width, experts, top_k, vocab, max_seq_len, test seq len:
# all different within each config.
TINY_SPECS = {
    "A": dict(d_model=40, n_heads=10, n_layers=3, vocab_size=131, max_seq_len=64, seq=19,
              attn=dict(kv_n_heads=5, clip_qkv=0.35, rope_theta=5000.0),
              ffn=dict(ffn_hidden_size=56, moe_num_experts=7, moe_top_k=2)),
    "B": dict(d_model=72, n_heads=6, n_layers=4, vocab_size=157, max_seq_len=128, seq=23,
              attn=dict(kv_n_heads=2, clip_qkv=0.5, rope_theta=250000.0),
              ffn=dict(ffn_hidden_size=88, moe_num_experts=9, moe_top_k=5)),
    "C": dict(d_model=96, n_heads=8, n_layers=3, vocab_size=211, max_seq_len=256, seq=29,
              attn=dict(kv_n_heads=1, clip_qkv=0.45, rope_theta=500000.0),
              ffn=dict(ffn_hidden_size=40, moe_num_experts=16, moe_top_k=4)),
}


@pytest.fixture(autouse=True)
def _no_machine_cache(monkeypatch):
    """Each test measures the machine itself (and fakes it freely): no rates kept on disk from earlier runs or tests.
    tests/test_precision.py turns the cache on where it is what is tested."""
    monkeypatch.setenv("DBRX_MACHINE_CACHE", "off")


def dbrx_config(name: str) -> DbrxConfig:
    s = TINY_SPECS[name]
    return DbrxConfig(
        d_model=s["d_model"], n_heads=s["n_heads"], n_layers=s["n_layers"], vocab_size=s["vocab_size"],
        max_seq_len=s["max_seq_len"], attn_config=dict(s["attn"]),
        ffn_config=dict(s["ffn"], moe_loss_weight=0.05, moe_jitter_eps=0.0),
    )


def hf_config(name: str, specs: dict | None = None):
    """The transformers config of `specs[name]` (TINY_SPECS by default)."""
    import transformers

    s = (TINY_SPECS if specs is None else specs)[name]
    theta = s["attn"]["rope_theta"]
    return transformers.DbrxConfig(
        d_model=s["d_model"], n_heads=s["n_heads"], n_layers=s["n_layers"], vocab_size=s["vocab_size"],
        max_seq_len=s["max_seq_len"], attn_config=dict(s["attn"]),
        ffn_config=dict(s["ffn"], moe_loss_weight=0.05),
        rope_parameters={"rope_type": "default", "rope_theta": theta},  # transformers 5 reads theta here
    )


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that clip_qkv clamps and routing is far from uniform; norms away from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)


def hf_reference(name: str, directory, seed: int = 0):
    """A transformers DbrxForCausalLM with random weights, saved to `directory` (HF format)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.DbrxForCausalLM(hf_config(name)).eval()
    randomize_(model, seed)
    model.save_pretrained(directory)
    return model


@pytest.fixture(params=sorted(TINY_SPECS))
def spec_name(request):
    return request.param
