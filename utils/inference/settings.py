"""Decoding settings, torch-free, so a stage can validate its sampling flags before anything heavy loads."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from utils.args import Group


@dataclass(frozen=True)
class Settings(Group):
    """How to decode: the same fields for generate.py's flags, the server's requests and evaluation."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    regulation_start: int = 0
    max_time: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))  # a list given by a caller, frozen

    def problems(self) -> list[str]:
        out = []
        if self.max_new_tokens < 1:
            out.append(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            out.append(f"--min_new_tokens must be in [0, --max_new_tokens], got {self.min_new_tokens}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            out.append(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            out.append(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            out.append(f"--top_k must be >= 0 (0: off), got {self.top_k}")
        if self.num_beams < 1:
            out.append(f"--num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            out.append("--num_beams > 1 is beam search: use it with --temperature 0")
        if self.repetition_penalty <= 0:
            out.append(f"--repetition_penalty must be > 0 (1: off), got {self.repetition_penalty}")
        if self.length_penalty <= 0:
            out.append(f"--length_penalty must be > 0 (1: off), got {self.length_penalty}")
        if self.regulation_start < 0 or self.max_time < 0:
            out.append("--regulation_start and --max_time must be >= 0")
        if any(not isinstance(s, str) or not s for s in self.stop):
            out.append("--stop strings must be non-empty")
        return out

    def to_json(self) -> dict:
        return {**asdict(self), "stop": list(self.stop)}
