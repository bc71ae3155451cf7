"""The ``scaling`` suite: the runs of ``benchmarks/suites/scaling.yaml``, each one command of the
parallel-efficiency tool (``python -m secondorder.scaling measure|project``) writing
``<name>.json``, ``.md`` and ``.png`` into the results folder. With ``report_only`` every
``.md`` and ``.png`` is rebuilt from its ``.json`` alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from secondorder.scaling import cli
from secondorder.scaling.report import rebuild


def _flat(items: list[Any]) -> list[str]:
    """One level of nested lists (YAML aliases of shared argument lists) flattened."""
    return [str(x) for item in items for x in (item if isinstance(item, list) else [item])]


def command_of(name: str, run: dict[str, Any], out: Path) -> list[str]:
    """The tool's arguments of one run of the suite file."""
    args = [a.replace("{out}", str(out)) for a in _flat(run["args"])]
    return [run["mode"], "--name", name, "--out", str(out), *args, "--", *_flat(run["overrides"])]


def main(path: Path, *, out: Path, only: set[str] | None, report_only: bool) -> int:
    runs: dict[str, dict[str, Any]] = yaml.safe_load(path.read_text())["runs"]
    unknown = (only or set()) - set(runs)
    if unknown:
        raise SystemExit(f"error: the scaling suite has no run {', '.join(sorted(unknown))}")
    for name, run in runs.items():
        if only is not None and name not in only:
            continue
        if report_only:
            result = out / f"{name}.json"
            if result.is_file():
                rebuild(result)
                print(f"rebuilt {result.with_suffix('.md')} and .png", flush=True)
            else:
                print(f"not run yet, left out: {result}", flush=True)
        else:
            cli.main(command_of(name, run, out))
    return 0
