"""How the teacher / student pass lays its sequences out (teacher.completion_hidden_states).

``pack`` (default): the sequences ``prompt_i + completion_i`` end to end in one row of ``sum(len)`` tokens with
per-sequence ``position_ids`` (0, 1, ... restarting at each sequence) and no attention mask. transformers reads the
restarts as packed sequences and builds the block-diagonal causal mask from them (SDPA / eager), or runs varlen flash
attention -- so no linear layer computes on padding. ``pad``: a right-padded ``[B, max len]`` batch with an attention
mask, kept for comparison; both give the same values up to float rounding (tests/test_rollout_teacher.py).
Both return ``(input_ids, extra model inputs, rows, cols)``: ``hidden[rows, cols]`` are the positions just before
each completion token, in order, ``[N]`` each.
"""
from __future__ import annotations

import torch


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """One packed row ``[1, sum(len)]`` with restarting ``position_ids`` (``pad_id`` unused)."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    starts = [0]
    for s in seqs[:-1]:
        starts.append(starts[-1] + len(s))
    ids = torch.tensor([t for s in seqs for t in s])[None]
    inputs = dict(position_ids=torch.cat([torch.arange(len(s)) for s in seqs])[None])
    rows = torch.zeros(sum(map(len, completions)), dtype=torch.long)
    cols = torch.cat([torch.arange(o + len(p) - 1, o + len(p) + len(c) - 1)
                      for o, p, c in zip(starts, prompts, completions)])
    return ids, inputs, rows, cols


def pad(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """A right-padded batch ``[B, max len]`` (``pad_id`` fills) with its attention mask."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    rows = torch.cat([torch.full((len(c),), i) for i, c in enumerate(completions)])
    cols = torch.cat([torch.arange(len(p) - 1, len(p) + len(c) - 1) for p, c in zip(prompts, completions)])
    return ids, dict(attention_mask=mask), rows, cols
