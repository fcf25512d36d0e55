"""ipadapter_jax.generation.conditioning against diffusers' own `encode_prompt` / `encode_image`.

The diffusers pipelines are built without UNet or VAE around tiny random CLIP towers; the JAX
towers load the same weights from disk, so any difference is the conditioning rule itself.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import (
  CLIPTextConfig,
  CLIPTextModel,
  CLIPTextModelWithProjection,
  CLIPTokenizer,
  CLIPVisionConfig,
  CLIPVisionModelWithProjection,
)

from ipadapter_jax.generation import conditioning
from ipadapter_jax.generation.conditioning import (
  HIDDEN_STATES,
  IMAGE_EMBEDS,
  encode_image,
  encode_image_or_null,
  encode_text,
  null_image_features,
)
from ipadapter_jax.tokenizer import write_word_tokenizer
from ipadapter_jax.weights import load_clip_text, load_clip_vision
from tests import torch_reference as ref

PROMPTS = ["a red circle on a blue background", ""]
PROMPTS_2 = ["green square", "photo of a blue circle"]  # SDXL's second tokenizer sees these
TEXT_2_LIKE = dict(ref.TEXT_LIKE, hidden_size=8, num_attention_heads=2, projection_dim=24)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
  """The torch towers, diffusers pipelines around them, and the JAX towers from their folders."""
  tmp = tmp_path_factory.mktemp("conditioning")
  write_word_tokenizer(str(tmp / "words"), ref.WORDS, model_max_length=16)
  tokenizer = CLIPTokenizer.from_pretrained(str(tmp / "words"))
  text = ref.randomize_(CLIPTextModel(CLIPTextConfig(**ref.TEXT_LIKE)), 11)
  text_2 = ref.randomize_(CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2_LIKE)), 12)
  vision = ref.randomize_(CLIPVisionModelWithProjection(CLIPVisionConfig(**ref.VISION_LIKE)), 13)
  for name, model in (("text", text), ("text_2", text_2), ("vision", vision)):
    model.save_pretrained(tmp / name)
  scheduler = DDIMScheduler(clip_sample=False, steps_offset=1)
  sd15 = StableDiffusionPipeline(
    vae=None,
    text_encoder=text,
    tokenizer=tokenizer,
    unet=None,
    scheduler=scheduler,
    safety_checker=None,
    feature_extractor=None,
    image_encoder=vision,
    requires_safety_checker=False,
  )
  sdxl = StableDiffusionXLPipeline(
    vae=None,
    text_encoder=text,
    text_encoder_2=text_2,
    tokenizer=tokenizer,
    tokenizer_2=tokenizer,
    unet=None,
    scheduler=scheduler,
    image_encoder=vision,
    feature_extractor=None,
  )
  return dict(
    tokenizer=tokenizer,
    sd15=sd15,
    sdxl=sdxl,
    text=load_clip_text(str(tmp / "text")),
    text_2=load_clip_text(str(tmp / "text_2")),
    vision=load_clip_vision(str(tmp / "vision")),
  )


def _ids(tokenizer, prompts):
  return jnp.asarray(
    tokenizer(prompts, padding="max_length", max_length=16, truncation=True).input_ids, jnp.int32
  )


def test_sd15_context_is_diffusers_encode_prompt(towers):
  """Catches taking hidden_states[-1] or [-2] (before / one layer before the final LayerNorm)
  instead of last_hidden_state, or returning a pooled output for a one-encoder model."""
  with torch.no_grad():
    expected, _ = towers["sd15"].encode_prompt(PROMPTS, "cpu", 1, False)
  context, pooled = encode_text(towers["text"], None, _ids(towers["tokenizer"], PROMPTS))
  assert pooled is None
  err = ref.assert_close(context, expected.numpy())
  print(f"SD1.5 context: max abs error {err:.1e}")
  # the rule matters here: the un-normalised last state is far from the context
  assert (
    np.abs(
      np.asarray(towers["text"](_ids(towers["tokenizer"], PROMPTS)).hidden_states[-1])
      - expected.numpy()
    ).max()
    > 1e-2
  )


def test_sdxl_context_and_pooled_are_diffusers_encode_prompt(towers):
  """Catches the wrong layer (not the penultimate), the encoders concatenated in the other order,
  the second encoder fed the first tokenizer's ids, and pooling from the first encoder or from
  the unprojected pooled state."""
  with torch.no_grad():
    expected, _, pooled_expected, _ = towers["sdxl"].encode_prompt(
      PROMPTS, prompt_2=PROMPTS_2, device="cpu", do_classifier_free_guidance=False
    )
  tokenizer = towers["tokenizer"]
  context, pooled = encode_text(
    towers["text"], towers["text_2"], _ids(tokenizer, PROMPTS), _ids(tokenizer, PROMPTS_2)
  )
  assert context.shape == (2, 16, ref.TEXT_LIKE["hidden_size"] + TEXT_2_LIKE["hidden_size"])
  err_context = ref.assert_close(context, expected.numpy())
  err_pooled = ref.assert_close(pooled, pooled_expected.numpy())
  print(f"SDXL: context {err_context:.1e}, pooled {err_pooled:.1e}")


@pytest.mark.parametrize("kind", [IMAGE_EMBEDS, HIDDEN_STATES])
def test_image_features_and_null_features_are_diffusers_encode_image(towers, kind):
  """Catches the wrong output for a kind (image_embeds vs hidden_states[-2], or the last hidden
  state), and an unconditional image that is not diffusers' (zeros for image_embeds, the
  encoding of an all-zero pixel tensor for hidden_states)."""
  pixels = torch.from_numpy(
    np.random.default_rng(0).standard_normal((2, 3, 30, 30), dtype=np.float32)
  )
  with torch.no_grad():
    cond, uncond = towers["sd15"].encode_image(pixels, "cpu", 1, kind == HIDDEN_STATES)
  pixels_BHWC = jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1))
  features = encode_image(towers["vision"], pixels_BHWC, kind)
  err = ref.assert_close(features, cond.numpy())
  null = null_image_features(towers["vision"], kind)
  assert null.shape == uncond.shape[1:]  # one example, no batch axis
  err_null = ref.assert_close(null, uncond[0].numpy())
  if kind == IMAGE_EMBEDS:
    np.testing.assert_array_equal(np.asarray(null), 0.0)
  else:  # a zero image still has features: position embeddings, biases, norms
    assert np.abs(np.asarray(null)).max() > 0.1
  print(f"{kind}: features {err:.1e}, null {err_null:.1e}")


@pytest.mark.parametrize("kind", [IMAGE_EMBEDS, HIDDEN_STATES])
def test_null_mask_selects_per_example(towers, kind):
  """Catches an inverted mask, one example's choice applied to the whole batch, or a null that
  differs from `null_image_features` (training and sampling must agree)."""
  pixels = torch.from_numpy(
    np.random.default_rng(1).standard_normal((3, 3, 30, 30), dtype=np.float32)
  )
  with torch.no_grad():
    cond, uncond = towers["sd15"].encode_image(pixels, "cpu", 1, kind == HIDDEN_STATES)
  null_B = jnp.asarray([False, True, False])
  got = encode_image_or_null(
    towers["vision"], jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1)), null_B, kind
  )
  expected = torch.where(
    torch.tensor([False, True, False]).reshape((-1,) + (1,) * (cond.ndim - 1)), uncond, cond
  ).numpy()
  ref.assert_close(got, expected)
  ref.assert_close(got[1], null_image_features(towers["vision"], kind))
  assert np.abs(np.asarray(got[0]) - np.asarray(got[1])).max() > 1e-2  # the two differ here


def test_unknown_kind_is_refused(towers):
  pixels = jnp.zeros((1, 30, 30, 3))
  for call in (
    lambda: encode_image(towers["vision"], pixels, "pooled"),
    lambda: null_image_features(towers["vision"], "image_embed"),
  ):
    with pytest.raises(ValueError, match="image features must be one of"):
      call()


def test_where_batch_broadcasts_one_value_over_the_batch():
  """Catches a mask reshaped against the wrong operand when `a` has no batch axis."""
  b = jnp.arange(12.0).reshape(3, 2, 2)
  a = jnp.full((2, 2), -1.0)
  got = np.asarray(conditioning.where_batch(jnp.asarray([True, False, True]), a, b))
  expected = np.asarray(b).copy()
  expected[[0, 2]] = -1.0
  np.testing.assert_array_equal(got, expected)
