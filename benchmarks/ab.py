"""One benchmark on two checkouts, side by side: before and after a change.

`python -m llmesh.benchmarks.ab --before DIR -- MODULE [ARGS...]` runs
`python -m llmesh.benchmarks.MODULE ARGS` in DIR (a checkout of the commit
before, e.g. `git worktree add DIR COMMIT`; its protos are generated there
first) and in this checkout, `--rounds` times each, the order alternating per
round, on the same machine in one run. Each run's results file is kept whole;
the report also gives, per tree, the median over rounds of every number in the
results' `rows` (matched by position), or of every number in the results.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from llmesh.benchmarks import kit

HERE = Path(__file__).resolve().parents[1]


def options(p) -> None:
    p.add_argument("--before", required=True, help="a checkout of the commit before")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("bench", nargs="+", help="MODULE [ARGS...] (after --)")


def _protos(tree: Path) -> None:
    if not (tree / "llmesh" / "v1" / "inference_pb2.py").exists():
        (tree / "llmesh" / "v1").mkdir(parents=True, exist_ok=True)
        (tree / "llmesh" / "v1" / "__init__.py").touch()
        protos = sorted(str(p.relative_to(tree)) for p in (tree / "protos").rglob("*.proto"))
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", "--python_out=.",
                        "--grpc_python_out=.", *protos], cwd=tree, check=True)


def _once(tree: Path, bench: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        cmd = [sys.executable, "-m", f"llmesh.benchmarks.{bench[0]}", *bench[1:],
               "--json", str(out)]
        kit.log(f"[ab] {tree}: {' '.join(cmd[2:])}")
        subprocess.run(cmd, cwd=tree, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def _figures(report: dict) -> list[dict]:
    """The numbers to take medians of: each row, or every number in the results
    (nested keys joined by dots; the stamp left out)."""
    rows = report.get("rows")
    if isinstance(rows, list):
        return rows
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix[:-1]] = value
    for key, value in report.items():
        if key not in ("command", "args", "machine", "versions", "timestamp"):
            walk(f"{key}.", value)
    return [flat]


def run(args) -> dict:
    trees = {"before": Path(args.before).resolve(), "after": HERE}
    _protos(trees["before"])
    runs = kit.alternate(args.rounds, list(trees), lambda name: _once(trees[name], args.bench))
    medians = {}
    for name, reports in runs.items():
        per_row = zip(*(_figures(r) for r in reports))
        medians[name] = [kit.medians(list(rows)) for rows in per_row]
    return {"trees": {k: str(v) for k, v in trees.items()}, "medians": medians, "runs": runs}


SPEC = kit.Spec("ab", __doc__, options, run, model=None)

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
