"""Bad inputs, each through the real command line: exit 2, one line `error: ...` naming the file,
no traceback, nothing half-written. The exact messages are the table in docs/errors.md
(benchmarks/fault_report.py prints it again from these tests)."""
from __future__ import annotations

import gzip
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import pytest

from conftest import LAMBDA, ROOT, run_module
from cmgems.errors import InputError
from cmgems.io import sha256_file
from cmgems.data.shards import Manifest

PRETRAIN = str(ROOT / "launchers" / "pretrain.py")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def record_error(case: str, command: str, message: str) -> None:
    path = os.environ.get("CMGEMS_ERRORS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": case, "command": command, "error": message}) + "\n")


def error_line(stderr: str) -> str:
    """The one `error: ...` line (a progress bar may share its terminal line: cut it off)."""
    lines = [ln[ln.index("error: "):] for ln in stderr.replace("\r", "\n").splitlines()
             if "error: " in ln]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _acgt(n: int, seed: int = 0) -> str:
    r = random.Random(seed)
    return "".join(r.choice("ACGT") for _ in range(n))


def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return [PRETRAIN, "--data-dir", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--micro-batch-size", "2", "--grad-accum", "1", "--max-length", "64",
            "--num-workers", "0", "--zero-stage", "0", *extra]


@dataclass
class Case:
    name: str
    # (tmp, dataset) -> (argv, the file named; or, for an option, the words naming it)
    make: Callable[[Path, Path], tuple[list[str], Path | str]]
    expect: str                                            # in the error line
    slow: bool = False
    # why this machine cannot show the refusal (None: it can), asked as the product asks
    unshowable: Callable[[], str | None] | None = None


def _fp16_runs_here() -> str | None:
    """The run's device takes fp16 when the product's own check accepts it (a GPU, or a CPU
    with AVX512-FP16/AMX, where DeepSpeed has fp16 kernels)."""
    import torch
    from cmgems.pretrain.engine import resolve_precision
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolve_precision("fp16", device)
    except InputError:
        return None
    return f"fp16 runs on this {device.type} (DeepSpeed has fp16 kernels for it)"


# ---------------------------------------------------------------------- FASTA
def _build(genome: Path, tmp: Path, *extra: str) -> list[str]:
    return ["-m", "preprocessing", "build", str(genome), str(tmp / "out"), "--min-count", "1", *extra]


def fasta_case(name: str, write: Callable[[Path], None], expect: str, *extra: str,
               suffix: str = ".fa") -> Case:
    def make(tmp, _data):
        genome = tmp / f"{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}{suffix}"
        write(genome)
        return _build(genome, tmp, *extra), genome
    return Case(f"FASTA: {name}", make, expect)


def _binary(p: Path):
    r = random.Random(1)
    p.write_bytes(b"\x7fELF" + bytes(r.randrange(256) for _ in range(4096)))


def _truncated_gzip(p: Path):
    blob = gzip.compress(("".join(f">r{i}\n{_acgt(2000, i)}\n" for i in range(20))).encode())
    p.write_bytes(blob[:len(blob) // 2])


def _gigabyte_line(p: Path):
    """1 GiB on one line: a header that never ends, streamed to disk in 8 MiB blocks."""
    block = b"A" * (8 << 20)
    with open(p, "wb") as f:
        f.write(b">")
        for _ in range(128):
            f.write(block)


FASTA_CASES = [
    fasta_case("binary file", _binary, "not FASTA (byte"),
    fasta_case("protein FASTA", lambda p: p.write_text(
        ">sp|P69905|HBA_HUMAN\nMVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALTNAVAH\n"
        "VDDMPNALSALSDLHAHKLRVDPVNFKLLSHCLLVTLAAHLPAEFTPAVHASLDKFLASVSTVLTSKYR\n"),
        "no training samples"),
    fasta_case("header only", lambda p: p.write_text(">chr1 nothing follows\n"), "no training samples"),
    fasta_case("no header", lambda p: p.write_text(_acgt(3000) + "\n"),
               "sequence before the first '>' header line"),
    fasta_case("empty file", lambda p: p.write_text(""), "empty file"),
    fasta_case("truncated gzip", _truncated_gzip, "truncated gzip", suffix=".fa.gz"),
    fasta_case("only Ns", lambda p: p.write_text(">chr1\n" + "N" * 6000 + "\n"),
               "no training samples"),
    fasta_case("1 GiB single line", _gigabyte_line, "header line longer than"),
    fasta_case("--valid-records names no record", lambda p: p.write_text(
        f">chr1\n{_acgt(3000)}\n"), "--valid-records: chrX not found", "--valid-records", "chrX"),
]
def _records_gz(n: int = 20, seed: int = 0) -> bytes:
    return gzip.compress("".join(f">r{seed}_{i}\n{_acgt(2000, seed + i)}\n"
                                 for i in range(n)).encode())


def _bgzf_blob(p: Path) -> bytes:
    bgzf = pytest.importorskip("Bio.bgzf")       # biopython: a test extra
    tmp = p.with_name("tmp-bgzf.gz")
    with bgzf.BgzfWriter(str(tmp), "wb") as f:
        for i in range(20):
            f.write(f">r{i}\n{_acgt(2000, i)}\n".encode())
            f.flush()
    blob = tmp.read_bytes()
    tmp.unlink()
    return blob


def _damaged_bgzf(p: Path):
    blob = _bgzf_blob(p)
    p.write_bytes(blob[:3000] + bytes([blob[3000] ^ 0xFF]) + blob[3001:])


FASTA_CASES += [
    fasta_case("junk after the last gzip member", lambda p: p.write_bytes(
        _records_gz() + b"junk"), "that are not gzip data", suffix=".fa.gz"),
    fasta_case("junk between gzip members", lambda p: p.write_bytes(
        _records_gz() + b"\0\0\0" + _records_gz(seed=50)), "that are not gzip data",
        suffix=".fa.gz"),
    fasta_case("damaged BGZF block", _damaged_bgzf, "corrupt gzip member at byte",
               suffix=".fa.gz"),
    fasta_case("BGZF without its end-of-file block", lambda p: p.write_bytes(
        _bgzf_blob(p)[:-28]), "BGZF file without its end-of-file block", suffix=".fa.gz"),
    fasta_case("a named pipe", lambda p: os.mkfifo(p), "a named pipe"),
]
DUPLICATE = fasta_case("duplicate record names", lambda p: p.write_text(
    f">chr1\n{_acgt(1500, 1)}\n>chr1\n{_acgt(1500, 2)}\n"), "chr1")


# ---------------------------------------------------------------------- NPMI tables
def table_case(name: str, text: Callable[[], str], expect: str) -> Case:
    def make(tmp, _data):
        genome = tmp / "genome.fa"
        genome.write_text(f">chr1\n{_acgt(3000)}\n")
        table = tmp / f"{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.csv"
        table.write_text(text())
        return _build(genome, tmp, "--npmi-table", str(table)), table
    return Case(f"NPMI table: {name}", make, expect)


TABLE_CASES = [
    table_case("wrong columns", lambda: "kmer,score\nAAAAAA,0.5\n", "unknown NPMI table columns"),
    table_case("k mismatch (5-mers for k=6)", lambda: "ngram,norm_dp_true_pmi\nAAAAA,0.5\nAAAAC,0.1\n",
               "has length 5, expected k=6"),
    table_case("value not a number", lambda: "ngram,norm_dp_true_pmi\nAAAAAA,high\n",
               "is not a number"),
]
TABLE_CASES += [
    table_case("infinite value", lambda: "ngram,norm_dp_true_pmi\nAAAAAA,0.5\nAAAAAT,inf\n",
               ":3: column 'norm_dp_true_pmi': 'inf' is not a finite number"),
    table_case("nan word", lambda: "ngram,norm_dp_true_pmi\nAAAAAA,nan\n",
               "'nan' is not a finite number (leave the field empty"),
    table_case("absurd value 1e30", lambda: "ngram,norm_dp_true_pmi\nAAAAAA,1e30\n",
               "'1e30' is outside [-1000, 1000]"),
    table_case("0_5 (an underscore)", lambda: "ngram,norm_dp_true_pmi\nAAAAAA,0_5\n",
               "'0_5' is not a number"),
]


# ---------------------------------------------------------------------- build: outputs, options
def build_case(name: str, make: Callable[[Path, Path], tuple[list[str], Path | str]],
               expect: str) -> Case:
    return Case(f"build: {name}", make, expect)


def _lambda_build(out: Path, *extra: str) -> list[str]:
    return ["-m", "preprocessing", "build", str(LAMBDA), str(out), "--min-count", "5", *extra]


def _parent_is_a_file(tmp: Path, _data):
    (tmp / "notes.txt").write_text("a file where a directory is expected\n")
    out = tmp / "notes.txt" / "data"
    return _lambda_build(out), out


def _name_too_long(tmp: Path, _data):
    out = tmp / ("d" * 252)          # fits NAME_MAX itself; its lock file and staging do not
    return _lambda_build(out), out


def _option(flag: str, value: str):
    return lambda tmp, _data: (_lambda_build(tmp / "out", flag, value), flag)


_HOLDERS = []     # lock holders: each ends when its stdin closes (at the latest with pytest)


def _out_dir_in_use(tmp: Path, _data):
    """Another process holds OUT_DIR's lock, as a build under way does."""
    import subprocess
    import sys
    out = tmp / "data"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom cmgems.io import exclusive_lock\n"
         f"with exclusive_lock({str(tmp / '.data.lock')!r}, 'test'):\n"
         "    print('held', flush=True)\n    sys.stdin.read()\n"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    _HOLDERS.append(holder)
    return _lambda_build(out), out


BUILD_CASES = [
    build_case("OUT_DIR being built by another process", _out_dir_in_use,
               "is in use by pid"),
    build_case("parent of OUT_DIR is a file", _parent_is_a_file, "notes.txt is a file, not a "
               "directory"),
    build_case("OUT_DIR name too long", _name_too_long, "cannot create the output directory "
               "(File name too long)"),
    build_case("--min-count 10^30", _option("--min-count", str(10 ** 30)),
               "--min-count: must be in 1.."),
    build_case("--shard-tokens 10^20", _option("--shard-tokens", str(10 ** 20)),
               "--shard-tokens: must be in 510.."),
    build_case("--seed 2^64", _option("--seed", str(2 ** 64)), "--seed: must be in 0.."),
    build_case("--seed -1", _option("--seed", "-1"), "--seed: must be in 0.."),
    build_case("--workers 10^6", _option("--workers", str(10 ** 6)), "--workers: must be in 1..1024"),
]


def _npmi_into(tmp: Path, where: str):
    out = tmp / where / "table.tsv"
    return ["-m", "preprocessing", "npmi", str(LAMBDA), str(out), "--min-count", "5"], out


NPMI_CASES = [
    Case("npmi: output directory missing", lambda tmp, _d: _npmi_into(tmp, "missing"),
         "cannot write the NPMI table (directory"),
]


# ---------------------------------------------------------------------- manifests
def _broken_manifest(edit: Callable[[dict], object]):
    def make(tmp: Path, data: Path):
        import shutil
        copy = tmp / "data"
        shutil.copytree(data, copy)
        manifest = copy / "manifest.json"
        manifest.write_text(json.dumps(edit(json.loads(manifest.read_text()))))
        return _train(copy, tmp / "runs" / "run"), manifest
    return make


def _drop_sha(m: dict) -> dict:
    del m["shards"][1]["sha256"]
    return m


MANIFEST_CASES = [
    Case("manifest: not a JSON object", _broken_manifest(lambda m: [m]),
         "not a valid cmgems manifest (a manifest is a JSON object, got list)", slow=True),
    Case("manifest: a shard without its sha256", _broken_manifest(_drop_sha),
         "not a valid cmgems manifest (shards[1] lacks 'sha256')", slow=True),
]


# ---------------------------------------------------------------------- configs
def config_case(name: str, body: str, expect: str, suffix: str = ".yaml") -> Case:
    def make(tmp, data):
        cfg = tmp / f"config{suffix}"
        cfg.write_text(body)
        return _train(data, tmp / "runs" / "run", "--config", str(cfg)), cfg
    return Case(f"config: {name}", make, expect, slow=True)


def bytes_config_case(name: str, body: bytes, expect: str) -> Case:
    def make(tmp, data):
        cfg = tmp / "config.yaml"
        cfg.write_bytes(body)
        return _train(data, tmp / "runs" / "run", "--config", str(cfg)), cfg
    return Case(f"config: {name}", make, expect, slow=True)


def option_case(name: str, extra: list[str], named: str, expect: str, slow=True,
                unshowable=None) -> Case:
    def make(tmp, data):
        return _train(data, tmp / "runs" / "run", *extra), named
    return Case(name, make, expect, slow=slow, unshowable=unshowable)


def ds_case(name: str, ds: dict | str, expect: str) -> Case:
    def make(tmp, data):
        path = tmp / "ds_config.json"
        path.write_text(ds if isinstance(ds, str) else json.dumps(ds))
        return _train(data, tmp / "runs" / "run", "--ds-config", str(path)), path
    return Case(f"DeepSpeed config: {name}", make, expect, slow=True)


def _ds(**over) -> dict:
    base = json.loads((ROOT / "ds_configs" / "zero0.json").read_text())
    base.update(over)
    return base


def _init_from_k5(tmp: Path, data: Path):
    from transformers import BertConfig, BertForMaskedLM
    from cmgems.data.tokens import vocab_size
    model = tmp / "k5-model"
    BertForMaskedLM(BertConfig(vocab_size=vocab_size(5), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(model)
    return _train(data, tmp / "runs" / "run", "--init-from", str(model)), model


def _saved_model(tmp: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM
    from cmgems.data.tokens import vocab_size
    model = tmp / "model"
    BertForMaskedLM(BertConfig(vocab_size=vocab_size(6), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(model)
    return model


def init_case(name: str, damage: Callable[[Path], Path], expect: str) -> Case:
    def make(tmp, data):
        model = _saved_model(tmp)
        return _train(data, tmp / "runs" / "run", "--init-from", str(model)), damage(model)
    return Case(f"--init-from: {name}", make, expect, slow=True)


def _broken_config(model: Path) -> Path:
    (model / "config.json").write_text('{"hidden_size": ')
    return model / "config.json"


def _no_weights(model: Path) -> Path:
    (model / "model.safetensors").unlink()
    return model


def _truncated_weights(model: Path) -> Path:
    w = model / "model.safetensors"
    w.write_bytes(w.read_bytes()[:5000])
    return w


def _poorly_scored(tmp: Path, data: Path):
    """The lambda phage at the default --min-count 101: no 6-mer is seen 101 times."""
    from conftest import LAMBDA
    built = tmp / "lambda101"
    run_module("-m", "preprocessing", "build", str(LAMBDA), str(built), "--valid-fraction", "0.1")
    return _train(built, tmp / "runs" / "run", "--mode", "fixed:genemask"), built / "manifest.json"


def _shard_of_other_k(tmp: Path, data: Path):
    """One shard re-labelled k=5 (and the manifest's checksum updated, as if it came from a k=5
    dataset): the checksum passes, the shard does not fit the run."""
    import shutil
    copy = tmp / "data"
    shutil.copytree(data, copy)
    victim = copy / "train-00001.h5"
    with h5py.File(victim, "r+") as f:
        f.attrs["k"], f.attrs["vocab_size"] = 5, 1029
    m = Manifest.load(copy)
    for s in m.shards:
        if s["path"] == victim.name:
            s["sha256"] = sha256_file(victim)
    m.save(copy)
    return _train(copy, tmp / "runs" / "run"), victim


CONFIG_CASES = [
    config_case("unknown key", "max_steps: 4\nlearning_rate: 0.1\n", "unknown config field(s) ['learning_rate']"),
    config_case("wrong type", "max_steps: four\n", "field 'max_steps' must be int"),
    config_case("not YAML", "max_steps: [4\n", "not valid YAML"),
    config_case("value out of range", "p_random: 1.5\n", "p_random must be in (0, 1)"),
    config_case("beta2 of 1", "beta2: 1.0\n", "beta2 must be in [0, 1), got 1.0"),
    config_case("non-finite lr", "lr: .nan\n", "lr must be a finite number, got nan"),
    config_case("duplicate key", "lr: 0.001\nlr: 0.01\n",
                ":2: key 'lr' given twice (lines 1 and 2)"),
    config_case("an empty file", "", "holds no config fields"),
    config_case("only comments", "# max_steps: 200\n", "holds no config fields"),
    bytes_config_case("not UTF-8", b"max_steps: 2\n# r\xe9sum\xe9\n", ":2: not UTF-8 text"),
    option_case("option: --seed beyond 2**32", ["--seed", "9" * 30], "seed",
                "seed must be in [0, 4294967295]"),
    option_case("option: --precision fp16 on a CPU", ["--precision", "fp16"], "precision fp16",
                "not supported on this device (cpu", slow=True, unshowable=_fp16_runs_here),
    ds_case("train_batch_size != micro x accum x world",
            _ds(train_batch_size=64), "train_batch_size=64 contradicts the run config (2)"),
    ds_case("micro batch contradicts --micro-batch-size",
            _ds(train_micro_batch_size_per_gpu=8), "train_micro_batch_size_per_gpu=8 contradicts"),
    ds_case("not JSON", "{\"zero_optimization\": ", "cannot read DeepSpeed config"),
    ds_case("a list, not an object", "[1, 2]", "a DeepSpeed config is a JSON object, got list"),
    ds_case("optimizer given as a string", _ds(optimizer="adam"),
            "'optimizer' must be an object, got str 'adam'"),
    ds_case("ZeRO stage 7", _ds(zero_optimization={"stage": 7}), "DeepSpeed refused this config"),
    ds_case("unknown optimizer", _ds(optimizer={"type": "Adamz", "params": {}}),
            "DeepSpeed refused this config (Adamz is not a supported DeepSpeed Optimizer)"),
    init_case("config.json not JSON", _broken_config, "not a readable BERT config"),
    init_case("no weights", _no_weights, "no weights (model.safetensors or pytorch_model.bin)"),
    init_case("truncated weights", _truncated_weights, "cannot load the weights"),
    Case("data: NPMI table scores 0 % (lambda phage at --min-count 101)", _poorly_scored,
         "scores 0.0% of the 4,096 6-mers, below min_scored_fraction 0.5", slow=True),
    Case("model/data: --init-from a k=5 model, k=6 shards", _init_from_k5,
         "vocab size 1029 is not the k=6 vocabulary (4101)", slow=True),
    Case("shards: a shard of k=5 in a k=6 dataset", _shard_of_other_k,
         "k=5, vocab 1029 differ from the manifest's k=6", slow=True),
]

ALL = FASTA_CASES + TABLE_CASES + BUILD_CASES + NPMI_CASES + MANIFEST_CASES + CONFIG_CASES


def _check(case: Case, tmp: Path, data: Path) -> None:
    why = case.unshowable() if case.unshowable else None
    if why:
        pytest.skip(reason=why)
    argv, named = case.make(tmp, data)
    inputs = {p for p in tmp.rglob("*") if p.is_file()}
    try:
        res = run_module(*argv, env=ONE_THREAD, check=False)
    finally:
        if isinstance(named, Path) and named.is_file() and named.stat().st_size > (512 << 20):
            named.unlink()   # the 1 GiB file does not outlive its test
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    line = error_line(res.stderr)
    tail = [ln for ln in res.stderr.replace("\r", "\n").splitlines() if ln.strip()][-1]
    assert tail.endswith(line), f"the error is not one last line:\n{res.stderr[-2000:]}"
    assert str(named) in line, f"{named} not named in: {line}"
    assert case.expect in line, line
    left = sorted(str(p) for p in tmp.rglob("*") if p.is_file() and p not in inputs)
    assert not left, f"left behind: {left}"
    assert not (tmp / "runs").exists(), "the refused run left its (empty) directories"
    cmd = "pretrain" if argv[0] == PRETRAIN else f"preprocessing {argv[2]}"
    record_error(case.name, cmd, line.replace(str(tmp) + "/", ""))


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if c.slow else [],
                                               id=c.name) for c in ALL])
def test_bad_input_exits_2_naming_the_file(case, tiny_dataset, tmp_path):
    _check(case, tmp_path, tiny_dataset)


def test_duplicate_record_names_are_refused(tiny_dataset, tmp_path):
    _check(DUPLICATE, tmp_path, tiny_dataset)


def test_catalogue_has_at_least_15_cases():
    assert len(ALL) + 1 >= 15


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write to: permission bits for a user; root ignores those, so
    there a read-only tmpfs is mounted (skipped where mounting is not allowed)."""
    import subprocess
    d = tmp_path / "read-only"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)],
                         capture_output=True, text=True)
    if res.returncode:
        pytest.skip(reason=f"running as root, and no read-only mount possible ({res.stderr})")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


@pytest.mark.parametrize("command", ["build", "npmi"])
def test_read_only_output_directory(command, read_only_dir, tiny_dataset, tmp_path):
    if command == "build":
        out = read_only_dir / "data"
        case = build_case("OUT_DIR in a read-only directory",
                          lambda tmp, _d: (_lambda_build(out), out),
                          "cannot create the output directory (")
    else:
        out = read_only_dir / "table.tsv"
        case = Case("npmi: output directory read-only", lambda tmp, _d: (
            ["-m", "preprocessing", "npmi", str(LAMBDA), str(out)], out),
            "cannot write the NPMI table (")
    _check(case, tmp_path, tiny_dataset)


@pytest.mark.slow
def test_a_dataset_refusal_comes_before_deepspeed_starts(tmp_path, tiny_dataset):
    """What the files can tell (here: an NPMI table that scores no k-mer) is refused by the
    preflight, before the process group and DeepSpeed start; and a run given --data-dir of a
    built dataset says nothing of the genome it does not read."""
    argv, manifest = _poorly_scored(tmp_path, tiny_dataset)
    res = run_module(*argv, env=ONE_THREAD, check=False)
    assert res.returncode == 2 and "below min_scored_fraction" in error_line(res.stderr)
    assert "rank(s) on" not in res.stderr and "deepspeed" not in res.stderr.lower(), res.stderr
    assert "genome:" not in res.stderr, res.stderr
