"""What every ``eval/`` script shares: the record of what was evaluated and the output folder's life cycle.

An evaluation's report (one JSON object) goes to stdout, always: a cron job or a shell pipe reads it there.
With ``--output_dir`` the run is also a stage like the others: the folder holds ``report.json``, the per-item
tables (JSONL, so a figure can be audited row by row) and ``pipeline.json`` (resolved arguments, what was
evaluated, file hashes); an identical re-run prints the stored report without loading a model, and a
different one is refused unless ``--overwrite`` is given.

The record of the artifact (``artifact_record``) names the base model, the adapter and template, and hashes
them (config and weights of the base as ``utils.artifacts.base_fingerprint`` does, every adapter file, the
template), so two reports say whether they scored the same weights.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from utils.args import Group, unfingerprinted
from utils.artifacts import Output, base_fingerprint, sha256_file, sha256_json, write_json
from utils.errors import SuiteError
from utils.jsonl import write_jsonl

REPORT_FILE = "report.json"


@dataclass(frozen=True)
class Destination(Group):
    """Where the report folder goes (optional: the report is printed either way)."""

    output_dir: str = unfingerprinted("", why="where the report is written, not what it says")
    overwrite: bool = unfingerprinted(False, why="a permission: it only allows what is otherwise refused")


@dataclass(frozen=True)
class UnparsedChecks(Group):
    """When a judged run ends non-zero although everything was written (R25): more than ``max_unparsed`` of the
    judge's outputs unparsed (or failed), or any at all with ``strict``. A verdict on the outputs, not part of
    them, so it is checked again on a no-op re-run and never changes a file."""

    max_unparsed: float = unfingerprinted(0.05, why="a verdict on the outputs, not part of them")
    strict: bool = unfingerprinted(False, why="a verdict on the outputs, not part of them")

    def problems(self) -> list[str]:
        ok = isinstance(self.max_unparsed, (int, float)) and 0 <= self.max_unparsed <= 1
        return [] if ok else [f"--max_unparsed must be a fraction in [0, 1], got {self.max_unparsed}"]


def file_record(path: str | Path) -> dict:
    """An input file as the report records it: absolute path, size and sha256."""
    p = Path(path)
    return {"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": sha256_file(p)}


def artifact_record(plan: Any) -> dict:
    """What a ``utils.inference.loading.Plan`` will load, with hashes: ``fingerprint`` changes when any weight,
    adapter file, template, dtype or quantization changes, and not when the same files are named another way."""
    info = plan.info
    base = base_fingerprint(plan.source.base)
    adapter = {}
    if plan.source.adapter:
        folder = Path(plan.source.adapter)
        adapter = {p.name: sha256_file(p) for p in sorted(folder.iterdir())
                   if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name == "adapter_config.json")}
    template = getattr(plan, "template", None)
    template_hash = sha256_json(template.data) if getattr(template, "data", None) is not None else None
    record = {"base_model": info.get("base_model"), "adapter": info.get("adapter"), "method": info.get("method"),
              "template": info.get("template"), "dtype": info.get("dtype"), "quantization": info.get("quantization")}
    record["fingerprint"] = sha256_json({"base": base, "adapter": adapter, "template": template_hash,
                                         "dtype": record["dtype"], "quantization": record["quantization"]})
    return record


def emit(report: dict) -> None:
    """The payload: the report as JSON on stdout."""
    sys.stdout.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


class EvalOutput:
    """The optional report folder of one eval script (see module docstring). Claimed at construction, before
    any work: a folder this stage may not write is refused then."""

    def __init__(self, destination: Destination, stage: str):
        self.stage = stage
        self.out = Output(destination.output_dir, stage, destination.overwrite) if destination.output_dir else None

    def finished(self, fingerprint: str) -> dict | None:
        """The stored report when the folder already holds this exact evaluation, else None."""
        if self.out is None or not self.out.up_to_date(fingerprint):
            return None
        try:
            report = json.loads((self.out.path / REPORT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SuiteError(f"--output_dir {self.out.path}: its {REPORT_FILE} cannot be read ({exc}); "
                             "pass --overwrite to evaluate again") from None
        print(f"{self.stage}: --output_dir {self.out.path} already holds this evaluation "
              f"(fingerprint {fingerprint[:12]}); nothing to do", file=sys.stderr)
        return report

    def write(self, fingerprint: str, report: dict, tables: dict[str, Iterable[dict]] | None = None,
              **meta: Any) -> None:
        """Write report.json and each ``tables`` entry (file name -> rows) as JSONL, then pipeline.json, all
        staged in a hidden sibling and renamed into place (no half-written folder)."""
        if self.out is None:
            return
        with self.out.produce(fingerprint, **meta) as st:
            write_json(st.dir / REPORT_FILE, report)
            for name, rows in (tables or {}).items():
                write_jsonl(st.dir / name, rows)
        print(f"{self.stage}: wrote {self.out.path}", file=sys.stderr)
