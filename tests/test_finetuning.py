"""Fine-tuning data: example formats and LLM Foundry's validation rules, exact label layouts for each target
policy, drop reports from every source, packing that leaves each example's loss unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dbrx.data import finetuning as ft
from dbrx.data.finetuning import IGNORE_INDEX as X
from dbrx.model import DbrxForCausalLM
from dbrx.tokenizer import EOS_ID, Tokenizer
from dbrx.train.loss import chunked_cross_entropy_sum
from tests.conftest import dbrx_config, randomize_

REFERENCE = Path(__file__).parent / "data" / "mds_reference"
IM_END = 100279


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def layout(turns, policy, max_seq_len=100):
    ids, labels, _ = ft.build_example(turns, policy, max_seq_len)
    return ids.tolist(), labels.tolist()


# ---- label layout ------------------------------------------------------------------------------------------
TWO_TURNS = [([1, 2, 3], [4, 5]), ([6, 7], [8, 9, EOS_ID])]


def test_label_layout_last_response_only():
    ids, labels = layout(TWO_TURNS, ft.LabelPolicy.from_config("last", "none"))
    assert ids == [1, 2, 3, 4, 5, 6, 7, 8, 9, EOS_ID]
    assert labels == [X, X, X, X, X, X, X, 8, 9, EOS_ID]


def test_label_layout_all_responses():
    _, labels = layout(TWO_TURNS, ft.LabelPolicy.from_config("all", "none"))
    assert labels == [X, X, X, 4, 5, X, X, 8, 9, EOS_ID]


def test_label_layout_all_prompts():
    # The example's first token is never a target: nothing of the example precedes it.
    _, labels = layout(TWO_TURNS, ft.LabelPolicy.from_config("all", "all"))
    assert labels == [X, 2, 3, 4, 5, 6, 7, 8, 9, EOS_ID]


def test_label_layout_prompts_by_length():
    _, labels = layout(TWO_TURNS, ft.LabelPolicy.from_config("last", "length>=3"))
    assert labels == [X, 2, 3, X, X, X, X, 8, 9, EOS_ID]  # the 3-token prompt is trained, the 2-token one not


def test_eos_appended_once():
    ids, labels = layout([([1, 2], [3])], ft.LabelPolicy())
    assert ids == [1, 2, 3, EOS_ID] and labels == [X, X, 3, EOS_ID]
    ids, _ = layout([([1, 2], [3, EOS_ID])], ft.LabelPolicy())
    assert ids == [1, 2, 3, EOS_ID]


def test_too_long_left_truncates_the_prompt_or_drops():
    ids, labels, truncated = ft.build_example([(list(range(1, 9)), [20, 21])], ft.LabelPolicy(), 5)
    assert truncated and ids.tolist() == [7, 8, 20, 21, EOS_ID] and labels.tolist() == [X, X, 20, 21, EOS_ID]
    with pytest.raises(ft.Drop) as e:
        ft.build_example([([1], [2, 3, 4, 5, 6])], ft.LabelPolicy(), 5)  # 5 response tokens + EOS
    assert e.value.reason == "too_long"


@pytest.mark.parametrize("bad", ["first", "length>=0", "length>=x"])
def test_bad_target_prompts(bad):
    with pytest.raises(ft.FinetuningDataError, match="target_prompts"):
        ft.LabelPolicy.from_config("last", bad)


def test_chat_turns_follow_the_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Ciao"}]
    turns = ft.example_turns({"messages": messages})
    assert [r for _, r in turns] == ["Hello<|im_end|>", "Ciao<|im_end|>"]
    # Prompts + responses, joined, are exactly the rendered conversation.
    assert "".join(p + r for p, r in turns) == Tokenizer.render_chat(messages, add_generation_prompt=False)
    assert turns[1][0] == "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    token_turns = ft.token_turns({"messages": messages}, tok)
    ids, labels, _ = ft.build_example(token_turns, ft.LabelPolicy("all"), 512)
    trained = [t for t, lab in zip(ids.tolist(), labels.tolist()) if lab != X]
    assert tok.decode(trained) == f"Hello<|im_end|>Ciao<|im_end|>{tok.decode([EOS_ID])}"


@pytest.mark.parametrize("example,reason", [
    ({"prompt": "a"}, "missing_key"),
    ({"prompt": "a", "response": 3}, "wrong_type"),
    ({"prompt": "a", "response": "  "}, "empty"),
    ({"prompt": "a", "response": "b", "extra": 1}, "unexpected_keys"),
    (["prompt", "response"], "not_a_mapping"),
    ({"messages": [{"role": "user", "content": "x"}]}, "bad_messages"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}, "bad_messages"),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, "bad_messages"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}, "bad_messages"),
])
def test_invalid_examples_have_reasons(example, reason):
    with pytest.raises(ft.Drop) as e:
        ft.example_turns(example)
    assert e.value.reason == reason


def test_completion_is_accepted_as_response():
    assert ft.example_turns({"prompt": "p", "completion": "c"}) == [("p", "c")]


# ---- preprocessors -----------------------------------------------------------------------------------------
def test_registered_preprocessors():
    text = "Below is an instruction.\n\n### Instruction:\nAdd.\n\n### Response:\n4"
    assert ft.alpaca({"text": text, "instruction": "Add."}) == {
        "prompt": text[:-2], "response": "\n4"}
    out = ft.dolly({"instruction": "Sum", "input": "2 and 2", "output": "4"})
    assert "### Input:\n2 and 2" in out["prompt"] and out["prompt"].endswith("### Response:\n") and out["response"] == "4"
    assert ft.p3({"inputs": "q", "targets": "a"}) == {"prompt": "q", "response": "a"}
    assert ft.registered_preprocessor("/snapshots/tatsu-lab/alpaca") is ft.alpaca
    assert ft.registered_preprocessor("/hub/datasets--Muennighoff--P3/snapshots/abc") is ft.p3
    assert ft.registered_preprocessor("some/other") is None


def test_preprocessing_fn_by_import_path_and_mapping():
    fn = ft.resolve_preprocessor("dbrx.data.finetuning:p3", None, "w")
    assert fn({"inputs": "a", "targets": "b"}) == {"prompt": "a", "response": "b"}
    fn = ft.resolve_preprocessor({"prompt": "q", "response": "a"}, None, "w")
    assert fn({"q": "1", "a": "2", "other": 3}) == {"prompt": "1", "response": "2"}
    with pytest.raises(ft.FinetuningDataError, match="cannot import"):
        ft.resolve_preprocessor("no.such.module:fn", None, "train_loader.dataset.preprocessing_fn")


# ---- sources and the drop report ---------------------------------------------------------------------------
def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


BAD_JSONL = [
    json.dumps({"prompt": "def f():", "response": " return 1"}),        # 1 kept
    "{not json",                                                          # 2 not_json
    json.dumps({"prompt": "x"}),                                          # 3 missing_key
    json.dumps({"prompt": "x", "response": ["list"]}),                    # 4 wrong_type
    json.dumps({"prompt": "x", "response": ""}),                          # 5 empty
    json.dumps({"prompt": "x", "response": "word " * 200}),              # 6 too_long
    json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),  # kept
]


def test_jsonl_drop_report_counts_every_row(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", BAD_JSONL)
    logs = []
    dataset = {"hf_name": "json", "hf_kwargs": {"data_files": str(path)}, "split": "train"}
    examples = ft.prepare(dataset, tok, 64, "train_loader.dataset", log=logs.append)
    assert len(examples) == 2
    report = logs[0]
    # the chat row carries the 211-token default system prompt: it is cut from the left to fit
    assert "7 rows read, 2 kept (1 left-truncated to fit), 5 dropped" in report
    for reason, line in [("not_json", 2), ("missing_key", 3), ("wrong_type", 4), ("empty", 5), ("too_long", 6)]:
        assert f"{reason}: 1" in report and f"{path}:{line}:" in report
    with pytest.raises(ft.FinetuningDataError, match="strict is true and 5 rows were dropped"):
        ft.prepare({**dataset, "strict": True}, tok, 64, "train_loader.dataset", log=lambda _: None)


def test_empty_dataset_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", BAD_JSONL[1:6])
    with pytest.raises(ft.FinetuningDataError, match="no usable example is left"):
        ft.prepare({"hf_name": "json", "hf_kwargs": {"data_files": str(path)}}, tok, 64, "d", log=lambda _: None)


def test_unknown_dataset_key_names_the_nearest(tok):
    with pytest.raises(ft.FinetuningDataError, match="did you mean 'packing_ratio'"):
        ft.prepare({"hf_name": "json", "packing_ration": 2}, tok, 64, "train_loader.dataset", log=lambda _: None)


def test_hub_snapshot_directory_with_registered_preprocessor(tmp_path, tok):
    """A local directory laid out like the tatsu-lab/alpaca snapshot (data/train-*.parquet) is read with
    datasets.load_dataset and formatted by the registered preprocessor."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "tatsu-lab" / "alpaca"
    (root / "data").mkdir(parents=True)
    texts = [f"Below is an instruction.\n\n### Instruction:\nSay {i}\n\n### Response:\n{i}" for i in range(5)]
    pq.write_table(pa.table({"instruction": [f"Say {i}" for i in range(5)], "input": [""] * 5,
                             "output": [str(i) for i in range(5)], "text": texts}),
                   root / "data" / "train-00000-of-00001.parquet")
    examples = ft.prepare({"hf_name": str(root), "split": "train"}, tok, 64, "d", log=lambda _: None)
    assert len(examples) == 5
    trained = [t for t, lab in zip(examples[3].input_ids.tolist(), examples[3].labels.tolist()) if lab != X]
    assert tok.decode(trained) == "\n3" + tok.decode([EOS_ID])


@pytest.mark.parametrize("folder", ["prompt_response", "messages", "turns"])
def test_reads_reference_mds(tmp_path, tok, folder):
    """MDS written by MosaicML Streaming: prompt/response (zstd, as a remote holds it), messages and pre-tokenized
    turns. `remote` is a directory here; `local` is the cache it is copied and decompressed into."""
    remote = tmp_path / "remote"
    shutil.copytree(REFERENCE / folder, remote)
    logs = []
    examples = ft.prepare({"remote": str(remote), "local": str(tmp_path / "cache"), "split": "train"}, tok, 64,
                          "d", log=logs.append)
    counts = {"prompt_response": 6, "messages": 4, "turns": 3}
    assert len(examples) == counts[folder] and f"{counts[folder]} kept" in logs[0]
    if folder == "turns":
        assert examples[0].input_ids.tolist() == [100278, 882, 198, 40, 50, 100279, EOS_ID]
        assert examples[0].labels.tolist() == [X, X, X, X, 50, 100279, EOS_ID]
    if folder == "prompt_response":
        trained = [t for t, lab in zip(examples[0].input_ids.tolist(), examples[0].labels.tolist()) if lab != X]
        assert tok.decode(trained[:-1]) == "chat numéro 0"


# ---- packing ------------------------------------------------------------------------------------------------
def test_first_fit_decreasing():
    bins = ft.first_fit_decreasing([6, 5, 4, 3, 2, 1], 7)
    assert sorted(sorted(b) for b in bins) == [[0, 5], [1, 4], [2, 3]]
    assert all(sum([6, 5, 4, 3, 2, 1][i] for i in b) <= 7 for b in bins)


def random_examples(n, vocab, seed, low=3, high=12):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, r = rng.integers(1, high), rng.integers(low, high)
        ids = rng.integers(0, vocab, p + r).astype(np.int32)
        labels = ids.copy()
        labels[:p] = X
        out.append(ft.Example(ids, labels))
    return out


def test_packed_examples_score_as_if_alone():
    """Per-document attention and restarting positions: each example in a packed row gets the loss it gets
    alone, in float64."""
    cfg = dbrx_config("C")
    model = DbrxForCausalLM(cfg).double().eval()
    randomize_(model, 3)
    examples = random_examples(9, cfg.vocab_size, 0)
    rows = ft.pack_window(examples, True, 32)
    assert len(rows) < len(examples)
    batch = ft.collate(rows, 32, pad_id=0)
    with torch.no_grad():
        h, _ = model.hidden_states(batch["input_ids"], sequence_id=batch["sequence_id"])
        packed = []
        for b, row in enumerate(rows):  # each example's own loss, read out of the packed row
            pos = 0
            for ex in row:
                n = len(ex)
                packed.append((ex, chunked_cross_entropy_sum(h[b:b + 1, pos:pos + n], model.lm_head.weight,
                                                             batch["labels"][b:b + 1, pos:pos + n]).item()))
                pos += n
        for ex, loss in packed:
            ids = torch.from_numpy(ex.input_ids.astype(np.int64))[None]
            h1, _ = model.hidden_states(ids)
            alone = chunked_cross_entropy_sum(h1, model.lm_head.weight,
                                              torch.from_numpy(ex.labels.astype(np.int64))[None]).item()
            assert loss == pytest.approx(alone, rel=1e-10, abs=1e-10)
        # The whole packed batch: the sum of the alone losses (no target crosses a document boundary).
        total = chunked_cross_entropy_sum(h, model.lm_head.weight, batch["labels"]).item()
        assert total == pytest.approx(sum(loss for _, loss in packed), rel=1e-10)


def test_loader_is_deterministic_and_resumes():
    examples = random_examples(40, 100, 1)
    a = ft.FinetuningLoader(examples, batch_size=3, seq_len=32, seed=5, packing_ratio=2.5)
    batches = [a.next_batch() for _ in range(12)]  # crosses an epoch boundary
    assert a.state["epoch"] >= 1
    b = ft.FinetuningLoader(examples, batch_size=3, seq_len=32, seed=5, packing_ratio=2.5)
    for _ in range(5):
        b.next_batch()
    c = ft.FinetuningLoader(examples, batch_size=3, seq_len=32, seed=5, packing_ratio=2.5)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    for want in batches[5:]:
        got = c.next_batch()
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])
    assert 0.5 < a.packing_efficiency() <= 1.0


def test_every_example_once_per_epoch():
    examples = random_examples(23, 100, 2)
    loader = ft.FinetuningLoader(examples, batch_size=2, seq_len=40, seed=0, packing_ratio=3)
    seen = []
    while loader.state["epoch"] == 0:
        batch = loader.next_batch()
        for b in range(batch["input_ids"].shape[0]):
            for d in batch["sequence_id"][b].unique().tolist():
                if d >= 0:
                    seen.append(tuple(batch["input_ids"][b][batch["sequence_id"][b] == d].tolist()))
    # The last batch of the epoch may be topped up from the next one; the first epoch's examples all appear.
    assert {tuple(e.input_ids.tolist()) for e in examples} <= set(seen)


def test_auto_packing_ratio_fits_the_data():
    short = [10] * 200
    assert ft.auto_packing_ratio(short, 4, 100) >= 8  # ten 10-token examples fit a 100-token row
    assert ft.auto_packing_ratio([90] * 200, 4, 100) == 1.0  # nothing packs


# ---- dbrx convert finetuning ------------------------------------------------------------------------------------
@pytest.mark.parametrize("folder,compression", [("prompt_response", "zstd"), ("messages", None)])
def test_convert_finetuning_writes_what_mosaicml_streaming_writes(tmp_path, folder, compression):
    """The reference fixtures' rows, as a user's JSONL, converted: index.json and shard bytes are identical to
    those MosaicML Streaming wrote, so Streaming reads our output (and `dbrx train` reads it back)."""
    from dbrx.cli import main
    from dbrx.data.mds import MDSReader

    reference = MDSReader(tmp_path / "ref", remote=REFERENCE / folder, split="train")
    rows = [dict(sample) for sample in reference]
    write_jsonl(tmp_path / "in" / "train.jsonl", [json.dumps(r, ensure_ascii=False) for r in rows])
    argv = ["convert", "finetuning", "--dataset", "json", "--data-dir", str(tmp_path / "in"), "--splits", "train",
            "--out-root", str(tmp_path / "out")] + (["--compression", compression] if compression else [])
    assert main(argv) == 0
    for f in (REFERENCE / folder / "train").iterdir():
        assert (tmp_path / "out" / "train" / f.name).read_bytes() == f.read_bytes(), f.name
    assert main(argv) == 2  # an existing output is refused without --overwrite
    assert main(argv + ["--overwrite"]) == 0


def test_convert_finetuning_pretokenized_turns_round_trip(tmp_path, tok):
    from dbrx.cli import main

    write_jsonl(tmp_path / "in" / "train.jsonl", BAD_JSONL)
    assert main(["convert", "finetuning", "--dataset", "json", "--data-dir", str(tmp_path / "in"),
                 "--out-root", str(tmp_path / "out"), "--tokenizer", "cl100k_base", "--max-seq-len", "64"]) == 0
    from_mds = ft.prepare({"remote": str(tmp_path / "out"), "split": "train"}, tok, 64, "d", log=lambda _: None)
    from_jsonl = ft.prepare({"hf_name": "json", "hf_kwargs": {"data_dir": str(tmp_path / "in")}}, tok, 64, "d",
                            log=lambda _: None)
    assert len(from_mds) == len(from_jsonl) == 2
    for a, b in zip(from_mds, from_jsonl):
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()


def test_csv_through_datasets(tmp_path, tok):
    import csv

    with open(tmp_path / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([["prompt", "response"], ["def f():\n", "    return 1\n"], ["q", "a"]])
    examples = ft.prepare({"hf_name": "csv", "hf_kwargs": {"data_files": str(tmp_path / "train.csv")}}, tok, 64, "d",
                          log=lambda _: None)
    assert len(examples) == 2


def test_stdlib_instruction_sets(tmp_path):
    """Both tasks come from the same functions: `body` keeps the source order; `signature` asks for the
    (dedented) header after the docstring and body, decorators included. A one-line function has no body after
    its docstring and the test suite is left out; a module goes to one split whole."""
    from dbrx.data import stdlib_sft

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "box.py").write_text(
        'class Box:\n    @cached\n    def get(self, key,\n            default=None):\n        """Return the value."""\n'
        '        if key in self.data:\n            return self.data[key]\n        return default\n\n'
        '    def one_line(self): """Doc."""; return 1\n')
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_box.py").write_text('def test_get():\n    """Doc."""\n    assert True\n')
    body = stdlib_sft.build(tmp_path, val_fraction=0.0)["train"]
    assert body == [
        {"prompt": '    @cached\n    def get(self, key,\n            default=None):\n        """Return the value."""\n',
         "response": "        if key in self.data:\n            return self.data[key]\n        return default\n"}]
    splits = stdlib_sft.build(tmp_path, val_fraction=1.0, task="signature")
    assert splits["train"] == [] and splits["val"] == [{
        "prompt": f'{stdlib_sft.SIGNATURE_INSTRUCTION}\n\n    """Return the value."""\n    if key in self.data:\n'
                  '        return self.data[key]\n    return default\n\n',
        "response": "@cached\ndef get(self, key,\n        default=None):\n"}]
    stdlib_sft.write(tmp_path / "out", splits, "signature")
    import pyarrow.parquet as pq
    table = pq.read_table(tmp_path / "out" / "hub" / "stdlib-functions" / "data" / "validation-00000-of-00001.parquet")
    assert table.column_names == ["docstring_and_body", "signature"]
    with pytest.raises(ValueError, match="unknown task 'name'"):
        stdlib_sft.build(tmp_path, task="name")
