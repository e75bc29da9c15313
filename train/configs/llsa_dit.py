"""Configs of train/llsa_dit.py: pixel-space DiT with LLSA, rectified flow.

Presets (`--config=train/configs/llsa_dit.py:<preset>`):
  digits (default): sklearn digits at their native 8x8 (64 pixel tokens,
    four LLSA blocks of 16), a small class-conditional DiT with LLSA-l1
    (top-2 of the 4 key blocks) predicting x0, classifier-free guidance 3,
    1500 steps of batch 32 at learning rate 2e-3 (50 warmup steps, cosine
    decay); recognisable digits (eval/digit_check.py) in about 3.5 minutes
    on a 2-core CPU.
  128: FFHQ-style stage 2 of the paper at 128x128 (16384 tokens): DiT-S/1,
    LLSA-l2, batch 16, bf16, noise x2; images from --config.data.image_dir.
  256: the same at 256x256 (65536 tokens), noise x4. Both unconditional,
    v-prediction, as in the paper.
Every field can be overridden, e.g. `--config.attn.method=dense`.
"""

import ml_collections


def get_config(preset: str = "digits") -> ml_collections.ConfigDict:
  """Returns the config of `preset` ("digits", "128" or "256")."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_steps = 1500
  config.batch_size = 32  # global, split over all devices of all hosts
  config.log_every = 10
  config.checkpoint_every = 250
  config.keep_checkpoints = 2
  config.init_from = ""  # a checkpoint step dir to take weights from

  config.data = ml_collections.ConfigDict()
  config.data.source = "digits"  # or "folder"
  config.data.image_dir = ""
  config.data.image_size = 8

  config.model = ml_collections.ConfigDict()
  config.model.in_channels = 1
  config.model.hidden_size = 64
  config.model.depth = 4
  config.model.num_heads = 2
  config.model.mlp_ratio = 4.0
  config.model.token_permutation = True
  config.model.bf16 = False  # compute in bfloat16 (params stay f32)
  # Class-conditional (adaLN label embedding) on the dataset's labels; 0:
  # unconditional.
  config.model.num_classes = 10

  config.attn = ml_collections.ConfigDict()
  config.attn.method = "llsa"  # "dense" or a key of jsparse.METHODS
  config.attn.implementation = ml_collections.config_dict.placeholder(str)
  # Fields of the method's config (LLSAConfig for llsa).
  config.attn.options = ml_collections.ConfigDict()
  config.attn.options.num_levels = 1
  config.attn.options.block_size = 16
  config.attn.options.topk = 2

  config.flow = ml_collections.ConfigDict()
  config.flow.noise_scale = 1.0
  config.flow.timestep_sampling = "logit_normal"  # or "uniform"
  config.flow.prediction = "x0"  # what the model outputs: "x0" or "v"
  # Labels replaced by "no label" in training (classifier-free guidance).
  config.flow.label_dropout = 0.1

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 2e-3
  config.optim.schedule = "cosine"  # after warmup, to 0; or "constant"
  config.optim.warmup_steps = 50
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.weight_decay = 0.01
  config.optim.grad_clip = 1.0

  config.ema = ml_collections.ConfigDict()
  config.ema.max_decay = 0.9999
  config.ema.power = 0.75  # warmup: decay = 1 - (1 + step) ** -power

  config.mesh = ml_collections.ConfigDict()
  config.mesh.fsdp = 1  # >1: shard params over this many devices

  config.sample = ml_collections.ConfigDict()
  config.sample.num_images = 40  # with labels: a multiple of num_classes
  config.sample.steps = 20
  config.sample.seed = 0
  config.sample.every = 0  # also sample every this many steps; 0: at the end
  # out = out_uncond + scale * (out_cond - out_uncond); 1: the conditional
  # model alone.
  config.sample.guidance_scale = 3.0

  if preset in ("128", "256"):
    size = int(preset)
    config.num_steps = 43_800
    config.batch_size = 16
    config.log_every = 50
    config.checkpoint_every = 1000
    config.data.source = "folder"
    config.data.image_size = size
    config.model.in_channels = 3
    config.model.hidden_size = 384
    config.model.depth = 12
    config.model.num_heads = 6
    config.model.bf16 = True
    config.model.num_classes = 0  # unconditional, as in the paper
    config.flow.label_dropout = 0.0
    config.flow.prediction = "v"
    config.flow.timestep_sampling = "uniform"
    config.sample.guidance_scale = 1.0
    config.attn.options.num_levels = 2
    config.attn.options.topk = 8
    config.flow.noise_scale = 2.0 if size == 128 else 4.0
    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 0
    config.optim.schedule = "constant"
    config.sample.num_images = 16
  elif preset != "digits":
    raise ValueError(f"unknown preset {preset!r}: digits, 128 or 256")
  return config
