"""The on-disk dataset: HDF5 token shards plus manifest.json, their reader, writer and merge (the
directory's file names are cmgems.data.layout's).

A shard holds three datasets (contiguous, uncompressed: random 512-token windows read in ~11 us):
  tokens  uint16 [T]   token ids of all samples back to back, no special tokens
  npmi    float32 [T]  NPMI of each token's k-mer, NaN where the k-mer has no score (float32
                       keeps every distinct value of the table, so its ranking: float16 merged
                       4,096 values into about 2,257 ties)
  offsets int64 [S+1]  sample i is tokens[offsets[i]:offsets[i+1]]
and attributes format_version, k, vocab_size, npmi_table_sha256, source_sha256, seed, split.

manifest.json is written last, atomically: a directory without it (or whose manifest lists files
that are missing or differ) is not a dataset.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from cmgems.errors import InputError
from cmgems.io import atomic_path, sha256_file
from cmgems.data.layout import SPLITS, DatasetDir
from cmgems.data.tokens import vocab_size as _vocab_size

FORMAT_VERSION = 2          # 1: NPMI stored as float16 (read no more: rebuild)
NPMI_DTYPE = np.float32


def _version_advice(found) -> str:
    """What to do with a dataset of another format version."""
    if isinstance(found, int) and found > FORMAT_VERSION:
        return "; it was written by a newer cmgems: update cmgems to read it"
    return ("; rebuild it: python -m preprocessing build GENOME DATA_DIR --overwrite (version 1 "
            "stored NPMI as float16, which ties distinct scores)")


class ShardError(InputError):
    """A shard or manifest that is missing, truncated, corrupt or does not fit the run; `path`,
    where given, is the file at fault."""

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = path


def _os_reason(err: BaseException) -> str:
    """The operating system's words for a failed write, also when HDF5 wraps them."""
    for e in (err, err.__context__, err.__cause__):
        if isinstance(e, OSError) and e.errno:
            return f"{os.strerror(e.errno)} (errno {e.errno})"
        found = e is not None and re.search(r"errno = (\d+)", str(e))
        if found and int(found.group(1)):
            n = int(found.group(1))
            return f"{os.strerror(n)} (errno {n})"
    return str(err).splitlines()[0][:200]


@dataclass(frozen=True)
class ShardFile:
    """A created shard: where its three datasets' data lie in the file (byte offsets), so that
    parts of it can be written in place by write_part, in any order and by any process."""
    path: str
    tokens: int
    npmi: int
    offsets: int


def create_shard(path: str | Path, n_tokens: int, n_samples: int, **attrs) -> ShardFile:
    """Create a shard of this size whose data are written afterwards, in place (write_part): the
    datasets are contiguous, allocated now at offsets fixed by the sizes, and never filled, so
    the bytes of the finished file depend only on the sizes, attributes and data written, not
    on who wrote which part. offsets[0] = 0 is written here."""
    def dcpl():
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        plist.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        return plist

    path = str(path)
    try:
        with h5py.File(path, "w") as f:
            at = {name: f.create_dataset(name, shape=(n,), dtype=dtype,
                                         dcpl=dcpl()).id.get_offset()
                  for name, dtype, n in (("tokens", np.uint16, n_tokens),
                                         ("npmi", NPMI_DTYPE, n_tokens),
                                         ("offsets", np.int64, n_samples + 1))}
            f.attrs["format_version"] = FORMAT_VERSION
            for key, value in attrs.items():
                f.attrs[key] = value
    except (OSError, RuntimeError) as e:
        # HDF5 reports a full disk (ENOSPC) or a file size limit (EFBIG) as OSError on write or
        # RuntimeError on close
        raise ShardError(f"{path}: cannot write shard: {_os_reason(e)}", Path(path)) from None
    shard = ShardFile(path, at["tokens"], at["npmi"], at["offsets"])
    _pwrite(path, [(shard.offsets, np.zeros(1, np.int64))])
    return shard


def write_part(shard: ShardFile, tokens: np.ndarray, npmi: np.ndarray, lengths: np.ndarray,
               token_at: int, sample_at: int) -> None:
    """Write samples (tokens and npmi back to back, `lengths` tokens each) into a created shard
    as its samples sample_at, sample_at + 1, ..., starting at token token_at."""
    tokens = np.ascontiguousarray(tokens, dtype=np.uint16)
    npmi = np.ascontiguousarray(npmi, dtype=NPMI_DTYPE)
    ends = np.cumsum(lengths, dtype=np.int64)
    ends += token_at
    _pwrite(shard.path, [(shard.tokens + tokens.itemsize * token_at, tokens),
                         (shard.npmi + npmi.itemsize * token_at, npmi),
                         (shard.offsets + ends.itemsize * (sample_at + 1), ends)])


def _pwrite(path: str, parts: list[tuple[int, np.ndarray]]) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            for at, data in parts:
                view = memoryview(data).cast("B")
                while view:                       # pwrite may write less than asked
                    done = os.pwrite(fd, view, at)
                    view, at = view[done:], at + done
        finally:
            os.close(fd)
    except OSError as e:
        raise ShardError(f"{path}: cannot write shard: {_os_reason(e)}", Path(path)) from None


def shard_entry(path: str | Path, split: str, samples: int, tokens: int) -> dict:
    """The manifest entry of a finished shard (path relative to its directory)."""
    return {"path": Path(path).name, "split": split, "samples": int(samples),
            "tokens": int(tokens), "sha256": sha256_file(path)}


def write_shard(path: str | Path, tokens: np.ndarray, npmi: np.ndarray, offsets: np.ndarray,
                **attrs) -> dict:
    """Write one shard atomically; return its manifest entry (path relative to its directory)."""
    path = Path(path)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if len(tokens) != len(npmi) or offsets[0] != 0 or offsets[-1] != len(tokens):
        raise ValueError(f"{path}: tokens ({len(tokens)}), npmi ({len(npmi)}) and offsets "
                         f"(last {offsets[-1]}) disagree")
    try:
        with atomic_path(path) as tmp:
            shard = create_shard(tmp, len(tokens), len(offsets) - 1, **attrs)
            write_part(shard, tokens, npmi, np.diff(offsets), 0, 0)
    except ShardError as e:             # named after the shard, not its temporary file
        raise ShardError(str(e).replace(str(tmp), str(path), 1), path) from None
    except OSError as e:                # the rename
        raise ShardError(f"{path}: cannot write shard: {_os_reason(e)}", path) from None
    return shard_entry(path, attrs.get("split", "train"), len(offsets) - 1, len(tokens))


def merge(paths: list[str | Path], out_path: str | Path, **attrs) -> dict:
    """One shard holding the samples of the shards `paths`, in that order (a shard written in
    parts, as the preprocessing job array does); returns its manifest entry. An unreadable part
    raises ShardError with that part as `path`."""
    tokens, npmi, lengths = [], [], []
    for path in paths:
        try:
            with h5py.File(path, "r") as f:
                tokens.append(f["tokens"][:])
                npmi.append(f["npmi"][:])
                lengths.append(np.diff(f["offsets"][:]))
        except (OSError, KeyError) as e:
            raise ShardError(f"{path}: unreadable ({e})", path=Path(path)) from None
    offsets = np.concatenate(([0], np.cumsum(np.concatenate(lengths))))
    return write_shard(out_path, np.concatenate(tokens), np.concatenate(npmi), offsets, **attrs)


class ShardReader:
    """Random access to the samples of one shard.

    Contiguous datasets are read through numpy memory maps at the file offsets HDF5 reports: a
    sample is a slice of memory, no HDF5 call. A shard whose datasets are chunked (no single
    offset) is read through h5py. Dtypes are the file's own.

    Picklable: maps and HDF5 handle open lazily in whichever process reads (h5py objects cannot
    cross a fork/spawn), so DataLoader workers each open their own.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._open_in, self._file, self._data = None, None, None
        try:
            with h5py.File(self.path, "r") as f:
                self.offsets = f["offsets"][:]
                self.attrs = {k: (v.item() if hasattr(v, "item") else v)
                              for k, v in f.attrs.items()}
                tok, npmi = f["tokens"], f["npmi"]
                n_tok, n_npmi = tok.shape[0], npmi.shape[0]
                self.token_dtype, self.npmi_dtype = tok.dtype, npmi.dtype
                # None where HDF5 stores a dataset in chunks (or has not allocated it: empty)
                self._file_offsets = (tok.id.get_offset(), npmi.id.get_offset())
        except (OSError, KeyError) as e:
            raise ShardError(f"{self.path}: not a readable cmgems shard ({e})") from None
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise ShardError(f"{self.path}: shard format version "
                             f"{self.attrs.get('format_version')}, this cmgems reads version "
                             f"{FORMAT_VERSION}{_version_advice(self.attrs.get('format_version'))}")
        if n_tok != n_npmi or self.offsets[-1] != n_tok:
            raise ShardError(f"{self.path}: tokens ({n_tok}), npmi ({n_npmi}) and offsets "
                             f"(end {self.offsets[-1]}) disagree")
        self.n_tokens = int(n_tok)
        self.vocab_size = int(self.attrs.get("vocab_size", 1 << 16))
        self.mapped = n_tok == 0 or None not in self._file_offsets
        if self.mapped and n_tok:
            need = max(o + n_tok * d.itemsize for o, d in
                       zip(self._file_offsets, (self.token_dtype, self.npmi_dtype)))
            if self.path.stat().st_size < need:
                raise ShardError(f"{self.path}: truncated ({self.path.stat().st_size} bytes, its "
                                 f"datasets end at byte {need})")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def arrays(self):
        """(tokens, npmi) of the whole shard, sliceable: memory maps (plain ndarray views: a
        memmap's own indexing costs more than the copy), or h5py datasets for a chunked shard.
        Opened once per process: a forked worker does not use its parent's."""
        if self._open_in != os.getpid():
            if self.mapped:
                self._data = tuple(
                    np.memmap(self.path, dtype=d, mode="r", offset=o,
                              shape=(self.n_tokens,)).view(np.ndarray)
                    if self.n_tokens else np.empty(0, d)
                    for o, d in zip(self._file_offsets, (self.token_dtype, self.npmi_dtype)))
            else:
                self._file = h5py.File(self.path, "r")
                self._data = (self._file["tokens"], self._file["npmi"])
            self._open_in = os.getpid()
        return self._data

    def out_of_vocabulary(self, sample: int, token: int) -> ShardError:
        """The error for a sample holding an id outside the vocabulary. Only a shard altered after
        its checksum was taken (a run with --skip-verify) holds one; the embedding lookup would
        fail with a bare IndexError."""
        return ShardError(f"{self.path}: sample {sample} holds token id {token} outside the "
                          f"vocabulary ({self.vocab_size} ids): the shard is corrupt; rebuild it "
                          f"(its sha256 check was skipped)", path=self.path)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        tokens, npmi = self.arrays()
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        t = np.asarray(tokens[lo:hi])
        if hi > lo and int(t.max()) >= self.vocab_size:
            raise self.out_of_vocabulary(i, int(t.max()))
        return t, np.asarray(npmi[lo:hi])

    def __getstate__(self):
        return {**self.__dict__, "_open_in": None, "_file": None, "_data": None}

    def close(self):
        if self._file is not None and self._open_in == os.getpid():
            self._file.close()
        self._open_in, self._file, self._data = None, None, None


_SHA256 = re.compile(r"[0-9a-f]{64}")
_ENTRY = {"path": str, "split": str, "samples": int, "tokens": int, "sha256": str}


def _check_entry(i: int, s) -> None:
    """A shard entry {path, split, samples, tokens, sha256}; its path a plain file name (a
    manifest never points outside its directory)."""
    if not isinstance(s, dict):
        raise ValueError(f"shards[{i}] must be an object, got {type(s).__name__}")
    for key, typ in _ENTRY.items():
        if key not in s:
            raise ValueError(f"shards[{i}] lacks {key!r}")
        if not isinstance(s[key], typ) or isinstance(s[key], bool):
            raise ValueError(f"shards[{i}].{key} must be {typ.__name__}, got {s[key]!r}")
    if s["split"] not in SPLITS:
        raise ValueError(f"shard {s['path']}: split {s['split']!r} not in {SPLITS}")
    if "/" in s["path"] or "\\" in s["path"] or s["path"] in ("", ".", ".."):
        raise ValueError(f"shards[{i}].path {s['path']!r} is not a file name in the dataset "
                         f"directory")
    if not _SHA256.fullmatch(s["sha256"]):
        raise ValueError(f"shards[{i}].sha256 {s['sha256']!r} is not a sha256 hex digest")
    if s["samples"] < 0 or s["tokens"] < 0:
        raise ValueError(f"shards[{i}]: negative samples or tokens")


@dataclass
class Manifest:
    """manifest.json: what a dataset directory holds and exactly how it was made."""
    k: int
    vocab_size: int
    source: dict                 # {"name": file name, "sha256": ...}
    params: dict                 # every preprocessing parameter
    npmi_table_sha256: str
    shards: list[dict]           # {path, split, samples, tokens, sha256}
    stats: dict = field(default_factory=dict)   # closing summary of the build
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        for name, typ in (("k", int), ("vocab_size", int), ("source", dict), ("params", dict),
                          ("npmi_table_sha256", str), ("shards", list), ("stats", dict),
                          ("format_version", int)):
            if not isinstance(getattr(self, name), typ) or isinstance(getattr(self, name), bool):
                raise ValueError(f"field {name!r} must be {typ.__name__}, got "
                                 f"{type(getattr(self, name)).__name__}")
        if self.vocab_size != _vocab_size(self.k):
            raise ValueError(f"vocab_size {self.vocab_size} does not match k={self.k}")
        for i, s in enumerate(self.shards):
            _check_entry(i, s)

    def save(self, directory: str | Path) -> Path:
        path = DatasetDir(directory).manifest
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        path = DatasetDir(directory).manifest
        if not path.is_file():
            raise ShardError(f"{path}: no manifest: {directory} is not a finished cmgems dataset "
                             f"(build it with `python -m preprocessing build GENOME {directory}`)")
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"a manifest is a JSON object, got {type(data).__name__}")
            if data.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format version {data.get('format_version')}, "
                                 f"this cmgems reads version {FORMAT_VERSION}"
                                 f"{_version_advice(data.get('format_version'))}")
            return cls(**data)
        except OSError as e:
            raise ShardError(f"{path}: cannot read manifest ({e.strerror or e})") from None
        except (ValueError, TypeError, KeyError) as e:     # UnicodeDecodeError included
            raise ShardError(f"{path}: not a valid cmgems manifest ({e})") from None

    def checksum(self) -> str:
        """Identity of the dataset: sha256 over the manifest's content (logged with each run)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def split_shards(self, split: str) -> list[dict]:
        return [s for s in self.shards if s["split"] == split]


def verify(directory: str | Path, manifest: Manifest | None = None, checksums: bool = True) -> None:
    """Raise ShardError naming the first shard that is missing, truncated or altered."""
    directory = Path(directory)
    manifest = manifest or Manifest.load(directory)
    for entry in manifest.shards:
        path = directory / entry["path"]
        if not path.is_file():
            raise ShardError(f"{path}: listed in {DatasetDir(directory).manifest} but missing")
        if checksums and sha256_file(path) != entry["sha256"]:
            raise ShardError(f"{path}: sha256 differs from the manifest (truncated or corrupted; "
                             f"rebuild the dataset, or pass --skip-verify at your own risk)")


class ShardSet:
    """All samples of one split of a dataset, indexed 0..len-1 across its shards."""

    def __init__(self, directory: str | Path, split: str = "train",
                 manifest: Manifest | None = None):
        self.directory = Path(directory)
        self.manifest = manifest or Manifest.load(self.directory)
        entries = self.manifest.split_shards(split)
        if not entries:
            raise ShardError(f"{DatasetDir(self.directory).manifest}: no {split!r} shards")
        self.readers = [ShardReader(self.directory / e["path"]) for e in entries]
        for r in self.readers:
            k, vocab = r.attrs.get("k"), r.attrs.get("vocab_size")
            if (k, vocab) != (self.manifest.k, self.manifest.vocab_size):
                raise ShardError(f"{r.path}: k={k}, vocab {vocab} differ from the manifest's "
                                 f"k={self.manifest.k}")
        self.cum = np.cumsum([0] + [len(r) for r in self.readers])
        self._lengths = np.concatenate([r.lengths for r in self.readers])
        self._starts = np.concatenate([r.offsets[:-1] for r in self.readers])
        self.token_dtype = np.result_type(*(r.token_dtype for r in self.readers))
        self.npmi_dtype = np.result_type(*(r.npmi_dtype for r in self.readers))

    def __len__(self) -> int:
        return int(self.cum[-1])

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self.cum, i, side="right")) - 1
        return self.readers[s][i - int(self.cum[s])]

    def counts(self, indices, max_tokens: int | None = None) -> np.ndarray:
        """Tokens of samples `indices`, each cut to max_tokens."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and not (0 <= indices.min() and indices.max() < len(self)):
            raise IndexError(f"sample indices outside 0..{len(self) - 1}")
        counts = self._lengths[indices]
        return counts if max_tokens is None else np.minimum(counts, max_tokens)

    def read_rows(self, indices, counts: np.ndarray, ids: np.ndarray, values: np.ndarray,
                  at: int = 0) -> None:
        """The first counts[j] tokens of sample indices[j] into row j of ids (token ids) and
        values (NPMI), from column `at` on: one slice copy per sample and array, no HDF5 call
        on contiguous shards. Ids outside the vocabulary raise ShardError naming the shard and
        sample (one reduction over the rows read)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            return
        shard = np.searchsorted(self.cum, indices, side="right") - 1
        local = indices - self.cum[shard]
        starts = self._starts[indices]
        readers = self.readers
        for row, s, lo, n in zip(range(len(indices)), shard.tolist(), starts.tolist(),
                                 counts.tolist()):
            tokens, npmi = readers[s].arrays()
            ids[row, at:at + n] = tokens[lo:lo + n]
            values[row, at:at + n] = npmi[lo:lo + n]
        vocab = self.manifest.vocab_size
        if int(ids[:len(indices), at:at + int(counts.max())].max()) >= vocab:
            # that reduction also saw the columns past shorter samples: find the sample itself
            for row, n in enumerate(counts.tolist()):
                worst = int(ids[row, at:at + n].max()) if n else 0
                if worst >= vocab:
                    raise readers[int(shard[row])].out_of_vocabulary(int(local[row]), worst)
