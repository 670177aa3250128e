"""The Penn experiment: SFT, KL-SFT, DPO, DPOP, IFT and TRL's DPO trained from one base model on the Penn preference
data and compared on held-out prompts. Run by `python recipes/penn_experiment.py`; its data are written by
`python recipes/penn_data.py`.

- `config.py`: the experiment's arguments and each method's TRL config, layered from `recipes/configs/penn/`
- `data.py`: the Penn preference data's generator and the target pattern
- `experiment.py`: one comparison per seed: data, training, evaluation, results
- `generation.py`: the held-out prompts' completions and their metrics, and the alignment-accuracy curve
- `judge.py`: the optional pairwise judge
- `report.py`: `report.md`, the plots and `results.json`
- `results.py`: what produced each stored result, and when a rerun may reuse it
- `seeds.py`: mean and spread over `--seeds`
"""

# Before any module here imports peft, which imports bitsandbytes: trl_ext imports it first, dropping its CPU-kernel
# notice (`trl_ext.quiet_imports`).
import trl_ext  # noqa: F401
