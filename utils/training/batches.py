"""Batches for training: deterministic steps, micro-batches cut for speed, padding or packing.

An optimizer step covers a fixed set of rows (``epoch_steps``), a pure function of (seed, epoch) so
a resumed run sees exactly the rows the interrupted one would have. The loss of a step is the sum
of token losses over all its rows divided by its trained-token count, so how the step's rows are cut
into micro-batches (sorted by length, split over data-parallel ranks, or packed several to a row)
changes speed and memory, never the mathematics.
"""

from __future__ import annotations

import math

import torch

from utils.data.encode import IGNORE_INDEX

MEGABATCH_STEPS = 50  # --group_by_length sorts rows by length within windows of this many steps


def epoch_steps(lengths: list[int], batch_size: int, seed: int, epoch: int,
                group_by_length: bool) -> list[list[int]]:
    """Row indices of every optimizer step of one epoch (the last step may be short).

    With ``group_by_length`` (as Hugging Face's sampler) rows of similar length share a step: rows are
    sorted by length within windows of ``MEGABATCH_STEPS`` steps and the steps are then shuffled.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if group_by_length:
        window = batch_size * MEGABATCH_STEPS
        order = [i for w in range(0, len(order), window)
                 for i in sorted(order[w:w + window], key=lambda i: -lengths[i])]
    steps = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        perm = torch.randperm(len(steps), generator=gen).tolist()
        steps = [steps[i] for i in perm]
    return steps


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return math.ceil(n_rows / batch_size)


def rank_rows(step: list[int], lengths: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of a step's rows, longest first; dealing the sorted rows round-robin gives
    every rank a similar number of tokens."""
    ordered = sorted(step, key=lambda i: (-lengths[i], i))
    return ordered[rank::world_size]


def micro_batches(rows: list[int], micro_batch_size: int) -> list[list[int]]:
    """Cut rows (already sorted longest first) into micro-batches of similar length: little padding."""
    return [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


def pack(rows: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bins of rows whose lengths sum to at most ``capacity``."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(rows, key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: pads get attention 0 and label -100."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        labels[r, :len(lab)] = torch.tensor(lab)
        attention[r, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def collate_packed(bins: list[list[tuple[list[int], list[int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Several examples per row, each with positions restarting at 0 and no attention mask, which
    transformers turns into a block-diagonal causal mask: an example attends only to itself.

    The first label of every example is dropped (-100) so no token is predicted across a boundary;
    unpacked, that label is never predicted either (nothing precedes it). The padding tail forms its
    own block (positions from 0, labels -100).
    """
    width = max(sum(len(ids) for ids, _ in b) for b in bins)
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    for r, b in enumerate(bins):
        at = 0
        for ids, lab in b:
            n = len(ids)
            input_ids[r, at:at + n] = torch.tensor(ids)
            labels[r, at + 1:at + n] = torch.tensor(lab[1:n])
            positions[r, at:at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "position_ids": positions, "labels": labels,
            "real_tokens": sum(len(ids) for b in bins for ids, _ in b)}


def empty_batch() -> dict:
    """A micro-batch with nothing to learn (loss 0): a rank's turn in a collective it has no rows for."""
    return {"input_ids": torch.zeros((1, 2), dtype=torch.long), "attention_mask": torch.ones((1, 2), dtype=torch.long),
            "labels": torch.full((1, 2), IGNORE_INDEX, dtype=torch.long), "real_tokens": 0}
