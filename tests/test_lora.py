"""LoRA (dbrx.lora): exact no-op at init, merge == adapted model on every MoE path, adapter files, merge-lora."""

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import TINY_SPECS, dbrx_config, hf_reference, randomize_
from dbrx import DbrxForCausalLM, cli
from dbrx.lora import (
    LoraConfig, LoraLinear, adapter_shapes, apply_lora, has_lora, load_adapter, lora_state_dict, merge_lora,
    save_adapter,
)
from dbrx.moe import DbrxExperts

ALL = ["Wqkv", "out_proj", "experts"]


def _model(name: str, dtype=torch.float32, seed: int = 0) -> DbrxForCausalLM:
    model = DbrxForCausalLM(dbrx_config(name)).to(dtype)
    randomize_(model, seed)
    return model.eval()


def _ids(name: str, batch: int, seq: int | None = None, seed: int = 1) -> torch.Tensor:
    s = TINY_SPECS[name]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, s["vocab_size"], (batch, seq or s["seq"]), generator=g)


def _randomize_adapters_(model, seed: int = 0, scale: float = 0.05) -> None:
    """Non-zero B (and A) so that the adapters change the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lora_state_dict(model).values():  # views of the live parameters
            t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * scale)


def test_zero_b_gives_the_base_logits_and_only_adapters_train():
    name, r = "B", 3
    model = _model(name)
    ids, few = _ids(name, 2), _ids(name, 1, 1)
    with torch.no_grad():
        base, base_few = model(ids).logits, model(few).logits
    apply_lora(model, LoraConfig.from_dict({"peft_type": "lora", "r": r, "lora_alpha": 6, "target_modules": ALL}))
    with torch.no_grad():
        # equal up to rounding: with adapters the experts run through the per-expert loop, without them through
        # torch's grouped matmul, whose kernels may sum in another order
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=1e-5)
        assert torch.equal(model(few).logits, base_few)  # few-token (decode) MoE path

    s = TINY_SPECS[name]
    D, F_, E, L = s["d_model"], s["ffn"]["ffn_hidden_size"], s["ffn"]["moe_num_experts"], s["n_layers"]
    qkv = D + 2 * s["attn"]["kv_n_heads"] * (D // s["n_heads"])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == L * r * ((D + qkv) + (D + D) + 3 * E * (D + F_))
    assert sum(t.numel() for t in lora_state_dict(model).values()) == L * r * ((D + qkv) + 2 * D + 3 * E * (D + F_))

    model.train()
    model(ids).logits.square().mean().backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in trainable.values())
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoraConfig())


def test_merged_model_equals_the_trained_adapted_model_on_every_moe_path(monkeypatch):
    name = "A"  # 7 experts, top 2: up to 3 tokens take the few-token decode path
    torch.manual_seed(0)
    model = _model(name, torch.float64)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LoraConfig.from_dict({"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ALL})
    apply_lora(model, cfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        ids = _ids(name, 2, seed=10 + step)
        logits = model(ids[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert all(t.abs().max() > 0 for n, t in lora_state_dict(model).items() if n.endswith(("lora_B", "lora_B.weight")))

    merged = merge_lora(copy.deepcopy(model))
    assert not has_lora(merged) and not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert {k: (v.shape, v.dtype) for k, v in merged.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in base_state.items()}
    assert torch.equal(merged.state_dict()["lm_head.weight"], base_state["lm_head.weight"])
    assert merged.lm_head.weight.stride() == model.lm_head.weight.stride()  # the layout chosen for decoding stays

    few_calls = []
    for path in ("_forward_one_token", "_forward_exact_groups"):
        original = getattr(DbrxExperts, path)
        monkeypatch.setattr(DbrxExperts, path, lambda self, *a, f=original, p=path: few_calls.append(p) or f(self, *a))
    ids = _ids(name, 2)
    adapted = model(ids).logits.detach()  # grad enabled: the grouped (training) path
    assert (merged(ids).logits - adapted).abs().max() <= 1e-10
    with torch.no_grad():
        for few in (ids[:1, :1], ids[:1, :3]):  # one-token and exact-groups inference branches
            assert (merged(few).logits - model(few).logits).abs().max() <= 1e-10
        assert sorted(set(few_calls)) == ["_forward_exact_groups", "_forward_one_token"]
        assert len(few_calls) == 2 * 2 * TINY_SPECS[name]["n_layers"]
        for m in (model, merged):
            m.set_moe_impl("reference")
        assert (merged(ids).logits - model(ids).logits).abs().max() <= 1e-10
        base = DbrxForCausalLM(dbrx_config(name)).double().eval()
        base.load_state_dict(base_state)
        assert (base(ids).logits - adapted).abs().max() > 1e-3  # the adapters did change the model


def test_adapter_round_trip_and_a_mis_shaped_tensor(tmp_path):
    name = "C"
    model = _model(name)
    cfg = LoraConfig(r=2, lora_alpha=5.0, target_modules=("Wqkv", "experts"))
    apply_lora(model, cfg)
    _randomize_adapters_(model)
    save_adapter(model, cfg, tmp_path / "adapter", base_model_name_or_path="tiny-C")

    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written == {"peft_type": "LORA", "r": 2, "lora_alpha": 5.0, "lora_dropout": 0.0,
                       "target_modules": ["Wqkv", "experts"], "task_type": "CAUSAL_LM",
                       "base_model_name_or_path": "tiny-C"}
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    s = TINY_SPECS[name]
    E, F_, D = s["ffn"]["moe_num_experts"], s["ffn"]["ffn_hidden_size"], s["d_model"]
    assert tensors["base_model.model.transformer.blocks.0.norm_attn_norm.attn.Wqkv.lora_A.weight"].shape == (2, D)
    assert tensors["base_model.model.transformer.blocks.2.ffn.experts.mlp.w2.lora_A"].shape == (E, 2, D)
    assert tensors["base_model.model.transformer.blocks.2.ffn.experts.mlp.w2.lora_B"].shape == (E, F_, 2)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == adapter_shapes(model, cfg)
    assert not any("out_proj" in k for k in tensors)

    fresh = _model(name)
    assert load_adapter(fresh, tmp_path / "adapter") == cfg
    ids = _ids(name, 2)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)

    bad = "base_model.model.transformer.blocks.1.ffn.experts.mlp.v1.lora_B"
    tensors[bad] = torch.zeros(E, F_, 3)
    save_file(tensors, tmp_path / "adapter" / "adapter_model.safetensors")
    untouched = _model(name)
    with pytest.raises(ValueError, match=re.escape(bad)) as err:
        load_adapter(untouched, tmp_path / "adapter")
    assert f"[{E}, {F_}, 3]" in str(err.value) and f"[{E}, {F_}, 2]" in str(err.value)
    assert not has_lora(untouched) and all(p.requires_grad for p in untouched.parameters())

    del tensors[bad]
    save_file(tensors, tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"missing tensor '{re.escape(bad)}'"):
        load_adapter(_model(name), tmp_path / "adapter")


def test_merge_lora_cli_writes_a_checkpoint_transformers_loads(tmp_path, capsys):
    import transformers

    name = "B"
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    hf_reference(name, base_dir)
    (base_dir / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}\n')
    ours = DbrxForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=8.0, target_modules=tuple(ALL))
    apply_lora(ours, cfg)
    _randomize_adapters_(ours, seed=1)
    save_adapter(ours, cfg, adapter_dir)

    code = cli.main(["merge-lora", str(base_dir), str(adapter_dir), "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "r=4" in stdout and str(out) in stdout
    assert (out / "tokenizer_config.json").read_text() == (base_dir / "tokenizer_config.json").read_text()
    assert not list(tmp_path.glob(".merged.*"))

    hf = transformers.DbrxForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(name, 2)
    with torch.no_grad():
        want, got = ours(ids).logits, hf(ids).logits
        merged = DbrxForCausalLM.from_pretrained(out)(ids).logits
        # The adapted model adds base(x) and the low-rank term as two fp32 products, the merged one forms one
        # product: they differ by rounding only (about 2e-6 of the logits' scale here).
        assert (got - want).abs().max() <= 3e-5
        assert (merged - want).abs().max() <= 3e-5
        assert (got - merged).abs().max() <= 1e-5
        assert (DbrxForCausalLM.from_pretrained(base_dir)(ids).logits - want).abs().max() > 1e-3

    def fails(*argv) -> str:
        capsys.readouterr()
        assert cli.main(list(argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith("dbrx merge-lora: error: ") and "Traceback" not in err
        return err

    assert "--overwrite" in fails("merge-lora", str(base_dir), str(adapter_dir), "--out", str(out))
    assert "not a directory" in fails("merge-lora", str(tmp_path / "nope"), str(adapter_dir), "--out",
                                      str(tmp_path / "o1"))
    assert "no adapter_config.json" in fails("merge-lora", str(base_dir), str(base_dir), "--out",
                                             str(tmp_path / "o2"))
    from dbrx.quant import QuantConfig, write_quantized

    write_quantized(base_dir, tmp_path / "int8", QuantConfig(8), log=lambda *_: None)  # adapters need float weights
    assert "quantised" in fails("merge-lora", str(tmp_path / "int8"), str(adapter_dir), "--out", str(tmp_path / "o3"))
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


@pytest.mark.parametrize("values, message", [
    ({"r": 0}, "model.peft_config.r: expected a positive integer, got 0"),
    ({"r": 2.5}, "model.peft_config.r: expected a positive integer, got 2.5"),
    ({"lora_alpha": -1}, "model.peft_config.lora_alpha: expected a positive number, got -1"),
    ({"lora_dropout": 1.0}, "model.peft_config.lora_dropout: expected a number in [0, 1), got 1.0"),
    ({"peft_type": "IA3"}, "model.peft_config.peft_type: only LORA is supported, got 'IA3'"),
    ({"target_modules": []}, "model.peft_config.target_modules: expected a non-empty list"),
    ({"target_modules": ["Wqkv", "out_projj"]},
     "model.peft_config.target_modules: unknown module 'out_projj'; did you mean 'out_proj'?"),
    ({"lora_alpa": 16}, "unknown key 'model.peft_config.lora_alpa'; did you mean 'model.peft_config.lora_alpha'?"),
])
def test_config_validation_names_the_key(values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LoraConfig.from_dict({"peft_type": "LORA", **values})


def test_config_reads_foundry_yaml_and_peft_adapter_config():
    d = {"peft_type": "lora", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
         "target_modules": ["Wqkv", "out_proj", "Wqkv"]}
    cfg = LoraConfig.from_dict(d)
    assert cfg == LoraConfig(r=8, lora_alpha=16.0, lora_dropout=0.05, target_modules=("Wqkv", "out_proj"))
    assert cfg.scaling == 2.0 and LoraConfig.from_dict(cfg.to_dict()) == cfg
    peft = {**cfg.adapter_config("databricks/dbrx-base"), "bias": "none", "fan_in_fan_out": False,
            "use_dora": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
            "inference_mode": True, "init_lora_weights": True, "peft_version": "0.17.1", "layers_to_transform": None,
            "runtime_config": {"ephemeral_gpu_offload": False}}
    assert LoraConfig.from_adapter_config(peft, where="adapter_config.json") == cfg
    with pytest.raises(ValueError, match=r"adapter_config.json: use_dora = true is not supported"):
        LoraConfig.from_adapter_config({**peft, "use_dora": True}, where="adapter_config.json")
