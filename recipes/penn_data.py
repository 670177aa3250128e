"""Generates the Penn preference dataset with the embedded model: sentence openers in the seed's style, a continuation
that mentions the University of Pennsylvania (chosen) and an independent one that does not (rejected). The generator
is `recipes/penn/data.py`.

```bash
python recipes/penn_data.py            # rewrites recipes/data/penn/{train,test}.jsonl (about an hour on a CPU)
python recipes/penn_data.py --train_size 16 --test_size 8 --output_dir outputs/penn-data   # the first rows only
```
"""

import sys
from pathlib import Path

from penn.data import main, parse_args
from trl_ext.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command(main, parse_args, own_code=Path(__file__).parent))
