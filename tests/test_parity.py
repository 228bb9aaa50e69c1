"""Numerics against transformers' DbrxForCausalLM (pinned in the dev extras) on random tiny configs."""

import torch
import transformers

from conftest import TINY_SPECS, hf_config, hf_reference, randomize_
from dbrx import DbrxForCausalLM


def _ids(name, batch=2, seed=1):
    s = TINY_SPECS[name]
    return torch.randint(0, s["vocab_size"], (batch, s["seq"]), generator=torch.Generator().manual_seed(seed))


def test_logits_and_aux_loss_match_transformers(tmp_path, spec_name):
    hf = hf_reference(spec_name, tmp_path)
    ours = DbrxForCausalLM.from_pretrained(tmp_path)
    ids = _ids(spec_name)
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True)
        out = ours(ids, output_router_logits=True)
    assert out.logits.shape == (2, TINY_SPECS[spec_name]["seq"], TINY_SPECS[spec_name]["vocab_size"])
    assert (out.logits - ref.logits).abs().max() <= 1e-4
    assert abs(out.aux_loss.item() - ref.aux_loss.item()) <= 1e-5
    # The reference path of the MoE agrees too.
    ours.set_moe_impl("reference")
    with torch.no_grad():
        assert (ours(ids).logits - ref.logits).abs().max() <= 1e-4


def test_clip_qkv_is_active_in_the_parity_configs(tmp_path, spec_name):
    hf_reference(spec_name, tmp_path)
    ours = DbrxForCausalLM.from_pretrained(tmp_path)
    clip = TINY_SPECS[spec_name]["attn"]["clip_qkv"]
    seen = []
    ours.transformer.blocks[0].norm_attn_norm.attn.Wqkv.register_forward_hook(
        lambda m, i, o: seen.append((o.abs() > clip).float().mean().item()))
    with torch.no_grad():
        clipped = ours(_ids(spec_name)).logits
        ours.config.attn_config.clip_qkv = None
        for block in ours.transformer.blocks:
            block.norm_attn_norm.attn.clip_qkv = None
        unclipped = ours(_ids(spec_name)).logits
    assert 0.05 < seen[0] < 0.95  # a real share of q/k/v values is clamped
    assert (clipped - unclipped).abs().max() > 1e-2


def test_padding_mask_and_aux_loss_with_padding(tmp_path):
    hf = hf_reference("B", tmp_path)
    ours = DbrxForCausalLM.from_pretrained(tmp_path)
    ids = _ids("B", batch=3)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[2, :2] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, output_router_logits=True)
        out = ours(ids, attention_mask=mask, output_router_logits=True)
    real = mask.bool()
    assert (out.logits[real] - ref.logits[real]).abs().max() <= 1e-4
    assert abs(out.aux_loss.item() - ref.aux_loss.item()) <= 1e-5


def test_state_dict_keys_and_shapes_are_transformers(spec_name):
    hf = transformers.DbrxForCausalLM(hf_config(spec_name))
    from conftest import dbrx_config

    ours = DbrxForCausalLM(dbrx_config(spec_name))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in hf.state_dict().items()}


def test_transformers_loads_what_we_write(tmp_path):
    from conftest import dbrx_config

    ours = DbrxForCausalLM(dbrx_config("C")).eval()
    randomize_(ours, seed=3)
    ours.save_pretrained(tmp_path / "single")
    ours.save_pretrained(tmp_path / "sharded", max_shard_size=40_000)
    ids = _ids("C")
    with torch.no_grad():
        want = ours(ids).logits
        for sub in ("single", "sharded"):
            hf = transformers.DbrxForCausalLM.from_pretrained(tmp_path / sub).eval()
            assert (hf(ids).logits - want).abs().max() <= 1e-4
