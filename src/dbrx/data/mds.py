"""MosaicML Streaming's MDS datasets (format version 2), read and written byte for byte as `streaming.MDSWriter`
0.13 writes them, without that library (it pins transformers < 5 and imports torchvision).

A dataset directory (``<root>/<split>/`` when there are splits) holds

    index.json                {"version": 2, "shards": [entry, ...]}, keys sorted, no trailing newline
    shard.00000.mds           a raw shard, or only shard.00000.mds.zstd (.gz, .bz2) when compressed

and a raw shard is, with every integer a little-endian uint32,

    count | offsets[count + 1] | config JSON | sample 0 | sample 1 | ...

where offsets are absolute positions of each sample and of the end of the file, the config JSON is the index
entry without samples/raw_data/zip_data, and a sample is the sizes of its variable-size columns followed by
every column's payload, both in sorted column-name order.

The `pkl` encoding (Python pickle) is refused everywhere: unpickling a file runs whatever code it names.
"""

from __future__ import annotations

import bisect
import bz2
import contextlib
import gzip
import itertools
import json
import mmap
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
import zstandard

from dbrx.fileio import atomic_path

__all__ = ["MDSError", "MDSReader", "MDSWriter", "ENCODINGS", "COMPRESSIONS"]

INDEX = "index.json"
FORMAT_VERSION = 2


class MDSError(ValueError):
    """A dataset that cannot be read or written as asked; the message names the file or the column."""


# ---- encodings ------------------------------------------------------------------------------------------------
# NDArray value dtypes and their one-byte codes (the code is only stored when the column leaves the dtype open).
_DTYPE_CODES = {
    "uint8": 8, "int8": 9, "uint16": 16, "int16": 17, "float16": 18, "uint32": 32, "int32": 33, "float32": 34,
    "uint64": 64, "int64": 65, "float64": 66,
}
_CODE_DTYPES = {code: name for name, code in _DTYPE_CODES.items()}
_SCALARS = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32", "float64")
_IMAGES = ("pil", "jpeg", "png", "jpeg_array", "jpegarray", "list[pil]", "list[jpeg]", "list[png]")
ENCODINGS = ("bytes", "str", "int", *_SCALARS, "str_int", "str_float", "str_decimal", "json",
             "ndarray[:dtype[:d0,d1,...]]")


def _expects(column: str, encoding: str, expected: str, value: Any) -> MDSError:
    return MDSError(f"column {column!r} (encoding {encoding!r}) expects {expected}, got {type(value).__name__}")


class _Encoding:
    """How one column's values become bytes and back. `size` is the payload size when it is fixed."""

    name: str
    size: int | None = None

    def encode(self, value: Any, column: str) -> bytes:
        raise NotImplementedError

    def decode(self, buf: memoryview) -> Any:
        raise NotImplementedError


class _Bytes(_Encoding):
    name = "bytes"

    def encode(self, value: Any, column: str) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise _expects(column, self.name, "bytes", value)
        return bytes(value)

    def decode(self, buf: memoryview) -> bytes:
        return bytes(buf)


class _Str(_Encoding):
    name = "str"

    def encode(self, value: Any, column: str) -> bytes:
        if not isinstance(value, str):
            raise _expects(column, self.name, "str", value)
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates, e.g. from a mis-decoded file
            raise MDSError(f"column {column!r}: the text is not encodable as UTF-8 ({e})") from None

    def decode(self, buf: memoryview) -> str:
        return str(buf, "utf-8")


class _Scalar(_Encoding):
    """A fixed-size number. `int` is int64 decoded to a Python int; the others decode to NumPy scalars, as the
    reference library returns them, so a float32 column keeps its precision."""

    def __init__(self, name: str, dtype: str, as_python_int: bool = False) -> None:
        self.name, self.as_python_int = name, as_python_int
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.size = self.dtype.itemsize

    def encode(self, value: Any, column: str) -> bytes:
        is_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        if self.dtype.kind in "iu":
            if not is_int:
                raise _expects(column, self.name, f"an integer ({self.dtype.name})", value)
            info = np.iinfo(self.dtype)
            if not info.min <= int(value) <= info.max:
                raise MDSError(f"column {column!r} (encoding {self.name!r}): {value} is outside "
                               f"[{info.min}, {info.max}]")
        elif not (is_int or isinstance(value, (float, np.floating))):
            raise _expects(column, self.name, f"a number ({self.dtype.name})", value)
        return np.array(value, self.dtype).tobytes()

    def decode(self, buf: memoryview) -> Any:
        value = np.frombuffer(buf, self.dtype, 1)[0]
        return int(value) if self.as_python_int else value


class _StrNumber(_Encoding):
    """Numbers stored as their decimal text, for arbitrary precision."""

    def __init__(self, name: str, kind: type) -> None:
        self.name, self.kind = name, kind

    def encode(self, value: Any, column: str) -> bytes:
        if not isinstance(value, self.kind) or isinstance(value, bool):
            raise _expects(column, self.name, self.kind.__name__, value)
        return str(value).encode("utf-8")

    def decode(self, buf: memoryview) -> Any:
        text = str(buf, "utf-8")
        try:
            return self.kind(text)
        except (ValueError, InvalidOperation):
            raise MDSError(f"{self.name} payload {text!r} is not a {self.kind.__name__}") from None


class _JSON(_Encoding):
    name = "json"

    def encode(self, value: Any, column: str) -> bytes:
        if isinstance(value, np.ndarray):  # as the reference does, so arrays round-trip as lists
            value = value.tolist()
        try:
            # Default separators and ensure_ascii: the bytes must be those of the reference's json.dumps(obj).
            return json.dumps(value).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise MDSError(f"column {column!r} (encoding 'json') expects a JSON-serialisable value: {e}") from None

    def decode(self, buf: memoryview) -> Any:
        return json.loads(str(buf, "utf-8"))


class _NDArray(_Encoding):
    """`ndarray`, `ndarray:<dtype>` or `ndarray:<dtype>:<d0,d1,...>`. Whatever the column name leaves open is
    stored in each payload: a dtype code byte, then one byte (ndim << 2 | shape width code) and the shape as
    the narrowest unsigned ints that hold it, then the values in C order."""

    def __init__(self, name: str, dtype: str | None, shape: tuple[int, ...] | None) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape
        if dtype is not None and shape is not None:
            self.size = int(np.prod(shape)) * np.dtype(dtype).itemsize

    @classmethod
    def parse(cls, name: str, column: str) -> _NDArray:
        args = name.split(":")[1:]
        if len(args) > 2 or (args and args[0] not in _DTYPE_CODES):
            raise MDSError(f"column {column!r}: encoding {name!r} is not ndarray[:dtype[:shape]] with dtype one "
                           f"of {sorted(_DTYPE_CODES)}")
        shape = None
        if len(args) == 2:
            try:
                shape = tuple(int(d) for d in args[1].split(","))
            except ValueError:
                shape = ()
            if not shape or min(shape) < 1:
                raise MDSError(f"column {column!r}: encoding {name!r} needs a shape of positive ints like 2,3")
        return cls(name, args[0] if args else None, shape)

    def encode(self, value: Any, column: str) -> bytes:
        if not isinstance(value, np.ndarray):
            want = f"a numpy array of dtype {self.dtype}" if self.dtype else "a numpy array"
            raise _expects(column, self.name, want, value)
        dtype = value.dtype.name
        if self.dtype is not None and dtype != self.dtype:
            raise MDSError(f"column {column!r} (encoding {self.name!r}) expects a numpy array of dtype "
                           f"{self.dtype}, got dtype {dtype}")
        if dtype not in _DTYPE_CODES:
            raise MDSError(f"column {column!r}: numpy dtype {dtype} has no MDS code (use one of "
                           f"{sorted(_DTYPE_CODES)})")
        if value.size == 0 or value.ndim == 0:  # the reference refuses both: a reader could not tell them apart
            raise MDSError(f"column {column!r}: cannot store an empty or 0-d array (shape {value.shape})")
        parts = []
        if self.dtype is None:
            parts.append(bytes([_DTYPE_CODES[dtype]]))
        if self.shape is None:
            if value.ndim > 63:
                raise MDSError(f"column {column!r}: an array has at most 63 axes, got {value.ndim}")
            width = next(w for w in range(4) if max(value.shape) < 1 << (8 << w))
            parts.append(bytes([value.ndim << 2 | width]))
            parts.append(np.array(value.shape, f"<u{1 << width}").tobytes())
        elif value.shape != self.shape:
            raise MDSError(f"column {column!r} (encoding {self.name!r}) expects shape {self.shape}, "
                           f"got {value.shape}")
        parts.append(value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes())
        return b"".join(parts)

    def decode(self, buf: memoryview) -> np.ndarray:
        pos = 0
        dtype = self.dtype
        if dtype is None:
            dtype = _CODE_DTYPES.get(buf[0])
            if dtype is None:
                raise MDSError(f"unknown ndarray dtype code {buf[0]}")
            pos = 1
        shape = self.shape
        if shape is None:
            ndim, width = buf[pos] >> 2, 1 << (buf[pos] & 3)
            shape = tuple(int(d) for d in np.frombuffer(buf, f"<u{width}", ndim, pos + 1))
            pos += 1 + ndim * width
        values = np.frombuffer(buf, np.dtype(dtype).newbyteorder("<"), offset=pos)
        # A copy in native order: the buffer is the shard's memory map (which must stay closable), and callers
        # (torch.from_numpy, in-place ops) want a writable array.
        return values.astype(dtype).reshape(shape)


def parse_encoding(name: str, column: str) -> _Encoding:
    """The coder for an encoding name as index.json spells it; refuses pickle and image encodings."""
    if not isinstance(name, str):
        raise MDSError(f"column {column!r}: encoding must be a string, got {name!r}")
    if name == "pkl":
        raise MDSError(f"column {column!r} uses the 'pkl' encoding (Python pickle), which dbrx refuses to read "
                       "or write: unpickling data runs arbitrary code. Re-write the column as json, str, bytes "
                       "or ndarray.")
    if name in _IMAGES:
        raise MDSError(f"column {column!r}: image encoding {name!r} is not supported by dbrx (text models only)")
    if name == "ndarray" or name.startswith("ndarray:"):
        return _NDArray.parse(name, column)
    if name == "bytes":
        return _Bytes()
    if name == "str":
        return _Str()
    if name == "json":
        return _JSON()
    if name == "int":
        return _Scalar("int", "int64", as_python_int=True)
    if name in _SCALARS:
        return _Scalar(name, name)
    kinds = {"str_int": int, "str_float": float, "str_decimal": Decimal}
    if name in kinds:
        return _StrNumber(name, kinds[name])
    raise MDSError(f"column {column!r}: unknown MDS encoding {name!r} (known: {', '.join(ENCODINGS)})")


# ---- compression ----------------------------------------------------------------------------------------------
# Name (also the file extension) -> (allowed levels, default level), as the reference accepts "name" or
# "name:level". Brotli and snappy are refused: their packages are not dependencies of dbrx.
COMPRESSIONS = {"zstd": (range(1, 23), 3), "gz": (range(0, 10), 9), "bz2": (range(1, 10), 9)}


def _parse_compression(spec: str) -> tuple[str, int]:
    name, _, level = spec.partition(":")
    if name not in COMPRESSIONS:
        raise MDSError(f"unsupported compression {spec!r}: use one of {sorted(COMPRESSIONS)}, optionally "
                       "with a level as in 'zstd:7'")
    levels, default = COMPRESSIONS[name]
    if not level:
        return name, default
    if not level.isdigit() or int(level) not in levels:
        raise MDSError(f"compression {spec!r}: {name} levels are {levels.start}..{levels.stop - 1}")
    return name, int(level)


def _compress(spec: str, data: bytes) -> bytes:
    name, level = _parse_compression(spec)
    if name == "zstd":
        # The reference calls libzstd with nbWorkers = its core count. libzstd's output is the same for every
        # nbWorkers >= 1 but differs from single-threaded output once a shard exceeds one job (~8 MB at level
        # 3), so threads must be on to stay byte-identical. threads=-1: one per core.
        return zstandard.ZstdCompressor(level=level, threads=-1).compress(data)
    if name == "gz":
        # mtime=0 keeps our output reproducible; the reference stamps the current time, so gz shards can never
        # be byte-identical to it anyway.
        return gzip.compress(data, level, mtime=0)
    return bz2.compress(data, level)


def _decompress_file(spec: str, src: IO[bytes], dst: IO[bytes]) -> None:
    name, _ = _parse_compression(spec)
    if name == "zstd":
        zstandard.ZstdDecompressor().copy_stream(src, dst)
    elif name == "gz":
        with gzip.GzipFile(fileobj=src) as f:
            shutil.copyfileobj(f, dst, 1 << 20)
    else:
        with bz2.BZ2File(src) as f:
            shutil.copyfileobj(f, dst, 1 << 20)


# ---- files ----------------------------------------------------------------------------------------------------
def _write_atomic(path: Path, fill: Callable[[IO[bytes]], object]) -> None:
    """Readers never see a partly written file: `fill` writes to a temporary name that is renamed at the end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            fill(f)
        os.chmod(tmp, 0o644)  # mkstemp made it owner-only; datasets are usually shared


def _is_url(location: str | Path) -> bool:
    return isinstance(location, str) and "://" in location


@contextlib.contextmanager
def _open_remote(remote: str | Path, relpath: str) -> Iterator[IO[bytes]]:
    """Open `relpath` under `remote`: a local directory, or any fsspec URL (s3://, gs://, memory://, ...)."""
    url = _is_url(remote)
    location = f"{str(remote).rstrip('/')}/{relpath}" if url else str(Path(remote) / relpath)
    try:
        if url:
            try:
                import fsspec
            except ImportError:
                raise MDSError(f"reading {remote} needs fsspec (and the plugin for its scheme)") from None
            fs, path = fsspec.core.url_to_fs(location)
            f = fs.open(path, "rb")
        else:
            f = open(location, "rb")
    except FileNotFoundError:
        raise MDSError(f"{location} does not exist") from None
    with f:
        yield f


# ---- writing --------------------------------------------------------------------------------------------------
class MDSWriter:
    """Write samples as an MDS dataset that MosaicML Streaming reads, byte-identical to its MDSWriter for the same
    samples, columns, compression and size_limit.

    >>> with MDSWriter("out/train", {"tokens": "ndarray:int32"}, compression="zstd") as w:
    ...     w.write({"tokens": np.arange(2048, dtype=np.int32)})

    Shards are cut where the reference cuts them: before a sample that would push the shard past `size_limit`
    bytes (header, offsets and config included). `size_limit=None` (or 0) keeps everything in one shard. Leaving
    the `with` block on an exception writes no index.json, so a failed conversion never looks complete.
    """

    format = "mds"

    def __init__(self, out_dir: str | Path, columns: dict[str, str], compression: str | None = None,
                 size_limit: int | None = 1 << 26) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and (not self.out_dir.is_dir() or any(self.out_dir.iterdir())):
            raise MDSError(f"{self.out_dir} exists and is not an empty directory; MDSWriter will not mix its shards "
                           "with other files")
        if not columns:
            raise MDSError("MDSWriter needs at least one column")
        self.column_names = sorted(columns)  # the format fixes column order as sorted names
        self._encodings = [parse_encoding(columns[name], name) for name in self.column_names]
        self.compression = compression or None
        if self.compression is not None:
            _parse_compression(self.compression)
        if size_limit is not None and not 0 <= size_limit < 1 << 32:
            raise MDSError(f"size_limit must be in [0, 2**32) since offsets are uint32, got {size_limit}")
        self.size_limit = size_limit or None
        self.out_dir.mkdir(parents=True, exist_ok=True)

        self._config = {
            "version": FORMAT_VERSION, "format": self.format, "compression": self.compression, "hashes": [],
            "size_limit": self.size_limit, "column_names": self.column_names,
            "column_encodings": [columns[name] for name in self.column_names],
            "column_sizes": [e.size for e in self._encodings],
        }
        self._config_bytes = json.dumps(self._config, sort_keys=True).encode("utf-8")
        self._shard_overhead = 4 + 4 + len(self._config_bytes)  # count, offsets[0], config
        self._shards: list[dict[str, Any]] = []
        self._samples: list[bytes] = []
        self._shard_bytes = self._shard_overhead
        self._finished = False

    def encode(self, sample: dict[str, Any]) -> bytes:
        """One sample's bytes: the uint32 sizes of its variable-size columns, then every column's payload."""
        sizes: list[int] = []
        payloads: list[bytes] = []
        for name, encoding in zip(self.column_names, self._encodings):
            if name not in sample:
                raise MDSError(f"sample has no column {name!r} (columns: {', '.join(self.column_names)})")
            payload = encoding.encode(sample[name], name)
            if encoding.size is None:
                if len(payload) >= 1 << 32:
                    raise MDSError(f"column {name!r}: a payload of {len(payload)} bytes does not fit a uint32 size")
                sizes.append(len(payload))
            payloads.append(payload)
        return struct.pack(f"<{len(sizes)}I", *sizes) + b"".join(payloads)

    def write(self, sample: dict[str, Any]) -> None:
        """Add one sample (a dict with every column; other keys are ignored)."""
        if self._finished:
            raise MDSError(f"MDSWriter for {self.out_dir} is already finished")
        data = self.encode(sample)
        cost = len(data) + 4  # each sample also adds one uint32 offset
        # No check that the shard holds anything: when the very first sample alone exceeds the limit, the
        # reference writes an empty shard.00000 before it, and so do we, to stay byte-identical.
        if self.size_limit is not None and self.size_limit < self._shard_bytes + cost:
            self._flush()
        self._samples.append(data)
        self._shard_bytes += cost

    def _flush(self) -> None:
        count = len(self._samples)
        header = 4 + 4 * (count + 1) + len(self._config_bytes)
        offsets = header + np.cumsum([0] + [len(s) for s in self._samples], dtype=np.int64)
        if offsets[-1] >= 1 << 32:
            raise MDSError(f"shard {len(self._shards)} would be {offsets[-1]} bytes; uint32 offsets stop at 4 GiB "
                           "(set a size_limit)")
        chunks = [struct.pack("<I", count), offsets.astype("<u4").tobytes(), self._config_bytes, *self._samples]
        raw_name = f"shard.{len(self._shards):05}.{self.format}"
        raw_info = {"basename": raw_name, "bytes": int(offsets[-1]), "hashes": {}}
        zip_info = None
        if self.compression is None:
            _write_atomic(self.out_dir / raw_name, lambda f: f.writelines(chunks))
        else:
            # Only the compressed file is written, as the reference does; the index still records the raw size.
            zip_name = f"{raw_name}.{_parse_compression(self.compression)[0]}"
            packed = _compress(self.compression, b"".join(chunks))
            _write_atomic(self.out_dir / zip_name, lambda f: f.write(packed))
            zip_info = {"basename": zip_name, "bytes": len(packed), "hashes": {}}
        self._shards.append({**self._config, "samples": count, "raw_data": raw_info, "zip_data": zip_info})
        self._samples = []
        self._shard_bytes = self._shard_overhead

    def finish(self) -> None:
        """Write the last shard, then index.json (last, so its presence means the dataset is complete)."""
        if self._finished:
            return
        if self._samples:
            self._flush()
        index = json.dumps({"version": FORMAT_VERSION, "shards": self._shards}, sort_keys=True)
        _write_atomic(self.out_dir / INDEX, lambda f: f.write(index.encode("utf-8")))
        self._finished = True

    def __enter__(self) -> MDSWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finish()


# ---- reading --------------------------------------------------------------------------------------------------
@dataclass
class _Shard:
    path: Path  # the raw (decompressed) shard in the local directory
    samples: int
    nbytes: int
    names: list[str]
    encodings: list[_Encoding]
    sizes: list[int | None]
    variable: int  # how many columns carry a size prefix
    zip_data: dict[str, Any] | None
    compression: str | None


class MDSReader:
    """Random access to the samples of an MDS dataset, decoded lazily from memory-mapped shards.

    `local` is the directory read from. With `remote` (a directory or an fsspec URL), index.json and the
    shards are first copied from it into `local`, compressed shards being decompressed there; shards already
    present at their recorded size are kept, so `local` works as a cache. With `split`, both are
    `<dir>/<split>`. Several processes may prepare the same `local` at once: every file appears by rename.
    """

    def __init__(self, local: str | Path, remote: str | Path | None = None, split: str | None = None) -> None:
        self.local = Path(local) / split if split else Path(local)
        if remote is not None and split:
            remote = f"{str(remote).rstrip('/')}/{split}" if _is_url(remote) else Path(remote) / split
        if remote is not None and not _is_url(remote) and Path(remote).resolve() == self.local.resolve():
            remote = None  # reading in place
        self.remote = remote

        if remote is not None:
            self.local.mkdir(parents=True, exist_ok=True)
            with _open_remote(remote, INDEX) as src:
                _write_atomic(self.local / INDEX, lambda f: shutil.copyfileobj(src, f))
        index_path = self.local / INDEX
        if not index_path.is_file():
            raise MDSError(f"no MDS index at {index_path}" + ("" if remote is None else f" (remote {remote})"))
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MDSError(f"{index_path} is not valid JSON: {e}") from None
        if not isinstance(index, dict) or index.get("version") != FORMAT_VERSION:
            raise MDSError(f"{index_path}: only MDS index version {FORMAT_VERSION} is supported, got "
                           f"{index.get('version') if isinstance(index, dict) else index!r}")

        # Every column of every shard is checked (pickle refused) before a single shard is fetched.
        self._shards = [self._parse_entry(entry, f"{index_path} shard {i}") for i, entry in enumerate(index["shards"])]
        for shard in self._shards:
            self._materialize(shard)
        self.samples_per_shard = [s.samples for s in self._shards]
        self._starts = [0, *itertools.accumulate(self.samples_per_shard)]
        self.num_samples = self._starts[-1]
        self._maps: list[mmap.mmap | None] = [None] * len(self._shards)

    def _parse_entry(self, entry: dict[str, Any], where: str) -> _Shard:
        if entry.get("format") != "mds" or entry.get("version") != FORMAT_VERSION:
            raise MDSError(f"{where}: format {entry.get('format')!r} version {entry.get('version')!r} is not "
                           f"mds version {FORMAT_VERSION}")
        names, sizes = entry["column_names"], entry["column_sizes"]
        encodings = [parse_encoding(e, n) for n, e in zip(names, entry["column_encodings"])]
        for name, enc, size in zip(names, encodings, sizes):
            if size != enc.size:
                raise MDSError(f"{where}: column {name!r} records size {size}, but {enc.name!r} implies {enc.size}")
        raw, packed = entry["raw_data"], entry.get("zip_data")
        for info in (raw, packed or {}):
            # Basenames may hold a subdirectory (merged indexes do) but must stay inside the dataset.
            name = info.get("basename", "")
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise MDSError(f"{where}: shard basename {name!r} points outside the dataset directory")
        return _Shard(self.local / raw["basename"], entry["samples"], raw["bytes"], names, encodings, sizes,
                      sizes.count(None), packed, entry.get("compression"))

    def _materialize(self, shard: _Shard) -> None:
        """Make sure the raw shard sits in `local` with the size that the index records."""
        path, nbytes = shard.path, shard.nbytes
        if not (path.is_file() and path.stat().st_size == nbytes):
            if shard.zip_data is not None:
                self._decompress(shard.zip_data, path, shard.compression or "")
            elif self.remote is not None:
                with _open_remote(self.remote, path.relative_to(self.local).as_posix()) as src:
                    _write_atomic(path, lambda f: shutil.copyfileobj(src, f, 1 << 20))
        if not path.is_file():
            raise MDSError(f"shard file {path} is missing")
        size = path.stat().st_size
        if size != nbytes:
            raise MDSError(f"shard file {path} is {size} bytes but index.json says {nbytes}: truncated or replaced")

    def _decompress(self, zip_data: dict[str, Any], path: Path, compression: str) -> None:
        zip_path = self.local / zip_data["basename"]
        fetched = self.remote is not None
        if fetched:
            with _open_remote(self.remote, zip_data["basename"]) as src:
                _write_atomic(zip_path, lambda f: shutil.copyfileobj(src, f, 1 << 20))
        if not zip_path.is_file():
            raise MDSError(f"shard file {zip_path} is missing")
        size = zip_path.stat().st_size
        if size != zip_data["bytes"]:
            raise MDSError(f"shard file {zip_path} is {size} bytes but index.json says {zip_data['bytes']}: "
                           "truncated or replaced")
        try:
            with open(zip_path, "rb") as src:
                _write_atomic(path, lambda f: _decompress_file(compression, src, f))
        except (zstandard.ZstdError, OSError, EOFError) as e:
            raise MDSError(f"cannot decompress {zip_path}: {e}") from None
        if fetched:  # the cache keeps what is read; the remote keeps the compressed copy
            zip_path.unlink(missing_ok=True)

    # ---- access -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_samples

    @property
    def columns(self) -> dict[str, str]:
        """Column name -> encoding, as the first shard records them."""
        if not self._shards:
            return {}
        return {n: e.name for n, e in zip(self._shards[0].names, self._shards[0].encodings)}

    @property
    def shard_paths(self) -> list[Path]:
        return [s.path for s in self._shards]

    def shard_of(self, index: int) -> tuple[int, int]:
        """(shard number, index within that shard) of sample `index`."""
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"sample {index} is out of range for {self.num_samples} samples in {self.local}")
        index %= self.num_samples
        shard = bisect.bisect_right(self._starts, index) - 1  # the right-most start skips empty shards
        return shard, index - self._starts[shard]

    def _map(self, i: int) -> mmap.mmap:
        mm = self._maps[i]
        if mm is None:
            shard = self._shards[i]
            with open(shard.path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            count = struct.unpack_from("<I", mm, 0)[0]
            end = struct.unpack_from("<I", mm, 4 + 4 * count)[0] if 8 + 4 * count <= len(mm) else -1
            if count != shard.samples or end != len(mm):
                mm.close()
                raise MDSError(f"shard file {shard.path} is corrupt: its header says {count} samples ending at byte "
                               f"{end}, index.json says {shard.samples} samples in {shard.nbytes} bytes")
            self._maps[i] = mm
        return mm

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, j = self.shard_of(index)
        shard, mm = self._shards[i], self._map(i)
        begin, end = struct.unpack_from("<II", mm, 4 + 4 * j)
        sizes = iter(struct.unpack_from(f"<{shard.variable}I", mm, begin))
        pos = begin + 4 * shard.variable
        view = memoryview(mm)
        sample = {}
        for name, encoding, size in zip(shard.names, shard.encodings, shard.sizes):
            size = next(sizes) if size is None else size
            if pos + size > end:
                raise MDSError(f"shard file {shard.path}: sample {j} column {name!r} runs past the sample's end")
            sample[name] = encoding.decode(view[pos:pos + size])
            pos += size
        return sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in range(self.num_samples):
            yield self[index]

    def close(self) -> None:
        for i, mm in enumerate(self._maps):
            if mm is not None:
                mm.close()
                self._maps[i] = None

    def __enter__(self) -> MDSReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps do not travel to DataLoader workers; each process maps the shards again on first use.
        return {**self.__dict__, "_maps": [None] * len(self._shards)}

    def __repr__(self) -> str:
        return f"MDSReader({str(self.local)!r}, samples={self.num_samples}, shards={len(self._shards)})"
