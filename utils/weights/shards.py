"""Weights read and written tensor by tensor: bounded memory whatever the model size.

``ModelWeights`` is a lazy view of a model folder's weights (``model.safetensors``, a sharded
``model.safetensors.index.json``, or, only behind an explicit opt-in, ``pytorch_model*.bin`` read with
``torch.load(weights_only=True)``). A tensor, or a range of its rows, is read from disk when asked for,
with plain positioned reads into a fresh tensor: nothing is memory-mapped, so what a process holds is
what it is working on, not the pages of the shard it came from.

``ShardWriter`` writes safetensors shards from a plan (every tensor's name, dtype and shape, known
before any data is produced, as it is in every conversion here): each shard's header is written first
and the tensors' bytes follow as they are produced, in row chunks if need be, so a shard never has to
be held in memory either. The sha256 of every file is computed while it is written. The format is the
safetensors specification (an 8-byte little-endian header length, a JSON header with dtype, shape and
data offsets, then the raw little-endian bytes); the files are checked against the ``safetensors``
library in the tests.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

from utils.args import Group
from utils.cli import parse_size
from utils.errors import SuiteError
from utils.dtypes import SAFETENSORS_DTYPES, dtype_code, dtype_size, torch_dtype
from utils.artifacts import sha256_file, write_json

MAX_HEADER = 100 << 20  # the safetensors library's own limit
CHUNK_BYTES = 4 << 20  # row chunk for tensors processed piecewise


def return_freed_memory(threshold: int = 4 << 20) -> None:
    """Make freed tensor buffers of ``threshold`` bytes (4 MB) and more go back to the OS at once (glibc only).

    glibc raises its mmap threshold each time a large block is freed, after which blocks of that size
    come from the heap and stay in the process when freed: a conversion that reads thousands of
    multi-MB tensors in turn would then keep the high-water mark of all of them. A fixed threshold
    keeps the resident size at what is live.
    """

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class HashQueue:
    """sha256 updates run on a background thread, in order, overlapping reading and writing (hashlib releases
    the GIL on large buffers). At most ``limit`` bytes wait; ``drain()`` before reading a digest."""

    def __init__(self, limit: int = 64 << 20):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="sha256")
        self.pending: list = []
        self.limit = limit

    def update(self, digest, data) -> None:
        self.pending.append((self.pool.submit(digest.update, data), data.nbytes if hasattr(data, "nbytes") else len(data)))
        while sum(n for _, n in self.pending) > self.limit:
            self.pending.pop(0)[0].result()

    def drain(self) -> None:
        for fut, _ in self.pending:
            fut.result()
        self.pending.clear()


HASHES = HashQueue()


class Scratch:
    """A ring of reusable read buffers: reading thousands of tensors into fresh allocations costs a page fault
    per 4 KB each time (the freed memory goes back to the OS, see ``return_freed_memory``). A slot is reused
    only once the background hashing of what was last written from it has finished (``release``)."""

    def __init__(self, slots: int = 2):
        self.bufs: list = [None] * slots
        self.fences: list = [None] * slots
        self.next = 0
        self.last = None

    def take(self, nbytes: int):
        import torch

        i = self.next
        self.next = (i + 1) % len(self.bufs)
        if self.fences[i] is not None:
            self.fences[i].result()
            self.fences[i] = None
        if self.bufs[i] is None or self.bufs[i].numel() < nbytes:
            self.bufs[i] = None
            self.bufs[i] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        self.last = i
        return self.bufs[i][:nbytes]

    def clear(self) -> None:
        """Give the buffers back (waiting for any hashing that still reads them)."""
        for fence in self.fences:
            if fence is not None:
                fence.result()
        self.bufs = [None] * len(self.bufs)
        self.fences = [None] * len(self.fences)
        self.last = None

    def release(self) -> None:
        """The buffer last taken has been handed to the writer: fence it behind the hashing queued so far."""
        if self.last is not None and HASHES.pending:
            self.fences[self.last] = HASHES.pending[-1][0]


@contextmanager
def conversion_setup():
    """Process settings while a conversion runs: freed buffers go back to the OS, and torch computes on one
    thread. The work is reading, adding and writing memory with a few small matrix products; more intra-op
    threads only spin-wait (doubling CPU time, much worse on a busy machine) and compete with the background
    hashing thread. An explicit OMP_NUM_THREADS is respected; the thread count is restored afterwards (the
    stages also run in-process, e.g. from tests)."""
    import torch

    return_freed_memory()
    before = torch.get_num_threads()
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class OutputWeights(Group):
    """How a stage writes its output's weights (export_hf.py, apply_delta.py): their dtype and shard size."""

    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    max_shard_size: str = "2GB"

    def problems(self) -> list[str]:
        try:
            parse_size(self.max_shard_size)
        except SuiteError as exc:
            return [str(exc)]
        return []


class Entry:
    """One stored tensor: where it lives and what it is."""

    __slots__ = ("name", "dtype", "shape", "path", "start", "end", "pickled")

    def __init__(self, name, dtype, shape, path, start=0, end=0, pickled=None):
        self.name, self.dtype, self.shape, self.path = name, dtype, tuple(shape), Path(path)
        self.start, self.end, self.pickled = start, end, pickled

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * dtype_size(self.dtype)


def read_header(path: str | Path, flag: str | None = None) -> tuple[dict[str, Entry], dict]:
    """The tensors of one safetensors file, validated (bounds, overlaps, sizes). Raises SuiteError, naming
    ``flag`` and the file's folder when given."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SuiteError(f"{flag + ' ' if flag else ''}{path}: cannot be read ({exc.strerror or exc})") from None

    def bad(why: str):
        where = f"{flag} {path.parent}: {path.name}" if flag else str(path)
        return SuiteError(f"{where}: not a valid safetensors file ({why})")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"truncated: {size} bytes, shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise bad(f"header length {n} is beyond the format's limit")
        if 8 + n > size:
            raise bad(f"truncated, or not safetensors: header length {n} does not fit the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    ends = [info["data_offsets"][1] for info in header.values() if isinstance(info, dict)
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
            and isinstance(info["data_offsets"][1], int)]
    if ends and base + max(ends) > size:  # the usual damage: a copy or download cut off
        raise bad(f"truncated: {size:,} bytes, its header needs {base + max(ends):,}; an interrupted copy or "
                  "download?")
    entries: dict[str, Entry] = {}
    spans = []
    for name, info in header.items():
        try:
            code, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} lacks dtype, shape or data_offsets") from None
        if code not in SAFETENSORS_DTYPES:
            raise bad(f"tensor {name!r} has unsupported dtype {code!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise bad(f"tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b and base + b <= size):
            raise bad(f"tensor {name!r} has offsets {a}..{b} outside the file")
        if b - a != math.prod(shape) * dtype_size(code):
            raise bad(f"tensor {name!r}: {b - a} bytes do not hold shape {shape} of {code}")
        entries[name] = Entry(name, code, shape, path, base + a, base + b)
        spans.append((a, b, name))
    spans.sort()
    for (a1, b1, n1), (a2, _, n2) in zip(spans, spans[1:]):
        if a2 < b1:
            raise bad(f"tensors {n1!r} and {n2!r} overlap")
    return entries, meta


def read_entry(entry: Entry, rows: tuple[int, int] | None = None, scratch: Scratch | None = None):
    """The tensor (or rows ``[r0, r1)`` of its first dimension), freshly allocated or in a ``scratch`` slot."""
    import torch

    if entry.pickled is not None:
        t = entry.pickled()
        return (t if rows is None else t[rows[0]:rows[1]]).clone()
    shape = list(entry.shape)
    start, nbytes = entry.start, entry.nbytes
    if rows is not None:
        r0, r1 = rows
        start += r0 * entry.row_bytes
        nbytes = (r1 - r0) * entry.row_bytes
        shape[0] = r1 - r0
    if scratch is not None:
        out = scratch.take(nbytes).view(torch_dtype(entry.dtype)).view(shape)
    else:
        out = torch.empty(shape, dtype=torch_dtype(entry.dtype))
    if nbytes:
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(entry.path, "rb", buffering=0) as f:
            f.seek(start)
            got = 0
            while got < nbytes:
                k = f.readinto(view[got:])
                if not k:
                    raise SuiteError(f"{entry.path}: file ends inside tensor {entry.name!r} (truncated?)")
                got += k
    return out


def row_chunks(entry_or_shape, dtype_bytes: int | None = None, limit: int = CHUNK_BYTES) -> list[tuple[int, int]]:
    """Row ranges of at most ``limit`` bytes each (at least one row) covering the first dimension."""
    if isinstance(entry_or_shape, Entry):
        shape, row = entry_or_shape.shape, entry_or_shape.row_bytes
    else:
        shape, row = entry_or_shape, math.prod(entry_or_shape[1:]) * dtype_bytes
    if not shape:
        return [(0, 0)]
    n = shape[0]
    step = max(1, limit // max(row, 1))
    return [(r, min(r + step, n)) for r in range(0, n, step)] or [(0, 0)]


class ModelWeights:
    """The weights of a model folder, by name, read lazily."""

    def __init__(self, folder: str | Path, allow_pickle: bool = False, flag: str = "--base_model"):
        self.folder = Path(folder)
        self.entries: dict[str, Entry] = {}
        self.files: list[Path] = []
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            files = sorted(set(self._weight_map(index, flag).values()))
            self._add_safetensors([self.folder / f for f in files], flag)
        elif single.is_file():
            self._add_safetensors([single], flag)
        else:
            pindex, pone = self.folder / "pytorch_model.bin.index.json", self.folder / "pytorch_model.bin"
            if not (pindex.is_file() or pone.is_file()):
                raise SuiteError(f"{flag} {folder}: no weights (no model.safetensors or model.safetensors.index.json)")
            if not allow_pickle:
                raise SuiteError(f"{flag} {folder}: only pickle weights (pytorch_model.bin); pass "
                                 "--allow_pickle_weights to read them with torch.load(weights_only=True), or convert "
                                 "them to safetensors")
            files = sorted(set(self._weight_map(pindex, flag).values())) if pindex.is_file() else ["pytorch_model.bin"]
            for f in files:
                self._add_pickle(self.folder / f, flag)

    @classmethod
    def from_entries(cls, folder: str | Path, entries: dict[str, Entry]) -> "ModelWeights":
        """A view of tensors produced on demand (``Entry.pickled`` loaders), e.g. a converted checkpoint."""
        self = cls.__new__(cls)
        self.folder, self.entries = Path(folder), dict(entries)
        self.files = sorted({e.path for e in entries.values()})
        return self

    def _weight_map(self, index: Path, flag: str) -> dict[str, str]:
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SuiteError(f"{flag} {index}: unreadable index ({exc})") from None
        for f in set(wm.values()):
            if "/" in f or "\\" in f or f.startswith(".") or not (self.folder / f).is_file():
                raise SuiteError(f"{flag} {index}: names a missing or outside shard {f!r}")
        return wm

    def _add_safetensors(self, paths: list[Path], flag: str) -> None:
        for p in paths:
            entries, _ = read_header(p, flag)
            for name, e in entries.items():
                if name in self.entries:
                    raise SuiteError(f"{flag} {self.folder}: tensor {name!r} is stored twice")
                self.entries[name] = e
            self.files.append(p)

    def _add_pickle(self, path: Path, flag: str) -> None:
        import torch

        try:  # mmap: only the tensors asked for are read (needs the zip format; older files load whole)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # an unpickling error is the safety net doing its job
            raise SuiteError(f"{flag} {path}: refused by torch.load(weights_only=True): {exc}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise SuiteError(f"{flag} {path}: not a dict of tensors")
        for name, t in state.items():
            self.entries[name] = Entry(name, dtype_code(t.dtype), t.shape, path, pickled=(lambda t=t: t))
        self.files.append(path)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        """Tensor names in storage order (file, then offset): sequential reads."""
        order = {p: i for i, p in enumerate(self.files)}
        return sorted(self.entries, key=lambda n: (order[self.entries[n].path], self.entries[n].start, n))

    def get(self, name: str, rows: tuple[int, int] | None = None, scratch: Scratch | None = None):
        return read_entry(self.entries[name], rows, scratch)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """Write planned tensors into safetensors shards of at most ``max_shard_size`` bytes, streaming.

    ``plan``: (name, dtype code, shape) in the order their data will be written. Use ``write(name,
    tensor)`` for a whole tensor, or several ``write(name, rows)`` calls with consecutive row chunks.
    """

    def __init__(self, folder: str | Path, plan: Iterable[tuple[str, str, tuple]], max_shard_size: int,
                 metadata: dict | None = None):
        self.folder = Path(folder)
        self.plan = [(n, c, tuple(s)) for n, c, s in plan]
        groups: list[list[tuple[str, str, tuple]]] = [[]]
        size = 0
        for item in self.plan:
            nbytes = math.prod(item[2]) * dtype_size(item[1])
            if groups[-1] and size + nbytes > max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += nbytes
        self.names = shard_names(len(groups))
        self.groups = groups
        self.metadata = {"format": "pt", **(metadata or {})}
        self.weight_map = {n: fname for fname, g in zip(self.names, groups) for n, _, _ in g}
        self.hashes: dict[str, str] = {}
        self._closed: list = []
        self._queue: Iterator = iter(self.plan)
        self._shard = -1
        self._file = None
        self._current = None  # (name, remaining bytes)
        self._left_in_shard = 0

    def _open_next(self) -> None:
        self._close_file()
        self._shard += 1
        group = self.groups[self._shard]
        header, offset = {}, 0
        for name, code, shape in group:
            nbytes = math.prod(shape) * dtype_size(code)
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as the library writes it
        delay = float(os.environ.get("SUITE_TEST_WRITE_DELAY", "0") or 0)
        if delay:  # fault-injection tests: a window in which to kill a conversion mid-write

            time.sleep(delay)
        self._file = open(self.folder / self.names[self._shard], "wb")
        self._hash = hashlib.sha256()
        self._left_in_shard = len(group)
        self._emit(struct.pack("<Q", len(raw)) + raw)

    def _emit(self, data) -> None:
        self._file.write(data)
        HASHES.update(self._hash, data)  # the buffer is not modified after write(): hashed in the background

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._closed.append((self.names[self._shard], self._hash))
            self._file = None

    def write(self, name: str, tensor) -> None:
        import torch

        if self._current is None:
            if self._left_in_shard == 0:
                self._open_next()
            expected, code, shape = next(self._queue)
            if expected != name:
                raise RuntimeError(f"ShardWriter: expected {expected!r}, got {name!r}")
            self._current = [name, math.prod(shape) * dtype_size(code), torch_dtype(code)]
        cur_name, remaining, dtype = self._current
        if cur_name != name:
            raise RuntimeError(f"ShardWriter: {cur_name!r} is incomplete, got {name!r}")
        if tensor.dtype != dtype:
            raise RuntimeError(f"ShardWriter: {name!r} must be {dtype}, got {tensor.dtype}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes > remaining:
            raise RuntimeError(f"ShardWriter: too many bytes for {name!r}")
        self._emit(memoryview(data))
        remaining -= data.nbytes
        self._current[1] = remaining
        if remaining == 0:
            self._current = None
            self._left_in_shard -= 1
            if self._left_in_shard == 0:
                self._close_file()

    def close(self) -> dict[str, str]:
        """Finish (every planned tensor must have been written); writes the index for several shards.
        Returns the sha256 of every file written."""
        if self._current is not None or next(self._queue, None) is not None:
            raise RuntimeError("ShardWriter: not every planned tensor was written")
        # Planned tensors with no bytes at all (empty shapes) still need their shard written.
        while self._shard + 1 < len(self.groups):
            self._open_next()
        self._close_file()
        HASHES.drain()
        self.hashes.update({name: h.hexdigest() for name, h in self._closed})
        if len(self.names) > 1:

            total = sum(math.prod(s) * dtype_size(c) for _, c, s in self.plan)
            index = self.folder / "model.safetensors.index.json"
            write_json(index, {"metadata": {"total_size": total}, "weight_map": self.weight_map})
            self.hashes[index.name] = sha256_file(index)
        return dict(self.hashes)

    def abort(self) -> None:
        HASHES.drain()
        if self._file is not None:
            self._file.close()
            self._file = None


def copy_tensor(src: ModelWeights, name: str, writer: ShardWriter, out_name: str | None = None, dtype=None,
                limit: int = CHUNK_BYTES) -> None:
    """Stream one tensor from ``src`` into ``writer`` in row chunks, cast to ``dtype`` if given."""
    entry = src.entries[name]
    for r0, r1 in row_chunks(entry, limit=limit):
        t = src.get(name, (r0, r1) if entry.shape else None, scratch=COPY_SCRATCH)
        writer.write(out_name or name, t if dtype is None else t.to(dtype))
        COPY_SCRATCH.release()


COPY_SCRATCH = Scratch()

