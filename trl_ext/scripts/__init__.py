"""Training scripts behind `trl-ext dpo` and `trl-ext sft` (and `recipes/dpo.py`, `recipes/sft.py`): each has
`parse_args(argv)` and `main(*parse_args(argv))`, as TRL's scripts do."""
