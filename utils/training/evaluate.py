"""The loss finetune.py trains on and the evaluation it reports, for any model and prepared rows.

One definition for the training loop, its validation split and ``scripts/score_validation.py`` (the same
rows scored before training), so the numbers compare like with like: next-token cross-entropy over the
trained positions only, summed so that gradient accumulation and ranks give the token mean exactly.
"""

from __future__ import annotations


def next_token_targets(model, batch, n_virtual: int, device="cpu", trained_only: bool = False):
    """(logits, labels) aligned for next-token prediction, virtual-token positions dropped.

    With ``trained_only`` the output head runs only at positions whose next token is trained (a
    forward pre-hook on the head selects them): with a 32k-150k vocabulary the full logits are most of
    a step's memory, and prompt positions never need them.
    """
    import torch

    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    labels = batch["labels"].to(device)
    head = model.get_output_embeddings() if trained_only and n_virtual == 0 else None
    keep = labels[:, 1:] != -100
    selected = []
    if head is not None:
        positions = torch.zeros_like(labels, dtype=torch.bool)
        positions[:, :-1] = keep

        def select(module, args):
            hidden = args[0]
            if hidden.shape[:2] != positions.shape:  # an unusual head call: leave it alone
                return None
            selected.append(True)
            return (hidden[positions][None], *args[1:])

        handle = head.register_forward_pre_hook(select)
        try:
            logits = model(**inputs, use_cache=False).logits
        finally:
            handle.remove()
        if selected:
            return logits[0].float(), labels[:, 1:][keep]
    else:
        logits = model(**inputs, use_cache=False).logits
    logits = logits[:, n_virtual:, :][:, :-1].float()
    return logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)


def token_loss_sum(model, batch, n_virtual: int, device="cpu"):
    """Summed next-token cross-entropy over trained positions (so accumulation is token-exact)."""
    import torch.nn.functional as F

    logits, labels = next_token_targets(model, batch, n_virtual, device, trained_only=True)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def evaluate(model, rows, micro_batch_size: int, n_virtual: int = 0, dist=None, lockstep: bool = False) -> dict:
    """Token-mean loss and next-token accuracy on the validation split (sharded over ranks).

    Args:
        rows: (input_ids, labels) rows, scored in batches of ``micro_batch_size``.
        n_virtual: Virtual tokens the model prepends to its logits (prompt methods).
        dist: The process's ``utils.distributed.Dist`` (None: one process, on the CPU).
        lockstep: Every rank must join every forward (a sharded model): ranks with fewer batches run empty ones.
    """
    import torch
    import torch.nn.functional as F

    from utils.training.batches import collate, empty_batch

    rank, world, device = (dist.rank, dist.world_size, dist.device) if dist else (0, 1, "cpu")
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        order = sorted(range(len(rows)), key=lambda i: (len(rows[i][0]), i))[rank::world]
        batches = [collate([rows[j] for j in order[i:i + micro_batch_size]], 0)
                   for i in range(0, len(order), micro_batch_size)]
        if dist is not None and lockstep:
            batches += [empty_batch()] * (dist.most(len(batches)) - len(batches))
        for batch in batches:
            logits, labels = next_token_targets(model, batch, n_virtual, device)
            mask = labels != -100
            loss_sum += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            correct += int((logits.argmax(-1)[mask] == labels[mask]).sum())
            count += int(mask.sum())
    if dist is not None:
        totals = dist.all_reduce_(torch.tensor([loss_sum, correct, count], dtype=torch.float64))
        loss_sum, correct, count = totals.tolist()
        correct, count = int(correct), int(count)
    return {"eval_loss": round(loss_sum / max(count, 1), 6), "eval_token_accuracy": round(correct / max(count, 1), 6),
            "eval_tokens": count}
