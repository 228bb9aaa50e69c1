import torch

from dbrx import DbrxConfig, DbrxForCausalLM


def test_tiny_forward_shape():
    cfg = DbrxConfig.from_name("dbrx-tiny").replace(vocab_size=300, n_layers=2)
    logits = DbrxForCausalLM(cfg)(torch.randint(0, 300, (2, 7))).logits
    assert logits.shape == (2, 7, 300)
