"""The training configs the library and its toy world are built on; `configs/` at the repository
root exposes each as a file for `train.py --config`."""
