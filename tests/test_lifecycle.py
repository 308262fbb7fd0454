"""The output-folder life cycle every stage shares (utils/artifacts.py, utils/training/checkpoint.py): a folder this
suite did not write is refused before any work and, with --overwrite, only the stage's own files are
replaced; a failed fine-tune leaves no folder it created and no lock; the lock never outlives its run;
output files and folders get the user's umask."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXPORT_SHAPE, REPO, STORIES, gsm8k_rows, prepare_gsm8k, tiny_model
from test_export import call, make_adapter
from utils.cli import run

FT = ["--batch_size", "8", "--micro_batch_size", "8", "--logging_steps", "0", "--learning_rate", "1e-2",
      "--notensorboard"]

# Runs a stage's script with every kind of expensive work replaced by a tripwire: hashing a file, loading a
# tokenizer or a model. A refusal that comes "before any work" exits 1 without touching one (99 otherwise).
DRIVER = """
import os, runpy, sys
sys.path.insert(0, {repo!r})
os.chdir({repo!r})

def tripwire(*a, **k):
    sys.stderr.write("TRIPWIRE: work started before the destination was checked\\n")
    sys.stderr.flush()
    os._exit(99)

import builtins
import utils.artifacts
utils.artifacts.sha256_file = tripwire

# transformers is wired the moment a stage first imports it (importing it here would cost every run seconds).
real_import = builtins.__import__

def wiring_import(name, *args, **kwargs):
    module = real_import(name, *args, **kwargs)
    lib = sys.modules.get("transformers")
    # once transformers has finished initialising (not while its own imports run), and only once
    if lib is not None and not getattr(lib.__spec__, "_initializing", False) and not getattr(lib, "_tripwired", False):
        lib._tripwired = True
        lib.AutoTokenizer.from_pretrained = tripwire
        lib.AutoModelForCausalLM.from_pretrained = tripwire
    return module

builtins.__import__ = wiring_import
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lifecycle")


@pytest.fixture(scope="module")
def raw(root) -> Path:
    path = root / "rows.json"
    path.write_text(json.dumps(gsm8k_rows(24)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prepared(root) -> Path:
    return prepare_gsm8k(root, gsm8k_rows(24), "--cutoff_len", "320", "--val_set_size", "4")


@pytest.fixture(scope="module")
def pair(root) -> tuple[Path, Path]:
    """Two tiny llamas of the same shapes (built from configs): a base and a 'fine-tuned' target."""
    return (tiny_model("llama", root / "base", STORIES, **EXPORT_SHAPE),
            tiny_model("llama", root / "target", STORIES, seed=1, **EXPORT_SHAPE))


@pytest.fixture(scope="module")
def adapter(root, pair) -> Path:
    return make_adapter(pair[0], root / "adapter")


def user_folder(path: Path) -> Path:
    """A folder of the user's: a README.md (a name finetune also writes) and notes.txt (one no stage writes)."""
    path.mkdir()
    (path / "README.md").write_text("mine\n")
    (path / "notes.txt").write_text("keep me\n")
    return path


def untouched(path: Path) -> bool:
    return sorted(p.name for p in path.iterdir()) == ["README.md", "notes.txt"] and \
        (path / "README.md").read_text() == "mine\n" and (path / "notes.txt").read_text() == "keep me\n"


def stage_commands(raw: Path, pair, adapter: Path) -> dict[str, tuple[str, list[str]]]:
    """script, arguments before --output_dir (or the stage's name for it) for each stage that writes a folder."""
    base, target = pair
    return {
        "finetune": ("finetune.py", ["--base_model", str(STORIES), "--data_path", str(raw), *FT, "--max_steps", "1",
                                  "--output_dir"]),
        "prepare_data": ("prepare_data.py", ["--base_model", str(STORIES), "--data_path", str(raw), "--output_dir"]),
        "export_hf": ("export_hf.py", ["--base_model", str(base), "--lora_weights", str(adapter), "--output_dir"]),
        "export_state_dict": ("export_state_dict.py", ["--base_model", str(STORIES), "--format", "llama2c",
                                                       "--output_dir"]),
        "apply_delta": ("apply_delta.py", ["make", "--base_model_path", str(base), "--target_model_path",
                                           str(target), "--delta_path"]),
    }


@pytest.mark.parametrize("stage", ["finetune", "prepare_data", "export_hf", "export_state_dict", "apply_delta"])
def test_foreign_folder_is_refused_before_any_work(tmp_path, raw, pair, adapter, stage):
    """Each stage as a real subprocess under tripwires: the only way to show that no work started."""
    script, argv = stage_commands(raw, pair, adapter)[stage]
    out = user_folder(tmp_path / "mine")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO)))
    proc = subprocess.run([sys.executable, str(driver), script, *argv, str(out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "not written by this suite" in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert untouched(out)  # not even a lock file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["driver.py", "mine"]  # no staging folder beside it


def _kept_files_report(err: str) -> bool:
    """Whether stderr says that the user's notes.txt was kept."""
    return any("kept" in line and "notes.txt" in line for line in err.splitlines())


def test_finetune_overwrite_keeps_the_users_files(tmp_path, prepared, capsys):
    import finetune as ft

    out = user_folder(tmp_path / "mine")
    argv = ["--base_model", str(STORIES), "--data_path", str(prepared), "--output_dir", str(out), *FT]
    run(ft.main, [*argv, "--overwrite", "--max_steps", "1"])
    err = capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me\n" and _kept_files_report(err)
    # peft writes a README.md too: the user's is kept beside it, under another name, and said so.
    assert (out / "README.md.orig").read_text() == "mine\n" and "README.md.orig" in err
    meta = json.loads((out / "pipeline.json").read_text())
    assert meta["complete"] and (out / "adapter_model.safetensors").is_file()
    assert "adapter_model.safetensors" in meta["files"] and "metrics.jsonl" in meta["files"]
    assert not {"notes.txt", "README.md.orig"} & set(meta["files"])  # never recorded as ours
    assert not (out / ".lock").exists()
    # A different run with --overwrite replaces the earlier run's files, and still none of the user's.
    run(ft.main, [*argv, "--overwrite", "--max_steps", "2"])
    assert (out / "notes.txt").read_text() == "keep me\n" and (out / "README.md.orig").read_text() == "mine\n"
    assert json.loads((out / "pipeline.json").read_text())["args"]["max_steps"] == 2
    assert not (out / "README.md.orig1").exists()  # the run's own README.md was replaced, not kept aside
    # A re-run of the finished run is a no-op, leaves no lock.
    stamp = (out / "pipeline.json").stat().st_mtime_ns
    capsys.readouterr()
    run(ft.main, [*argv, "--max_steps", "2"])
    assert "nothing to do" in capsys.readouterr().err and (out / "pipeline.json").stat().st_mtime_ns == stamp
    assert not (out / ".lock").exists()


def test_prepare_data_overwrite_keeps_the_users_files(tmp_path, raw, capsys):
    import prepare_data

    out = user_folder(tmp_path / "mine")
    argv = ["--base_model", str(STORIES), "--data_path", str(raw), "--output_dir", str(out), "--val_set_size", "4"]
    run(prepare_data.main, [*argv, "--overwrite"])
    assert untouched_but_ours(out, "dataset") and _kept_files_report(capsys.readouterr().err)
    first = json.loads((out / "pipeline.json").read_text())
    run(prepare_data.main, [*argv, "--cutoff_len", "300", "--overwrite"])
    second = json.loads((out / "pipeline.json").read_text())
    assert second["fingerprint"] != first["fingerprint"] and untouched_but_ours(out, "dataset")
    # Only the new output's files are there besides the user's: the earlier ones were removed, not mixed in.
    ours = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"README.md", "notes.txt"}
    assert ours == set(second["files"]) | {"pipeline.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def untouched_but_ours(out: Path, ours: str) -> bool:
    """The user's two files are as they were, and the stage's output (``ours``) is there, complete."""
    meta = json.loads((out / "pipeline.json").read_text())
    return ((out / "README.md").read_text() == "mine\n" and (out / "notes.txt").read_text() == "keep me\n"
            and meta["complete"] and (out / ours).exists() and not {"README.md", "notes.txt"} & set(meta["files"]))


def test_conversion_stages_overwrite_keep_the_users_files(tmp_path, raw, pair, adapter, capsys):
    import apply_delta
    import export_hf
    import export_state_dict

    mains = {"export_hf": (export_hf.main, "config.json"), "export_state_dict": (export_state_dict.main, "model.bin"),
             "apply_delta": (apply_delta.main, "config.json")}
    for stage, (main, output) in mains.items():
        _, argv = stage_commands(raw, pair, adapter)[stage]
        out = user_folder(tmp_path / stage)
        call(main, [*argv, str(out), "--overwrite"])
        assert untouched_but_ours(out, output), stage
        assert _kept_files_report(capsys.readouterr().err), stage


def test_another_stages_output_is_never_replaced(tmp_path, prepared, pair, adapter):
    import shutil

    import export_hf
    from utils.errors import SuiteError

    prepared = Path(shutil.copytree(prepared, tmp_path / "prepared"))  # the module's copy stays safe if this fails
    before = {p: p.read_bytes() for p in prepared.rglob("*") if p.is_file()}
    with pytest.raises(SuiteError, match="holds a prepare_data output.*--overwrite never replaces"):
        call(export_hf.main, ["--base_model", str(pair[0]), "--lora_weights", str(adapter), "--output_dir",
                              str(prepared), "--overwrite"])
    assert {p: p.read_bytes() for p in prepared.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("case", ["bad_data", "empty_file", "unknown_module", "tokenizer_mismatch"])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_finetune_leaves_no_folder_and_no_lock(tmp_path, raw, prepared, pair, bpe_tokenizer_dir, case,
                                                      existing, capsys):
    import finetune as ft

    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": 3}] * 10))
    (tmp_path / "empty.jsonl").write_text("")
    data = {"bad_data": tmp_path / "bad.json", "empty_file": tmp_path / "empty.jsonl", "unknown_module": raw,
            "tokenizer_mismatch": prepared}[case]
    # The prepared folder was tokenized with stories260K's tokenizer; this base has another one.
    other = case == "tokenizer_mismatch"
    base = tiny_model("llama", tmp_path / "other", bpe_tokenizer_dir, **EXPORT_SHAPE) if other else pair[0]
    out = tmp_path / "run" if existing else tmp_path / "new" / "run"
    if existing:
        out.mkdir()
    extra = ["--lora_target_modules", "query_key_value"] if case == "unknown_module" else []
    with pytest.raises(SystemExit) as exc:
        run(ft.main, ["--base_model", str(base), "--data_path", str(data), "--output_dir", str(out), *FT,
                  "--max_steps", "1", *extra])
    assert exc.value.code == 1, capsys.readouterr().err
    if existing:
        assert out.is_dir() and list(out.iterdir()) == []  # as it was: no lock, no mark, no prepared data
    else:
        assert not (tmp_path / "new").exists()  # nor the parent folder it made for it


def test_interrupted_finetune_stays_resumable_and_holds_no_lock(tmp_path, prepared, monkeypatch, capsys):
    import export_hf
    import finetune as ft
    from utils.training import checkpoint as ckpt
    from utils.errors import SuiteError

    out = tmp_path / "run"
    argv = ["--base_model", str(STORIES), "--data_path", str(prepared), "--output_dir", str(out), *FT,
            "--max_steps", "3", "--save_steps", "1"]

    def dies(*a, **k):
        raise SystemExit(143)  # as SIGTERM does while the final files are written

    monkeypatch.setattr(ckpt, "save_final", dies)
    with pytest.raises(SystemExit):
        run(ft.main, argv)
    monkeypatch.undo()
    assert ckpt.checkpoint_dirs(out) and not (out / ".lock").exists()
    meta = json.loads((out / "pipeline.json").read_text())
    assert meta["stage"] == "finetune" and meta["complete"] is False  # ours, unfinished
    with pytest.raises(SuiteError, match="did not finish"):
        call(export_hf.main, ["--lora_weights", str(out), "--output_dir", str(tmp_path / "x")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run(ft.main, argv)  # not refused as foreign: told how to resume
    assert exc.value.code == 1 and "--resume_from_checkpoint auto" in capsys.readouterr().err
    run(ft.main, [*argv, "--resume_from_checkpoint", "auto"])
    assert "resumed from" in capsys.readouterr().err
    assert json.loads((out / "pipeline.json").read_text())["complete"] and not (out / ".lock").exists()


def test_checkpoints_without_a_mark_are_still_resumable(tmp_path, prepared, capsys):
    """A folder with our checkpoints but no pipeline.json (an older version's interrupted run, killed while
    it moved its final files in) is resumed, not refused as foreign; what it holds is kept or replaced
    by the same bytes, never lost."""
    import finetune as ft

    out = tmp_path / "run"
    argv = ["--base_model", str(STORIES), "--data_path", str(prepared), "--output_dir", str(out), *FT,
            "--max_steps", "2", "--save_steps", "1"]
    run(ft.main, argv)
    for name in ("pipeline.json", "adapter_model.safetensors"):
        (out / name).unlink()
    (out / "notes.txt").write_text("keep me\n")
    capsys.readouterr()
    run(ft.main, [*argv, "--resume_from_checkpoint", "auto"])
    assert "resumed from" in capsys.readouterr().err and (out / "adapter_model.safetensors").is_file()
    meta = json.loads((out / "pipeline.json").read_text())
    assert meta["complete"] and "notes.txt" not in meta["files"]  # not claimed: a later --overwrite keeps it
    assert (out / "notes.txt").read_text() == "keep me\n" and not list(out.glob("*.orig*"))


def test_lock_file_lives_only_as_long_as_the_lock(tmp_path):
    from utils.artifacts import Lock
    from utils.errors import SuiteError

    def RunLock(folder):
        return Lock(folder / ".lock", f"--output_dir {folder}")

    with RunLock(tmp_path) as first:
        assert (tmp_path / ".lock").is_file()
        with pytest.raises(SuiteError, match="in use by another run"):
            RunLock(tmp_path).__enter__()
        # A run that opened the file just before the holder removed it does not get a lock on the removed file.
        stale = os.open(tmp_path / ".lock", os.O_RDWR)
    assert not (tmp_path / ".lock").exists()
    import fcntl

    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the old file is free, and means nothing now
    with RunLock(tmp_path) as second:
        assert second is not first and os.fstat(second.fd).st_ino != os.fstat(stale).st_ino
    os.close(stale)
    assert list(tmp_path.iterdir()) == []


def test_sigterm_releases_the_lock_outside_training(tmp_path):
    """SIGTERM before training (data preparation, model loading) still removes the lock: it raises
    SystemExit(143) there, so the run folder's cleanup runs."""
    from utils.training.checkpoint import RunFolder, sigterm_exits

    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        with sigterm_exits(), RunFolder(out, overwrite=False):
            assert (out / ".lock").is_file()
            os.kill(os.getpid(), signal.SIGTERM)
    assert exc.value.code == 143 and not out.exists()  # it wrote nothing: neither lock nor folder is left
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def modes_follow(mask: int, *folders: Path) -> list[str]:
    """Paths under ``folders`` whose mode is not what ``mask`` gives a new file (0666) or folder (0777)."""
    wrong = []
    for folder in folders:
        for p in [folder, *folder.rglob("*")]:
            want = (0o777 if p.is_dir() else 0o666) & ~mask
            if stat.S_IMODE(p.stat().st_mode) != want:
                wrong.append(f"{p.relative_to(folder.parent)} {oct(stat.S_IMODE(p.stat().st_mode))}")
    return wrong


def test_output_modes_follow_the_umask(tmp_path, raw, pair, adapter, umask_027):
    import export_hf
    import finetune as ft

    out = tmp_path / "run"
    run(ft.main, ["--base_model", str(STORIES), "--data_path", str(raw), "--output_dir", str(out), *FT,
                  "--max_steps", "2", "--save_steps", "1", "--val_set_size", "4"])
    assert (out / "checkpoint-1").is_dir() and (out / "data" / "dataset").is_dir()
    merged, only = tmp_path / "merged", tmp_path / "adapter"
    call(export_hf.main, ["--base_model", str(pair[0]), "--lora_weights", str(adapter), "--output_dir", str(merged)])
    call(export_hf.main, ["--base_model", str(pair[0]), "--lora_weights", str(adapter), "--output_dir", str(only),
                          "--adapter_only"])
    assert modes_follow(umask_027, out, merged, only) == []
