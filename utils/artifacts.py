"""Self-describing, atomically written stage outputs.

Every stage writes its output folder under a temporary name beside the destination and renames it
into place only when complete, so a crash never leaves a half-written folder where the next stage
looks. The last file written is ``pipeline.json`` (``META_FILE``): the stage, its resolved arguments,
its inputs with their hashes, a fingerprint of everything that determines the output, and the hash
of every file in the folder. The next stage needs only the folder's path.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from utils.cli import SuiteError

META_FILE = "pipeline.json"
META_VERSION = 1

# Files that define a Hugging Face tokenizer; their hashes identify it.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def tokenizer_fingerprint(model_dir: str | Path) -> dict[str, str]:
    """Hashes of the tokenizer files present in ``model_dir``."""
    model_dir = Path(model_dir)
    return {name: sha256_file(model_dir / name) for name in TOKENIZER_FILES if (model_dir / name).is_file()}


def read_meta(folder: str | Path) -> dict | None:
    """The folder's ``pipeline.json``, or None if it has none (or it cannot be read)."""
    path = Path(folder) / META_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: str | Path, value: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_output_dir(output_dir: str | Path, stage: str, fingerprint: str, overwrite: bool) -> bool:
    """Decide what to do with an existing destination.

    Returns:
        True if it already holds this exact output (the stage is a no-op), False if the stage should run.

    Raises:
        SuiteError: if it holds something else and ``overwrite`` is not set, or is not a folder this
            suite wrote (we never delete those).
    """
    output_dir = Path(output_dir)
    if not output_dir.exists():
        return False
    if not output_dir.is_dir():
        raise SuiteError(f"--output_dir {output_dir} exists and is not a folder")
    meta = read_meta(output_dir)
    if meta is not None and meta.get("stage") == stage and meta.get("fingerprint") == fingerprint and meta.get("complete"):
        return True
    if meta is None:
        if any(output_dir.iterdir()):
            raise SuiteError(
                f"--output_dir {output_dir} exists, is not empty and was not written by this suite; "
                "choose another folder (it is never deleted)"
            )
        return False
    if not overwrite:
        raise SuiteError(
            f"--output_dir {output_dir} holds a different {meta.get('stage', '?')} output "
            f"(fingerprint {str(meta.get('fingerprint'))[:12]} != {fingerprint[:12]}); pass --overwrite to replace it"
        )
    return False


@contextmanager
def staged_dir(output_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``output_dir``, on error it is removed."""
    output_dir = Path(output_dir).absolute()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.old-{uuid.uuid4().hex[:6]}")
        os.replace(output_dir, old)
    os.replace(tmp, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def finish_meta(folder: Path, meta: dict, known_hashes: dict[str, str] | None = None) -> dict:
    """Write ``pipeline.json`` last, with the hash of every other file in ``folder``. ``known_hashes``: sha256
    of files already hashed while they were written (by relative path), not read again."""
    files = {}
    known = known_hashes or {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != META_FILE:
            rel = path.relative_to(folder).as_posix()
            files[rel] = known[rel] if rel in known else sha256_file(path)
    meta = {
        "meta_version": META_VERSION,
        **meta,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "files": files,
        "complete": True,
    }
    write_json(folder / META_FILE, meta)
    return meta


def library_versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
