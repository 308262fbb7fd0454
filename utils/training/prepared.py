"""A prepare_data.py output folder as training and evaluation read it: the check that it is complete and was
tokenized with the model's tokenizer, and its rows."""

from __future__ import annotations

from pathlib import Path

from utils.artifacts import OutputInfo, read_output, tokenizer_fingerprint
from utils.errors import SuiteError


def check_prepared(folder: str | Path, base_model: str) -> OutputInfo:
    """The record of ``folder``, a complete prepare_data.py output tokenized with ``base_model``'s tokenizer
    (refused otherwise, naming --data_path)."""
    info = read_output(folder)
    if info is None or info.stage != "prepare_data" or not info.complete:
        raise SuiteError(f"--data_path {folder}: not a complete prepare_data.py output folder")
    if info.base_model.get("tokenizer_files") != tokenizer_fingerprint(base_model):
        raise SuiteError(f"--data_path {folder} was tokenized with a different tokenizer "
                         f"({info.base_model.get('path')}) than --base_model {base_model}")
    return info


def prepared_rows(data_dir: str | Path, *splits: str) -> dict[str, list]:
    """The (input_ids, labels) rows of each named split the folder holds (a split it lacks is left out)."""
    from datasets import load_from_disk

    dataset = load_from_disk(str(Path(data_dir) / "dataset"))
    return {s: list(zip(dataset[s]["input_ids"], dataset[s]["labels"])) for s in splits if s in dataset}
