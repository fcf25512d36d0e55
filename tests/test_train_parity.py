"""The denoising objective and every adapter gradient against a PyTorch reference train step.

The same batch, x0, noise, timesteps and drop masks go into `denoising_error` and into the
reference recipe built from diffusers' UNet with its own IP-Adapter loader (image projection and
IPAdapterAttnProcessor), transformers' CLIP encoders and DDPMScheduler.add_noise: an empty
caption for a dropped text, a zero CLIP image embedding for a dropped image, epsilon targets,
F.mse_loss(reduction="mean") or diffusers' min-SNR weighting.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from PIL import Image

from ipadapter_jax.configs import sd15_ip_adapter
from ipadapter_jax.preprocessing import CLIPImageConfig, clip_pixels
from ipadapter_jax.tokenizer import tokenize
from ipadapter_jax.train.loading import empty_conditions, load_models, step_spec
from ipadapter_jax.train.step import denoising_error, trainable_filter
from ipadapter_jax.weights.ip_adapter import ip_adapter_state_dict

CAPTIONS = [
  "a red circle",
  "a blue square on a green background",
  "a photo of a green circle",
  "red",
  "a square of blue",
  "photo of a red square on a blue background",
]
# Per example: neither dropped, image, text, both, neither, image.
DROP_IMAGE = [False, True, False, True, False, True]
DROP_TEXT = [False, False, True, True, False, False]
TIMESTEPS = [10, 200, 500, 900, 50, 999]  # SNR from ~1e3 to ~5e-3: min-SNR clips some, not all
SNR_GAMMA = 5.0
B, H, LATENT = len(CAPTIONS), 32, 16  # the tiny VAE downsamples by 2

# Both sides run float32 on CPU; the UNet's forward and backward differ only in summation order.
# Measured: loss ~1e-7 relative, gradients ~1e-6 of each gradient's largest entry.
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5


def _config(world, snr_gamma):
  c = sd15_ip_adapter.get_config()
  c.model.pretrained = str(world / "sd")
  c.model.image_encoder = str(world / "adapter" / "image_encoder")
  c.model.init_adapter = str(world / "adapter" / "ip-adapter.safetensors")
  c.noise.snr_gamma = snr_gamma
  return c


@pytest.fixture(scope="module")
def draws(tiny_world):
  """The batch (ours: NHWC) and the step's draws, fixed in advance for both frameworks."""
  encoder = tiny_world / "adapter" / "image_encoder"
  size = json.loads((encoder / "preprocessor_config.json").read_text())["crop_size"]["height"]
  rng = np.random.default_rng(11)
  images = [
    Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 36, 3), dtype=np.uint8)) for i in range(B)
  ]
  clip = clip_pixels(images, CLIPImageConfig.from_folder(str(encoder)))
  assert clip.shape == (B, size, size, 3)
  return dict(
    captions=CAPTIONS,
    pixels=rng.uniform(-1, 1, (B, H, H, 3)).astype(np.float32),
    clip_pixels=clip,
    x0=rng.standard_normal((B, LATENT, LATENT, 4)).astype(np.float32),
    noise=rng.standard_normal((B, LATENT, LATENT, 4)).astype(np.float32),
    t=np.asarray(TIMESTEPS, np.int32),
    drop_image=np.asarray(DROP_IMAGE),
    drop_text=np.asarray(DROP_TEXT),
  )


class _Ours:
  """This project's train-step objective on the tiny world, loaded as a run loads it."""

  def __init__(self, world):
    self.world, self.results = world, {}
    self.sd = load_models(_config(world, 0.0))  # the models do not depend on the weighting

  def __call__(self, d, snr_gamma):
    """(loss, {official key: gradient in PyTorch layout}) for the draws `d`."""
    if snr_gamma in self.results:
      return self.results[snr_gamma]
    cfg, sd = _config(self.world, snr_gamma), self.sd
    spec = step_spec(cfg, sd, cached=False)
    assert spec.image_features == "image_embeds" and spec.schedule.prediction_type == "epsilon"
    empty = empty_conditions(cfg, sd, spec)
    batch = dict(
      pixels=jnp.asarray(d["pixels"]),
      clip_pixels=jnp.asarray(d["clip_pixels"]),
      input_ids=jnp.asarray(tokenize(sd.tokenizer, d["captions"])),
    )
    graphdef, params, frozen = nnx.split(sd.networks(), trainable_filter("adapter"), ...)

    def loss(params):
      models = nnx.merge(graphdef, params, frozen)
      return denoising_error(
        models,
        batch,
        empty,
        jnp.asarray(d["x0"]),
        jnp.asarray(d["noise"]),
        jnp.asarray(d["t"]),
        jnp.asarray(d["drop_image"]),
        jnp.asarray(d["drop_text"]),
        spec,
      )

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    official = ip_adapter_state_dict(nnx.merge(graphdef, grads, frozen).unet)
    assert len(jax.tree.leaves(grads)) == len(official)  # every trainable leaf has its key
    self.results[snr_gamma] = float(value), official
    return self.results[snr_gamma]


@pytest.fixture(scope="module")
def ours(tiny_world):
  return _Ours(tiny_world)


@pytest.fixture(scope="module")
def reference(tiny_world):
  """diffusers' pipeline with the official adapter loaded by diffusers, and its DDPM schedule."""
  from diffusers import DDPMScheduler, StableDiffusionPipeline

  pipe = StableDiffusionPipeline.from_pretrained(tiny_world / "sd")
  pipe.load_ip_adapter(
    str(tiny_world / "adapter"),
    subfolder="",
    weight_name="ip-adapter.safetensors",
    image_encoder_folder="image_encoder",
  )
  for module in (pipe.unet, pipe.text_encoder, pipe.image_encoder):
    assert all(p.dtype == torch.float32 for p in module.parameters())
    module.eval().requires_grad_(False)
  trainable = _reference_adapter(pipe.unet)
  for p in trainable.values():
    p.requires_grad_(True)
  scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
  assert scheduler.config.beta_schedule == "scaled_linear"
  return pipe, scheduler, trainable


def _reference_adapter(unet) -> dict:
  """{official key: diffusers parameter} for the image projection and every to_k_ip/to_v_ip."""
  proj = unet.encoder_hid_proj.image_projection_layers[0]
  out = {
    "image_proj.proj.weight": proj.image_embeds.weight,
    "image_proj.proj.bias": proj.image_embeds.bias,
    "image_proj.norm.weight": proj.norm.weight,
    "image_proj.norm.bias": proj.norm.bias,
  }
  assert len(list(proj.parameters())) == 4
  for i, processor in enumerate(unet.attn_processors.values()):  # the official file's index
    if hasattr(processor, "to_k_ip"):
      out[f"ip_adapter.{i}.to_k_ip.weight"] = processor.to_k_ip[0].weight
      out[f"ip_adapter.{i}.to_v_ip.weight"] = processor.to_v_ip[0].weight
  return out


MISTAKES = ("zero_tokens", "image_first", "sum")


def _reference_step(reference, d, snr_gamma, mistake=None):
  """(loss, {official key: gradient}) of the reference recipe, or with one of the MISTAKES."""
  pipe, scheduler, trainable = reference
  unet = pipe.unet
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  captions = ["" if drop else c for c, drop in zip(d["captions"], d["drop_text"])]
  ids = pipe.tokenizer(
    captions,
    padding="max_length",
    max_length=pipe.tokenizer.model_max_length,
    truncation=True,
    return_tensors="pt",
  ).input_ids
  with torch.no_grad():
    text = pipe.text_encoder(ids)[0]
    image_embeds = pipe.image_encoder(nchw(d["clip_pixels"])).image_embeds
  if mistake != "zero_tokens":
    image_embeds = torch.stack(
      [torch.zeros_like(e) if drop else e for e, drop in zip(image_embeds, d["drop_image"])]
    )

  hooks = []
  if mistake == "zero_tokens":  # zero image tokens after the projection, not a zero embedding
    keep = torch.from_numpy(~d["drop_image"]).float()
    hooks.append(
      unet.encoder_hid_proj.register_forward_hook(
        lambda module, args, out: [
          tokens * keep.reshape((-1,) + (1,) * (tokens.ndim - 1)) for tokens in out
        ]
      )
    )
  if mistake == "image_first":  # [image, text] where the processors split [text | image]
    original = unet.process_encoder_hidden_states

    def image_first(**kwargs):
      text_BSD, (image,) = original(**kwargs)  # image tokens [B, images, N, C]
      S = text_BSD.shape[1]
      joined = torch.cat([image.flatten(1, 2), text_BSD], dim=1)
      return joined[:, :S], [joined[:, S:].reshape(image.shape)]

    unet.process_encoder_hidden_states = image_first
  x0, noise, t = nchw(d["x0"]), nchw(d["noise"]), torch.from_numpy(d["t"]).long()
  x_t = scheduler.add_noise(x0, noise, t)
  for p in trainable.values():
    p.grad = None
  try:
    pred = unet(x_t, t, text, added_cond_kwargs={"image_embeds": [image_embeds[:, None]]}).sample
  finally:
    for hook in hooks:
      hook.remove()
    vars(unet).pop("process_encoder_hidden_states", None)
  if snr_gamma > 0:
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, t)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0] / snr
    loss = F.mse_loss(pred.float(), noise.float(), reduction="none")
    loss = (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()
  else:
    loss = F.mse_loss(pred.float(), noise.float(), reduction="sum" if mistake == "sum" else "mean")
  loss.backward()
  return float(loss.detach()), {k: p.grad.numpy().copy() for k, p in trainable.items()}


def _rel_errors(actual, expected):
  """Max abs error over max |expected| for each key."""
  return {k: float(np.max(np.abs(actual[k] - g)) / np.max(np.abs(g))) for k, g in expected.items()}


@pytest.mark.parametrize("snr_gamma", [0.0, SNR_GAMMA])
def test_loss_and_adapter_gradients_match_the_reference_trainer(ours, reference, draws, snr_gamma):
  loss, grads = ours(draws, snr_gamma)
  expected_loss, expected_grads = _reference_step(reference, draws, snr_gamma)
  assert set(grads) == set(expected_grads) and len(expected_grads) == 4 + 2 * 11
  for key, g in expected_grads.items():
    assert grads[key].shape == g.shape, key
    assert np.max(np.abs(g)) > 0, f"{key}: the reference gradient is zero"
  loss_err = abs(loss - expected_loss) / abs(expected_loss)
  errors = _rel_errors(grads, expected_grads)
  worst = max(errors, key=errors.get)
  print(
    f"snr_gamma {snr_gamma}: loss {loss:.6f} vs {expected_loss:.6f} (rel error "
    f"{loss_err:.1e}); gradients: worst rel error {errors[worst]:.1e} ({worst}), median "
    f"{np.median(list(errors.values())):.1e}, image_proj "
    f"{max(v for k, v in errors.items() if k.startswith('image_proj')):.1e}"
  )
  assert loss_err <= LOSS_RTOL
  bad = {k: v for k, v in errors.items() if v > GRAD_RTOL}
  assert not bad, f"gradients off by more than {GRAD_RTOL:g} of their scale: {bad}"


def test_the_comparison_tells_common_mistakes_apart(ours, reference, draws):
  loss, grads = ours(draws, 0.0)
  wrong = {m: _reference_step(reference, draws, 0.0, m) for m in MISTAKES}
  wrong["min_snr"] = _reference_step(reference, draws, SNR_GAMMA)
  swapped = dict(draws, drop_image=draws["drop_text"], drop_text=draws["drop_image"])
  wrong["swapped_masks"] = _reference_step(reference, swapped, 0.0)
  print(f"loss {loss:.6f}; " + ", ".join(f"{m} {v:.6f}" for m, (v, _) in wrong.items()))
  for mistake, (value, mistaken_grads) in wrong.items():
    assert abs(loss - value) / abs(value) > 100 * LOSS_RTOL, mistake
    assert max(_rel_errors(grads, mistaken_grads).values()) > 100 * GRAD_RTOL, mistake
