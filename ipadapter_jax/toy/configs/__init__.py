"""The toy world's training configs, one file per stage (`world` holds what they share). Each is
a registered name of `ipadapter-jax train --config` (`toy_<stage>`: ipadapter_jax.configs), and
`configs/toy_*.py` at the repository root re-exports each for `python train.py --config`."""
