"""Self-describing, atomically written stage outputs.

Every stage writes its output folder under a temporary name beside the destination and renames it
into place only when complete, so a crash never leaves a half-written folder where the next stage
looks. The last file written is ``pipeline.json`` (``META_FILE``): the stage, its resolved arguments,
its inputs with their hashes, a fingerprint of everything that determines the output, and the hash
of every file in the folder. The next stage needs only the folder's path.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import filecmp
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Iterator

from utils.errors import SuiteError

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


def base_fingerprint(base_model: str | Path) -> dict:
    """What identifies a base model (recorded by finetune.py, checked by the loader and export_hf.py): its
    config and each weight file's size and hash (files of 256 MiB or more by size only)."""
    base = Path(base_model)
    weights = {f.name: [f.stat().st_size, sha256_file(f) if f.stat().st_size < 1 << 28 else None]
               for f in sorted(base.glob("*.safetensors"))}
    return {"config": sha256_file(base / "config.json"), "weights": weights}


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


# Names inside an output folder that say nothing about whose folder it is: our locks (``.lock``, ``.NAME.lock``:
# a killed run may leave one) and the temporary names of our atomic writes (``.NAME.xxxxxxxx.tmp``, ``.NAME.tmp-…``).
_TRANSIENT = re.compile(r"^\.((.+\.)?lock|.+\.tmp(-.*)?)$")
# How a refusal names the output a stage writes, where the stage's name does not read well.
_NOUNS = {"finetune": "fine-tune"}


def transient(name: str) -> bool:
    """Whether ``name`` (an entry of an output folder) is our lock or a temporary file of an atomic write."""
    return bool(_TRANSIENT.match(name))


def output_state(folder: str | Path, stage: str, resumable: Callable[[Path], bool] | None = None
                 ) -> tuple[str, dict | None]:
    """Classify a destination folder for ``stage``, reading only (nothing is changed).

    Returns:
        (state, meta): ``missing``; ``empty`` (nothing but our lock / temporary files); ``complete`` or
        ``unfinished`` (its pipeline.json is this stage's, finished or not; ``resumable(folder)`` may also
        recognise an unfinished output without one); ``other`` (another stage's output); ``unreadable``
        (a pipeline.json this suite cannot read); ``foreign`` (files this suite did not write).

    Raises:
        SuiteError: if ``folder`` exists and is not a folder.
    """
    folder = Path(folder)
    if not folder.exists():
        return "missing", None
    if not folder.is_dir():
        raise SuiteError(f"{folder} exists and is not a folder")
    if not any(not transient(p.name) for p in folder.iterdir()):
        return "empty", None
    if (folder / META_FILE).exists():
        meta = read_meta(folder)
        if not isinstance(meta, dict) or not isinstance(meta.get("stage"), str):
            return "unreadable", None
        if meta["stage"] != stage:
            return "other", meta
        return ("complete" if meta.get("complete") else "unfinished"), meta
    if resumable is not None and resumable(folder):
        return "unfinished", None
    return "foreign", None


def claim_output_dir(output_dir: str | Path, stage: str, overwrite: bool, *, flag: str = "--output_dir",
                     resumable: Callable[[Path], bool] | None = None) -> str:
    """The one destination rule of every stage, applied before any work (it reads only).

    A destination may be missing or empty, or hold an output of this same stage (finished: the stage then
    compares fingerprints; unfinished: the stage resumes or restarts it). Any other non-empty folder is
    refused: one holding another stage's output always (it is never replaced), one holding files this suite
    did not write unless ``overwrite`` is set; then the stage writes its files into it and keeps every
    other file (see ``install``).

    Returns:
        The destination's state (see ``output_state``).

    Raises:
        SuiteError: naming ``flag``, if the destination is refused.
    """
    try:
        state, meta = output_state(output_dir, stage, resumable)
    except SuiteError as exc:
        raise SuiteError(f"{flag} {exc}") from None
    noun = _NOUNS.get(stage, f"{stage} output")
    if state == "other":
        raise SuiteError(f"{flag} {output_dir} holds a {meta['stage']} output, not a {noun}; choose another "
                         "folder (--overwrite never replaces another stage's output)")
    if state == "unreadable":
        raise SuiteError(f"{flag} {output_dir} holds a {META_FILE} this suite cannot read; choose another folder")
    if state == "foreign" and not overwrite:
        names = sorted(p.name for p in Path(output_dir).iterdir() if not transient(p.name))
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise SuiteError(f"{flag} {output_dir} exists, is not empty and was not written by this suite ({shown}); "
                         "choose another folder, or pass --overwrite to write this stage's files into it "
                         "(files it did not write are kept)")
    return state


def check_output_dir(output_dir: str | Path, stage: str, fingerprint: str, overwrite: bool, *,
                     flag: str = "--output_dir", resumable: Callable[[Path], bool] | None = None) -> bool:
    """Decide what to do with the destination once the output's fingerprint is known.

    Returns:
        True if it already holds this exact output (the stage is a no-op), False if the stage should run.

    Raises:
        SuiteError: if ``claim_output_dir`` refuses it, or it holds a different finished output of this
            stage and ``overwrite`` is not set.
    """
    state = claim_output_dir(output_dir, stage, overwrite, flag=flag, resumable=resumable)
    if state != "complete":
        return False
    meta = read_meta(output_dir)
    if meta.get("fingerprint") == fingerprint:
        return True
    if not overwrite:
        raise SuiteError(
            f"{flag} {output_dir} holds a different {meta['stage']} output "
            f"(fingerprint {str(meta.get('fingerprint'))[:12]} != {fingerprint[:12]}); pass --overwrite to replace it"
        )
    return False


def umask() -> int:
    """The process's umask, read without changing it where Linux reports it (``os.umask`` sets it: another
    thread creating a file at that moment would get the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(root: str | Path) -> None:
    """Give ``root`` and everything under it the modes the user's umask gives new files and folders.

    Some writers create files private to the owner whatever the umask (safetensors' ``save_file`` writes
    0600); an output folder is meant to be read by the next stage, possibly as another user.
    """
    mask = umask()
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        want = (0o777 if path.is_dir() or mode & 0o111 else 0o666) & ~mask
        if mode & 0o7777 != want:
            os.chmod(path, want)


def _inside(folder: Path, rel: str) -> Path | None:
    """``folder/rel`` if ``rel`` is a plain relative path that stays inside ``folder``, else None."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return None
    return folder / p


def _free_name(path: Path) -> Path:
    for i in range(1000):
        candidate = path.with_name(path.name + (".orig" if i == 0 else f".orig{i}"))
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
    raise SuiteError(f"cannot find a free name to keep {path}")


def _same_file_content(a: Path, b: Path) -> bool:
    return a.is_file() and not a.is_symlink() and filecmp.cmp(a, b, shallow=False)


def _remove_files(folder: Path, rels) -> None:
    """Remove ``folder/rel`` for each recorded relative path (only plain files inside ``folder``) and the
    folders that leaves empty."""
    parents = set()
    for rel in rels:
        path = _inside(folder, rel)
        if path is None or not (path.is_file() or path.is_symlink()):
            continue
        path.unlink()
        parents.update(p for p in path.parents if folder in p.parents)
    for p in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        try:
            p.rmdir()
        except OSError:  # not empty: it holds files we did not record
            pass


def remove_recorded(folder: str | Path, meta: dict | None) -> None:
    """Remove the files an earlier output of ours recorded in its pipeline.json (and the folders that
    leaves empty), then that pipeline.json; nothing else."""
    folder = Path(folder)
    _remove_files(folder, (meta or {}).get("files") or {})
    (folder / META_FILE).unlink(missing_ok=True)


def install(src: Path, dest: Path, stage: str, owned: Callable[[str], bool] | None = None) -> None:
    """Move the finished files of ``src`` into an existing, non-empty ``dest``; ``pipeline.json`` last.

    An earlier output of this stage in ``dest`` is replaced: the files its pipeline.json records are
    removed (meanwhile the folder is marked as this stage's unfinished output, listing old and new files,
    so a crash leaves a folder the next run knows as ours). Every other file is kept; one in the way of a
    new file is kept as ``NAME.orig``, unless it holds the same bytes. ``owned(top_level_name)``: what
    else in ``dest`` is this stage's (not reported as kept).
    """
    src, dest = Path(src), Path(dest)
    old = read_meta(dest)
    new = sorted(rel for rel in (p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
                 if rel != META_FILE)
    if old is not None and old.get("stage") == stage:
        recorded = set(old.get("files") or {})
        write_json(dest / META_FILE, {"meta_version": META_VERSION, "stage": stage, "complete": False,
                                      "files": {rel: None for rel in sorted(recorded | set(new))}})
        _remove_files(dest, recorded)
    renamed = []
    for rel in new:
        target = dest / rel
        # Someone else's file or folder in the way: at the target, or a file / link where a parent must be.
        for b in [*(dest / p for p in reversed(Path(rel).parents) if p != Path(".")), target]:
            if b == target and _same_file_content(b, src / rel):
                continue  # replacing it loses nothing (e.g. an interrupted install of this same output)
            if (b.exists() or b.is_symlink()) and (b == target or b.is_symlink() or not b.is_dir()):
                aside = _free_name(b)
                os.replace(b, aside)
                renamed.append((b.relative_to(dest).as_posix(), aside.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src / rel, target)
    if (src / META_FILE).is_file():
        os.replace(src / META_FILE, dest / META_FILE)
    ours = {rel.split("/", 1)[0] for rel in new} | {META_FILE}
    kept = sorted(p.name for p in dest.iterdir() if p.name not in ours and not transient(p.name)
                  and not (owned and owned(p.name)))
    for name, aside in renamed:
        print(f"{stage}: kept {dest / name}, which this suite did not write, as {aside} (this stage writes "
              f"{name})", file=sys.stderr)
    if kept:
        shown = ", ".join(kept[:10]) + (f" and {len(kept) - 10} more" if len(kept) > 10 else "")
        print(f"{stage}: kept what {dest} held that this stage does not write: {shown}", file=sys.stderr)


@contextmanager
def staged_dir(output_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it becomes ``output_dir``, on error it is removed.

    A missing (or empty) destination is replaced by one rename, so it never holds a partial output. An
    existing one (allowed by ``claim_output_dir``: an earlier output of this stage, or files of the user's
    with --overwrite) receives the new files by ``install``: only our own earlier files are removed.
    The stage name comes from the staged folder's pipeline.json (``finish_meta`` writes it there).
    """
    output_dir = Path(output_dir).absolute()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir()
    try:
        yield tmp
        apply_umask(tmp)
        try:
            os.replace(tmp, output_dir)  # also replaces an empty folder
            return
        except OSError:
            if not output_dir.is_dir():
                raise
        install(tmp, output_dir, (read_meta(tmp) or {}).get("stage", "?"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def finish_meta(folder: Path, meta: dict, known_hashes: dict[str, str] | None = None) -> dict:
    """Write ``pipeline.json`` last, with the hash of every other file in ``folder``. ``known_hashes``: sha256
    of files already hashed while they were written (by relative path), not read again."""
    files = {}
    known = known_hashes or {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != META_FILE:
            rel = path.relative_to(folder).as_posix()
            files[rel] = known[rel] if rel in known else sha256_file(path)
    return write_meta(folder, meta, files)


def write_meta(folder: Path, meta: dict, files: dict[str, str]) -> dict:
    """Write a complete ``pipeline.json`` into ``folder``: the stage's ``meta`` (stage, fingerprint, args,
    inputs, ...) in the one envelope every stage uses (format version, when, which Python, file hashes)."""
    meta = {
        "meta_version": META_VERSION,
        **meta,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "files": files,
        "complete": True,
    }
    write_json(Path(folder) / META_FILE, meta)
    return meta


def library_versions(*names: str) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# -- reading an output folder ----------------------------------------------------------------------


@dataclass(frozen=True)
class OutputInfo:
    """What a stage's ``pipeline.json`` says about its folder (the one typed reader of it)."""

    folder: Path
    stage: str
    complete: bool
    fingerprint: str | None
    args: dict
    files: dict
    raw: dict

    @property
    def base_model(self) -> dict:
        """The base a fine-tune was trained on: ``{"path": ..., "fingerprint": ...}`` (empty if none recorded)."""
        base = self.raw.get("base_model")
        return base if isinstance(base, dict) else {}


def read_output(folder: str | Path) -> OutputInfo | None:
    """The folder's ``pipeline.json`` as an ``OutputInfo``, or None if it has none this suite can read."""
    meta = read_meta(folder)
    if not isinstance(meta, dict) or not isinstance(meta.get("stage"), str):
        return None
    return OutputInfo(folder=Path(folder), stage=meta["stage"], complete=bool(meta.get("complete")),
                      fingerprint=meta.get("fingerprint"), args=meta.get("args") or {},
                      files=meta.get("files") or {}, raw=meta)


def finished_output(folder: str | Path, stage: str, flag: str) -> OutputInfo | None:
    """The folder's record if it is an output of ``stage``; refused if that output did not finish."""
    info = read_output(folder)
    if info is None or info.stage != stage:
        return None
    if not info.complete:
        raise SuiteError(f"{flag} {folder}: an unfinished {stage} run (its {META_FILE} is not complete)")
    return info


# -- the stage life cycle --------------------------------------------------------------------------


class Lock:
    """An exclusive lock on a destination: a second run on it at the same time is refused.

    The lock file lives only as long as the lock: the holder removes it before unlocking. A run that had
    opened the file before that removal, and then gets the lock, finds that the path is no longer its
    file and tries again, so two runs never both hold it.
    """

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = Path(path), what, None

    def __enter__(self):
        for _ in range(100):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise SuiteError(f"{self.what} is in use by another run") from None
            try:
                mine = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                mine = False
            if mine:
                self.fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking
                return self
            os.close(fd)
        raise SuiteError(f"{self.what}: could not lock {self.path}")

    def __exit__(self, *exc):
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: see the class docstring
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def sweep_stale(output_dir: str | Path) -> None:
    """Remove staging folders (``.NAME.tmp-PID-xxxxxx``) whose process is gone (a killed earlier run)."""
    out = Path(output_dir).absolute()
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            continue


@dataclass
class Staging:
    """The hidden folder a stage writes into. ``meta``: what its pipeline.json records besides the stage and
    fingerprint; ``known_hashes``: sha256 of files already hashed while written (not read again)."""

    dir: Path
    meta: dict = field(default_factory=dict)
    known_hashes: dict = field(default_factory=dict)


class Output:
    """One stage's destination folder, from the claim (before any work) to the rename of its finished files.

    The life cycle every stage follows::

        out = Output(output_dir, STAGE, overwrite)     # refuse a foreign / another stage's folder, now
        ...validate, compute the fingerprint...
        if out.up_to_date(fingerprint):                # an identical re-run is a no-op
            return
        with out.produce(fingerprint) as st:           # lock, stage in a hidden sibling
            ...write files into st.dir, record in st.meta...
        # pipeline.json written last, then renamed into place (or installed into a kept folder)

    finetune.py's run folder is the one output written in place (it resumes); it uses the same claim and
    lock (``utils.training.checkpoint.RunFolder``).
    """

    def __init__(self, path: str | Path, stage: str, overwrite: bool, *, flag: str = "--output_dir",
                 resumable: Callable[[Path], bool] | None = None):
        self.path, self.stage, self.overwrite, self.flag, self.resumable = Path(path), stage, overwrite, flag, resumable
        self.state = claim_output_dir(self.path, stage, overwrite, flag=flag, resumable=resumable)

    def up_to_date(self, fingerprint: str) -> bool:
        """Whether the destination already holds this exact output (refused: a different one, without
        --overwrite)."""
        return check_output_dir(self.path, self.stage, fingerprint, self.overwrite, flag=self.flag,
                                resumable=self.resumable)

    def lock(self) -> Lock:
        """The destination's lock: a sibling file (the destination itself may not exist yet)."""
        path = self.path.absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        return Lock(path.with_name(f".{path.name}.lock"), f"{self.flag} {self.path}")

    @contextmanager
    def produce(self, fingerprint: str | Callable[[], str], **meta: Any) -> Iterator[Staging]:
        """Stage the output under the destination's lock; on success write pipeline.json last and rename.

        ``fingerprint`` may be a function, for inputs hashed in the background while the work runs: it is called
        when the destination holds a finished output to compare with, and when pipeline.json is written.
        """
        value = fingerprint if callable(fingerprint) else (lambda: fingerprint)
        sweep_stale(self.path)
        with self.lock():
            # Again under the lock: another run may have changed the folder since the claim.
            if claim_output_dir(self.path, self.stage, self.overwrite, flag=self.flag,
                                resumable=self.resumable) == "complete":
                self.up_to_date(value())
            with staged_dir(self.path) as tmp:
                st = Staging(tmp, dict(meta))
                yield st
                # stage and fingerprint first (a person reads them first), and never replaced by the stage's own record
                head = {"stage": self.stage, "fingerprint": value()}
                finish_meta(tmp, {**head, **st.meta, **head}, st.known_hashes)
