"""`DPOConfig`: `trl.DPOConfig` with trl_ext's loss types and their fields, checked when the config is built."""

import math
from dataclasses import dataclass, field

import trl

from ..config_checks import check_training_fields
from ..losses import registered_dpo_loss, registered_dpo_losses
from ..trl_contract import TRL_DPO_LOSS_TYPES, default_bf16_to_what_the_machine_supports
from .prefix_sharing import SUPPORTED_ATTENTION


@dataclass
class DPOConfig(trl.DPOConfig):
    r"""
    [`trl.DPOConfig`] with trl_ext's extra loss types.

    `loss_type` takes TRL's values plus every name registered with [`register_dpo_loss`]. trl_ext ships `"dpop"`
    (DPO-Positive on summed log-probs), `"dpop_norm"` (the same on per-token averaged log-probs), `"cdpo"`
    (conservative DPO, with TRL's `label_smoothing`), `"rdpo"` (R-DPO's length regulariser), `"beta_dpo"` (a
    per-batch beta), `"npo"` (Negative Preference Optimization on the rejected completions) and `"tdpo1"` /
    `"tdpo2"` (token-level DPO). They combine with TRL's through the `loss_type` list and `loss_weights`, e.g.
    `loss_type=["dpop", "sft"]`.

    `beta` must be > 0 (and finite) for every loss but TRL's `sft`: it is the temperature of the preference margin in
    TRL's losses and trl_ext's (and a loss registered by the user is assumed to read it too), or the regularisation
    strength `ipo` and `sppo_hard` divide by. A negative `beta` trains the opposite preference while the reward
    metrics, scaled by it, look like success; `0` learns nothing. `sft` alone (the chosen completion's NLL) reads none.

    Parameters:
        dpop_lambda (`float`, *optional*, defaults to `50.0`):
            Weight of DPOP's penalty `max(0, -(log pi(y_w) - log ref(y_w)))`, applied inside the sigmoid and scaled by
            `beta`. Must be >= 0; `0` is exactly DPO. The paper uses 50 (with `beta=0.3`) and reports little
            sensitivity in [5, 500]. Used by `"dpop"` and `"dpop_norm"`.
        rdpo_alpha (`float`, *optional*, defaults to `0.01`):
            R-DPO's length weight: `rdpo_alpha * (|y_w| - |y_l|)` (in tokens) is added inside the sigmoid, outside
            `beta`, so length explains part of each preference. Must be >= 0; `0` is exactly DPO. The paper tunes it
            per setting; 0.01 is trl_ext's starting point, not a value the paper prescribes.
        beta_dpo_alpha (`float`, *optional*, defaults to `0.5`):
            beta-DPO's `alpha` in `beta_batch = beta * (1 + alpha * (M_batch - M_running))`; `beta` is the paper's
            `beta_0`. Must be >= 0; `0` with `beta_dpo_filter_ratio=0` is exactly DPO. The authors' config leaves it
            at 0 and their runs set it per model; 0.5 is trl_ext's choice.
        beta_dpo_momentum (`float`, *optional*, defaults to `0.9`):
            Momentum of the running mean and standard deviation of the margin (the authors' code: 0.9), in [0, 1).
        beta_dpo_filter_ratio (`float`, *optional*, defaults to `0.2`):
            Share of each batch's pairs beta-DPO drops, preferring those whose margin is far from the running mean
            (the authors' config: 0.2), in [0, 1); `0` keeps every pair.
        tdpo_alpha (`float`, *optional*, defaults to `0.5`):
            TDPO2's weight of the sequential-KL difference (the authors' code: 0.5), >= 0.
        sdpo_stages (`int`, *optional*, defaults to `1`):
            Stepwise DPO (sDPO, Kim et al. 2024; not TRL's Self-Distillation Policy Optimization): split training
            into this many equal stages of optimizer steps; at each stage boundary the current policy becomes the
            reference (with `precompute_ref_log_probs`, its log-probs are precomputed again). Works with any
            `loss_type`; `1` is plain training.
        prefix_sharing (`bool`, *optional*, defaults to `False`):
            Prefix sharing (Wang et al. 2024): the policy and the reference each run one forward per pair over
            `[prompt | chosen | rejected]`, the two completions masked from each other, instead of two rows that both
            hold the prompt. Every loss, TRL's and trl_ext's, and every metric get exactly the numbers of the
            unshared forwards; the backbone's work per pair scales with `P + C + R` tokens instead of `2P + C + R`.
            Needs an attention implementation that takes a custom mask (`sdpa`, `eager`, `flex_attention`); refused
            with prompt-learning PEFT, a sliding window shorter than `max_length`, MoE load balancing and
            vision-language models (see `trl_ext.trainers.prefix_sharing`).
    """

    # TRL's help lists only its own values; `--help` lists trl_ext's too.
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": f"Loss types to combine (with `loss_weights`): TRL's {', '.join(TRL_DPO_LOSS_TYPES)}; "
                          f"trl_ext's {', '.join(registered_dpo_losses())}; or a loss registered with "
                          "`trl_ext.register_dpo_loss`."},
    )
    dpop_lambda: float = field(
        default=50.0,
        metadata={"help": "Weight of the DPOP penalty (>= 0; 0 is exactly DPO). Used by `dpop` and `dpop_norm`."},
    )
    rdpo_alpha: float = field(
        default=0.01, metadata={"help": "R-DPO's weight of the length difference in tokens (>= 0; 0 is DPO)."}
    )
    beta_dpo_alpha: float = field(default=0.5, metadata={"help": "beta-DPO's scaling of beta by the margin (>= 0)."})
    beta_dpo_momentum: float = field(
        default=0.9, metadata={"help": "Momentum of beta-DPO's running margin statistics, in [0, 1)."}
    )
    beta_dpo_filter_ratio: float = field(
        default=0.2, metadata={"help": "Share of each batch beta-DPO drops as margin outliers, in [0, 1)."}
    )
    tdpo_alpha: float = field(default=0.5, metadata={"help": "TDPO2's weight of the sequential-KL difference."})
    sdpo_stages: int = field(
        default=1, metadata={"help": "Stepwise DPO (sDPO, Kim et al. 2024) stages: the policy becomes the reference at "
                                    "each boundary (1: plain training)."}
    )
    prefix_sharing: bool = field(
        default=False, metadata={"help": "Run each pair's prompt through the model once (one row per pair, "
                                         "[prompt | chosen | rejected]): the same numbers, fewer FLOPs. Needs "
                                         "attn_implementation sdpa, eager or flex_attention."}
    )

    def __post_init__(self):
        default_bf16_to_what_the_machine_supports(self)
        super().__post_init__()
        validate_loss_config(self)


def validate_loss_config(args: trl.DPOConfig) -> None:
    """Raises a `ValueError` naming the field if `args` asks for a loss trl_ext cannot compute as configured."""
    valid = TRL_DPO_LOSS_TYPES + registered_dpo_losses()
    loss_types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    if not loss_types:
        raise ValueError("`loss_type` is empty: name at least one loss, e.g. `loss_type=['sigmoid']`.")
    weights = {"beta": args.beta, **{f"loss_weights[{i}]": w for i, w in enumerate(args.loss_weights or [])}}
    for name, value in weights.items():
        if not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite number, got {value}.")
    stages = getattr(args, "sdpo_stages", 1)
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"`sdpo_stages` must be an integer >= 1, got {stages!r}.")
    if 0 < args.max_steps < stages:  # else checked when training starts, once the step count is known
        raise ValueError(f"`sdpo_stages={stages}` (stepwise DPO) needs at least one optimizer step per stage, and "
                         f"`max_steps` is {args.max_steps}: set `sdpo_stages` to at most {args.max_steps}.")
    if stages > 1 and args.sync_ref_model:
        raise ValueError(
            f"`sdpo_stages={stages}` (stepwise DPO) makes the policy the reference at each stage boundary, while "
            "`sync_ref_model=True` (TR-DPO) blends the policy into the reference every `ref_model_sync_steps`: "
            "together they would train neither method. Set `sync_ref_model=False` or `sdpo_stages=1`."
        )
    unknown = [name for name in loss_types if name not in valid]
    if unknown:
        raise ValueError(
            f"Unknown `loss_type` {unknown}. Valid values: TRL's {list(TRL_DPO_LOSS_TYPES)} and trl_ext's "
            f"{list(registered_dpo_losses())}. Custom losses must be registered with "
            "`trl_ext.register_dpo_loss` before the config is created."
        )
    _check_beta(args, loss_types)
    check_training_fields(args)
    _check_prefix_sharing(args)
    extension = [name for name in loss_types if name in registered_dpo_losses()]
    if not extension:
        return
    if not isinstance(args, DPOConfig):
        raise TypeError(f"`loss_type` {extension} needs a `trl_ext.DPOConfig`, got a `{type(args).__qualname__}`.")
    for name in extension:
        registered = registered_dpo_loss(name)
        if registered.validate is not None:
            registered.validate(args)
        if registered.token_logps and args.precompute_ref_log_probs:
            raise ValueError(
                f"`loss_type` `{name}` reads the reference's per-token log-probs, but `precompute_ref_log_probs=True` "
                "keeps only their sums: set it to False."
            )
    # These TRL options reshape the log-probs or the per-pair loss inside TRL's private loss code; trl_ext's losses
    # work on the plain summed log-probs, so refuse rather than silently ignore them.
    unsupported = {
        "ld_alpha": (args.ld_alpha, None),
        "f_divergence_type": (args.f_divergence_type, "reverse_kl"),
        "use_weighting": (args.use_weighting, False),
    }
    for name, (value, default) in unsupported.items():
        if value != default:
            raise ValueError(
                f"`{name}={value!r}` is not supported with the trl_ext loss types {extension}; "
                f"leave it at {default!r} or use only TRL's loss types."
            )


# The loss types that read no `beta`: `sft` is the NLL of the chosen completion.
LOSSES_WITHOUT_BETA = ("sft",)


def _check_beta(args: trl.DPOConfig, loss_types: list[str]) -> None:
    reading = [name for name in loss_types if name not in LOSSES_WITHOUT_BETA]
    if reading and not args.beta > 0:
        raise ValueError(
            f"`beta` must be > 0 for {', '.join(f'`{name}`' for name in reading)}, got {args.beta}: it scales the "
            "preference margin (for `ipo` and `sppo_hard`, it is the regularisation strength they divide by). A "
            "negative beta trains the opposite preference while the reward metrics, scaled by it, look like success; "
            "0 learns nothing. Use a positive value, e.g. 0.1 (the default)."
        )


def _check_prefix_sharing(args: trl.DPOConfig) -> None:
    """Refuses, before the model loads, an attention implementation `model_init_kwargs` asks for that takes no custom
    mask (the loaded model's own is checked by the trainer)."""
    implementation = (args.model_init_kwargs or {}).get("attn_implementation")
    if getattr(args, "prefix_sharing", False) and implementation not in (None, *SUPPORTED_ATTENTION):
        raise ValueError(
            f"`prefix_sharing=True` needs an attention implementation that takes a custom mask "
            f"({', '.join(SUPPORTED_ATTENTION)}), but `model_init_kwargs` asks for `{implementation}`: use "
            "`attn_implementation='sdpa'` (`--attn_implementation sdpa`), or set `prefix_sharing=False`."
        )
