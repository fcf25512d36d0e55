"""The toy world's training configs, one file per stage; `configs/toy_*.py` at the repository
root re-exports each for `train.py --config`."""
