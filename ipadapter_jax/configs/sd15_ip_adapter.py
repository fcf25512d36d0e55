r"""IP-Adapter on Stable Diffusion 1.5: the paper's recipe (docs/reference.md §5).

  ipadapter-jax train --config sd15 --workdir runs/sd15 \
      --config.data.source=/data/laion_coyo_built --config.batch_size=64

Every key the trainer reads is declared here; variant configs import this one and override.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 42

  c.model = ml_collections.ConfigDict()
  c.model.pretrained = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # diffusers folder or hub id
  c.model.revision = ""  # hub revision of pretrained (branch, tag or commit);
  # "" = the default branch
  c.model.variant = ""  # weights variant to read ("fp16"), "" for the default
  c.model.image_encoder = "h94/IP-Adapter/models/image_encoder"  # "" when no adapter is trained
  c.model.trainable = "adapter"  # adapter | unet (pre-train / fine-tune) | all | clip
  # | vae (clip: pretrained is a CLIPModel folder,
  # trained contrastively; vae: an AutoencoderKL
  # folder, trained to reconstruct; the toy world's
  # first stages)
  c.model.frozen_dtype = "float32"  # float32 | bfloat16 (adapter weights stay float32)
  c.model.compute_dtype = "float32"  # float32 | bfloat16
  c.model.init_adapter = ""  # official adapter file to start from ("" = fresh)
  c.model.remat = "none"  # none | full | dots: UNet blocks' rematerialisation
  c.model.attention_implementation = ""  # "" (per platform) | xla | chunked | cudnn | splash
  c.model.adapter = ml_collections.ConfigDict()
  c.model.adapter.kind = "basic"  # basic | plus | full_face
  c.model.adapter.num_tokens = 4
  c.model.adapter.resampler_dim = 0  # plus only; 0 = the UNet's cross_attention_dim
  c.model.adapter.resampler_depth = 4
  c.model.adapter.resampler_heads = 0  # 0 = resampler_dim // 64
  c.model.adapter.attention = "decoupled"  # decoupled | simple (one softmax over text + image
  # tokens: the paper's ablation; no official export)

  c.data = ml_collections.ConfigDict()
  c.data.source = ""  # an image folder with metadata.jsonl/csv, webdataset
  # .tar shards (a folder or a {00000..00099}.tar
  # pattern), an embedding cache, a built dataset
  # folder or a TFDS name; gs:// for all but TFDS
  c.data.data_dir = ""  # TFDS data_dir for a dataset given by name
  c.data.split = "train"
  c.data.image_key = "image"
  c.data.caption_key = "text"  # imagefolder: a metadata column; webdataset: text
  # (KEY.txt), json/NAME (a field of KEY.json) or EXT
  c.data.resolution = 512
  c.data.random_crop = False
  c.data.worker_count = 0
  c.data.shuffle_buffer = 1000  # webdataset: records each process shuffles among
  c.data.max_bad_records = 100  # undecodable records skipped (each replaced by the
  # next); one more stops the run, naming it

  c.batch_size = 64  # global, over all processes and devices
  c.num_steps = 1_000_000
  c.dropout = ml_collections.ConfigDict()  # condition dropout, one draw per example
  c.dropout.image = 0.05
  c.dropout.text = 0.05
  c.dropout.both = 0.05
  c.noise = ml_collections.ConfigDict()
  c.noise.prediction_type = ""  # "" = the model's scheduler config; epsilon | v_prediction
  c.noise.snr_gamma = 0.0  # > 0: min-SNR loss weighting (Hang et al.); 0 = plain MSE
  c.contrastive_temperature = 0.07  # trainable = clip: the fixed softmax temperature
  c.vae_kl_weight = 1e-6  # trainable = vae: KL weight against the pixel MSE

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-4
  c.optimizer.schedule = "constant"  # constant | cosine
  c.optimizer.warmup_steps = 0
  c.optimizer.weight_decay = 0.01
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip = 0.0  # global-norm clipping; 0 = off
  c.optimizer.accumulate_steps = 1  # gradient accumulation
  c.optimizer.ema_decay = 0.0  # 0 = no EMA of the trainable weights

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 = all devices not used by fsdp
  c.mesh.fsdp = 1
  c.mesh.shard_frozen = False  # shard frozen weights over fsdp
  c.mesh.shard_trainable = False  # shard trainable weights and optimizer state over fsdp
  c.mesh.coordinator_address = ""  # multi-host GPU clusters; TPU VMs need none
  c.mesh.num_processes = 0
  c.mesh.process_id = -1

  c.log_every = 100
  c.profile_steps = ""  # "FIRST:LAST": trace those steps into workdir/profile
  # (jax.profiler, for TensorBoard); "" = off
  c.compilation_cache_dir = "~/.cache/ipadapter_jax/jax"  # JAX's persistent compilation cache
  # (per user, local); "" = off; JAX_COMPILATION_CACHE_DIR
  # wins when set
  c.checkpoint_every = 1000
  c.keep_last = 3  # checkpoints kept, plus every keep_every-th
  c.keep_every = 50_000  # 0 = none beyond the last ones
  c.sample_every = 5000  # 0 = no periodic sample grids
  c.sample_prompts = ("", "best quality, high quality")
  c.sample_images = ()  # image files for the periodic grids
  c.sample_steps = 30
  c.eval_every = 0  # validation every N steps (and at the end); 0 = off
  c.eval_annotations = ""  # held-out {image_file, text} records (JSON / JSONL)
  c.eval_clip = ""  # CLIPModel folder or hub id that scores them
  c.eval_judge = ""  # "module:function" reading attributes from an image
  # (the toy world's); "" = CLIP scores only
  c.eval_limit = 64  # records used
  c.eval_steps = 20  # DDIM steps per validation image
  c.eval_guidance_scale = 7.5
  c.eval_batch_size = 16  # images per compiled sampling call
  c.export_adapter = True  # write the official-format adapter at the end
  return c
