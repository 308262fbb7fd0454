"""Tests for the strict command line (``utils/cli.py``) and its use by ``prepare_data.py``.

Toy ``main`` functions are called through ``bind_args`` (binding and coercion only) and ``run``
(binding, the resolved-arguments line, then the call through Fire). The real script is run in a
subprocess for ``--help`` and for a misspelled flag.
"""

import json
import subprocess
import sys
from typing import Literal

import pytest

from conftest import REPO
from utils.cli import SuiteError, UsageError, bind_args, coerce, run


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


def test_bare_bool_followed_by_false_is_not_silently_true():
    # With no positional slot left, the stray "false" must be reported, not dropped.
    def main(base: str, *, flag: bool = False) -> None:
        """M."""

    msg = usage_error(["--base=m", "--flag", "false"], main)
    assert "unexpected positional arguments: false" in msg


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


def test_one_letter_alias_for_unique_first_letter():
    def main(base_model: str, *, rank: int = 8, verbose: bool = False) -> None:
        """M."""

    assert bind_args(main, ["m", "-r", "16", "-v"]) == {"base_model": "m", "rank": 16, "verbose": True}


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
                                         "-c", "7", "--on_overlength=drop", "--train_on_inputs"])
    assert args["data_path"] == ["a.json", "b.jsonl"]
    assert args["cutoff_len"] == 7
    assert args["on_overlength"] == "drop"
    assert args["train_on_inputs"] is True
    assert args["val_set_size"] == 0.05
    msg = usage_error(["--base_model=M", "--data_path=a", "--output_dir=O", "--on_overlength=skip"],
                      prepare_data.main)
    assert "--on_overlength must be one of truncate, drop, error; got 'skip'" in msg


def test_prepare_data_advertised_alias_is_accepted(prepare_help):
    import prepare_data

    assert "-d, --data_format" in prepare_help.stdout + prepare_help.stderr
    args = bind_args(prepare_data.main, ["--base_model=M", "--data_path=a", "--output_dir=O", "-d", "moss"])
    assert args["data_format"] == "moss"
