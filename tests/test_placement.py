"""The inference fit planner (dbrx.placement, `dbrx info --devices`): DBRX Instruct's sizes under each
quantisation, planned on the meta device, and the device specs and errors a user types."""

import json
import subprocess
import sys

import pytest
import torch

from dbrx.config import DbrxConfig
from dbrx.placement import GiB, RESERVE_BYTES, parse_devices, plan, suggestions, tensor_bytes

INSTRUCT = DbrxConfig.from_name("dbrx-instruct")


def test_dbrx_instruct_int8_fits_one_h200_bf16_needs_two_int4_fits_one_80gb_at_8k():
    int8 = plan(INSTRUCT, parse_devices("1xH200"), 32768, torch.bfloat16, "int8")
    assert int8.fits and 126 * GiB < int8.weight_bytes < 128 * GiB  # "about 127 GiB"
    left = int8.devices[0].device.memory_bytes - int8.weight_bytes
    assert 8 * GiB <= left <= 15 * GiB and int8.kv_bytes_per_token == 160 * 2**10  # 160 KiB per token in bf16
    bf16 = plan(INSTRUCT, parse_devices("1xH200"), 32768)
    assert not bf16.fits and not bf16.weights_fit and 244 * GiB < bf16.weight_bytes < 246 * GiB  # 245 GiB
    two = plan(INSTRUCT, parse_devices("2xH200"), 32768)
    assert two.fits and [d.parts for d in two.devices] == [["embedding", "blocks 0-19"],
                                                             ["blocks 20-39", "final norm + head"]]
    int4 = plan(INSTRUCT, parse_devices("1x80GB"), 8192, torch.bfloat16, "int4", 128)
    assert int4.fits and 68 * GiB <= int4.weight_bytes <= 72 * GiB  # "68-72 GiB"
    assert suggestions(INSTRUCT, parse_devices("1xH200"), 32768, torch.bfloat16, "none", 128, ()) == [
        "--quant int8 on these devices", "--devices 2xH200 (quantisation none)"]


def test_quantised_bytes_count_weights_and_scales_as_stored():
    E, F, D = 16, 10752, 6144
    shape = torch.Size([E * F, D])
    bf16 = torch.bfloat16
    assert tensor_bytes("transformer.blocks.0.ffn.experts.mlp.w1", shape, bf16, "int8", num_experts=E) == \
        E * F * D + E * F * 2  # a byte per weight, a bf16 scale per output row
    assert tensor_bytes("transformer.blocks.0.ffn.experts.mlp.w2", shape, bf16, "int8", num_experts=E) == \
        E * F * D + E * D * 2  # w2 is applied as h @ w2: its output channels are D per expert
    assert tensor_bytes("transformer.blocks.0.ffn.experts.mlp.v1", shape, bf16, "int4", 128) == \
        E * F * D // 2 + E * F * D // 128 * 4  # half a byte, a bf16 scale and zero per 128 weights
    attn = torch.Size([D + 2 * 1024, D])
    assert tensor_bytes("transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight", attn, bf16, "int8") == \
        attn.numel() * 2  # attention stays in bf16 unless included
    assert tensor_bytes("transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight", attn, bf16, "int8",
                        include=("attention",)) == attn.numel() + attn[0] * 2
    with_head = plan(INSTRUCT, parse_devices("1xH200"), 4096, torch.bfloat16, "int8", include=("lm_head",))
    plain = plan(INSTRUCT, parse_devices("1xH200"), 4096, torch.bfloat16, "int8")
    head = INSTRUCT.vocab_size * INSTRUCT.d_model
    assert plain.weight_bytes - with_head.weight_bytes == head * 2 - (head + INSTRUCT.vocab_size * 2)


def test_blocks_follow_each_devices_memory_and_the_device_map_names_torch_devices():
    mixed = plan(INSTRUCT, parse_devices("H200,80GB"), 8192, torch.bfloat16, "int8")
    held = [sum(1 for d in mixed.layer_device if d == i) for i in range(2)]
    assert held[0] > held[1] > 0 and sum(held) == 40 and mixed.fits
    share = [d.weight_bytes / d.device.usable_bytes for d in mixed.devices]
    assert abs(share[0] - share[1]) < 0.1  # filled alike, relative to each device's memory
    dmap = mixed.device_map()
    assert dmap["transformer.wte"] == "cuda:0" and dmap["lm_head"] == dmap["transformer.norm_f"] == "cuda:1"
    assert dmap["transformer.blocks.0"] == "cuda:0" and dmap["transformer.blocks.39"] == "cuda:1"
    assert [d.device.name for d in plan(INSTRUCT, parse_devices("4x80GB"), 4096).devices] == ["80GB"] * 4
    assert all(d.device.usable_bytes == d.device.memory_bytes - RESERVE_BYTES for d in mixed.devices)


@pytest.mark.parametrize("spec, message", [
    ("2xTPU", "'TPU' is neither a device kind"), ("0xH200", "a count of 0"), ("H200,", "an empty item"),
    ("cuda:0", "cuda:0 is not here"), ("2xcuda:0", "repeats one device"),
])
def test_device_specs_that_are_wrong_say_what_was_expected(spec, message):
    if spec == "cuda:0" and torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(ValueError, match=message):
        parse_devices(spec)


def _info(*args):
    return subprocess.run([sys.executable, "-m", "dbrx", "info", "--preset", "dbrx-instruct", *args],
                          capture_output=True, text=True, timeout=120)


def test_planning_builds_its_meta_model_without_drawing_weights():
    """A meta model draws no values: torch's normal_ on meta imported its compiler stack (torch._dynamo), which was
    2 of `dbrx info`'s 4 seconds."""
    code = ("import sys; from dbrx.config import DbrxConfig; from dbrx.placement import plan, parse_devices; "
            "plan(DbrxConfig.from_name('dbrx-instruct'), parse_devices('1xH200')); print('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_dbrx_info_devices_prints_the_plan_and_json_has_a_boolean_fits():
    r = _info("--devices", "1xH200", "--quant", "int8", "--max-model-len", "32768", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] is True and out["kv_tokens_fit"] >= 32768 and out["devices"][0]["device"] == "H200"
    assert out["kv_cache_bytes_per_token"] == 163840 and out["quantized"] == ["experts"]
    r = _info("--devices", "1xH200")
    assert r.returncode == 0 and "does NOT fit: device 0 needs 245.1 GiB" in r.stdout
    assert "would fit: --quant int8 on these devices" in r.stdout and "--devices 2xH200" in r.stdout
    r = _info("--devices", "1x80GB", "--quant", "int4", "--max-model-len", "8192")
    assert r.returncode == 0 and "  fits:" in r.stdout
    # a group size that divides neither input size: planned as the quantiser takes it (groups of 96 here)
    r = _info("--devices", "1xH200", "--quant", "int4", "--group-size", "100")
    assert r.returncode == 0 and "(group 100; 96 along d_model, 96 along ffn_hidden_size)" in r.stdout
    w1 = torch.Size([16 * 10752, 6144])
    assert tensor_bytes("transformer.blocks.0.ffn.experts.mlp.w1", w1, torch.bfloat16, "int4", 100, (), 16) == \
        w1.numel() // 2 + w1.numel() // 96 * 2 * 2
    for args, said in ((["--quant", "int8"], "give --devices too"),
                       (["--devices", "1xH200", "--max-model-len", "40000"], "between 1 and the model's max_seq_len"),
                       (["--devices", "1xH200", "--quant", "int4", "--group-size", "0"], "must be positive"),
                       (["--devices", "1xH200", "--quant", "int8", "--include", "router"], "only attention, lm_head")):
        r = _info(*args)
        assert r.returncode == 2 and said in r.stderr, (args, r.stderr)


def _two_devices() -> list[str]:
    """Two devices to spread a model over: two GPUs where there are, one GPU twice where there is one, else the CPU
    twice (the same code path)."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cuda:0", "cuda:1"] if n >= 2 else ["cuda:0", "cuda:0"] if n else ["cpu", "cpu"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from dbrx import DbrxForCausalLM

    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = DbrxConfig.from_name("dbrx-tiny").replace(vocab_size=300, n_layers=3, max_seq_len=128)
    DbrxForCausalLM(cfg).save_pretrained(path)
    return path


def test_a_model_spread_over_two_devices_gives_the_same_logits_tokens_and_served_tokens(tiny_dir):
    from dbrx import DbrxForCausalLM, generate
    from dbrx.placement import layer_devices
    from dbrx.serve import Engine, SamplingParams

    d0, d1 = _two_devices()
    one = DbrxForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, device=d0)
    dmap = {"transformer.wte": d0, "transformer.blocks.0": d0, "transformer.blocks.1": d1,
            "transformer.blocks.2": d1, "transformer.norm_f": d1, "lm_head": d1}
    spread = DbrxForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, device_map=dmap)
    assert [str(d) for d in layer_devices(spread)] == [d0, d1, d1]
    assert all(hasattr(m, "_dbrx_dispatch") for m in [*spread.transformer.blocks, spread.lm_head])
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1)).to(d0)
    with torch.no_grad():
        want, got = one(ids, output_router_logits=True), spread(ids, output_router_logits=True)
    assert got.logits.device == ids.device
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=0, atol=1e-6)
    prompt = ids[0, :9].tolist()
    assert generate(spread, prompt, 12) == generate(one, prompt, 12)
    engine = Engine(spread, max_num_seqs=2)
    engine.add_request("a", prompt, SamplingParams(max_tokens=12))
    engine.add_request("b", ids[1, :5].tolist(), SamplingParams(max_tokens=6))
    got_tokens: dict = {"a": [], "b": []}
    while engine.has_work():
        for o in engine.step():
            got_tokens[o.request_id] += o.token_ids
    assert got_tokens == {"a": generate(one, prompt, 12), "b": generate(one, ids[1, :5].tolist(), 6)}


def test_device_map_auto_plans_over_max_memory_and_bad_maps_say_what_is_wrong(tiny_dir, capsys):
    from dbrx import DbrxForCausalLM

    auto = DbrxForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, device_map="auto",
                                           max_memory={"cpu": "4GiB"})
    assert {str(p.device) for p in auto.parameters()} == {"cpu"}
    with pytest.raises(ValueError, match="do not fit: cpu would need"):
        DbrxForCausalLM.from_pretrained(tiny_dir, device_map="auto", max_memory={"cpu": 1000})
    # transformers' spellings: one device as the map, "balanced" for auto, dtype="auto" for as stored
    one = DbrxForCausalLM.from_pretrained(tiny_dir, dtype="auto", device_map="cpu")
    assert one.transformer.wte.weight.dtype == torch.float32 and {str(p.device) for p in one.parameters()} == {"cpu"}
    devices = {str(p.device) for p in DbrxForCausalLM.from_pretrained(tiny_dir, device_map="auto").parameters()}
    assert {str(p.device) for p in DbrxForCausalLM.from_pretrained(tiny_dir, device_map="balanced").parameters()} \
        == devices == ({"cuda:0"} if torch.cuda.is_available() else {"cpu"})
    with pytest.raises(ValueError, match="device_map='sequential': dbrx places blocks in proportion"):
        DbrxForCausalLM.from_pretrained(tiny_dir, device_map="sequential")
    with pytest.raises(ValueError, match="'transformer.block.1' is not a module"):
        DbrxForCausalLM.from_pretrained(tiny_dir, device_map={"": "cpu", "transformer.block.1": "cpu"})
    with pytest.raises(ValueError, match="is not a torch device"):
        DbrxForCausalLM.from_pretrained(tiny_dir, device_map={"": "gpu7"})
    with pytest.raises(ValueError, match="places no module that holds 'lm_head.weight'"):
        DbrxForCausalLM.from_pretrained(tiny_dir, device_map={"transformer": "cpu"})
    # a GPU that is not there is named before anything is read (torch would assert in the middle of the load)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = f"cuda:{gpus}"
    said = "no CUDA device here" if gpus == 0 else f"this machine has {gpus} CUDA device"
    for where in ({"device": missing}, {"device_map": {"": missing}},
                  {"device_map": "auto", "max_memory": {gpus: "1GiB"}}):
        with pytest.raises(ValueError, match=said):
            DbrxForCausalLM.from_pretrained(tiny_dir, **where)
    from dbrx import cli

    assert cli.main(["generate", "--model", str(tiny_dir), "--device", missing, "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dbrx generate: error: --device '{missing}': {said}") and "Traceback" not in err
    if gpus == 0:  # a device kind plans (dbrx info); to load, it stands for this machine's GPUs
        assert cli.main(["generate", "--model", str(tiny_dir), "--devices", "2xH200", "x"]) == 2
        assert "--devices 2xH200: device 0 (H200) as 'cuda:0': no CUDA device here" in capsys.readouterr().err


@pytest.mark.parametrize("bits, include", [(8, ("lm_head",)), (4, ())])
def test_a_quantised_checkpoint_is_planned_loaded_and_spread_as_stored(tiny_dir, tmp_path, monkeypatch, bits,
                                                                      include):
    from dbrx import DbrxForCausalLM
    from safetensors import safe_open

    from dbrx.placement import stored_quant
    from dbrx.quant import QuantConfig, write_quantized

    out = tmp_path / "q"
    write_quantized(tiny_dir, out, QuantConfig(bits, 128, include), log=lambda *_: None)
    config = DbrxConfig.from_pretrained(out)
    as_stored = 0
    for file in out.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            as_stored += sum(f.get_tensor(k).nbytes for k in f.keys())
    # int4 groups: 128 along d_model, 96 along the expert width 192 (the quantiser's largest divisor below 128)
    quantised = plan(config, parse_devices("cpu"), dtype=torch.float32, **stored_quant(config))
    unquantised = plan(config, parse_devices("cpu"), dtype=torch.float32)
    assert quantised.weight_bytes == as_stored < unquantised.weight_bytes * (0.3 if bits == 8 else 0.2)
    # room for the weights as stored, not as they would be in fp32
    room = {"cpu": (as_stored + unquantised.weight_bytes) // 2}
    auto = DbrxForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="auto", max_memory=room)
    one = DbrxForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, one(ids).logits, rtol=0, atol=0)
    info = [sys.executable, "-m", "dbrx", "info", "--model", str(out), "--devices", "cpu", "--dtype", "float32"]
    r = subprocess.run(info + ["--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert (facts["quant"], facts["weight_bytes"], facts["quantized"]) == (f"int{bits}", as_stored,
                                                                          ["experts", *include])
    r = subprocess.run([*info[:6], "--json"], capture_output=True, text=True, timeout=120)  # without --devices
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["quantization"]["quant"] == f"int{bits}" and facts["weight_bytes"]["float32"] == as_stored
    r = subprocess.run(info + ["--quant", "int4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "already quantised" in r.stderr, r.stderr
    # the CLI's --devices path (generate, chat, eval, serve) plans it the same way, and on one device its memory
    # check counts the codes as stored (a byte each, not a --dtype word each)
    from dbrx.cli import _load_model, build_parser

    monkeypatch.setattr("dbrx.cli.available_memory_bytes", lambda: int(as_stored * 1.2))
    alone = _load_model(build_parser().parse_args(["generate", "--model", str(out), "--dtype", "float32", "x"]))
    with torch.no_grad():
        torch.testing.assert_close(alone(ids).logits, one(ids).logits, rtol=0, atol=0)
    monkeypatch.undo()

    d0 = _two_devices()[0]
    args = build_parser().parse_args(["generate", "--model", str(out), "--dtype", "float32", "--devices",
                                      ",".join(_two_devices()), "x"])
    spread, here = _load_model(args), DbrxForCausalLM.from_pretrained(out, dtype=torch.float32, device=d0)
    with torch.no_grad():
        torch.testing.assert_close(spread(ids.to(d0)).logits, here(ids.to(d0)).logits, rtol=0, atol=0)


def test_generate_with_devices_spreads_the_model_and_prints_the_same_text(tmp_path):
    init = [sys.executable, "-m", "dbrx", "init", "--preset", "dbrx-tiny", "--out", str(tmp_path / "m")]
    assert subprocess.run(init, capture_output=True, timeout=120).returncode == 0
    run = [sys.executable, "-m", "dbrx", "generate", "--model", str(tmp_path / "m"), "--max-new-tokens", "8",
           "--dtype", "float32", "def f(x):"]
    alone = subprocess.run(run, capture_output=True, text=True, timeout=120)
    spread = subprocess.run(run + ["--devices", ",".join(_two_devices())], capture_output=True, text=True,
                            timeout=120)
    assert alone.returncode == spread.returncode == 0, spread.stderr
    assert spread.stdout == alone.stdout and alone.stdout.strip()
    # compiled decoding kernels on the spread model, each kept where it measured faster (their logits against the
    # eager ones: tests/test_kernels.py; the text may differ: a random model's logits are near ties, and the kernels
    # sum in another order)
    compiled = subprocess.run(run + ["--devices", ",".join(_two_devices()), "--compile"], capture_output=True,
                              text=True, timeout=300)
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout.strip() and "compiled decode, experts:" in compiled.stderr


def test_eval_scores_and_generates_the_same_on_a_spread_model(tmp_path):
    import json

    from dbrx import DbrxForCausalLM
    from dbrx.eval import evaluate
    from dbrx.tokenizer import Tokenizer

    torch.manual_seed(0)  # the full vocabulary, so that the tokenizer's ids are the model's
    cfg = DbrxConfig(d_model=32, n_heads=2, n_layers=2, max_seq_len=256, vocab_size=100352,
                     attn_config={"kv_n_heads": 1}, ffn_config={"ffn_hidden_size": 24})
    DbrxForCausalLM(cfg).save_pretrained(tmp_path / "m")
    d0, d1 = _two_devices()
    one = DbrxForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32, device=d0)
    spread = DbrxForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32, device_map={
        "transformer.wte": d0, "transformer.blocks.0": d0, "transformer.blocks.1": d1, "transformer.norm_f": d1,
        "lm_head": d1})
    mc, qa = tmp_path / "mc.jsonl", tmp_path / "qa.jsonl"
    mc.write_text("".join(json.dumps({"query": f"Which word follows {w}?", "choices": ["alpha", "beta", "gamma"],
                                      "gold": i % 3}) + "\n" for i, w in enumerate(["one", "two", "three", "four"])))
    qa.write_text("".join(json.dumps({"context": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                          for i in range(3)))
    tasks = {"max_seq_len": 128, "device_eval_batch_size": 2, "icl_tasks": [
        {"label": "mc", "dataset_uri": str(mc), "icl_task_type": "multiple_choice", "num_fewshot": [0, 1]},
        {"label": "qa", "dataset_uri": str(qa), "icl_task_type": "generation_task_with_answers", "num_fewshot": [0],
         "continuation_delimiter": "\nAnswer:", "early_stopping_criteria": ["\n"]}]}
    results = {}
    for name, model in (("one", one), ("spread", spread)):
        results[name] = evaluate(model, Tokenizer(), tasks, out_dir=tmp_path / name, log=lambda *_: None)
    assert results["spread"]["metrics"].keys() == results["one"]["metrics"].keys()
    for key, value in results["one"]["metrics"].items():
        assert results["spread"]["metrics"][key] == pytest.approx(value, abs=1e-6), key
    rows = {name: [json.loads(line) for line in (tmp_path / name / "examples.jsonl").read_text().splitlines()]
            for name in results}
    assert [r.get("generation") for r in rows["spread"]] == [r.get("generation") for r in rows["one"]]
    assert any(r.get("generation") for r in rows["one"])
