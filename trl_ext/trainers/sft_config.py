"""`SFTConfig`: `trl.SFTConfig` with trl_ext's loss types (`kl_sft`, `ift`) and their fields, checked when the config is
built."""

import math
from dataclasses import dataclass, field

import trl

from ..config_checks import check_training_fields
from ..losses import registered_sft_loss, registered_sft_losses
from ..losses.kl_sft import KL_PENALTIES
from ..trl_contract import TRL_SFT_LOSS_CHOICES, TRL_SFT_LOSS_TYPES, default_bf16_to_what_the_machine_supports

IFT_PREDICTIONS = ("greedy", "soft")
IFT_LAMBDA_SCHEDULES = ("constant", "linear")


@dataclass
class SFTConfig(trl.SFTConfig):
    r"""
    [`trl.SFTConfig`] with trl_ext's extra loss types.

    `loss_type` takes TRL's `"nll"` and `"dft"` plus:
    - `"kl_sft"`: the NLL of the target completion plus `kl_coef` times a penalty toward a frozen reference model. The
      reference is `ref_model` if given to the trainer, else the model with its PEFT adapter disabled, else a frozen
      copy of the initial model.
    - `"ift"`: Intuitive Fine-Tuning (Hua et al. 2024): a no-grad pass predicts every completion token from its
      prefix, the prediction is mixed into the next input embedding (temporal residual connection, `ift_lambda`),
      and a second pass learns the ground truth from the mixed inputs, with per-token weights from relation
      propagation (`ift_gamma`). About 4/3 of SFT's compute; no reference model.

    `bf16` left unset defaults to what the machine supports (off on a CPU), so the same script runs anywhere.

    Parameters:
        kl_coef (`float`, *optional*, defaults to `0.1`):
            Weight of the KL-SFT penalty, >= 0; `0` gives exactly the `nll` loss.
        kl_penalty (`str`, *optional*, defaults to `"sq_logratio"`):
            `"sq_logratio"`: squared difference of the per-token averaged completion log-probs of policy and
            reference (the Penn experiment's; penalises drift both ways). `"token_kl"`: per-token reverse-KL
            estimate `k3 = exp(r) - r - 1`, `r = logp_ref - logp_policy`, on the target tokens.
        precompute_ref_log_probs (`bool`, *optional*, defaults to `False`):
            For `kl_sft`: compute the reference's per-token log-probs of the train and eval datasets once, at
            construction, and drop the reference copy, so no reference model is held or run during training. Needs
            map-style datasets without packing or padding-free batches; only for `kl_sft`.
        ift_lambda (`float`, *optional*, defaults to `0.2`):
            Weight of the predicted embedding in IFT's mixed inputs, in [0, 1] (the target of the linear schedule).
        ift_gamma (`float`, *optional*, defaults to `0.95`):
            Discount of IFT's relation propagation, in [0, 1]; `0` weights every token 1.
        ift_prediction (`str`, *optional*, defaults to `"greedy"`):
            `"greedy"`: the embedding of the argmax token (the official code). `"soft"`: the probability-weighted
            average of the embedding rows (the paper's description); it costs a `(positions, vocab) @ (vocab, hidden)`
            product, computed in chunks of 256 positions in the model's dtype.
        ift_lambda_schedule (`str`, *optional*, defaults to `"constant"`):
            `"constant"`, or `"linear"`: from `ift_lambda_min` to `ift_lambda` over `ift_lambda_warmup_steps`
            optimizer steps. Computed from the global step, so it is right after resuming from a checkpoint.
        ift_lambda_min (`float`, *optional*, defaults to `0.0`):
            Start of the linear schedule, in [0, `ift_lambda`].
        ift_lambda_warmup_steps (`int`, *optional*, defaults to `0`):
            Length of the linear schedule in optimizer steps (> 0 with `"linear"`, 0 with `"constant"`).
        ift_detach_weights (`bool`, *optional*, defaults to `False`):
            Whether to stop the gradient through the relation-propagation weights (the official code does not).
    """

    # TRL's field lists only its own names as argparse `choices`: without them, `--loss_type kl_sft` and the names
    # users register parse, and `validate_sft_config` names the valid ones.
    loss_type: str = field(
        default="nll",
        metadata={"help": f"Loss type: TRL's {', '.join(TRL_SFT_LOSS_TYPES)}; trl_ext's "
                          f"{', '.join(registered_sft_losses())}; or a loss registered with "
                          "`trl_ext.register_sft_loss`."},
    )
    kl_coef: float = field(default=0.1, metadata={"help": "Weight of the KL-SFT penalty (>= 0; 0 is exactly `nll`)."})
    kl_penalty: str = field(
        default="sq_logratio",
        metadata={"help": "KL-SFT penalty.", "choices": list(KL_PENALTIES)},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute the KL-SFT reference's log-probs once before training; no reference runs after."},
    )

    ift_lambda: float = field(default=0.2, metadata={"help": "IFT mixing weight of the prediction, in [0, 1]."})
    ift_gamma: float = field(default=0.95, metadata={"help": "IFT relation-propagation discount, in [0, 1]."})
    ift_prediction: str = field(
        default="greedy", metadata={"help": "IFT prediction embedding.", "choices": list(IFT_PREDICTIONS)}
    )
    ift_lambda_schedule: str = field(
        default="constant", metadata={"help": "IFT lambda schedule.", "choices": list(IFT_LAMBDA_SCHEDULES)}
    )
    ift_lambda_min: float = field(default=0.0, metadata={"help": "Start of IFT's linear lambda schedule."})
    ift_lambda_warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps of IFT's lambda ramp."})
    ift_detach_weights: bool = field(default=False, metadata={"help": "Detach IFT's relation-propagation weights."})

    def __post_init__(self):
        _check_loss_type_name(self.loss_type, TRL_SFT_LOSS_CHOICES)  # before TRL's checks of other fields
        default_bf16_to_what_the_machine_supports(self)
        super().__post_init__()
        validate_sft_config(self)


def _check_loss_type_name(loss_type: str, trl_names: tuple[str, ...] = TRL_SFT_LOSS_TYPES) -> None:
    if loss_type not in trl_names + registered_sft_losses():
        raise ValueError(
            f"Unknown `loss_type` '{loss_type}'. Valid values: TRL's {list(TRL_SFT_LOSS_TYPES)} and trl_ext's "
            f"{list(registered_sft_losses())}. Custom losses must be registered with `trl_ext.register_sft_loss` "
            "before the config is created."
        )


def validate_sft_config(args: trl.SFTConfig) -> None:
    """Raises a `ValueError` naming the field and the fix if `args` asks for something trl_ext cannot honour."""
    _check_loss_type_name(args.loss_type)
    check_training_fields(args)
    uses_reference = args.loss_type in registered_sft_losses() and registered_sft_loss(args.loss_type).reference
    if getattr(args, "precompute_ref_log_probs", False) and not uses_reference:
        raise ValueError(
            f"`precompute_ref_log_probs=True` is for `loss_type='kl_sft'`; `{args.loss_type}` has no reference model "
            "(only losses registered with `reference=True` have one), so it would run a reference pass over the whole "
            "dataset for nothing. Set it to False."
        )
    if args.loss_type in TRL_SFT_LOSS_TYPES:
        return
    if not isinstance(args, SFTConfig):
        raise TypeError(f"`loss_type='{args.loss_type}'` needs a `trl_ext.SFTConfig`, got `{type(args).__qualname__}`.")
    if not args.kl_coef >= 0 or math.isinf(args.kl_coef):  # `not >=` also catches NaN
        raise ValueError(f"`kl_coef` must be a finite number >= 0, got {args.kl_coef}.")
    if args.kl_penalty not in KL_PENALTIES:
        raise ValueError(f"Unknown `kl_penalty` '{args.kl_penalty}'. Valid values: {list(KL_PENALTIES)}.")
    for name in ("ift_lambda", "ift_gamma", "ift_lambda_min"):
        if not 0 <= getattr(args, name) <= 1:  # also refuses NaN
            raise ValueError(f"`{name}` must be in [0, 1], got {getattr(args, name)}.")
    if args.ift_prediction not in IFT_PREDICTIONS:
        raise ValueError(f"Unknown `ift_prediction` '{args.ift_prediction}'. Valid values: {list(IFT_PREDICTIONS)}.")
    if args.ift_lambda_schedule not in IFT_LAMBDA_SCHEDULES:
        raise ValueError(
            f"Unknown `ift_lambda_schedule` '{args.ift_lambda_schedule}'. Valid values: {list(IFT_LAMBDA_SCHEDULES)}."
        )
    if args.ift_lambda_min > args.ift_lambda:
        raise ValueError(f"`ift_lambda_min` ({args.ift_lambda_min}) must be <= `ift_lambda` ({args.ift_lambda}).")
    if args.ift_lambda_schedule == "linear" and args.ift_lambda_warmup_steps <= 0:
        raise ValueError(
            f"`ift_lambda_schedule='linear'` ramps over `ift_lambda_warmup_steps` steps, got "
            f"{args.ift_lambda_warmup_steps}: set it > 0, or use `ift_lambda_schedule='constant'`."
        )
    if args.ift_lambda_schedule == "constant" and args.ift_lambda_warmup_steps != 0:
        raise ValueError(
            f"`ift_lambda_warmup_steps={args.ift_lambda_warmup_steps}` has no effect with "
            "`ift_lambda_schedule='constant'`: set `ift_lambda_schedule='linear'` to ramp lambda, or leave it at 0."
        )
    if args.precompute_ref_log_probs and (args.packing or args.padding_free):
        raise ValueError(
            "`precompute_ref_log_probs=True` does not support `packing` or `padding_free`: set them to False, or "
            "compute the reference on the fly (`precompute_ref_log_probs=False`)."
        )
    if args.label_smoothing_factor > 0:
        raise ValueError(
            f"`label_smoothing_factor={args.label_smoothing_factor}` is not supported with "
            f"`loss_type='{args.loss_type}'`: TRL would then compute the loss itself and run the forward trl_ext "
            "reads without gradient. Set it to 0."
        )
    if args.neftune_noise_alpha is not None:
        raise ValueError(
            f"`neftune_noise_alpha` is not supported with `loss_type='{args.loss_type}'`: its noise would enter "
            + ("the policy's log-probs but not the reference's, so a penalty toward the reference would measure noise"
               if registered_sft_loss(args.loss_type).reference else f"the passes `{args.loss_type}` runs")
            + ". Leave it at None."
        )
