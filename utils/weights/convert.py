"""What the conversion stages (export_hf.py, export_state_dict.py, apply_delta.py) share: destination
rules, input fingerprints, carrying config / tokenizer / template along. The Meta "consolidated" and
llama2.c layouts are utils/weights/formats.py, reading and writing shards utils/weights/shards.py, the
merge math utils/weights/merge.py, the verification forward utils/weights/forward.py.

Destination rules, for every stage: output goes to a hidden sibling folder renamed into place when
complete (utils.artifacts.Output); an existing destination needs --overwrite, and one that holds
this exact output already makes the stage a no-op; a destination equal to (or containing) a source is
refused, since replacing it would destroy the input; staging folders left by a killed run are removed
on the next start.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from utils.errors import SuiteError
from utils.artifacts import TOKENIZER_FILES, sha256_file
from utils.data.chat_template import check_jinja, to_jinja
from utils.data.templates import template_from_dict


def log(stage: str, message: str) -> None:
    print(f"{stage}: {message}", file=sys.stderr)


def check_destination(output_dir: str, sources: dict[str, str | None]) -> list[str]:
    """Problems with the destination relative to the inputs (flag -> path)."""
    problems = []
    out = Path(output_dir).resolve()
    for flag, src in sources.items():
        if not src:
            continue
        s = Path(src).resolve()
        if out == s or out in s.parents:
            problems.append(f"--output_dir {output_dir} is {'the same folder as' if out == s else 'a folder holding'} "
                            f"{flag} {src}; choose another destination (the input would be destroyed)")
    return problems



class Deferred:
    """A value computed now, or on a background thread while the conversion runs (input hashing: hashlib
    releases the GIL, so it overlaps the work on another core). ``result()`` waits for it."""

    def __init__(self, fn, now: bool):
        if now:
            self._value, self._future = fn(), None
        else:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="fingerprint")
            self._future = self._pool.submit(fn)

    def result(self):
        if self._future is not None:
            self._value, self._future = self._future.result(), None
            self._pool.shutdown()
        return self._value


def weight_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every weight file (and index) of a model folder, and its config."""

    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".bin", ".pth") or p.name.endswith(".index.json") or p.name == "config.json"))
    return {n: sha256_file(folder / n) for n in names}


def quick_hashes(folder: str | Path) -> dict:
    """Identity of a model folder's files without reading their data: size, modification time and the sha256
    of the safetensors header (every tensor's name, dtype, shape and offsets) for weight files; the sha256 of
    small files. For inputs whose content is verified otherwise (a delta's recorded tensor hashes)."""


    folder = Path(folder)
    out = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        st = p.stat()
        if p.suffix == ".safetensors":
            with open(p, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = f.read(min(n, 100 << 20))

            out[p.name] = [st.st_size, st.st_mtime_ns, hashlib.sha256(header).hexdigest()]
        elif st.st_size < 1 << 24:
            out[p.name] = sha256_file(p)
        else:
            out[p.name] = [st.st_size, st.st_mtime_ns]
    return out


def tokenizer_source(*folders: str | Path | None) -> Path | None:
    """The first folder holding tokenizer files."""

    for f in folders:
        if f and any((Path(f) / n).is_file() for n in TOKENIZER_FILES):
            return Path(f)
    return None


def sentencepiece_source(*folders: str | Path | None) -> Path | None:
    """The first folder's ``tokenizer.model`` (a SentencePiece model, what Meta's code reads), if any has one."""
    for f in folders:
        if f and (Path(f) / "tokenizer.model").is_file():
            return Path(f) / "tokenizer.model"
    return None


def no_tokenizer_warning(stage: str, folders: dict[str, str | Path | None], fix: str = "") -> None:
    """Say that an output has no tokenizer, where none was found, and what that means."""
    where = " nor ".join(f"{flag} {path}" for flag, path in folders.items() if path)
    log(stage, f"warning: no tokenizer files in {where}; the output has none, so generate.py and finetune.py "
               f"cannot use it until they are copied in{fix}")


def copy_tokenizer(src: Path | None, dst: Path) -> list[str]:

    copied = []
    if src is None:
        return copied
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def carry_template(template_file: Path | None, dst: Path, eos: str, stage: str) -> dict | None:
    """Copy ``template.json`` and install it as the tokenizer's chat template (checked by rendering)."""
    if template_file is None or not template_file.is_file():
        return None

    data = json.loads(template_file.read_text(encoding="utf-8"))
    shutil.copyfile(template_file, dst / "template.json")
    name = data.pop("name", "template")
    info = {"name": name, "file": "template.json", "chat_template": False}
    if "chat_template" in data and "prompt_input" not in data and "user_format" not in data:
        jinja = data["chat_template"]
    else:
        try:
            template = template_from_dict(data, name, str(template_file))
        except SuiteError as exc:
            log(stage, f"warning: template.json cannot be read ({exc}); the tokenizer's chat template is unchanged")
            return info
        jinja = to_jinja(template)
        problem = check_jinja(template, jinja, eos) if jinja else "no Jinja form for this template kind"
        if problem:
            log(stage, f"warning: the training template is carried as template.json only: {problem}")
            return info
    (dst / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    config = dst / "tokenizer_config.json"
    if config.is_file():  # a chat_template key there would compete with the .jinja file
        tc = json.loads(config.read_text(encoding="utf-8"))
        if "chat_template" in tc:
            tc["chat_template"] = jinja
            config.write_text(json.dumps(tc, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    info["chat_template"] = True
    return info


def eos_token(tokenizer_dir: Path | None) -> str:
    if tokenizer_dir is None:
        return "</s>"
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            value = json.loads((tokenizer_dir / name).read_text(encoding="utf-8")).get("eos_token")
        except (OSError, ValueError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return "</s>"


def floating(code: str) -> bool:
    return code in ("F64", "F32", "F16", "BF16")


# --------------------------------------------------------------------------------------------------
# Meta "consolidated" and llama2.c formats


# llama2.c's legacy (version 0) checkpoint: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
# vocab_size, seq_len; a negative vocab_size means the classifier is stored separately), then fp32
# tensors: embeddings, then each kind of layer weight for all layers in turn, the final norm, the RoPE
# cos and sin tables (seq_len x head_dim/2), and the classifier if not shared. q/k rows are interleaved.


