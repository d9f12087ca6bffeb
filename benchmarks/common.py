"""What the benchmarks share: the bundled dataset, and their tables."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENOME = ROOT / "data" / "ecoli_k12_mg1655.fa.gz"
DATA_DIR = ROOT / "data" / "ecoli_k12_mg1655"


def add_data_dir(parser) -> None:
    """--data-dir: the dataset a benchmark reads, the bundled genome's unless given."""
    parser.add_argument("--data-dir", default=str(DATA_DIR),
                        help="dataset to read (built from the bundled genome if missing)")


def ensure_data(data_dir: Path, genome: Path = GENOME, *extra: str) -> None:
    """Build `data_dir` from `genome` unless it already holds a dataset."""
    if not (Path(data_dir) / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "preprocessing", "build", str(genome),
                        str(data_dir), *extra], cwd=ROOT, check=True)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """One markdown table; columns are (key, heading, format); a missing value prints as '-'."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = [fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
