"""DPO-family training with trl_ext's DPOTrainer: TRL's loss types plus `dpop`, `dpop_norm` and registered losses.

Every `trl_ext.DPOConfig`, `trl.ModelConfig` and `trl.ScriptArguments` field is a command-line flag, and
`--config file.yaml` sets any of them:

```bash
# DPOP with LoRA on the embedded SmolLM2-135M-Instruct, offline on CPU
python recipes/dpo.py --config recipes/configs/dpop_smollm2.yaml

# the same on another model and dataset
accelerate launch recipes/dpo.py --config recipes/configs/dpop_smollm2.yaml \
    --model_name_or_path Qwen/Qwen2-0.5B-Instruct --dataset_name trl-lib/ultrafeedback_binarized --bf16 true
```

`--dataset_name` takes a hub dataset or a local `.json`/`.jsonl` file of `prompt`/`chosen`/`rejected` objects;
`--model_name_or_path` takes a hub id, a local directory or `embedded:smollm2-135m-instruct`. The same script runs as
`trl-ext dpo` (`trl_ext/scripts/dpo.py`).
"""

import sys

from trl_ext.cli import run_command
from trl_ext.scripts.dpo import main, parse_args  # the script behind `trl-ext dpo`

if __name__ == "__main__":
    sys.exit(run_command(main, parse_args))
