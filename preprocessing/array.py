"""`build` split into four stages for a Slurm job array (launchers/slurm/preprocess.sbatch).

  count GENOME WORK --group i/N   n-gram counts and sample layout of every N-th piece
                                                                    -> WORK/counts-i.npz
  table WORK                      whole-genome NPMI table; the shard plan -> WORK/npmi.tsv, plan.npz
  shard GENOME WORK --group i/N   the shards of group i's stretch of the genome -> WORK/*.h5
  finish WORK OUT_DIR             shards that span groups stitched, manifest, published atomically

The NPMI of a token needs the counts of the whole genome, hence two passes with a gather between.
The genome is handled in build's pieces (PIECE_BASES of one record): `count` deals them
round-robin; `shard` gives each group a contiguous run of pieces holding 1/N of the bases (so a
long chromosome is shared, not one task's burden). Every piece is cut exactly as `build` cuts it
(same reader, same generator seeds); the sample layout does not depend on the NPMI, so `count`
already records it and `table` computes where build's shards begin and end. Each `shard` task then
writes the shards lying wholly in its run, byte for byte as `build` would, plus fragments of the
(at most two) shards it shares with a neighbour; `finish` joins those fragments. The dataset is
identical to `build`'s: same shard files, same npmi.tsv, same manifest but the time in its stats.

WORK/job.json, written by the first count task, holds every parameter; the later stages take them
from there, and every part carries job.json's digest, so parts of another job are never mixed in.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from cmgems.errors import InputError
from cmgems.io import atomic_path, sha256_file
from cmgems.data.npmi_table import load_table
from cmgems.data.layout import SPLITS, TABLE_NAME, shard_name
from cmgems.data.shards import Manifest, ShardError, merge

from .build import (BuildConfig, params_of, scan_genome, stored_table,
                                 write_npmi_table)
from .dataset_writer import (ShardWriter, SplitShards, Summary,
                                          check_train_samples, dataset_manifest, genome_sha256,
                                          shard_attrs, shard_ends)
from .output_dir import INTERRUPTS, Staging, check_target, output_lock
from .fasta import FastaReader
from .parallel import PieceRunner, Scanned

JOB_NAME = "job.json"
JOB_FORMAT = 1
# BuildConfig fields that shape the output (job.json holds them; workers is per task)
_JOB_FIELDS = ("k", "min_count", "npmi_definition", "valid_fraction", "valid_records", "seed", "npmi_table",
               "shard_tokens", "overwrite", "piece_bases")


def parse_group(text: str) -> tuple[int, int]:
    """'i/N' -> (i, N) with 0 <= i < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--group: expected i/N (say 0/8), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--group: need 0 <= i < N and N >= 1, got {text!r}")
    return i, n


def counts_path(work: Path, i: int) -> Path:
    return work / f"counts-{i}.npz"


def part_path(work: Path, i: int) -> Path:
    """What `shard` task i wrote (written last: the task's completion mark)."""
    return work / f"shards-{i}.json"


# ---- the job ----

def _job_config(job: dict, genome: Path | None = None, out_dir: Path | None = None,
                workers: int = 1) -> BuildConfig:
    fields = dict(job["config"])
    fields["valid_records"] = tuple(fields["valid_records"])
    return BuildConfig(genome=genome or Path(job["genome"]["path"]), out_dir=out_dir or Path("."),
                       workers=workers, **fields)


def _digest(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()


def load_job(work: Path) -> tuple[dict, str]:
    path = work / JOB_NAME
    if not path.is_file():
        raise InputError(f"{path}: missing: run the `count` stage (all its groups) into {work} "
                         f"first")
    try:
        job = json.loads(path.read_text())
        if job.get("format") != JOB_FORMAT:
            raise ValueError(f"format {job.get('format')}, expected {JOB_FORMAT}")
        _job_config(job)
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(f"{path}: not a preprocessing job file ({e})") from None
    return job, _digest(job)


def _claim_job(work: Path, job: dict) -> str:
    """Write job.json, or check that the one there (from a sibling task) is the same job."""
    path = work / JOB_NAME
    if path.is_file():
        have, digest = load_job(work)
        if digest != _digest(job):
            diff = [k for k in job if k != "config" and have.get(k) != job[k]]
            diff += ["--" + k.replace("_", "-") for k in job["config"]
                     if have.get("config", {}).get(k) != job["config"][k]]
            raise InputError(f"{path}: holds another job (different {', '.join(diff)}); remove "
                             f"{work} or use another work directory")
        return digest
    work.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(job, indent=2) + "\n")
    return _digest(job)


def _check_genome(job: dict, genome: Path) -> None:
    if genome_sha256(genome) != job["genome"]["sha256"]:
        raise InputError(f"{genome}: differs from the genome the job was counted on "
                         f"({job['genome']['path']}, sha256 {job['genome']['sha256'][:12]}...)")


def _missing(paths: list[Path], stage: str, n: int) -> None:
    gone = [p for p in paths if not p.is_file()]
    if gone:
        idx = ",".join(p.stem.rsplit("-", 1)[1] for p in gone)
        names = ", ".join(p.name for p in gone[:5]) + (" ..." if len(gone) > 5 else "")
        raise InputError(f"{gone[0].parent}: {len(gone)} of {n} `{stage}` parts missing "
                         f"({names}); rerun `{stage}` for groups {idx} (array indexes {idx})")


def _load_part(path: Path, digest: str) -> dict:
    try:
        with np.load(path) as z:
            part = {key: z[key] for key in z.files}
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable part ({e}); rerun its stage") from None
    if str(part.get("job")) != digest:
        raise InputError(f"{path}: made for another job than {path.parent / JOB_NAME}; "
                         f"rerun its stage")
    return part


def _table_of(work: Path, digest: str, k: int) -> tuple[np.ndarray, str]:
    """The NPMI table of this job and its sha256 (checked against what `table` recorded)."""
    meta_path = work / "table.json"
    if not meta_path.is_file() or not (work / TABLE_NAME).is_file():
        raise InputError(f"{work / TABLE_NAME}: missing: run the `table` stage first")
    meta = json.loads(meta_path.read_text())
    sha = sha256_file(work / TABLE_NAME)
    if meta.get("job") != digest or meta.get("sha256") != sha:
        raise InputError(f"{work / TABLE_NAME}: not the table of {work / JOB_NAME}'s job; "
                         f"rerun the `table` stage")
    return stored_table(work / TABLE_NAME, k), sha


# ---- stages ----

def count_stage(cfg: BuildConfig, work: Path, group: tuple[int, int], out=sys.stdout) -> Path:
    """Stage 1: n-gram counts (none with an external table) and the sample layout (sample
    lengths per split, which do not depend on the NPMI) of pieces i, i+N, i+2N, ..."""
    if cfg.sampling != "dnabert":
        # GeneMask's rule removes duplicates across the whole genome: no piece-wise layout
        raise InputError(f"--sampling {cfg.sampling}: the job array cuts by the DNABERT rule "
                         f"only; use `python -m preprocessing build`")
    start = time.perf_counter()
    i, n = group
    source_sha = genome_sha256(cfg.genome)
    table_sha = None
    if cfg.npmi_table is not None:
        load_table(cfg.npmi_table, cfg.k)      # refuse a bad table now, not at the gather
        table_sha = sha256_file(cfg.npmi_table)
    config = {f: getattr(cfg, f) for f in _JOB_FIELDS}
    config["valid_records"] = list(cfg.valid_records)
    config["npmi_table"] = None if cfg.npmi_table is None else str(cfg.npmi_table.resolve())
    job = {"format": JOB_FORMAT,
           "genome": {"path": str(cfg.genome.resolve()), "sha256": source_sha},
           "npmi_table_sha256": table_sha, "groups": n, "config": config}
    digest = _claim_job(work, job)
    summary = Summary()
    path = counts_path(work, i)
    with INTERRUPTS:
        with PieceRunner(cfg.workers, cfg.piece_bases, cfg.k) as runner:
            layout = _Layout()
            counts = scan_genome(cfg, runner, summary, cfg.npmi_table is None,
                                 pieces=lambda j: j % n == i, on_piece=layout.add)
        flat = np.zeros(0, np.int64) if counts is None else np.concatenate(counts[1:])
        layout = layout.arrays()
        INTERRUPTS.check()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, counts=flat, job=np.array(digest), reader=np.array(json.dumps(
                summary.reader_fields())), seconds=np.array(time.perf_counter() - start),
                **layout)
    print(f"{path}: group {i}/{n}, {len(layout['piece'])} pieces, "
          f"{int(layout['bases'].sum()):,} bases, {time.perf_counter() - start:.2f} s", file=out)
    return path


class _Layout:
    """Number, new bases and samples per split (count and lengths) of each of a group's
    pieces, as pass 1 of `build` lays them out (preprocessing.build.scan_genome)."""

    def __init__(self):
        self.piece, self.bases = [], []
        self.per = {s: ([], []) for s in SPLITS}      # samples per piece, lengths

    def add(self, number: int, r: Scanned) -> None:
        self.piece.append(number)
        self.bases.append(len(r.piece.seq) - r.piece.overlap)
        for split, smask in (("train", ~r.valid), ("valid", r.valid)):
            self.per[split][0].append(int(smask.sum()))
            self.per[split][1].append(r.lengths[smask].astype(np.uint16))   # <= MAX_TOKENS

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"piece": np.array(self.piece, dtype=np.int64),
               "bases": np.array(self.bases, dtype=np.int64)}
        for split, (counts, lens) in self.per.items():
            out[f"{split}_n"] = np.array(counts, dtype=np.int64)
            out[f"{split}_len"] = np.concatenate(lens) if lens else np.zeros(0, np.uint16)
        return out


def table_stage(work: Path, out=sys.stdout) -> Path:
    """Stage 2: sum the groups' counts into WORK/npmi.tsv (exactly as `build` writes it) and
    plan the shard stage: each group's run of pieces, and where build's shards begin and end."""
    start = time.perf_counter()
    job, digest = load_job(work)
    cfg = _job_config(job, out_dir=work)
    n = job["groups"]
    paths = [counts_path(work, i) for i in range(n)]
    _missing(paths, "count", n)
    parts = [_load_part(p, digest) for p in paths]
    counts = external = None
    if cfg.npmi_table is None:
        flat = np.sum([p["counts"] for p in parts], axis=0)
        counts, at = [np.zeros(1, dtype=np.int64)], 0
        for m in range(1, cfg.k + 1):
            counts.append(flat[at:at + 4 ** m])
            at += 4 ** m
    else:
        external = load_table(cfg.npmi_table, cfg.k)
        if sha256_file(cfg.npmi_table) != job["npmi_table_sha256"]:
            raise InputError(f"{cfg.npmi_table}: changed since the `count` stage; rerun the job")
    table = write_npmi_table(work / TABLE_NAME, cfg, job["genome"]["sha256"], counts, external,
                             job["npmi_table_sha256"])
    plan = _plan(parts, n, cfg.shard_tokens, work)
    with atomic_path(work / "plan.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, job=np.array(digest), **plan)
    secs = time.perf_counter() - start
    with atomic_path(work / "table.json") as tmp:
        tmp.write_text(json.dumps({"job": digest, "seconds": secs,
                                   "sha256": sha256_file(work / TABLE_NAME)}) + "\n")
    print(f"{work / TABLE_NAME}: {int((~np.isnan(table)).sum())} of {4 ** cfg.k} "
          f"{cfg.k}-mers scored; {len(plan['train_shard_end'])} train and "
          f"{len(plan['valid_shard_end'])} valid shards planned; {secs:.2f} s", file=out)
    return work / TABLE_NAME


def _plan(parts: list[dict], n: int, shard_tokens: int, work: Path) -> dict[str, np.ndarray]:
    total = sum(len(p["piece"]) for p in parts)
    for i, p in enumerate(parts):       # count task i had pieces i, i+n, ...
        if not np.array_equal(p["piece"], np.arange(i, total, n)):
            raise InputError(f"{counts_path(work, i)}: not the pieces of group {i}/{n} of this "
                             f"genome; rerun its `count` task")
    order = [(j % n, j // n) for j in range(total)]      # (part, position) of piece j
    bases = np.array([parts[g]["bases"][m] for g, m in order], dtype=np.int64)
    cum = np.concatenate(([0], np.cumsum(bases)))
    # contiguous runs of pieces, 1/n of the bases each: group g starts at the first piece
    # beginning at or after g/n of the genome
    piece_start = np.searchsorted(cum[:-1], np.arange(n + 1) * int(cum[-1]) // n)
    piece_start[-1] = total
    plan = {"piece_start": piece_start.astype(np.int64)}
    for split in SPLITS:
        offs = [np.concatenate(([0], np.cumsum(p[f"{split}_n"]))) for p in parts]
        lens = [parts[g][f"{split}_len"][offs[g][m]:offs[g][m + 1]] for g, m in order]
        per_piece = np.array([parts[g][f"{split}_n"][m] for g, m in order], dtype=np.int64)
        plan[f"{split}_sample_start"] = np.concatenate(([0], np.cumsum(per_piece)))
        lengths = np.concatenate(lens) if lens else np.zeros(0, np.uint16)
        plan[f"{split}_shard_end"] = shard_ends(lengths, shard_tokens)
    return plan


def shard_stage(genome: Path, work: Path, group: tuple[int, int], workers: int = 1,
                out=sys.stdout) -> Path:
    """Stage 3: cut group i's run of pieces as `build` does, with the NPMI of `table`, into
    the shards that lie wholly in the run and fragments of those shared with a neighbour."""
    start = time.perf_counter()
    i, n = group
    job, digest = load_job(work)
    if n != job["groups"]:
        raise InputError(f"--group {i}/{n}: {work / JOB_NAME} was counted in {job['groups']} "
                         f"groups")
    cfg = _job_config(job, genome=genome, out_dir=work, workers=workers)
    _check_genome(job, genome)
    table, table_sha = _table_of(work, digest, cfg.k)
    plan = _load_part(work / "plan.npz", digest)
    p0, p1 = int(plan["piece_start"][i]), int(plan["piece_start"][i + 1])
    attrs = shard_attrs(cfg.k, table_sha, job["genome"]["sha256"], cfg.seed)
    shards = SplitShards(lambda split: ShardWriter(
        work, split, attrs, cfg.shard_tokens, cfg.piece_bases + cfg.k,
        shard_end=plan[f"{split}_shard_end"], first=int(plan[f"{split}_sample_start"][p0]),
        group=i))
    reader = FastaReader(cfg.genome, cfg.piece_bases, cfg.k - 1, cfg.min_bases)
    run = itertools.islice(reader, p0, p1)      # the reader stops after this group's run

    with INTERRUPTS:
        with PieceRunner(cfg.workers, cfg.piece_bases, cfg.k) as runner:
            for _, cut in runner.cut(run, cfg.seed, cfg.valid_fraction, cfg.valid_records, table):
                INTERRUPTS.check()
                shards.add(cut)
            entries = shards.close()
        INTERRUPTS.check()
        stats = shards.stats()
        for split in SPLITS:
            want = int(plan[f"{split}_sample_start"][p1] - plan[f"{split}_sample_start"][p0])
            if stats["samples"][split] != want:
                raise InputError(f"{genome}: group {i}/{n} cut {stats['samples'][split]} "
                                 f"{split} samples, `count` planned {want}; rerun the job")
        stats["seconds"] = time.perf_counter() - start
        path = part_path(work, i)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({
                "job": digest, "pieces": [p0, p1], "stats": stats,
                "shards": entries, "fragments": shards.fragments}, indent=1) + "\n")
    print(f"{path}: group {i}/{n}, pieces [{p0}, {p1}), {stats['samples']['train']:,} train "
          f"and {stats['samples']['valid']:,} valid samples, {time.perf_counter() - start:.2f} s",
          file=out)
    return path


def finish_stage(work: Path, out_dir: Path, keep_work: bool = False, out=sys.stdout) -> Manifest:
    """Stage 4: join the fragments of shards shared by groups, write the manifest, publish the
    dataset into OUT_DIR at once (as `build` does). Refuses while any part is missing or belongs
    to another job. Removes WORK afterwards unless keep_work."""
    start = time.perf_counter()
    job, digest = load_job(work)
    cfg = _job_config(job, out_dir=out_dir)
    n = job["groups"]
    table, table_sha256 = _table_of(work, digest, cfg.k)
    plan = _load_part(work / "plan.npz", digest)
    paths = [part_path(work, i) for i in range(n)]
    _missing(paths, "shard", n)
    parts = [json.loads(p.read_text()) for p in paths]
    for p, part in zip(paths, parts):
        if part.get("job") != digest:
            raise InputError(f"{p}: made for another job than {work / JOB_NAME}; rerun its "
                             f"`shard` task")
    source_sha = job["genome"]["sha256"]
    params = params_of(cfg, job["npmi_table_sha256"])
    with output_lock(cfg.out_dir):
        if (m := check_target(cfg.out_dir, cfg.overwrite, params, source_sha, out,
                              "--overwrite (to `count`)")) is not None:
            return m
        counts = [_load_part(counts_path(work, i), digest) for i in range(n)]
        summary = Summary(**json.loads(str(counts[0]["reader"])))
        for part in parts:
            summary.add_cuts(part["stats"])
        check_train_samples(cfg.genome, cfg.min_bases, summary)
        whole = {(e["split"], e["path"]): (e, g) for g, part in enumerate(parts)
                 for e in part["shards"]}
        pieces_of: dict[tuple[str, int], list[dict]] = {}
        for part in parts:
            for f in part["fragments"]:
                pieces_of.setdefault((f["split"], f["shard"]), []).append(f)
        for e, g in whole.values():
            if not (work / e["path"]).is_file():
                raise InputError(f"{work / e['path']}: missing; rerun `shard` task {g}")

        with Staging(cfg.out_dir) as staging, INTERRUPTS:
            partial = staging.dir
            shutil.copyfile(work / TABLE_NAME, partial / TABLE_NAME)
            attrs = shard_attrs(cfg.k, table_sha256, source_sha, cfg.seed)
            entries = []
            for split in SPLITS:
                ends = plan[f"{split}_shard_end"]
                for sh in range(len(ends)):
                    INTERRUPTS.check()
                    name = shard_name(split, sh)
                    want = int(ends[sh] - (ends[sh - 1] if sh else 0))
                    if (split, name) in whole:
                        entry = whole[(split, name)][0]
                        _link_or_copy(work / name, partial / name)
                    else:
                        entry = _join(work, partial / name, pieces_of.get((split, sh), []), want,
                                      split, attrs)
                    entries.append(entry)
            summary.shards = len(entries)
            summary.seconds = (time.perf_counter() - start
                               + sum(float(c["seconds"]) for c in counts)
                               + json.loads((work / "table.json").read_text())["seconds"]
                               + sum(p["stats"]["seconds"] for p in parts))
            manifest = dataset_manifest(cfg.k, cfg.genome, source_sha, params, table_sha256,
                                        entries, summary, table)
            staging.publish(manifest)
    for line in summary.lines():
        print(line, file=out)
    print(f"wrote {cfg.out_dir}", file=out)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where WORK and OUT_DIR share a file system (instant); WORK stays whole until
    the dataset is published, so an interrupted finish can simply be run again."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _join(work: Path, path: Path, fragments: list[dict], want: int, split: str,
          attrs: dict) -> dict:
    """One shard from its groups' fragments, in group (= genome) order."""
    fragments = sorted(fragments, key=lambda f: f["group"])
    if sum(f["samples"] for f in fragments) != want:
        raise InputError(f"{work}: the fragments of {path.name} hold "
                         f"{sum(f['samples'] for f in fragments)} of its {want} samples; rerun "
                         f"the `shard` tasks of groups "
                         f"{', '.join(str(f['group']) for f in fragments) or '(none found)'}")
    paths = [work / f["path"] for f in fragments]
    group_of = {p: f["group"] for p, f in zip(paths, fragments)}
    try:
        return merge(paths, path, split=split, **attrs)
    except ShardError as e:
        if e.path not in group_of:      # not a fragment: the shard being written
            raise
        raise InputError(f"{e}; rerun `shard` task {group_of[e.path]}") from None
