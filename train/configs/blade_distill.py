"""Config of train/blade_distill.py: sparsity-aware TDM on digits.

The default is the spec's toy TDM sized for a few minutes on a 2-core CPU:
sklearn digits at 8x8 (64 pixel tokens), a tiny dense DiT teacher trained
here with rectified flow, then a 4-step student with ASA attention (block 8,
pooled keys of 4) distilled data-free. Override any field with
`--config.x=y`, e.g. `--config.tdm.fake_attention=blade` for the released
code's ASA fake score.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.teacher_steps = 600
  config.distill_steps = 100
  config.batch_size = 32
  config.log_every = 25
  config.checkpoint_every = 100
  config.keep_checkpoints = 2

  config.data = ml_collections.ConfigDict()
  config.data.image_size = 8

  config.model = ml_collections.ConfigDict()
  config.model.hidden_size = 64
  config.model.depth = 3
  config.model.num_heads = 2
  config.model.mlp_ratio = 4.0

  config.asa = ml_collections.ConfigDict()  # BladeConfig fields
  config.asa.block_size = 8
  config.asa.samples = 4
  config.asa.mass = 0.95
  config.asa.min_fraction = 0.05
  config.asa.max_fraction = 0.25
  config.asa.pool_size = 4
  config.asa.implementation = ml_collections.config_dict.placeholder(str)

  config.tdm = ml_collections.ConfigDict()
  config.tdm.student_steps = 4  # K
  config.tdm.eta = 0.9
  config.tdm.t_max = 0.98  # t ~ U[t_mid, t_max) (980 / 1000)
  config.tdm.huber_c = 1e-3
  config.tdm.weight_clip = 5.0
  config.tdm.reg_weight = 0.0  # lambda_reg (0.5 CogVideoX, 0 Wan / flow)
  config.tdm.fake_attention = "dense"  # paper; "blade": released code

  config.optim = ml_collections.ConfigDict()
  config.optim.teacher_lr = 1e-3
  config.optim.student_lr = 1e-4
  config.optim.fake_lr = 5e-4
  config.optim.b1 = 0.0
  config.optim.b2 = 0.95
  config.optim.grad_clip = 1.0

  config.eval = ml_collections.ConfigDict()
  config.eval.num_samples = 256
  config.eval.teacher_steps = 50
  config.eval.seed = 1
  return config
