"""`dbrx convert text`: documents -> windows of N tokens joined by <|endoftext|> -> MDS, with a held-out split
by document."""

import json

import numpy as np
import pytest

from dbrx import cli
from dbrx.data.mds import MDSReader
from dbrx.data.text import convert_text, is_validation
from dbrx.tokenizer import Tokenizer


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    for i in range(30):
        (src / "pkg" / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * (5 + i % 7))
    (src / "notes.md").write_text("# Notes\n" + "words " * 200)
    (src / "skip.bin").write_bytes(b"\x00\x01")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join([json.dumps({"text": "alpha beta " * 40}), "not json",
                                json.dumps({"no_text": 1}), json.dumps({"text": "gamma " * 50})]) + "\n")
    return src, jsonl


def test_windows_are_documents_joined_by_eos(tmp_path, corpus):
    src, jsonl = corpus
    stats = convert_text([str(src), str(jsonl)], tmp_path / "out", 64, progress=False, workers=2)
    assert stats.documents["train"] == 33 and len(stats.skipped) == 2
    assert any("docs.jsonl:2" in s for s in stats.skipped) and any("docs.jsonl:3" in s for s in stats.skipped)
    reader = MDSReader(tmp_path / "out", split="train")
    assert reader.columns == {"tokens": "ndarray:int32"}
    windows = [reader[i]["tokens"] for i in range(len(reader))]
    assert all(w.dtype == np.int32 and len(w) == 64 for w in windows)
    stream = np.concatenate(windows).tolist()
    tok = Tokenizer()
    first = tok.encode((src / "notes.md").read_text()) + [tok.eos_token_id]
    assert stream[: len(first)] == first  # files in sorted order, each followed by <|endoftext|>
    assert stream.count(tok.eos_token_id) >= 30
    assert len(windows) == stats.windows["train"] == stats.tokens["train"] // 64


def test_validation_split_is_by_document(tmp_path, corpus):
    src, _ = corpus
    stats = convert_text([str(src)], tmp_path / "out", 32, val_fraction=0.3, seed=1, progress=False)
    assert stats.documents["val"] > 0 and stats.documents["train"] > stats.documents["val"]
    files = sorted(p for p in src.rglob("*") if p.suffix in (".py", ".md"))
    assert sum(is_validation(str(p), 0.3, 1) for p in files) == stats.documents["val"]
    assert len(MDSReader(tmp_path / "out", split="val")) == stats.windows["val"]


def test_existing_output_needs_overwrite_and_compression_works(tmp_path, corpus, capsys):
    src, _ = corpus
    out = tmp_path / "out"
    argv = ["convert", "text", str(src), "--out", str(out), "--concat-tokens", "32", "--compression", "zstd"]
    assert cli.main(argv) == 0
    assert list((out / "train").glob("*.mds.zstd"))
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite"]) == 0
    assert len(MDSReader(tmp_path / "cache", remote=out, split="train")) > 0
    assert cli.main(["convert", "text", str(tmp_path / "missing"), "--out", str(tmp_path / "o2"),
                     "--concat-tokens", "32"]) == 2
