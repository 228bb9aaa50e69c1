"""MDS datasets: reading MosaicML Streaming 0.13's own output (tests/data/mds_reference, written by its MDSWriter)
and writing files byte-identical to it."""

from __future__ import annotations

import copy
import json
import shutil
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from dbrx.data.mds import MDSError, MDSReader, MDSWriter

FIXTURES = Path(__file__).parent / "data" / "mds_reference"
NAMES = ["tokens", "prompt_response", "messages", "turns"]


def open_fixture(name: str, cache: Path) -> MDSReader:
    """prompt_response holds only its compressed shard, as a remote store would: read it through a cache."""
    if name == "prompt_response":
        return MDSReader(cache, remote=FIXTURES / name, split="train")
    return MDSReader(FIXTURES / name, split="train")


# ---- reading the reference's files ------------------------------------------------------------------------------
def test_tokens():
    r = MDSReader(FIXTURES / "tokens", split="train")
    assert len(r) == r.num_samples == 8
    assert r.samples_per_shard == [5, 3]
    assert r.columns == {"tokens": "ndarray:int32"}
    for i, sample in enumerate(r):
        assert sample["tokens"].dtype == np.int32 and sample["tokens"].shape == (16,)
        np.testing.assert_array_equal(sample["tokens"], 1000 * i + np.arange(16))
    assert [r.shard_of(i) for i in (0, 4, 5, 7, -1)] == [(0, 0), (0, 4), (1, 0), (1, 2), (1, 2)]
    r[0]["tokens"][0] = 5  # decoded arrays are writable copies, not views of the memory map
    assert r[0]["tokens"][0] == 0
    with pytest.raises(IndexError):
        r[8]


def test_prompt_response_is_decompressed_into_the_cache(tmp_path):
    r = MDSReader(tmp_path / "cache", remote=FIXTURES / "prompt_response", split="train")
    assert len(r) == 6 and r.samples_per_shard == [6]
    for i, sample in enumerate(r):
        assert sample == {"prompt": f"Translate to French: cat number {i}\n", "response": f"chat numéro {i}"}
    assert sorted(p.name for p in (tmp_path / "cache" / "train").iterdir()) == ["index.json", "shard.00000.mds"]
    assert (tmp_path / "cache" / "train" / "shard.00000.mds").stat().st_size == 566  # raw_data.bytes
    assert MDSReader(tmp_path / "cache", split="train")[5]["response"] == "chat numéro 5"  # the cache alone


def test_compressed_shard_in_local_dir_is_decompressed_in_place(tmp_path):
    shutil.copytree(FIXTURES / "prompt_response", tmp_path / "pr")
    r = MDSReader(tmp_path / "pr", split="train")
    assert r[0]["prompt"] == "Translate to French: cat number 0\n"
    assert (tmp_path / "pr" / "train" / "shard.00000.mds.zstd").exists()  # a local original is not deleted


def test_fsspec_remote(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for f in (FIXTURES / "prompt_response" / "train").iterdir():
        fs.pipe(f"/mds_test/pr/train/{f.name}", f.read_bytes())
    try:
        r = MDSReader(tmp_path, remote="memory://mds_test/pr", split="train")
        assert [s["response"] for s in r] == [f"chat numéro {i}" for i in range(6)]
    finally:
        fs.rm("/mds_test", recursive=True)


def test_messages():
    r = MDSReader(FIXTURES / "messages", split="train")
    assert [s["messages"] for s in r] == [
        [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i}"}] for i in range(4)
    ]


def test_turns():
    r = MDSReader(FIXTURES / "turns", split="train")
    assert [s["turns"] for s in r] == [
        [{"input_ids": [100278, 882, 198, 40 + i], "labels": [50 + i, 100279]}] for i in range(3)
    ]


def test_reader_survives_copy_for_dataloader_workers():
    r = MDSReader(FIXTURES / "tokens", split="train")
    r[6]  # maps shard 1
    clone = copy.deepcopy(r)  # what pickling to a worker does: memory maps are dropped and re-made there
    np.testing.assert_array_equal(clone[6]["tokens"], r[6]["tokens"])
    r.close()
    np.testing.assert_array_equal(r[7]["tokens"], 7000 + np.arange(16))  # re-maps after close


# ---- writing byte-identical files -------------------------------------------------------------------------------
def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


@pytest.mark.parametrize("name", NAMES)
def test_rewrite_is_byte_identical(name, tmp_path):
    reference = FIXTURES / name / "train"
    shard = json.loads((reference / "index.json").read_text())["shards"][0]
    columns = dict(zip(shard["column_names"], shard["column_encodings"]))
    with MDSWriter(tmp_path / "out", columns, compression=shard["compression"],
                   size_limit=shard["size_limit"]) as writer:
        for sample in open_fixture(name, tmp_path / "cache"):
            writer.write(sample)
    assert files(tmp_path / "out") == files(reference)


def big_sample(i: int, rng: np.random.Generator) -> dict:
    return {
        "tokens": rng.integers(0, 100_352, int(rng.integers(1, 300)), dtype=np.int64).astype(np.int32),
        "window": np.full(8, i, np.uint16),
        "grid": rng.standard_normal((2, int(rng.integers(1, 4)))).astype(np.float32),
        "text": f"document {i} " + "é" * int(rng.integers(0, 50)),
        "blob": bytes(range(i % 256)),
        "id": i * 10**12,
        "tiny": -i % 128, "big": 2**64 - 1 - i, "half": 0.5, "f32": i / 3, "f64": i / 7,
        "meta": {"i": i, "tags": ["a", "ü"]},
        "exact": Decimal(i) / 8, "wide": 10**30 + i, "ratio": i / 9,
    }


BIG_COLUMNS = {
    "tokens": "ndarray:int32", "window": "ndarray:uint16:8", "grid": "ndarray", "text": "str", "blob": "bytes",
    "id": "int", "tiny": "int8", "big": "uint64", "half": "float16", "f32": "float32", "f64": "float64",
    "meta": "json", "exact": "str_decimal", "wide": "str_int", "ratio": "str_float",
}


def test_large_round_trip_with_zstd_and_several_shards(tmp_path):
    rng = np.random.default_rng(0)
    samples = [big_sample(i, rng) for i in range(700)]
    with MDSWriter(tmp_path / "remote", BIG_COLUMNS, compression="zstd:7", size_limit=40_000) as writer:
        for sample in samples:
            writer.write(sample)
    index = json.loads((tmp_path / "remote" / "index.json").read_text())
    assert len(index["shards"]) > 5
    assert all(s["raw_data"]["bytes"] <= 40_000 and s["compression"] == "zstd:7" for s in index["shards"])
    assert sorted(p.name for p in (tmp_path / "remote").iterdir()) == sorted(
        ["index.json"] + [s["zip_data"]["basename"] for s in index["shards"]])  # no temporary files left behind

    r = MDSReader(tmp_path / "local", remote=tmp_path / "remote")
    assert len(r) == 700 and sum(r.samples_per_shard) == 700 and len(r.samples_per_shard) == len(index["shards"])
    for want, got in zip(samples, r):
        assert got.keys() == want.keys()
        for key in want:
            if isinstance(want[key], np.ndarray):
                assert got[key].dtype == want[key].dtype
                np.testing.assert_array_equal(got[key], want[key])
            elif key in ("half", "f32"):
                assert got[key] == np.array(want[key], BIG_COLUMNS[key])
            else:
                assert got[key] == want[key]
    assert isinstance(r[0]["id"], int) and r[0]["tiny"].dtype == np.int8

    # Writing what was read gives the same bytes again.
    with MDSWriter(tmp_path / "again", BIG_COLUMNS, compression="zstd:7", size_limit=40_000) as writer:
        for sample in r:
            writer.write(sample)
    assert files(tmp_path / "again") == files(tmp_path / "remote")


@pytest.mark.parametrize("compression", ["gz:5", "bz2"])
def test_other_compressions(compression, tmp_path):
    with MDSWriter(tmp_path / "remote", {"text": "str"}, compression=compression, size_limit=200) as writer:
        for i in range(40):
            writer.write({"text": f"line {i}"})
    r = MDSReader(tmp_path / "local", remote=tmp_path / "remote")
    assert [s["text"] for s in r] == [f"line {i}" for i in range(40)] and len(r.samples_per_shard) > 1


def test_oversized_first_sample_leaves_an_empty_first_shard_like_the_reference(tmp_path):
    with MDSWriter(tmp_path, {"text": "str"}, size_limit=300) as writer:
        writer.write({"text": "x" * 400})
        writer.write({"text": "y"})
    r = MDSReader(tmp_path)
    assert r.samples_per_shard == [0, 1, 1]
    assert [s["text"] for s in r] == ["x" * 400, "y"] and r.shard_of(0) == (1, 0)


def test_no_limit_and_no_samples(tmp_path):
    with MDSWriter(tmp_path / "one", {"n": "int"}, size_limit=None) as writer:
        for i in range(1000):
            writer.write({"n": i})
    assert MDSReader(tmp_path / "one").samples_per_shard == [1000]
    with MDSWriter(tmp_path / "none", {"n": "int"}):
        pass
    assert len(MDSReader(tmp_path / "none")) == 0


def test_failed_write_leaves_no_index(tmp_path):
    with pytest.raises(RuntimeError):
        with MDSWriter(tmp_path, {"text": "str"}, size_limit=100) as writer:
            for i in range(20):
                writer.write({"text": f"sample {i}"})
            raise RuntimeError("conversion crashed")
    assert not (tmp_path / "index.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partly written files


# ---- errors -------------------------------------------------------------------------------------------------------
def test_missing_index_names_the_path(tmp_path):
    with pytest.raises(MDSError, match=str(tmp_path / "train" / "index.json")):
        MDSReader(tmp_path, split="train")
    with pytest.raises(MDSError, match="index.json does not exist"):
        MDSReader(tmp_path / "cache", remote=tmp_path / "nowhere")


def test_pickle_is_refused(tmp_path):
    index = json.loads((FIXTURES / "turns" / "train" / "index.json").read_text())
    index["shards"][0]["column_encodings"] = ["pkl"]
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(MDSError, match=r"'turns'.*pickle.*arbitrary code"):
        MDSReader(tmp_path)
    with pytest.raises(MDSError, match=r"'obj'.*pickle.*arbitrary code"):
        MDSWriter(tmp_path / "out", {"obj": "pkl"})


def test_unknown_encoding_is_refused(tmp_path):
    with pytest.raises(MDSError, match=r"'x'.*unknown MDS encoding 'complex128'"):
        MDSWriter(tmp_path, {"x": "complex128"})
    with pytest.raises(MDSError, match=r"'x'.*'ndarray:bool'"):
        MDSWriter(tmp_path, {"x": "ndarray:bool"})


def test_truncated_shard_is_named(tmp_path):
    shutil.copytree(FIXTURES / "tokens", tmp_path / "tokens")
    shard = tmp_path / "tokens" / "train" / "shard.00001.mds"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(MDSError, match=r"shard\.00001\.mds is 396 bytes but index.json says 406: truncated"):
        MDSReader(tmp_path / "tokens", split="train")


def test_truncated_compressed_shard_is_named(tmp_path):
    shutil.copytree(FIXTURES / "prompt_response", tmp_path / "remote")
    shard = tmp_path / "remote" / "train" / "shard.00000.mds.zstd"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(MDSError, match=r"shard\.00000\.mds\.zstd is 100 bytes .* truncated"):
        MDSReader(tmp_path / "cache", remote=tmp_path / "remote", split="train")


@pytest.mark.parametrize("column, encoding, value, expected", [
    ("tokens", "ndarray:int32", [1, 2, 3], "expects a numpy array of dtype int32, got list"),
    ("tokens", "ndarray:int32", np.arange(3), "expects a numpy array of dtype int32, got dtype int64"),
    ("window", "ndarray:int32:4", np.arange(3, dtype=np.int32), r"expects shape \(4,\), got \(3,\)"),
    ("prompt", "str", b"raw bytes", "expects str, got bytes"),
    ("n", "int", "7", "expects an integer"),
    ("n", "uint8", 256, r"outside \[0, 255\]"),
    ("x", "float32", "1.0", "expects a number"),
    ("meta", "json", {1, 2}, "expects a JSON-serialisable value"),
])
def test_write_type_mismatch_names_column_and_type(column, encoding, value, expected, tmp_path):
    with MDSWriter(tmp_path, {column: encoding}) as writer:
        with pytest.raises(MDSError, match=rf"column '{column}'.*{expected}"):
            writer.write({column: value})


def test_write_missing_column_and_nonempty_dir(tmp_path):
    with MDSWriter(tmp_path / "a", {"prompt": "str", "response": "str"}) as writer:
        with pytest.raises(MDSError, match="no column 'response'"):
            writer.write({"prompt": "hi"})
    with pytest.raises(MDSError, match="not an empty directory"):
        MDSWriter(tmp_path / "a", {"prompt": "str"})
    with pytest.raises(MDSError, match="unsupported compression 'lz4'"):
        MDSWriter(tmp_path / "b", {"prompt": "str"}, compression="lz4")


def test_shard_names_cannot_escape_the_dataset(tmp_path):
    index = json.loads((FIXTURES / "turns" / "train" / "index.json").read_text())
    index["shards"][0]["raw_data"]["basename"] = "../../elsewhere.mds"
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "index.json").write_text(json.dumps(index))
    with pytest.raises(MDSError, match="outside the dataset directory"):
        MDSReader(tmp_path / "cache", remote=tmp_path / "remote")
