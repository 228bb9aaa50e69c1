import json

import pytest

from dbrx import PRESETS, DbrxConfig


def test_released_presets_have_the_released_values():
    for name in ("dbrx-base", "dbrx-instruct"):
        c = DbrxConfig.from_name(name)
        assert (c.d_model, c.n_layers, c.n_heads, c.kv_n_heads, c.head_dim) == (6144, 40, 48, 8, 128)
        assert (c.ffn_config.ffn_hidden_size, c.num_experts, c.top_k) == (10752, 16, 4)
        assert (c.attn_config.clip_qkv, c.attn_config.rope_theta, c.ffn_config.moe_loss_weight) == (8, 500000, 0.05)
        assert (c.vocab_size, c.max_seq_len, c.dtype, c.tie_word_embeddings) == (100352, 32768, "bfloat16", False)


def test_cpu_presets_keep_the_fine_grained_shape():
    for name in ("dbrx-tiny", "dbrx-small"):
        c = DbrxConfig.from_name(name)
        assert (c.num_experts, c.top_k, c.vocab_size) == (16, 4, 100352)
    assert set(PRESETS) >= {"dbrx-base", "dbrx-instruct", "dbrx-tiny", "dbrx-small"}


@pytest.mark.parametrize("change, words", [
    (dict(ffn_config={"moe_top_k": 17}), ["moe_top_k", "moe_num_experts"]),
    (dict(n_heads=7), ["n_heads", "divisible"]),
    (dict(attn_config={"kv_n_heads": 5}), ["kv_n_heads", "divisible"]),
    (dict(d_model=0), ["d_model", "positive"]),
    (dict(n_layers=-1), ["n_layers", "positive"]),
    (dict(ffn_config={"ffn_hidden_size": 0}), ["ffn_config.ffn_hidden_size", "positive"]),
    (dict(attn_config={"clip_qkv": -1.0}), ["clip_qkv"]),
    (dict(tie_word_embeddings=True), ["tie_word_embeddings"]),
    (dict(ffn_config={"ffn_act_fn": {"name": "tanh"}}), ["ffn_act_fn"]),
])
def test_invalid_configs_name_the_field_and_rule(change, words):
    with pytest.raises(ValueError) as e:
        DbrxConfig.from_name("dbrx-tiny").replace(**change)
    for w in words:
        assert w in str(e.value)


def test_unknown_fields_are_errors_that_suggest_the_nearest():
    d = DbrxConfig.from_name("dbrx-tiny").to_dict()
    d["n_layer"] = 3
    with pytest.raises(ValueError, match="'n_layer'.*'n_layers'"):
        DbrxConfig.from_dict(d)
    d = DbrxConfig.from_name("dbrx-tiny").to_dict()
    d["ffn_config"]["moe_topk"] = 2
    with pytest.raises(ValueError, match="ffn_config.moe_topk.*ffn_config.moe_top_k"):
        DbrxConfig.from_dict(d)


def test_round_trip_and_released_config_json(tmp_path):
    c = DbrxConfig.from_name("dbrx-small")
    c.save_pretrained(tmp_path)
    assert DbrxConfig.from_pretrained(tmp_path) == c
    # The released dbrx-instruct config.json, as published (ints where transformers 5 wants floats, auto_map).
    released = {
        "architectures": ["DbrxForCausalLM"], "auto_map": {"AutoConfig": "configuration_dbrx.DbrxConfig"},
        "attn_config": {"clip_qkv": 8, "kv_n_heads": 8, "model_type": "", "rope_theta": 500000},
        "d_model": 6144, "emb_pdrop": 0.0, "initializer_range": 0.02, "max_seq_len": 32768, "model_type": "dbrx",
        "ffn_config": {"ffn_hidden_size": 10752, "model_type": "", "moe_jitter_eps": 0, "moe_loss_weight": 0.05,
                       "moe_num_experts": 16, "moe_top_k": 4},
        "n_heads": 48, "n_layers": 40, "output_router_logits": False, "resid_pdrop": 0.0,
        "router_aux_loss_coef": 0.05, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.38.2", "use_cache": True, "vocab_size": 100352,
    }
    (tmp_path / "config.json").write_text(json.dumps(released))
    assert DbrxConfig.from_pretrained(tmp_path) == DbrxConfig.from_name("dbrx-instruct")


def test_written_config_loads_in_transformers(tmp_path):
    import transformers

    DbrxConfig.from_name("dbrx-instruct").save_pretrained(tmp_path)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "dbrx" and hf.rope_parameters["rope_theta"] == 500000
    assert hf.attn_config.clip_qkv == 8 and hf.ffn_config.moe_normalize_expert_weights == 1.0
    # only ffn_config keys that transformers declares: 5.17 refused the whole config over an unknown one
    from dataclasses import fields

    from transformers.models.dbrx.configuration_dbrx import DbrxFFNConfig

    written = json.loads((tmp_path / "config.json").read_text())["ffn_config"]
    assert set(written) <= {f.name for f in fields(DbrxFFNConfig)}, written


def test_bad_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        DbrxConfig.from_pretrained(tmp_path)
