"""The on-disk dataset: HDF5 token shards plus manifest.json. The one module that knows the layout.

A shard holds three datasets (contiguous, uncompressed: random 512-token windows read in ~11 us):
  tokens  uint16 [T]   token ids of all samples back to back, no special tokens
  npmi    float16 [T]  NPMI of each token's k-mer, NaN where the k-mer has no score
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
from cmgems.tokens import vocab_size as _vocab_size

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "valid")


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


def write_shard(path: str | Path, tokens: np.ndarray, npmi: np.ndarray, offsets: np.ndarray,
                **attrs) -> dict:
    """Write one shard atomically; return its manifest entry (path relative to its directory)."""
    path = Path(path)
    tokens = np.ascontiguousarray(tokens, dtype=np.uint16)
    npmi = np.ascontiguousarray(npmi, dtype=np.float16)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if len(tokens) != len(npmi) or offsets[0] != 0 or offsets[-1] != len(tokens):
        raise ValueError(f"{path}: tokens ({len(tokens)}), npmi ({len(npmi)}) and offsets "
                         f"(last {offsets[-1]}) disagree")
    try:
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("tokens", data=tokens)
                f.create_dataset("npmi", data=npmi)
                f.create_dataset("offsets", data=offsets)
                f.attrs["format_version"] = FORMAT_VERSION
                for key, value in attrs.items():
                    f.attrs[key] = value
    except (OSError, RuntimeError) as e:
        # HDF5 reports a full disk (ENOSPC) or a file size limit (EFBIG) as OSError on write or
        # RuntimeError on close; atomic_path has removed the temporary file either way.
        raise ShardError(f"{path}: cannot write shard: {_os_reason(e)}") from None
    return {"path": path.name, "split": attrs.get("split", "train"), "samples": len(offsets) - 1,
            "tokens": int(len(tokens)), "sha256": sha256_file(path)}


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
                             f"{FORMAT_VERSION}")
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
        if self.vocab_size != _vocab_size(self.k):
            raise ValueError(f"vocab_size {self.vocab_size} does not match k={self.k}")
        for s in self.shards:
            if s["split"] not in SPLITS:
                raise ValueError(f"shard {s['path']}: split {s['split']!r} not in {SPLITS}")

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ShardError(f"{path}: no manifest: {directory} is not a finished cmgems dataset "
                             f"(build it with `python -m preprocessing build GENOME {directory}`)")
        try:
            data = json.loads(path.read_text())
            if data.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format version {data.get('format_version')}, "
                                 f"this cmgems reads version {FORMAT_VERSION}")
            return cls(**data)
        except (ValueError, TypeError, KeyError) as e:
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
            raise ShardError(f"{path}: listed in {directory / MANIFEST_NAME} but missing")
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
            raise ShardError(f"{self.directory / MANIFEST_NAME}: no {split!r} shards")
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
