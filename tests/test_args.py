"""Every stage's flags travel as typed groups (``utils/args.py``), and its output fingerprint is built from them:
each field counts unless its declaration says it cannot change the output, so a flag added later counts by
default. Checked for every stage, on the real ``Args`` class and ``fingerprint`` function of its script."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing

import pytest

from utils.args import Group, StageArgs, counts, unfingerprinted

STAGES = ["prepare_data", "finetune", "generate", "export_hf", "export_state_dict", "apply_delta", "quantize",
          "eval.perplexity",
          "eval.multiple_choice", "eval.text_metrics", "eval.answer", "eval.review", "eval.llmzoo_metric",
          "eval.judge", "eval.rank", "eval.run"]
INPUTS = {"base_model": {"config": "c0ffee", "weights": {}}, "data": "d00d"}


def stage_pairs():
    """(stage, Args class, fingerprint function) for every stage; a stage with several commands may give
    ``Args`` as a tuple, with ``fingerprint_<command>`` functions in the same order."""
    out = []
    for stage in STAGES:
        module = importlib.import_module(stage)
        classes = module.Args if isinstance(module.Args, tuple) else (module.Args,)
        if len(classes) == 1:
            out.append((stage, classes[0], module.fingerprint))
        else:
            for cls in classes:
                out.append((stage, cls, getattr(module, f"fingerprint_{cls.COMMAND}")))
    return out


PAIRS = stage_pairs()
IDS = [f"{stage}-{cls.__name__}" for stage, cls, _ in PAIRS]


def placeholder(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return typing.get_args(tp)[0]
    if origin in (list, typing.List) or tp is list:
        return ["x"]
    if tp is int:
        return 1
    if tp is float:
        return 0.5
    return "x"


def default_args(cls: type[StageArgs]) -> StageArgs:
    flags = {}
    for group in cls.group_types().values():
        hints = typing.get_type_hints(group)
        for f in dataclasses.fields(group):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                flags[f.name] = placeholder(hints[f.name])
    return cls.from_flags(flags)


def changed(value, tp=None):
    """A different value of the same kind (validity does not matter: only the fingerprint is computed; a choice
    among fixed values takes another of them)."""
    choices = [c for c in typing.get_args(tp) if c != value] if typing.get_origin(tp) is typing.Literal else []
    if choices:
        return choices[0]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.25
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, (list, tuple)):
        return [*value, "changed"]
    if value is None:
        return "changed"
    if isinstance(value, dict):
        return {**value, "changed": 1}
    raise AssertionError(f"no changed value for {value!r}")


def with_group(args: StageArgs, name: str, group: Group) -> StageArgs:
    return dataclasses.replace(args, **{name: group})


@pytest.mark.parametrize("stage,cls,fingerprint", PAIRS, ids=IDS)
def test_every_flag_of_main_is_in_exactly_one_group(stage, cls, fingerprint):
    module = importlib.import_module(stage)
    commands = getattr(cls, "COMMAND", None)
    main = getattr(module, commands) if commands and hasattr(module, commands) and callable(getattr(module, commands)) \
        else module.main
    flags = cls.flag_names()
    assert len(flags) == len(set(flags)), "a flag in two groups"
    assert sorted(flags) == sorted(inspect.signature(main).parameters)
    assert all(issubclass(t, Group) for t in cls.group_types().values())


@pytest.mark.parametrize("stage,cls,fingerprint", PAIRS, ids=IDS)
def test_each_field_counts_in_the_fingerprint_unless_marked(stage, cls, fingerprint):
    args = default_args(cls)
    base = fingerprint(args, INPUTS)
    assert base == fingerprint(default_args(cls), INPUTS), "not a pure function of its arguments"
    wrong = []
    for name, group in args.groups().items():
        container = next(f for f in dataclasses.fields(cls) if f.name == name)
        hints = typing.get_type_hints(type(group))
        for f in dataclasses.fields(group):
            other = dataclasses.replace(group, **{f.name: changed(getattr(group, f.name), hints[f.name])})
            moved = fingerprint(with_group(args, name, other), INPUTS) != base
            if moved != (counts(container) and counts(f)):
                wrong.append(f"{name}.{f.name}: {'changes' if moved else 'does not change'} the fingerprint")
            if not counts(f):
                assert f.metadata.get("why"), f"{name}.{f.name} is left out of the fingerprint without a why"
    assert wrong == []


@pytest.mark.parametrize("stage,cls,fingerprint", PAIRS, ids=IDS)
def test_a_field_added_to_any_group_counts_unless_marked(stage, cls, fingerprint):
    args = default_args(cls)
    for name, group in args.groups().items():
        container = next(f for f in dataclasses.fields(cls) if f.name == name)
        base = type(group)
        plain = dataclasses.make_dataclass(f"Grown{base.__name__}", [("added_later", int, dataclasses.field(default=1))],
                                           bases=(base,), frozen=True)
        marked = dataclasses.make_dataclass(f"Marked{base.__name__}",
                                            [("added_later", int, unfingerprinted(1, why="test"))],
                                            bases=(base,), frozen=True)
        values = group.values()
        one = fingerprint(with_group(args, name, plain(**values, added_later=1)), INPUTS)
        two = fingerprint(with_group(args, name, plain(**values, added_later=2)), INPUTS)
        assert (one != two) == counts(container), name
        one = fingerprint(with_group(args, name, marked(**values, added_later=1)), INPUTS)
        two = fingerprint(with_group(args, name, marked(**values, added_later=2)), INPUTS)
        assert one == two, name


@pytest.mark.parametrize("stage,cls,fingerprint", PAIRS, ids=IDS)
def test_the_inputs_count_in_the_fingerprint(stage, cls, fingerprint):
    args = default_args(cls)
    assert fingerprint(args, INPUTS) != fingerprint(args, {**INPUTS, "data": "other"})


@dataclasses.dataclass(frozen=True)
class One(Group):
    a_flag: int = 1


@dataclasses.dataclass(frozen=True)
class Both(StageArgs):
    one: One


def test_from_flags_refuses_a_flag_in_no_group():
    assert Both.from_flags({"a_flag": 3}).one.a_flag == 3
    with pytest.raises(TypeError, match="flags in no group: stray"):
        Both.from_flags({"a_flag": 3, "stray": 1})
