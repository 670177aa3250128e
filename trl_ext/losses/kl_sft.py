"""KL-SFT (the Penn experiment's "KL-SFT loss"; no paper to cite): `kl_sft`, the NLL of the target plus `kl_coef`
times a penalty toward a frozen reference model, one of `KL_PENALTIES`."""

import torch

from .inputs import SFTLogps, SFTLossOutput, sequence_mean
from .registry import register_sft_loss


def sq_logratio_penalty(
    policy_token_logps: torch.Tensor, ref_token_logps: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The Penn experiment's penalty: `(avg_logp_policy(y) - avg_logp_ref(y))^2` per sequence.

    A pseudo-KL on per-token averaged sequence log-probs that penalises drift in both directions.

    Args:
        policy_token_logps: `(B, T)` log-probability of each target token under the policy.
        ref_token_logps: `(B, T)` the same under the frozen reference.
        mask: `(B, T)` 1 on target (completion) tokens, 0 elsewhere.

    Returns:
        `(B,)` per-sequence penalty.
    """
    return (sequence_mean(policy_token_logps, mask) - sequence_mean(ref_token_logps, mask)) ** 2


def token_kl_penalty(
    policy_token_logps: torch.Tensor, ref_token_logps: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-token reverse-KL estimate `k3 = exp(r) - r - 1`, `r = logp_ref - logp_policy`, averaged per sequence.

    `k3` is non-negative, unbiased for `KL(policy || ref)` when tokens are sampled from the policy, and has lower
    variance than `-r`; here it is evaluated on the target tokens. Shapes as in [`sq_logratio_penalty`].
    """
    log_ratio = ref_token_logps - policy_token_logps
    return sequence_mean(torch.exp(log_ratio) - log_ratio - 1, mask)


KL_PENALTIES = {"sq_logratio": sq_logratio_penalty, "token_kl": token_kl_penalty}


@register_sft_loss("kl_sft", reference=True)
def kl_sft(batch: SFTLogps, config) -> SFTLossOutput:
    """KL-SFT: `kl_coef` times the `kl_penalty` toward the reference, added to TRL's NLL."""
    penalty = KL_PENALTIES[config.kl_penalty](batch.policy_token_logps, batch.ref_token_logps, batch.mask)
    return SFTLossOutput(config.kl_coef * penalty, {
        "kl/penalty": penalty,
        "kl/nll": batch.nll,
        "logps/policy": sequence_mean(batch.policy_token_logps, batch.mask),
        "logps/ref": sequence_mean(batch.ref_token_logps, batch.mask),
    })
