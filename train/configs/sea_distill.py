"""Config of train/sea_distill.py: SEA distilled into a small byte LM.

The default is the spec's CPU check scaled to a few minutes on a 2-core CPU:
a 2-layer causal byte LM (Shakespeare, T=256) trained densely as the
teacher, SEA (T_M=64, k=16, nbf=1) distilled into a copy of it, and the
sliding-window and linear-attention baselines fine-tuned with the same
logit/hidden distillation for `baseline_steps`. Override any field with
`--config.x=y`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.teacher_steps = 400
  config.distill_steps = 150
  config.baseline_steps = 75  # each of window and linear attention
  config.batch_size = 8
  config.seq_len = 256
  config.log_every = 25
  config.checkpoint_every = 100
  config.keep_checkpoints = 2

  config.data = ml_collections.ConfigDict()
  config.data.data_dir = ""  # "" -> $JSPARSE_DATA_DIR or ~/.cache/jsparse
  config.data.val_every = 10
  config.data.eval_windows = 16

  config.model = ml_collections.ConfigDict()
  config.model.num_layers = 2
  config.model.d_model = 64
  config.model.num_heads = 4
  config.model.num_kv_heads = 2
  config.model.mlp_hidden = 176
  config.model.block_size = 64

  config.sea = ml_collections.ConfigDict()  # SEAConfig fields
  config.sea.predictor_len = 64
  config.sea.topk = 16  # also the window and the linear features
  config.sea.feature_divisor = 1
  config.sea.output = "mix"

  config.loss = ml_collections.ConfigDict()
  config.loss.lm_weight = 0.1
  config.loss.hidden_weight = 5.0
  config.loss.kl_weight = 0.2

  config.optim = ml_collections.ConfigDict()
  config.optim.teacher_lr = 3e-3
  config.optim.distill_lr = 3e-4
  config.optim.estimator_lr_multiplier = 10.0
  config.optim.warmup_fraction = 0.1
  config.optim.end_lr_ratio = 0.1
  config.optim.weight_decay = 0.01
  config.optim.grad_clip = 1.0

  config.plot = ml_collections.ConfigDict()
  config.plot.layer = 0
  config.plot.head = 0
  return config
