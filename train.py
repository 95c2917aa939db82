"""Train a flame model.

    python train.py --config train_configs/debug.toml [--section.key value ...]
    torchrun --nproc_per_node=8 train.py --config train_configs/<model>.toml
    python train.py --config X.toml --print-config | --dry-run
"""

import sys

from flame.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
