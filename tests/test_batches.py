"""Batch construction (utils/training/batches.py) as units: which rows make each optimizer step, how a step's
rows are dealt to ranks and cut into micro-batches, and what padded and packed batches hold."""

from __future__ import annotations

import pytest

from utils.data.encode import IGNORE_INDEX
from utils.training.batches import (MEGABATCH_STEPS, collate, collate_packed, epoch_steps, micro_batches,
                                    rank_rows, steps_per_epoch)

LENGTHS = [(i * 37) % 23 + 1 for i in range(103)]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_an_epoch_covers_every_row_once_in_steps_of_batch_size(group_by_length):
    steps = epoch_steps(LENGTHS, 8, seed=3, epoch=0, group_by_length=group_by_length)
    assert sorted(i for s in steps for i in s) == list(range(len(LENGTHS)))
    assert len(steps) == steps_per_epoch(len(LENGTHS), 8) == 13
    assert sorted(len(s) for s in steps)[1:] == [8] * 12 and min(len(s) for s in steps) == 103 - 12 * 8


def test_steps_are_a_pure_function_of_seed_and_epoch():
    """What resume relies on: the interrupted run's steps, recomputed, are the same."""
    one = epoch_steps(LENGTHS, 8, seed=3, epoch=1, group_by_length=False)
    assert one == epoch_steps(LENGTHS, 8, seed=3, epoch=1, group_by_length=False)
    assert one != epoch_steps(LENGTHS, 8, seed=3, epoch=2, group_by_length=False)
    assert one != epoch_steps(LENGTHS, 8, seed=4, epoch=1, group_by_length=False)


def test_group_by_length_puts_similar_lengths_in_a_step():
    lengths = list(range(1, 8 * MEGABATCH_STEPS + 1))
    grouped = epoch_steps(lengths, 8, seed=0, epoch=0, group_by_length=True)
    shuffled = epoch_steps(lengths, 8, seed=0, epoch=0, group_by_length=False)

    def spread(steps):
        return sum(max(lengths[i] for i in s) - min(lengths[i] for i in s) for s in steps)

    assert spread(grouped) == 7 * len(grouped)  # consecutive lengths in every step
    assert spread(shuffled) > 10 * spread(grouped)


def test_ranks_share_a_step_without_overlap_and_with_similar_tokens():
    step = list(range(16))
    shares = [rank_rows(step, LENGTHS, r, 4) for r in range(4)]
    assert sorted(i for s in shares for i in s) == step
    tokens = [sum(LENGTHS[i] for i in s) for s in shares]
    assert max(tokens) - min(tokens) <= max(LENGTHS)
    for share in shares:
        assert [LENGTHS[i] for i in share] == sorted((LENGTHS[i] for i in share), reverse=True)


def test_micro_batches_cut_in_order():
    assert micro_batches([5, 4, 3, 2, 1], 2) == [[5, 4], [3, 2], [1]]


def test_collate_pads_right_with_masked_labels():
    batch = collate([([1, 2, 3], [IGNORE_INDEX, 2, 3]), ([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]


def test_collate_packed_restarts_positions_and_never_predicts_across_examples():
    batch = collate_packed([[([1, 2, 3], [1, 2, 3]), ([4, 5], [4, 5])], [([6], [6])]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    # the first token of each example is not a target (nothing of its own precedes it)
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5], [IGNORE_INDEX] * 5]
    assert batch["real_tokens"] == 6 and "attention_mask" not in batch
