"""A stage's flags as typed, frozen groups: what reaches ``utils`` and what makes an output's fingerprint.

Each stage keeps its flat, typed ``main()`` signature (the CLI and ``--help``); its first line turns the
flags into one ``StageArgs`` (a frozen dataclass whose fields are ``Group``s, one per concern: data,
method, optimisation, ...). A ``utils`` function receives the group it needs, never a dict of flag names.

The fingerprint of an output is built from the groups: every field counts unless its declaration says
it does not change the result (``unfingerprinted(default, why=...)``), and a whole group can be left
out the same way (``field(metadata=...)`` on the container). So a new flag counts by default; leaving it
out is a decision written beside it. ``tests/test_args.py`` checks this for every stage.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from utils.errors import UsageError

# Field metadata key: False for a field (or a whole group) that does not change the output.
IN_FINGERPRINT = "fingerprint"


def unfingerprinted(default: Any = dataclasses.MISSING, *, why: str) -> Any:
    """A field that does not change the output (where it is written, how progress is shown, safety flags
    that only allow what is otherwise refused); ``why`` says so, for the reader and the tests."""
    return field(default=default, metadata={IN_FINGERPRINT: False, "why": why})


def counts(f: dataclasses.Field) -> bool:
    return f.metadata.get(IN_FINGERPRINT, True)


@dataclass(frozen=True)
class Group:
    """One concern's flags. ``problems()`` validates the group alone (all problems, not the first)."""

    def problems(self) -> list[str]:
        return []

    def fingerprint_values(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if counts(f)}

    def values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class StageArgs:
    """A stage's groups. ``from_flags(main's locals)`` fills each group from the flags of the same names;
    every flag must land in exactly one group (a flag left out is a programming error, caught by tests)."""

    STAGE: ClassVar[str] = ""

    @classmethod
    def group_types(cls) -> dict[str, type]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def flag_names(cls) -> list[str]:
        return [f.name for g in cls.group_types().values() for f in dataclasses.fields(g)]

    @classmethod
    def from_flags(cls, flags: dict[str, Any]) -> "StageArgs":
        groups, used = {}, set()
        for name, tp in cls.group_types().items():
            names = [f.name for f in dataclasses.fields(tp)]
            groups[name] = tp(**{n: flags[n] for n in names if n in flags})
            used.update(names)
        unused = sorted(set(flags) - used)
        if unused:
            raise TypeError(f"{cls.__name__}: flags in no group: {', '.join(unused)}")
        return cls(**groups)

    def groups(self) -> dict[str, Group]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def problems(self) -> list[str]:
        return [p for g in self.groups().values() for p in g.problems()]

    def check(self) -> "StageArgs":
        """Raise one UsageError listing every group's problems (nothing else has run yet)."""
        problems = self.problems()
        if problems:
            raise UsageError("\n".join(problems))
        return self

    def fingerprint_values(self) -> dict[str, dict[str, Any]]:
        """The values that determine the output, by group: every field not marked ``unfingerprinted``."""
        return {f.name: getattr(self, f.name).fingerprint_values() for f in dataclasses.fields(self) if counts(f)}

    def flags(self) -> dict[str, Any]:
        """Every flag's value, flat, as the user gave it (recorded in pipeline.json as ``args``)."""
        return {k: _plain(v) for g in self.groups().values() for k, v in g.values().items()}


def _plain(value: Any) -> Any:
    """JSON-ready: tuples (frozen groups hold lists as tuples) as lists, recursively."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
