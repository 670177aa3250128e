"""The Penn experiment: train SFT, KL-SFT, DPO, DPOP and IFT (and TRL's stock DPO) from the same base model on the
same Penn preference data and budget, then compare how often their completions mention the University of
Pennsylvania and how fluent and varied they stay.

```bash
python recipes/penn_experiment.py                       # every method, embedded SmolLM2-135M, LoRA, CPU
python recipes/penn_experiment.py --quick               # a few steps on a small subset (smoke test)
python recipes/penn_experiment.py --config recipes/configs/penn_gpt2.yaml   # the seed's GPT-2 setup (GPU)
python recipes/penn_experiment.py --config recipes/configs/penn_seed.yaml   # the seed's setup, embedded model
python recipes/penn_experiment.py --methods sft dpop --output_dir outputs/penn-small
python recipes/penn_experiment.py --seeds 0 1 2 --output_dir outputs/penn-seeds   # mean and spread over 3 seeds
python recipes/penn_experiment.py --methods cdpo rdpo beta_dpo npo tdpo1 tdpo2 sdpo   # the other DPO-family losses
```

Outputs in `--output_dir`: `report.md`, `results.json`, PNG plots (alignment accuracy over training steps among them,
from `trl_ext.GenerationEvalCallback`), and each method's model or adapter and `eval_generations.jsonl`. Every
method's result is saved as soon as it finishes, with what produced it (settings, data and model fingerprints,
versions); a rerun reuses a stored result only when all of these match, and trains the method again otherwise, saying
what changed (`--overwrite` always trains again).

Each method trains with a real TRL config: `recipes/configs/penn/common.yaml` (model, LoRA, budget), then the
method's own file there (trainer and loss), then `--config` (top-level keys, and `<method>:` sections), then the
command line, where every field of the method's config is a flag: `--learning_rate 1e-4` (every method),
`--dpop_lambda 7` (the methods whose files set it: `dpop`), `--dpop.beta 0.3` (`dpop` alone). See
`recipes/penn/config.py`; the experiment's code is the `penn` package beside this script.
"""

import sys
from pathlib import Path

from penn.experiment import main, parse_args
from trl_ext.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command(main, parse_args, own_code=Path(__file__).parent))
