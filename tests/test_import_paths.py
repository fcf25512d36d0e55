"""The import paths that moved keep working for one release, and name the same objects."""


def test_the_old_import_paths_name_the_same_objects():
  from ipadapter_jax import diffusion, samplers, schedulers
  from ipadapter_jax.weights import pipeline, stable_diffusion
  assert schedulers.DDIM is samplers.DDIMSampler is diffusion.DDIM
  assert schedulers.NoiseSchedule is diffusion.NoiseSchedule
  assert samplers.make_sampler is diffusion.make_sampler
  assert pipeline.load_stable_diffusion is stable_diffusion.load_stable_diffusion
