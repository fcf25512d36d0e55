"""What a run writes besides checkpoints and metrics: its config, sample grids, the exports.

Every file goes through `ipadapter_jax.storage`, so a `gs://` work directory gets all of them.
"""

from __future__ import annotations

import io
import json

import numpy as np

from ipadapter_jax import storage
from ipadapter_jax.generation.pipeline import IPAdapterPipeline
from ipadapter_jax.preprocessing import image_grid, load_image
from ipadapter_jax.weights import (
  StableDiffusion,
  save_clip_model,
  save_ip_adapter,
  save_stable_diffusion,
)
from ipadapter_jax.weights.adapter_checkpoint import CONFIG_NAME, EXPORT_DTYPE, adapter_metadata
from ipadapter_jax.weights.diffusers import save_vae


def write_run_files(cfg, sd: StableDiffusion, workdir: str):
  """The resolved config, and what `convert to-official` needs to read the checkpoints."""
  storage.write_text(storage.join(workdir, "config.json"), cfg.to_json_best_effort(indent=2))
  if sd.unet is not None and sd.unet.adapter_config is not None:
    storage.write_text(
      storage.join(workdir, CONFIG_NAME), json.dumps(adapter_metadata(sd.unet), indent=2)
    )


# What the run's export folders' markers name: a run replaces only an earlier export of a run.
EXPORTED_BY = "train.py (end-of-run export)"


def _exports(cfg, sd: StableDiffusion, workdir: str) -> list:
  """[(path, is a folder, writer of a local path)] for what `export` writes."""
  if sd.unet is None and sd.vae is not None:  # the VAE stage
    return [(storage.join(workdir, "vae"), True, lambda local: save_vae(sd.vae, local))]
  if sd.unet is None:  # the contrastive stage
    logit_scale = float(np.log(1.0 / cfg.contrastive_temperature))
    return [
      (
        storage.join(workdir, "clip"),
        True,
        lambda local: save_clip_model(
          sd.text_encoder,
          sd.image_encoder,
          local,
          tokenizer=sd.tokenizer,
          processor=sd.image_processor,
          logit_scale=logit_scale,
        ),
      )
    ]
  exports = []
  if sd.unet.adapter_config is not None and cfg.export_adapter:
    exports.append(
      (
        storage.join(workdir, "ip_adapter.safetensors"),
        False,
        lambda local: save_ip_adapter(sd.unet, local, dtype=np.dtype(EXPORT_DTYPE)),
      )
    )
  if cfg.model.trainable in ("unet", "all"):
    exports.append(
      (storage.join(workdir, "pipeline"), True, lambda local: save_stable_diffusion(sd, local))
    )
  return exports


def check_export(cfg, sd: StableDiffusion, workdir: str) -> None:
  """Raises ValueError (one line) when an export would replace a folder the run did not write:
  called before training, so that a run does not end on it. The adapter file is the run's own
  in its work directory, and replaced."""
  for path, folder, _ in _exports(cfg, sd, workdir):
    storage.check_output(path, EXPORTED_BY, folder=folder, flag="--workdir", overwrite=True)


def export(cfg, sd: StableDiffusion, workdir: str) -> list[str]:
  """The trained weights in PyTorch-world formats: the official adapter and/or a diffusers folder
  (or a transformers CLIPModel folder for the contrastive stage, an AutoencoderKL folder for
  the VAE's). `sd` holds the final weights. Each appears whole, and only in place of nothing,
  of an empty folder or of an earlier export (`check_export`)."""
  written = []
  for path, folder, write in _exports(cfg, sd, workdir):
    with storage.staged(
      path, EXPORTED_BY, folder=folder, flag="--workdir", overwrite=True
    ) as local:
      write(local)
    written.append(path)
  return written


class SampleGrids:
  """Periodic samples from fixed prompts (columns) and images (rows) with the run's current
  weights: one pipeline (shared with the validation) and one compiled program for the run.

  An adapter run given no `sample_images` takes its rows from the held-out set: the first
  HELD_OUT_ROWS images of `eval_annotations`. Without either its grids show no image prompt,
  and `description` says so."""

  HELD_OUT_ROWS = 2

  def __init__(self, cfg, pipe: IPAdapterPipeline, workdir: str, metrics):
    self.pipe = pipe
    adapter = pipe.models.unet.image_proj is not None
    self.images, self.description = self._image_prompts(cfg, adapter)
    self.prompts = list(cfg.sample_prompts)
    self.request = dict(
      num_inference_steps=cfg.sample_steps,
      seed=cfg.seed,
      height=cfg.data.resolution,
      width=cfg.data.resolution,
    )
    self.workdir, self.metrics = workdir, metrics

  def __call__(self, step: int, weights):
    """Samples with `weights` (the trainable nnx.State, on the host) and writes
    `samples/step_N.png` and a TensorBoard image."""
    self.pipe.update_weights(weights)
    prompts = self.prompts * max(1, len(self.images))  # one batched call: row by row
    images = [image for image in self.images for _ in self.prompts] or None
    grid = image_grid(
      self.pipe(prompts, images, output_type="np", **self.request).images, cols=len(self.prompts)
    )
    png = io.BytesIO()
    grid.save(png, format="PNG")
    storage.write_bytes(
      storage.join(self.workdir, "samples", f"step_{step:07d}.png"), png.getvalue()
    )
    self.metrics.write_image(step, "samples", np.asarray(grid))

  @classmethod
  def _image_prompts(cls, cfg, adapter: bool) -> tuple[list, str | None]:
    """(the grids' image prompts, a startup line on where they come from; None for a run
    without an adapter)."""
    if not adapter:
      return [], None
    if cfg.sample_images:
      return (
        [load_image(p, f"sample_images: {p}") for p in cfg.sample_images],
        f"sample grids: {len(cfg.sample_images)} image prompts from sample_images",
      )
    if cfg.eval_annotations:
      from ipadapter_jax import evaluate  # pylint: disable=import-outside-toplevel

      try:
        images, _ = evaluate.load_annotated_images(cfg.eval_annotations, cls.HELD_OUT_ROWS)
      except (OSError, ValueError) as e:
        raise ValueError(f"eval_annotations (the sample grids' image prompts): {e}") from None
      return images, (
        f"sample grids: the first {len(images)} image prompts of eval_annotations "
        f"({cfg.eval_annotations}, held out)"
      )
    return [], (
      "warning: the sample grids show no image prompt (the adapter is unused in them): "
      "set sample_images=('a.png', ...) or eval_annotations"
    )
