"""Batches for training: deterministic order, optional length grouping, padding to the longest row."""

from __future__ import annotations

import math

import torch

from utils.encode import IGNORE_INDEX


def epoch_batches(lengths: list[int], micro_batch_size: int, seed: int, epoch: int,
                  group_by_length: bool) -> list[list[int]]:
    """Row indices of every micro-batch of one epoch, a pure function of (seed, epoch), so a resumed
    run sees exactly the batches the interrupted one would have.

    With ``group_by_length``, rows are sorted by length within windows of 64 micro-batches (so
    padding is small) and the batches are then shuffled (so lengths do not trend through the epoch).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if group_by_length:
        window = micro_batch_size * 64
        order = [i for w in range(0, len(order), window)
                 for i in sorted(order[w:w + window], key=lambda i: -lengths[i])]
    batches = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    if group_by_length:
        perm = torch.randperm(len(batches), generator=gen).tolist()
        batches = [batches[i] for i in perm]
    return batches


def steps_per_epoch(n_batches: int, accumulation: int) -> int:
    return math.ceil(n_batches / accumulation)


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
