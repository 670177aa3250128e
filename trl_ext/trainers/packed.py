"""Per-sequence rows of a batch, whether TRL padded it or packed it padding-free (sequences laid end to end)."""

import torch


def unpack_sequences(token_values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Splits one row of sequences laid end to end (a padding-free batch) into a right-padded row per sequence.

    Args:
        token_values: `(1, N)` per-token values.
        offsets: `(S + 1,)` sequence `k` spans `[offsets[k], offsets[k + 1])`; `offsets[-1] == N`.

    Returns:
        `(S, L)`, `L` the longest sequence, zero (False) after each sequence's end. Differentiable.
    """
    rows = torch.split(token_values[0], offsets.diff().tolist())
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def rows_per_sequence(inputs, mask, *token_values, shifted: bool = True) -> tuple[torch.Tensor, ...]:
    """`mask` and `token_values` with one row per sequence, so that per-sequence reductions stay within a sequence.

    A padding-free batch (packing) is one row of sequences laid end to end: it is split at TRL's sequence offsets
    (`cu_seq_lens_q`), dropping the sequences without a target (padding). Other batches are returned as they are.
    With `shifted`, the tensors are `(B, T - 1)` and position `t` holds the label of token `t + 1`.
    """
    if "cu_seq_lens_q" not in inputs:
        return (mask, *token_values)
    offsets = inputs["cu_seq_lens_q"].to(mask.device)
    if shifted:
        offsets = (offsets - 1).clamp(min=0)
    rows = [unpack_sequences(values, offsets) for values in (mask, *token_values)]
    has_targets = rows[0].any(dim=1)
    return tuple(row[has_targets] for row in rows)
