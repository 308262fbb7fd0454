"""Crash-safe training checkpoints and the final fine-tune artifact.

A checkpoint is written into a temporary folder and renamed to ``checkpoint-N``; its
``manifest.json`` (sha256 of every file) is written last, so a folder without a valid manifest is
incomplete and resume skips it with a message. Nothing here is pickled: weights are safetensors,
optimizer state is a tensor-only ``torch.save`` read back with ``weights_only=True``, the rest JSON.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import sys
import uuid
from pathlib import Path

from utils.artifacts import (META_FILE, META_VERSION, Lock, apply_umask, install, library_versions, read_meta,
                             read_output, sha256_file, write_json, write_meta)
from utils.errors import SuiteError
from utils.artifacts import claim_output_dir, transient
from utils.training.methods import trainable_state

MANIFEST = "manifest.json"


# What a finetune run writes into its folder besides its final files: the loss record, its plot, the
# TensorBoard events, the data prepared from raw files, and checkpoints (and DeepSpeed's staging).
RUN_FILES = ("metrics.jsonl", "loss.png")
RUN_FOLDERS = ("tensorboard", "data")


def run_owned(name: str) -> bool:
    """Whether a top-level entry of a finetune folder is something a run writes before it finishes."""
    return name in RUN_FILES or name in RUN_FOLDERS or name.startswith(("checkpoint-", ".deepspeed-"))


def unfinished_run(out: Path) -> bool:
    """Whether ``out``, which has no pipeline.json, holds one of our checkpoints (a manifest and trainable
    weights): an unfinished run from a version that did not mark its folder, or whose mark was lost. It
    can be resumed; nothing else in it is removed (see ``utils.artifacts.install``)."""
    return any((p / MANIFEST).is_file() and (p / "trainable.safetensors").is_file() for p in checkpoint_dirs(out))


def mark_unfinished(out: Path) -> None:
    """Mark ``out`` as this stage's run in progress (pipeline.json, complete: false) until save_final."""

    write_json(Path(out) / META_FILE, {
        "meta_version": META_VERSION, "stage": "finetune", "complete": False, "files": {},
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })



class RunFolder:
    """The output folder of one finetune run, from the destination check to the release of its lock.

    On entry, before any work: the shared destination rule (``claim_output_dir``), the folder (created if
    missing), the lock, and, for a folder that held no run of ours, the unfinished-run mark. On exit the
    lock and its file go. A run that failed before writing anything of its own leaves the folder as it
    found it: the mark, data it prepared and the folder it created are removed. An interrupted run keeps
    what it wrote (prepared data, checkpoints), to be resumed.
    """

    def __init__(self, out: Path, overwrite: bool):
        self.out, self.overwrite = Path(out), overwrite
        self.lock, self.created, self.marked, self.had_data = None, [], False, True

    def __enter__(self):

        claim_output_dir(self.out, "finetune", self.overwrite, resumable=unfinished_run)
        # The folders this run creates, innermost first (the output folder and any missing parents).
        here = self.out.absolute()
        self.created = [p for p in [here, *here.parents] if not p.exists()]
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self.lock = Lock(self.out / ".lock", f"--output_dir {self.out}").__enter__()
            # Again under the lock: another run may have changed the folder since.
            state = claim_output_dir(self.out, "finetune", self.overwrite, resumable=unfinished_run)
            self.had_data = (self.out / "data").exists()
            if state in ("missing", "empty", "foreign"):
                mark_unfinished(self.out)
                self.marked = True
            elif state == "unfinished" and not (self.out / META_FILE).exists():
                mark_unfinished(self.out)  # known as ours from its checkpoints: say so to the other stages
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            failed = exc_type is not None and not (exc_type is SystemExit and exc.code in (0, None))
            interrupted = exc_type is KeyboardInterrupt or exc_type is SystemExit and exc.code in (130, 143)
            if failed and self.marked:
                self._undo(keep_data=interrupted)
        finally:
            if self.lock is not None:
                self.lock.__exit__(None, None, None)
                self.lock = None
            for folder in self.created:
                try:
                    folder.rmdir()  # only if nothing is left in it
                except OSError:
                    break

    def _undo(self, keep_data: bool) -> None:

        fresh_data = not self.had_data and not keep_data
        rest = [p for p in self.out.iterdir() if not transient(p.name) and p.name != META_FILE
                and not (fresh_data and p.name == "data")]
        meta = read_meta(self.out)
        if rest or not meta or meta.get("stage") != "finetune" or meta.get("complete"):
            return  # the run wrote something (metrics, checkpoints): the folder is an unfinished run
        if fresh_data:
            shutil.rmtree(self.out / "data", ignore_errors=True)
        (self.out / META_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def sigterm_exits():
    """While inside, SIGTERM raises SystemExit(143) (as Ctrl-C raises KeyboardInterrupt), so that cleanup
    runs (the run folder's lock is released) instead of the process dying where it stands. The training
    loop installs its own handler (save a checkpoint first) and restores this one after."""

    def handle(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def verify(folder: Path) -> str | None:
    """None if ``folder`` is a complete checkpoint, else what is wrong with it."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no manifest (interrupted while saving?)"
    for name, digest in manifest["files"].items():
        if not (folder / name).is_file():
            return f"{name} is missing"
        if sha256_file(folder / name) != digest:
            return f"{name} does not match its hash"
    return None


def checkpoint_dirs(out: Path) -> list[Path]:
    """Checkpoint folders by step, unverified (cheap: no hashing)."""
    return sorted((p for p in Path(out).glob("checkpoint-*") if p.is_dir()), key=_step_of)


def complete_checkpoints(out: Path, report: bool = False) -> list[Path]:
    found = []
    for path in checkpoint_dirs(out):
        problem = verify(path)
        if problem is None:
            found.append(path)
        elif report:
            print(f"finetune: skipping damaged checkpoint {path}: {problem}", file=sys.stderr)
    return found


def find_resume(out: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(out, report=True)
        if not found:
            print(f"finetune: no complete checkpoint in {out}; starting from the beginning", file=sys.stderr)
            return None
        return found[-1]
    path = Path(resume)
    problem = verify(path)
    if problem:
        raise SuiteError(f"--resume_from_checkpoint {path}: {problem}")
    return path


def save_checkpoint(out: Path, step: int, weights: dict, optimizer_state: dict, scheduler, keep: int,
         state: dict | None = None, best_weights: dict | None = None, rng: list | None = None,
         engine_dir: Path | None = None) -> Path:
    """Write checkpoint-STEP atomically: trainable weights, optimizer, scheduler, RNG of every rank,
    the early-stopping state and (with --load_best_model_at_end) the best weights so far."""
    import torch
    from safetensors.torch import save_file

    final = Path(out) / f"checkpoint-{step}"
    tmp = Path(out) / f".checkpoint-{step}.tmp-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / "trainable.safetensors"))
        if best_weights is not None:
            save_file(best_weights, str(tmp / "best.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save({"ranks": rng if rng is not None else [rng_state()]}, tmp / "rng.pt")
        write_json(tmp / "trainer_state.json", {"step": step, "scheduler": scheduler.state_dict(),
                                                **(state or {})})
        if engine_dir is not None:
            os.replace(engine_dir, tmp / "deepspeed")
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json(tmp / MANIFEST, {"step": step, "files": files})
        apply_umask(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Prune by step without re-hashing every kept checkpoint on each save.
    for old in (checkpoint_dirs(out)[:-keep] if keep > 0 else []):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def rng_state() -> dict:
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def gather_rng(dist) -> list:
    """Every rank's RNG state, in rank order (rank 0 writes them all into the checkpoint)."""
    if not dist.active:
        return [rng_state()]
    import torch.distributed as td

    states = [None] * dist.world_size
    td.all_gather_object(states, rng_state())
    return states


def trainable_copy(model) -> dict:
    """A CPU copy of the trained parameters by name."""

    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in trainable_state(model).items()}


def copy_weights(model, weights: dict) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def load_checkpoint(folder: Path, model, scheduler, backend) -> tuple[int, dict, dict | None]:
    """Restore a checkpoint into ``model``, its optimizer and ``scheduler`` through ``backend`` (see
    ``utils.training.backends``: it knows how its weights and optimizer state are held); returns (step,
    early-stopping state, best weights or None)."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(folder / "trainable.safetensors"))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        raise SuiteError(f"--resume_from_checkpoint {folder}: its weights do not match this run's trainable "
                         f"parameters ({len(state)} vs {len(expected)}); was it made with other flags?")
    backend.load_state(folder, state, torch.load(folder / "optimizer.pt", weights_only=True))
    dist = backend.dist
    ranks = torch.load(folder / "rng.pt", weights_only=True)["ranks"]
    rank, world = dist.rank, dist.world_size
    if len(ranks) != world:
        print(f"finetune: checkpoint was written by {len(ranks)} processes, this run has {world}; dropout "
              "randomness will differ from an uninterrupted run", file=sys.stderr)
    mine = ranks[rank % len(ranks)]
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])
    meta = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    scheduler.load_state_dict(meta["scheduler"])
    best = load_file(str(folder / "best.safetensors")) if (folder / "best.safetensors").is_file() else None
    return int(meta["step"]), {"best": meta.get("best"), "bad_evals": meta.get("bad_evals", 0)}, best


def init_weights_file(folder: Path) -> Path:
    """The weights file of a finetune output (adapter) or of one of its checkpoints."""
    for name in ("trainable.safetensors", "adapter_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise SuiteError(f"--init_from {folder}: no trainable.safetensors, adapter_model.safetensors or model.safetensors")


def init_weights(folder: Path, model) -> None:
    """Copy the trained weights of an earlier run into ``model``; every trainable tensor must be found."""
    import torch
    from safetensors.torch import load_file

    path = init_weights_file(folder)
    state = load_file(str(path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if path.name == "adapter_model.safetensors":  # PEFT drops the adapter name from saved keys
        from peft import set_peft_model_state_dict

        try:
            result = set_peft_model_state_dict(model, state)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise SuiteError(f"--init_from {folder}: adapter does not fit this run ({type(exc).__name__}: {exc}); "
                             "same --method and settings?") from None
        missing = [k for k in result.missing_keys if k in params]
        if result.unexpected_keys or missing:
            raise SuiteError(f"--init_from {folder}: adapter does not fit this run (unexpected "
                             f"{list(result.unexpected_keys)[:3]}, missing {missing[:3]}); same --method and settings?")
        print(f"finetune: initialised from {path}", file=sys.stderr)
        return
    unknown, missing = set(state) - set(params), set(params) - set(state)
    if path.name == "model.safetensors":
        missing = set()  # a full model leaves tied weights (e.g. lm_head) out of the file
    if unknown or missing:
        raise SuiteError(f"--init_from {folder}: weights do not fit this run (unknown {sorted(unknown)[:3]}, "
                         f"missing {sorted(missing)[:3]}); same --method and settings?")
    with torch.no_grad():
        named = dict(model.named_parameters())
        for k, v in state.items():
            if k in named:
                named[k].copy_(v)
    print(f"finetune: initialised from {path}", file=sys.stderr)


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint a run resumes from)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines() if step > 0 else []
    keep = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def clear_run(out: Path) -> None:
    """Remove what a run writes before it finishes (checkpoints, metrics, plot, events); not the prepared
    data, which prepare_data.py keeps or replaces itself."""
    for path in Path(out).glob("checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)
    for name in RUN_FILES:
        (Path(out) / name).unlink(missing_ok=True)
    shutil.rmtree(Path(out) / "tensorboard", ignore_errors=True)


def verify_artifact(out: Path, model, method: str) -> None:
    """Reload what was saved and check it: non-empty, the expected keys, finite, not all zero."""
    import torch
    from safetensors.torch import load_file

    name = "model*.safetensors" if method == "full" else "adapter_model.safetensors"
    files = sorted(Path(out).glob("model*.safetensors")) if method == "full" else [Path(out) / name]
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    if not state:
        raise SuiteError(f"saved {name} in {out} is empty")
    bad = [k for k, v in state.items() if not torch.isfinite(v.float()).all()]
    if bad:
        raise SuiteError(f"saved weights hold non-finite values: {bad[:5]}")
    if method != "full":
        trained = [k for k in state if "lora_B" in k or "prompt" in k or "prefix" in k or "embedding" in k]
        if method in ("lora", "qlora") and not any("lora_A" in k for k in state):
            raise SuiteError(f"saved adapter in {out} has no lora_A/lora_B weights")
        if trained and all(float(state[k].abs().max()) == 0 for k in trained):
            raise SuiteError(f"saved adapter in {out} is all zeros: training changed nothing")


def save_final(out: Path, model, data_dir: Path, *, method: str, max_shard_size: str, fingerprint: str,
               recorded_args: dict, base_model: str, base: dict, summary: dict, state_dict: dict | None = None) -> None:
    """Write the adapter (or model), tokenizer, template and report into ``out``, then pipeline.json.

    Args:
        method: The tuning method (``full`` saves the whole model, in shards of at most ``max_shard_size``).
        recorded_args: The run's arguments as pipeline.json records them.
        base_model: The base model folder; ``base`` its fingerprint.
        summary: How the run went (steps, final evaluation, ...), recorded as it is.
        state_dict: The gathered weights of a sharded (FSDP, DeepSpeed) model.
    """
    out = Path(out)
    written = _write_final_files(out, model, data_dir, method, max_shard_size, state_dict)
    meta = {
        "stage": "finetune",
        "fingerprint": fingerprint,
        "args": recorded_args,
        "method": method,
        "base_model": {"path": os.path.abspath(base_model), "fingerprint": base},
        "data": {"path": os.path.abspath(data_dir), "fingerprint": read_output(data_dir).fingerprint},
        "template": {"name": json.loads((out / "template.json").read_text())["name"], "file": "template.json"},
        **summary,
        "versions": library_versions("torch", "transformers", "peft"),
    }
    # Hash only this stage's own files: not checkpoints or the prepared data (which carry their own hashes),
    # nor anything else the folder holds (a later --overwrite removes exactly what is listed here).
    files = {name: sha256_file(out / name) for name in sorted({*written, *RUN_FILES}) if (out / name).is_file()}
    write_meta(out, meta, files)


def _write_final_files(out: Path, model, data_dir: Path, method: str, max_shard_size: str,
                       state_dict: dict | None) -> list[str]:
    """Save, check and install the final files into ``out``; returns their names."""
    from transformers import AutoTokenizer

    tmp = out / f".final.tmp-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    extra = {} if state_dict is None else {"state_dict": state_dict}
    try:
        if method == "full":
            model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size, **extra)
        else:
            model.save_pretrained(str(tmp), safe_serialization=True, **extra)
        AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"), local_files_only=True).save_pretrained(str(tmp))
        for name in ("template.json", "data_report.json"):
            shutil.copyfile(data_dir / name, tmp / name)
        verify_artifact(tmp, model, method)
        apply_umask(tmp)
        written = sorted(p.name for p in tmp.iterdir() if p.is_file())
        # Only our own files are replaced: the folder may hold the user's (kept, reported) under --overwrite.
        install(tmp, out, "finetune", owned=run_owned)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
