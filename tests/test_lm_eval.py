"""lm-eval interop (the `eval` extra, in dev): our model type `dbrx` against lm-eval's own `hf` model on the same
exported checkpoint, through lm_eval.simple_evaluate on a local JSONL task and through direct requests. Offline:
the checkpoint, the task and its data are written to tmp_path."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import lm_eval  # noqa: E402
import pytest  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from conftest import randomize_  # noqa: E402
from dbrx import DbrxForCausalLM  # noqa: E402
from dbrx.config import DbrxConfig  # noqa: E402
from dbrx.eval.lm_eval import DbrxLM, write_multiple_choice_task  # noqa: E402
from dbrx.tokenizer import Tokenizer  # noqa: E402

MAX_SEQ_LEN = 64  # short, so few-shot prompts, rolling windows and generation contexts are cut from the left
TOL = 1e-5

WORDS = "one two three four five six seven eight nine ten eleven twelve".split()
MC_ROWS = [{"query": f"Question {i}: which word comes after {w}?" + (" Think of the count." * (i % 4 == 3) * 6),
            "choices": ["alpha", "beta gamma", "delta-epsilon!", " zeta"], "gold": i % 4} for i, w in enumerate(WORDS)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny DBRX with the full cl100k vocabulary (seeded, fp32) and our tokenizer files: an HF checkpoint."""
    path = tmp_path_factory.mktemp("lm_eval") / "ckpt"
    config = DbrxConfig(d_model=32, n_heads=2, n_layers=2, max_seq_len=MAX_SEQ_LEN, vocab_size=100352,
                        attn_config={"kv_n_heads": 1, "clip_qkv": 8.0}, ffn_config={"ffn_hidden_size": 24})
    model = DbrxForCausalLM(config)
    randomize_(model, seed=0)  # larger weights than the initialisation: peaked distributions, some greedy hits
    model.save_pretrained(path)
    Tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def task_manager(checkpoint):
    root = checkpoint.parent
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    write_multiple_choice_task(root / "tasks", "dbrx_interop_mc", root / "mc.jsonl", cache_dir=root / "hf_datasets")
    return TaskManager(include_path=str(root / "tasks"), include_defaults=False)


@pytest.fixture(scope="module")
def ours(checkpoint):
    return DbrxLM(pretrained=str(checkpoint), batch_size=3)


@pytest.fixture(scope="module")
def theirs(checkpoint):
    return HFLM(pretrained=str(checkpoint), dtype="float32", device="cpu", batch_size=3)


def _evaluate(model: str, model_args: str, task_manager, **kwargs) -> dict:
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["dbrx_interop_mc"], device="cpu",
                                   task_manager=task_manager, log_samples=True, bootstrap_iters=0, **kwargs)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat_template"])
def test_simple_evaluate_equals_lm_evals_hf_model(checkpoint, task_manager, chat):
    kwargs = dict(num_fewshot=2, apply_chat_template=chat, limit=4 if chat else None)
    got = _evaluate("dbrx", f"pretrained={checkpoint},dtype=float32,batch_size=4", task_manager, **kwargs)
    ref = _evaluate("hf", f"pretrained={checkpoint},dtype=float32", task_manager, batch_size=4, **kwargs)
    got_samples, ref_samples = got["samples"]["dbrx_interop_mc"], ref["samples"]["dbrx_interop_mc"]
    assert len(got_samples) == len(ref_samples) == (4 if chat else len(MC_ROWS))
    diffs = []
    for a, b in zip(got_samples, ref_samples):
        assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]  # the same prompts, choice by choice
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a["filtered_resps"], b["filtered_resps"]):
            diffs.append(abs(ll_a - ll_b))
            assert greedy_a == greedy_b
        assert (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"])
    assert max(diffs) < TOL
    for metric in ("acc,none", "acc_norm,none"):
        assert got["results"]["dbrx_interop_mc"][metric] == ref["results"]["dbrx_interop_mc"][metric]
    if chat:
        assert "<|im_start|>assistant\n" in got_samples[0]["arguments"][0][0]
    else:  # the long questions' few-shot prompts were cut to max_length + 1 tokens on both sides
        encode = Tokenizer().encode
        assert max(len(encode("".join(a))) for s in got_samples for a in s["arguments"]) > MAX_SEQ_LEN + 1


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_edge_cases_equal_hf(ours, theirs):
    long_context = " ".join(WORDS * 8)  # ~100 tokens: cut from the left
    pairs = [("The cat sat on the ", "mat"),  # a trailing space moves into the continuation
             ("The cat sat on the", " mat"), ("", "Hello world"),  # empty context: <|endoftext|> before it
             ("x", " = 1 + 2 + 3"), (long_context, " and thirteen"), ("Answer:", " beta gamma"),
             ("Answer:", " delta"), ("<|im_start|>user\nhi<|im_end|>", "\n<|im_start|>assistant\nyes")]
    got = ours.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    ref = theirs.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in ref]
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, ref)) < TOL


def test_loglikelihood_rolling_equals_hf(ours, theirs):
    texts = ["A short one.", " ".join(f"{w} {i}" for i, w in enumerate(WORDS * 5)),  # ~150 tokens: 3 windows
             "def f(x):\n    return x * 2\n" * 9]
    got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    ref = theirs.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    assert len(ours.tokenizer.encode(texts[1])) > 2 * MAX_SEQ_LEN
    assert max(abs(a - b) for a, b in zip(got, ref)) < TOL


def test_generate_until_equals_hf(ours, theirs):
    prompts = ["Once upon a time", "def fibonacci(n):\n", " ".join(WORDS * 6), "Q: 2 + 2 =\nA:"]  # third: cut
    settings = [{"until": ["e"], "max_gen_toks": 12, "do_sample": False},
                {"until": ["\n\n"], "max_gen_toks": 6, "temperature": 0.0}]
    args = [(p, dict(s)) for s in settings for p in prompts]
    got = ours.generate_until(_requests("generate_until", args), disable_tqdm=True)
    ref = theirs.generate_until(_requests("generate_until", [(p, dict(s)) for p, s in args]), disable_tqdm=True)
    assert got == ref
    assert any(got) and not any("e" in g for g in got[:len(prompts)])


def test_chat_template_equals_hf(ours, theirs):
    histories = [[{"role": "user", "content": "What is 2 + 2?"}],
                 [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
                 [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]]
    for history in histories:
        for prompt in (True, False):
            assert ours.apply_chat_template(history, prompt) == theirs.apply_chat_template(history, prompt)
    assert ours.chat_template(True) == theirs.chat_template(True)
    assert ours.chat_template(False) is None


def test_unsupported_arguments_are_named(checkpoint, ours):
    with pytest.raises(ValueError, match="unknown argument 'batchsize'; did you mean 'batch_size'"):
        DbrxLM(pretrained=str(checkpoint), batchsize=4)
    with pytest.raises(ValueError, match="pretrained=DIR"):
        DbrxLM()
    with pytest.raises(ValueError, match="sampling"):
        ours.generate_until(_requests("generate_until", [("Hi", {"until": ["\n"], "do_sample": True})]))
    with pytest.raises(ValueError, match="'num_beams'"):
        ours.generate_until(_requests("generate_until", [("Hi", {"until": ["\n"], "num_beams": 4})]))


def test_the_core_package_never_imports_lm_eval():
    code = "import sys, dbrx, dbrx.eval, dbrx.cli; sys.exit(int('lm_eval' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

