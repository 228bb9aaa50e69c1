"""Hugging Face-format checkpoints: layouts, dtypes, and errors that name the file or tensor."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import dbrx_config, randomize_
from dbrx import DbrxForCausalLM
from dbrx.checkpoint import CheckpointError, parse_size


@pytest.fixture
def model():
    m = DbrxForCausalLM(dbrx_config("B")).eval()
    randomize_(m, 5)
    return m


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_single_file_round_trip(tmp_path, model):
    model.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "dbrx" and cfg["architectures"] == ["DbrxForCausalLM"] and cfg["dtype"] == "float32"
    loaded = DbrxForCausalLM.from_pretrained(tmp_path)
    assert _same(model, loaded)
    assert not any(p.device.type == "meta" for p in loaded.parameters())


def test_sharded_round_trip_and_layout_switch(tmp_path, model):
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    assert _same(model, DbrxForCausalLM.from_pretrained(tmp_path))
    # Saving again as one file removes the shards, which would otherwise shadow it.
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("model-*")) and not (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob(".*tmp"))


def test_dtype_on_load(tmp_path, model):
    model.save_pretrained(tmp_path)
    bf = DbrxForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16} and bf.config.dtype == "bfloat16"
    bf.save_pretrained(tmp_path / "bf")
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["dtype"] == "bfloat16"
    again = DbrxForCausalLM.from_pretrained(tmp_path / "bf")  # dtype=None keeps the stored dtype
    assert next(again.parameters()).dtype == torch.bfloat16


def test_pickle_checkpoints_are_refused(tmp_path, model):
    model.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*never unpickles"):
        DbrxForCausalLM.from_pretrained(tmp_path)


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path, model):
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = "transformer.blocks.1.ffn.experts.mlp.w2"
    del state[key]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"missing tensor.*{key}"):
        DbrxForCausalLM.from_pretrained(tmp_path)

    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["transformer.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor.*transformer.extra.weight"):
        DbrxForCausalLM.from_pretrained(tmp_path)

    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["ffn_config"]["ffn_hidden_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'transformer.blocks.0.ffn.experts.mlp.w1'.*\[792, 72\].*\[720, 72\]"):
        DbrxForCausalLM.from_pretrained(tmp_path)


def test_truncated_and_missing_files_give_clear_errors(tmp_path, model):
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated"):
        DbrxForCausalLM.from_pretrained(tmp_path)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"index.json names shard.*{shard.name}"):
        DbrxForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        DbrxForCausalLM.from_pretrained(tmp_path / "nowhere")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


def test_loading_peak_memory_is_one_copy_of_the_weights(tmp_path):
    """Measured in a fresh process: resident memory grows by about one copy of the weights, not two."""
    m = DbrxForCausalLM(dbrx_config("C").replace(d_model=512, n_heads=8, vocab_size=30000,
                                                 ffn_config={"ffn_hidden_size": 1024}))
    m.save_pretrained(tmp_path)
    nbytes = sum(t.numel() * 4 for t in m.state_dict().values())
    script = textwrap.dedent(f"""
        import torch
        from dbrx import DbrxForCausalLM
        def hwm():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
        base = hwm()
        m = DbrxForCausalLM.from_pretrained({str(tmp_path)!r})
        for p in m.parameters():
            p.sum()
        print(hwm() - base)
    """)
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert 0.9 * nbytes < grown < 1.4 * nbytes, (grown, nbytes)
