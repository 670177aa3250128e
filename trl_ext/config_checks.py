"""Checks of the `TrainingArguments` fields both trl_ext configs share, which transformers and TRL accept as given and
which would fail only at `train()` (a sampler error) or train on something else than asked (a negative learning
rate ascends the loss)."""

import math
from pathlib import Path

# Fields that count things, and the smallest value that means anything
POSITIVE_COUNTS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")


def check_training_fields(args) -> None:
    """Raises a `ValueError` naming the field, the value and the fix if one of `args`' shared fields is unusable."""
    for name in POSITIVE_COUNTS:
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}: set it to 1 or more.")
    if args.max_length is not None and (not isinstance(args.max_length, int) or args.max_length < 1):
        raise ValueError(f"`max_length` must be an integer >= 1 or None (no truncation), got {args.max_length!r}.")
    if not args.learning_rate >= 0 or math.isinf(args.learning_rate):  # `not >=` also catches NaN
        raise ValueError(f"`learning_rate` must be a finite number >= 0, got {args.learning_rate}: a negative one "
                         "would climb the loss instead of descending it.")
    if args.output_dir is not None and Path(args.output_dir).expanduser().is_file():
        raise ValueError(f"`output_dir` is '{args.output_dir}', an existing file: checkpoints and the trained model "
                         "are saved in a directory. Give a directory path (it is created if missing).")
