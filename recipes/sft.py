"""Supervised fine-tuning with trl_ext's SFTTrainer: TRL's `nll` and `dft` plus `kl_sft` and `ift`.

Every `trl_ext.SFTConfig`, `trl.ModelConfig` and `trl.ScriptArguments` field is a command-line flag, and
`--config file.yaml` sets any of them:

```bash
# KL-SFT with LoRA on the embedded SmolLM2-135M-Instruct, offline on CPU (learns the pairs' `chosen`)
python recipes/sft.py --config recipes/configs/kl_sft_smollm2.yaml

# IFT instead, on two CPU processes
ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/multi_cpu.yaml \
    recipes/sft.py --config recipes/configs/kl_sft_smollm2.yaml --loss_type ift --output_dir outputs/ift-smollm2
```

The same script runs as `trl-ext sft` (`trl_ext/scripts/sft.py`).
"""

import sys

from trl_ext.cli import run_command
from trl_ext.scripts.sft import main, parse_args  # the script behind `trl-ext sft`

if __name__ == "__main__":
    sys.exit(run_command(main, parse_args))
