"""Tests for the strict command line (``utils/cli.py``) and its use by every stage script.

Toy ``main`` functions are called through ``bind_args`` (binding and coercion only) and ``run``
(binding, the resolved-arguments line, then the call through Fire). The real scripts are run in a
subprocess for ``--help``, a misspelled flag, ``-o``, and a stage's stderr; the README's table of
defaults that differ from alpaca-lora's is checked against the signatures.
"""

import inspect
import json
import re
import subprocess
import sys
import typing
import warnings
from typing import Literal

import pytest

from conftest import REPO, STORIES
from utils.cli import SHORT_FLAGS, bind_args, coerce, is_destructive, quiet_known_warnings, run
from utils.errors import SuiteError, UsageError


def toy(
    base: str,
    lora_r: int = 8,
    *,
    run_name: str = "default-run",
    targets: list[str] = ["q_proj"],
    flag: bool = False,
    lr: float = 1e-4,
    tag: str | None = "t",
    mode: Literal["a", "b"] = "a",
    some_name: str = "s",
) -> None:
    """A toy stage.

    Args:
        base: Base model folder.
        lora_r: LoRA rank.
        run_name: Name of the run.
        targets: Modules to adapt.
        flag: A switch.
        lr: Learning rate.
        tag: Optional tag.
        mode: One of a, b.
        some_name: A name with an underscore.
    """


def bind(argv: list[str]) -> dict:
    return bind_args(toy, argv)


def usage_error(argv: list[str], fn=toy) -> str:
    with pytest.raises(UsageError) as info:
        bind_args(fn, argv)
    return str(info.value)


# ------------------------------------------------------------------------------------------------
# Unknown flags are rejected before main runs
# ------------------------------------------------------------------------------------------------


def test_misspelled_flag_rejected_before_main_runs(tmp_path, capsys):
    sentinel = tmp_path / "main_ran"

    def main(base_model: str, *, lora_r: int = 8, lora_alpha: int = 16) -> None:
        """Train.

        Args:
            base_model: Model folder.
            lora_r: LoRA rank.
            lora_alpha: LoRA alpha.
        """
        sentinel.write_text("ran")

    with pytest.raises(SystemExit) as info:
        run(main, ["--base_model=m", "--lora_rank=16"])
    assert info.value.code == 2
    assert not sentinel.exists()
    err = capsys.readouterr().err
    assert "--lora_rank" in err
    assert "did you mean --lora_r?" in err
    assert "valid flags: --base_model --lora_r --lora_alpha" in err
    assert "resolved arguments" not in err


def test_unknown_flag_value_is_not_taken_as_positional():
    # "16" belongs to the unknown flag: it must not be bound positionally to lora_r.
    msg = usage_error(["m", "--lora_rank", "16"])
    assert "unknown flag --lora_rank (did you mean --lora_r?)" in msg
    assert "unexpected positional" not in msg
    assert "lora_r expects" not in msg


def test_several_problems_reported_in_one_error():
    msg = usage_error(["--lora_rank=16", "--lora_r=1.5"])
    assert "unknown flag --lora_rank" in msg
    assert "--base is required" in msg
    assert "--lora_r expects an integer; got '1.5'" in msg
    assert "valid flags:" in msg


def test_unknown_flag_without_close_match_still_lists_valid_flags():
    msg = usage_error(["m", "--zzzzzz=1"])
    assert "unknown flag --zzzzzz" in msg
    assert "did you mean" not in msg
    assert "--some_name" in msg.split("valid flags:")[1]


# ------------------------------------------------------------------------------------------------
# Coercion to the annotations
# ------------------------------------------------------------------------------------------------


def test_str_parameter_keeps_digits_as_str():
    args = bind(["m", "--run_name=2024"])
    assert args["run_name"] == "2024" and isinstance(args["run_name"], str)
    assert bind(["007"])["base"] == "007"


@pytest.mark.parametrize(
    "argv",
    [
        ["--targets=q_proj,v_proj"],
        ["--targets", "q_proj", "v_proj"],
        ["--targets=[q_proj,v_proj]"],
        ['--targets=["q_proj", "v_proj"]'],
        ["--targets=[q_proj, v_proj]"],
    ],
)
def test_list_forms(argv):
    assert bind(["m", *argv])["targets"] == ["q_proj", "v_proj"]


def test_list_values_stop_at_next_flag():
    args = bind(["m", "--targets", "q_proj", "v_proj", "--flag", "--lr=2"])
    assert args["targets"] == ["q_proj", "v_proj"]
    assert args["flag"] is True and args["lr"] == 2.0


def test_list_comma_form_after_space_is_split():
    assert bind(["m", "--targets", "q_proj,v_proj"])["targets"] == ["q_proj", "v_proj"]


def test_list_needs_a_value():
    assert "--targets needs at least one value" in usage_error(["m", "--targets", "--flag"])


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], False),
        (["--flag"], True),
        (["--noflag"], False),
        (["--flag=false"], False),
        (["--flag=true"], True),
        (["--flag=No"], False),
        (["--flag=1"], True),
        (["--flag=off"], False),
    ],
)
def test_bool_forms(argv, expected):
    assert bind(["m", *argv])["flag"] is expected


def test_bare_bool_flag_does_not_swallow_next_token():
    args = bind(["--flag", "positional_value"])
    assert args["flag"] is True
    assert args["base"] == "positional_value"


@pytest.mark.parametrize("word, expected", [("False", False), ("false", False), ("FALSE", False),
                                            ("True", True), ("true", True), ("tRUE", True)])
def test_bool_takes_a_following_true_or_false_as_fire_does(word, expected):
    # alpaca-lora's users write "--train_on_inputs False" (plain Fire reads it as --train_on_inputs=False).
    def main(base: str, *, flag: bool = not expected, other: int = 1) -> None:
        """M."""

    assert bind_args(main, ["--base=m", "--flag", word]) == {"base": "m", "flag": expected, "other": 1}
    assert bind_args(main, ["--flag", word, "m", "--other=2"]) == {"base": "m", "flag": expected, "other": 2}
    assert bind_args(main, ["m", "--flag", word])["flag"] is expected


@pytest.mark.parametrize("word", ["1", "0", "yes", "No", "on", "off"])
def test_bool_followed_by_other_boolean_word_asks_for_the_equals_form(word):
    # "--flag 1" could be a value or a positional: neither guess is safe, and nothing may be silent.
    msg = usage_error(["m", "--flag", word])
    assert f"write --flag={word}" in msg
    assert bind(["m", f"--flag={word}"])["flag"] is (word.lower() in ("1", "yes", "on"))


def test_bare_bool_followed_by_a_word_that_is_not_a_boolean_is_an_error_when_left_over():
    def main(base: str, *, flag: bool = False) -> None:
        """M."""

    msg = usage_error(["--base=m", "--flag", "maybe"], main)
    assert "unexpected positional arguments: maybe (--flag is a switch: it takes no value, or true / false)" in msg


def test_bare_bool_followed_by_a_word_never_fills_an_optional_positional():
    # finetune.py's output_dir is an optional positional: "--train_on_inputs maybe" must not write to ./maybe.
    def main(base: str, out: str = "./out", *, flag: bool = False) -> None:
        """M."""

    msg = usage_error(["--base=m", "--flag", "maybe"], main)
    assert "--flag maybe: --flag is a switch (it takes no value, or true / false); write --out=maybe" in msg
    assert bind_args(main, ["m", "maybe", "--flag"]) == {"base": "m", "out": "maybe", "flag": True}
    assert bind_args(main, ["--flag", "m"]) == {"base": "m", "out": "./out", "flag": True}  # a required one may


def test_negated_bool_followed_by_true_or_false_rejected():
    assert "--noflag takes no value" in usage_error(["m", "--noflag", "False"])


def test_bool_rejects_garbage():
    assert "--flag expects true or false; got 'maybe'" in usage_error(["m", "--flag=maybe"])


def test_bool_and_its_negation_together_reported():
    assert "--flag given more than once" in usage_error(["m", "--flag", "--noflag"])


def test_negated_bool_with_value_rejected():
    msg = usage_error(["m", "--noflag=true"])
    assert "noflag" in msg


def test_int_rejects_float_naming_flag():
    msg = usage_error(["m", "--lora_r", "1.5"])
    assert "--lora_r expects an integer; got '1.5'" in msg


def test_int_and_float_values():
    args = bind(["m", "--lora_r=16", "--lr", "1e3"])
    assert args["lora_r"] == 16 and type(args["lora_r"]) is int
    assert args["lr"] == 1000.0 and type(args["lr"]) is float


def test_negative_number_is_a_value_not_a_flag():
    assert bind(["m", "--lr", "-1e-3"])["lr"] == -0.001
    assert bind(["m", "--lora_r", "-4"])["lora_r"] == -4


def test_float_rejects_text():
    assert "--lr expects a number; got 'fast'" in usage_error(["m", "--lr=fast"])


@pytest.mark.parametrize("value", ["None", "null", "NONE"])
def test_optional_str_accepts_none(value):
    assert bind(["m", f"--tag={value}"])["tag"] is None


def test_optional_str_keeps_other_text():
    assert bind(["m", "--tag", "2024"])["tag"] == "2024"


def test_none_is_text_for_a_plain_str():
    assert bind(["m", "--run_name=None"])["run_name"] == "None"


def test_literal_accepts_choice_and_rejects_other_listing_choices():
    assert bind(["m", "--mode=b"])["mode"] == "b"
    msg = usage_error(["m", "--mode=c"])
    assert "--mode must be one of a, b; got 'c'" in msg


def test_dash_name_for_underscore_parameter():
    assert bind(["m", "--some-name", "x"])["some_name"] == "x"
    assert bind(["m", "--some-name=y"])["some_name"] == "y"
    assert bind(["m", "--run-name=z"])["run_name"] == "z"


def test_positional_values_fill_required_params():
    def main(base_model: str, output_dir: str, *, seed: int = 1) -> None:
        """M."""

    assert bind_args(main, ["A", "B", "--seed=3"]) == {"base_model": "A", "output_dir": "B", "seed": 3}
    assert bind_args(main, ["--output_dir=B", "A"]) == {"base_model": "A", "output_dir": "B", "seed": 1}


def test_too_many_positional_values_reported():
    def main(base_model: str, *, seed: int = 1) -> None:
        """M."""

    assert "unexpected positional arguments: B C" in usage_error(["A", "B", "C"], main)


def test_required_param_missing_reported():
    def main(base_model: str, output_dir: str, *, seed: int = 1) -> None:
        """M."""

    msg = usage_error(["--base_model=A"], main)
    assert "--output_dir is required" in msg
    assert "--base_model is required" not in msg


def test_flag_given_twice_reported():
    assert "--lr given more than once" in usage_error(["m", "--lr=1", "--lr", "2"])


def test_flag_needs_a_value():
    assert "--run_name needs a value" in usage_error(["m", "--run_name"])


def test_defaults_included_in_signature_order():
    args = bind(["m"])
    assert list(args) == ["base", "lora_r", "run_name", "targets", "flag", "lr", "tag", "mode", "some_name"]
    assert args == {
        "base": "m", "lora_r": 8, "run_name": "default-run", "targets": ["q_proj"], "flag": False,
        "lr": 1e-4, "tag": "t", "mode": "a", "some_name": "s",
    }


def test_one_letter_aliases_are_refused():
    # Fire would take "-r" for --rank and "-v" for --verbose; here only the SHORT_FLAGS table makes a short flag.
    def main(base_model: str, *, rank: int = 8, verbose: bool = False) -> None:
        """M."""

    msg = usage_error(["m", "-r", "16", "-v"], main)
    assert "unknown flag -r: the only short flag is -h (--help), and flags are never abbreviated; " \
           "write the full name: --rank" in msg
    assert "unknown flag -v:" in msg and "--verbose" in msg
    assert "unexpected positional" not in msg  # "16" went with the refused -r
    assert "unknown flag -rank: write --rank (flags take two dashes)" in usage_error(["m", "-rank=3"], main)


def test_destructive_flag_never_filled_from_a_positional_value():
    def main(base: str, overwrite: bool = False) -> None:
        """M."""

    assert "--overwrite must be given by name, not as the positional value 'true'" in usage_error(["m", "true"], main)
    assert bind_args(main, ["m", "--overwrite", "true"])["overwrite"] is True


def test_destructive_flag_registry():
    for name in ("overwrite", "insecure", "allow_pickle_weights", "allow_base_mismatch", "allow_anything_later",
                 "trust_remote_code", "force", "delete_checkpoints"):
        assert is_destructive(name), name
    for name in ("output_dir", "lora_weights", "allowance", "overwrite_later_maybe_not", "seed"):
        assert not is_destructive(name), name
    # No short flag may ever reach a flag that replaces data or lowers a safety check.
    assert all(long.startswith("--") and not is_destructive(long[2:]) for long in SHORT_FLAGS.values())
    assert set(SHORT_FLAGS) == {"-h"}


def test_coerce_direct():
    assert coerce("3", int, "--n") == 3
    assert coerce(["a", "b"], list[str], "--x") == ["a", "b"]
    assert coerce("1,2", list[int], "--x") == [1, 2]
    with pytest.raises(ValueError, match="--n takes one value, got 2"):
        coerce(["1", "2"], int, "--n")


# ------------------------------------------------------------------------------------------------
# run(): resolved arguments, typed values, error exits
# ------------------------------------------------------------------------------------------------


def test_run_prints_resolved_arguments_before_main_and_passes_typed_values(capsys):
    got = {}

    def main(
        base: str, lora_r: int = 8, *, run_name: str = "x", targets: list[str] = ["q"], flag: bool = False,
        lr: float = 1e-4, tag: str | None = "t", mode: Literal["a", "b"] = "a",
    ) -> None:
        """Toy.

        Args:
            base: Base.
            lora_r: Rank.
        """
        print("MAIN RUNNING", file=sys.stderr)
        got.update(base=base, lora_r=lora_r, run_name=run_name, targets=targets, flag=flag, lr=lr, tag=tag,
                   mode=mode)

    run(main, ["2024", "--run_name=007", "--targets", "q_proj", "v_proj", "--tag=null", "--lr=1e3",
               "--flag", "--mode=b"])
    expected = {"base": "2024", "lora_r": 8, "run_name": "007", "targets": ["q_proj", "v_proj"],
                "flag": True, "lr": 1000.0, "tag": None, "mode": "b"}
    assert got == expected
    assert type(got["base"]) is str and type(got["run_name"]) is str and type(got["lr"]) is float
    assert type(got["lora_r"]) is int
    err = capsys.readouterr().err
    assert "resolved arguments " in err
    assert err.index("resolved arguments") < err.index("MAIN RUNNING")
    line = next(l for l in err.splitlines() if "resolved arguments " in l)
    assert json.loads(line.split("resolved arguments ", 1)[1]) == expected


def test_run_passes_awkward_strings_untouched():
    got = {}

    def main(*, name: str = "", items: list[str] = []) -> None:
        """M."""
        got.update(locals())

    run(main, ['--name=a=b c"d\n-x', "--items=[1,true,null]"])
    assert got["name"] == 'a=b c"d\n-x'
    assert got["items"] == ["1", "true", "null"]


def test_run_suite_error_exits_1_without_traceback(capsys):
    def main(base: str) -> None:
        """M."""
        raise SuiteError("the data file is broken")

    with pytest.raises(SystemExit) as info:
        run(main, ["x"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "error: the data file is broken" in err
    assert "Traceback" not in err


def test_run_usage_error_inside_main_exits_2(capsys):
    def main(base: str) -> None:
        """M."""
        raise UsageError("--base must be a folder")

    with pytest.raises(SystemExit) as info:
        run(main, ["x"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: --base must be a folder" in err
    assert "Traceback" not in err


def test_run_help_is_built_from_docstring_and_does_not_run_main(tmp_path, capsys):
    sentinel = tmp_path / "main_ran"

    def main(base: str, *, lora_r: int = 8) -> None:
        """Train a toy adapter.

        Args:
            base: Base model folder.
            lora_r: LoRA rank of the adapter.
        """
        sentinel.write_text("ran")

    run(main, ["--help"])  # returns normally: exit status 0
    assert not sentinel.exists()
    captured = capsys.readouterr()
    text = captured.out
    assert "Train a toy adapter." in text
    assert "--lora_r" in text and "LoRA rank of the adapter." in text


def test_run_other_exceptions_are_not_swallowed():
    def main(base: str) -> None:
        """M."""
        raise RuntimeError("a real bug")

    with pytest.raises(RuntimeError, match="a real bug"):
        run(main, ["x"])


# ------------------------------------------------------------------------------------------------
# The real script
# ------------------------------------------------------------------------------------------------


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "prepare_data.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def prepare_help() -> subprocess.CompletedProcess:
    return _script("--help")


def test_prepare_data_help(prepare_help):
    assert prepare_help.returncode == 0, prepare_help.stderr
    out = prepare_help.stdout + prepare_help.stderr
    for flag in ("--cutoff_len", "--on_overlength", "--train_on_inputs", "--data_format", "--mask_mode"):
        assert flag in out
    assert "Maximum tokens per example" in out
    assert "Tokenize and mask instruction / conversation data for fine-tuning." in out


def test_prepare_data_help_on_stdout(prepare_help):
    assert prepare_help.returncode == 0
    assert "--cutoff_len" in prepare_help.stdout
    assert "--on_overlength" in prepare_help.stdout
    assert "--train_on_inputs" in prepare_help.stdout
    assert "Maximum tokens per example" in prepare_help.stdout


def test_prepare_data_misspelled_flag_exits_2_and_writes_nothing(tmp_path):
    out_dir = tmp_path / "Z"
    proc = _script("--base_model", "X", "--data_path", "Y", "--output_dir", str(out_dir), "--cutof_len", "5")
    assert proc.returncode == 2
    assert "--cutof_len" in proc.stderr
    assert "did you mean --cutoff_len?" in proc.stderr
    assert "valid flags:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_prepare_data_binding_of_real_signature():
    import prepare_data

    args = bind_args(prepare_data.main, ["--base_model=M", "--data_path", "a.json", "b.jsonl", "--output_dir=O",
                                         "--cutoff_len", "7", "--on_overlength=drop", "--train_on_inputs"])
    assert args["data_path"] == ["a.json", "b.jsonl"]
    assert args["cutoff_len"] == 7
    assert args["on_overlength"] == "drop"
    assert args["train_on_inputs"] is True
    assert args["val_set_size"] == 0.05
    msg = usage_error(["--base_model=M", "--data_path=a", "--output_dir=O", "--on_overlength=skip"],
                      prepare_data.main)
    assert "--on_overlength must be one of truncate, drop, error; got 'skip'" in msg




# ------------------------------------------------------------------------------------------------
# Every stage script: no short flags, no abbreviations, whole types in --help, no library noise
# ------------------------------------------------------------------------------------------------

# Each stage with arguments that bind (the files need not exist: binding comes before any work).
# apply_delta.py takes its subcommand as the positional COMMAND, bound like any other parameter.
STAGES = {
    "prepare_data.py": ["--base_model", "M", "--data_path", "d.json", "--output_dir", "OUT"],
    "finetune.py": ["--base_model", "M", "--data_path", "d.json", "--output_dir", "OUT"],
    "generate.py": ["--base_model", "M", "--input_file", "d.json", "--output_file", "OUT"],
    "export_hf.py": ["--lora_weights", "A", "--output_dir", "OUT"],
    "export_state_dict.py": ["--base_model", "M", "--format", "llama2c", "--output_dir", "OUT"],
    "apply_delta.py make": ["make", "--base_model_path", "B", "--target_model_path", "T", "--delta_path", "OUT"],
    "apply_delta.py apply": ["apply", "--base_model_path", "B", "--delta_path", "D", "--target_model_path", "OUT"],
}


def _stage_main(stage: str):
    import importlib

    return importlib.import_module(stage.split(".py")[0]).main


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_refuses_every_single_dash_form_and_every_abbreviation(stage, capsys):
    import string

    main = _stage_main(stage)
    names = list(inspect.signature(main).parameters)
    bind_args(main, STAGES[stage])  # the base arguments are fine
    bad = [f"-{c}" for c in string.ascii_letters if c != "h"]
    bad += [f"-{n}" for n in names] + [f"-{n}=1" for n in names]
    # Every prefix of every flag that is not itself a flag (or a --no form) is refused, not expanded.
    bad += [f"--{n[:k]}" for n in names for k in range(1, len(n))
            if n[:k] not in names and not (n[:k].startswith("no") and n[:k][2:] in names)]
    for token in bad:
        with pytest.raises(UsageError, match=re.escape(f"unknown flag {token.split('=')[0]}")):
            bind_args(main, [*STAGES[stage], token])
    # Through run(): exit 2, before anything runs (the resolved arguments are printed just before main).
    for token in ("-o", "-a", "-overwrite", "--over", "--overwrit"):
        with pytest.raises(SystemExit) as info:
            run(main, [*STAGES[stage], token])
        assert info.value.code == 2
        assert "resolved arguments" not in capsys.readouterr().err


def _stage_cmd(stage: str, *args: str) -> list[str]:
    return [sys.executable, stage.split()[0], *args]


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("form", ["-o", "-o DIR"])
def test_dash_o_refused_by_every_stage_script_before_work(stage, form, tmp_path):
    # The issue: "export_state_dict.py --base_model M --format llama2c -o DIR" replaced an existing export,
    # since -o was --overwrite there and --output_dir in finetune.py / export_hf.py.
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "params.json").write_text("mine")
    args = [str(tmp_path / a) if a in ("OUT", "d.json", "A", "D", "M", "B", "T") else a for a in STAGES[stage]]
    if form == "-o":
        args = [str(existing) if a == str(tmp_path / "OUT") else a for a in args] + ["-o"]
    else:
        i = args.index(str(tmp_path / "OUT"))
        args = args[:i - 1] + args[i + 1:] + ["-o", str(existing)]
    proc = subprocess.run(_stage_cmd(stage, *args), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "unknown flag -o: the only short flag is -h (--help)" in proc.stderr
    assert "resolved arguments" not in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert [p.name for p in existing.iterdir()] == ["params.json"] and (existing / "params.json").read_text() == "mine"


@pytest.fixture(scope="module")
def stage_helps() -> dict[str, str]:
    out = {}
    for stage in dict.fromkeys(s.split()[0] for s in STAGES):
        proc = subprocess.run([sys.executable, stage, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out[stage] = proc.stdout
    return out


@pytest.mark.parametrize("stage", list(dict.fromkeys(s.split()[0] for s in STAGES)))
def test_stage_help_lists_every_flag_with_its_whole_type(stage, stage_helps):
    text = stage_helps[stage]
    params = inspect.signature(_stage_main(stage)).parameters
    lines = text.splitlines()
    types_shown = {}
    for k, line in enumerate(lines):
        m = re.match(r"    (?:--(\w+)=\w+(?: \(required\))?|([A-Z_]+))$", line)
        if m:
            name = m.group(1) or m.group(2).lower()
            assert lines[k + 1].startswith("        Type: "), (name, lines[k + 1])
            types_shown[name] = lines[k + 1].split("Type: ", 1)[1]
    assert set(types_shown) == set(params)
    for name, shown in types_shown.items():
        # Whole: exactly the annotation as written in the source (Fire cut it: "Literal['cosine...").
        assert "..." not in shown, (name, shown)
        assert shown == " ".join(str(params[name].annotation).split()), name
    # No one-letter alias is advertised, except -h for --help, which is.
    assert re.findall(r"^\s*(-\w), --", text, flags=re.M) == ["-h"]
    assert "    -h, --help\n" in text


def test_help_shows_long_literal_types_whole(stage_helps):
    assert "Type: Literal['cosine', 'linear', 'constant']" in stage_helps["finetune.py"]
    assert "Type: Literal['auto', 'balanced', 'sequential'] | None" in stage_helps["generate.py"]
    assert "Type: Literal['', 'false', 'gradients', 'all']" in stage_helps["finetune.py"]


def test_known_library_deprecations_silenced_ours_kept():
    def main() -> None:
        """M."""
        peft_msg = ("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use "
                    "`is_activation_checkpointing` instead.")
        # As transformers emits it when peft reads the old property: silenced.
        warnings.warn_explicit(peft_msg, FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
        # The same words from anywhere else, and our own warnings of either category: shown.
        warnings.warn_explicit(peft_msg, FutureWarning, "finetune.py", 2, module="finetune")
        warnings.warn("our own notice", FutureWarning)
        warnings.warn("our own deprecation", DeprecationWarning)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run(main, [])
    got = [(w.category, str(w.message), w.filename) for w in seen]
    assert [g for g in got if g[2] == "modeling_utils.py"] == []
    assert [g[2] for g in got if "is_gradient_checkpointing" in g[1]] == ["finetune.py"]
    assert (FutureWarning, "our own notice") in [g[:2] for g in got]
    assert (DeprecationWarning, "our own deprecation") in [g[:2] for g in got]
    # The filters were for that call only.
    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "m.py", 1,
                               module="transformers.modeling_utils")
    assert len(after) == 1


@pytest.mark.slow
def test_stage_subprocess_stderr_has_no_library_deprecation_warning(tmp_path):
    """Slow: It runs stages as subprocesses on a real adapter: the warnings appear only when the libraries really load."""
    # A plain-peft LoRA adapter: loading it makes peft read transformers' deprecated is_gradient_checkpointing.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        quiet_known_warnings()  # this process's copy of the notice is not what the test is about
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(STORIES),
                               LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    proc = subprocess.run([sys.executable, "generate.py", "--base_model", str(STORIES), "--lora_weights",
                           str(tmp_path / "adapter"), "--prompt", "Once", "--max_new_tokens", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    for noise in ("FutureWarning", "DeprecationWarning", "is deprecated", "warnings.warn("):
        assert noise not in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------------
# alpaca-lora's command lines and the README's table of defaults that differ from alpaca-lora's
# ------------------------------------------------------------------------------------------------


def test_alpaca_lora_readme_command_lines_bind():
    import finetune

    # alpaca-lora's README command, then the same with the "--flag False" form its users write.
    cmd = ("--base_model decapoda-research/llama-7b-hf --data_path yahma/alpaca-cleaned --output_dir ./lora-alpaca "
           "--batch_size 128 --micro_batch_size 4 --num_epochs 3 --learning_rate 1e-4 --cutoff_len 512 "
           "--val_set_size 2000 --lora_r 8 --lora_alpha 16 --lora_dropout 0.05 --lora_target_modules [q_proj,v_proj] "
           "--train_on_inputs --group_by_length").split()
    args = bind_args(finetune.main, cmd)
    assert args["train_on_inputs"] is True and args["group_by_length"] is True
    assert args["lora_target_modules"] == ["q_proj", "v_proj"] and args["val_set_size"] == 2000.0
    args = bind_args(finetune.main, [*cmd[:-2], "--train_on_inputs", "False", "--group_by_length", "True"])
    assert args["train_on_inputs"] is False and args["group_by_length"] is True
    assert "unexpected positional arguments: maybe (--train_on_inputs is a switch" in \
        usage_error([*cmd[:-2], "--train_on_inputs", "maybe"], finetune.main)
    bare = ["--base_model", "M", "--data_path", "d.json", "--train_on_inputs", "maybe"]  # output_dir not given
    assert "write --output_dir=maybe" in usage_error(bare, finetune.main)


def _alpaca_section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("### Coming from alpaca-lora")
    end = text.find("\n#", start + 1)
    return text[start:end if end > 0 else None]


def _alpaca_table() -> list[dict[str, str]]:
    rows = [line for line in _alpaca_section().splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header == ["flag", "alpaca-lora", "ours", "why"]
    return [dict(zip(header, (c.strip() for c in row.strip("|").split("|")))) for row in rows[2:]]


def test_readme_alpaca_lora_table_ours_column_matches_the_signatures():
    rows = _alpaca_table()
    seen = set()
    for row in rows:
        m = re.fullmatch(r"`(\w+\.py) --(\w+)`", row["flag"])
        assert m, row["flag"]
        script, flag = m.groups()
        main = _stage_main(script)
        param = inspect.signature(main).parameters[flag]
        ours = re.match(r"`([^`]*)`", row["ours"])
        assert ours, row["ours"]
        # The value as a user would type it, read as the flag's type, is the signature's default.
        default = list(param.default) if isinstance(param.default, tuple) else param.default
        assert coerce(ours.group(1).split(), typing.get_type_hints(main)[flag], f"--{flag}") == default, row
        assert row["alpaca-lora"] and row["why"]
        seen.add(f"{script} --{flag}")
    # The defaults the section says are the same in both (alpaca-lora's values) are still ours.
    same = re.search(r"\nThe same in both: (.*?)\n\n", _alpaca_section() + "\n\n", flags=re.S).group(1)
    pairs = re.findall(r"`--(\w+) ([^`]+)`", same)
    assert len(pairs) >= 8
    for flag, value in pairs:
        main = next(_stage_main(s) for s in ("finetune.py", "generate.py")
                    if flag in inspect.signature(_stage_main(s)).parameters)
        assert coerce(value, typing.get_type_hints(main)[flag], f"--{flag}") == \
            inspect.signature(main).parameters[flag].default, flag
    for required in ("finetune.py --train_on_inputs", "finetune.py --lora_target_modules", "finetune.py --val_set_size",
                     "generate.py --num_beams", "generate.py --temperature", "generate.py --top_p",
                     "generate.py --top_k"):
        assert required in seen, required


def test_readme_alpaca_lora_reproduction_commands_bind_to_alpaca_lora_settings():
    import shlex

    section = _alpaca_section()
    block = re.search(r"```sh\n(.*?)```", section, flags=re.S).group(1).replace("\\\n", " ")
    commands = {}
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["python"]:
            commands[words[1]] = bind_args(_stage_main(words[1]), words[2:])
    ft, gen = commands["finetune.py"], commands["generate.py"]
    # alpaca-lora's values (tloen/alpaca-lora finetune.py and generate.py at 8bb8579e).
    assert ft["train_on_inputs"] is True
    assert ft["lora_target_modules"] == ["q_proj", "v_proj"]
    assert ft["val_set_size"] == 2000
    assert ft["lr_scheduler"] == "linear" and ft["warmup_steps"] == 100
    assert ft["eval_steps"] == 200 and ft["load_best_model_at_end"] is True
    assert gen["num_beams"] == 4 and gen["temperature"] == 0 and gen["max_new_tokens"] == 128
