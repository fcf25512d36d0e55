r"""The toy world: IP-Adapter's whole pipeline on 32x32 procedural shapes, on a CPU, in one command.

  ipadapter-jax toy --workdir runs/toy             # the paper's claims, measured
  ipadapter-jax toy pretrain --out DIR              # the pretrained toy weights, rebuilt

Like a real IP-Adapter run starts from a pretrained Stable Diffusion, the toy world starts from
pretrained toy weights that the package ships (`toy/weights/`, with how they were made and their
sha256 in its MANIFEST.json): a miniature Stable Diffusion (a tiny CLIP, an f=4 VAE and a latent
text-to-image UNet) and a "community model" fine-tuned from the base on a shifted world.
`pretrain` rebuilds them from nothing; `--from_scratch` makes the main command do that first.

  shapes       the world: procedural shapes, their captions, and the judge that reads them back
  stages       data, pretraining and training runs            (configs/: one file per stage)
  evaluation   held-out prompt images: every rate with its 95% Wilson interval, the claims table
  composition  masked composition of two image prompts
  structure    img2img and inpainting with an image prompt
  probe        what the base's denoiser reads from its text at one noise level
  stats        the rates and intervals shared with the notebooks
  run          every stage, then the evaluation (the command: ipadapter_jax.cli.toy)
"""

from ipadapter_jax.toy.evaluation import (
  PromptSet,
  Setting,
  adapter_settings,
  base_settings,
  held_out,
  image_only,
  score_settings,
)
from ipadapter_jax.toy.run import run_world
from ipadapter_jax.toy.stages import (
  EVAL_SEED,
  MANIFEST,
  QUICK,
  SHIPPED,
  STAGES,
  Sizes,
  build_data,
  prepare_world,
  pretrain,
  reconstruct,
  shipped_weights,
  train_stage,
)

__all__ = [
  "EVAL_SEED",
  "MANIFEST",
  "QUICK",
  "SHIPPED",
  "STAGES",
  "PromptSet",
  "Setting",
  "Sizes",
  "adapter_settings",
  "base_settings",
  "build_data",
  "held_out",
  "image_only",
  "prepare_world",
  "pretrain",
  "reconstruct",
  "run_world",
  "score_settings",
  "shipped_weights",
  "train_stage",
]
