"""Logging the registered losses' metrics the way TRL logs its own: means over every process, at TRL's next log."""

import torch

from ..trl_contract import log_metric


def log_means(trainer, values: dict[str, torch.Tensor]) -> None:
    """Logs under each key the mean of its tensor's elements over every process. Processes may hold different numbers
    of elements (packed rows split into their sequences), so each gathers sums and counts, all keys in one all-gather.
    """
    if not values:
        return
    device = next(iter(values.values())).device
    sums_and_counts = torch.stack([torch.stack([value.detach().float().sum(), torch.tensor(float(value.numel()),
                                                                                          device=device)])
                                   for value in values.values()])
    totals = trainer.accelerator.gather(sums_and_counts).view(-1, len(values), 2).sum(dim=0)
    for key, (total, count) in zip(values, totals.tolist(), strict=True):
        log_metric(trainer, key, total / max(count, 1.0))
