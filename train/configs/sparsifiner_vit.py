"""Config of train/sparsifiner_vit.py: Sparsifiner on a small digits ViT.

The default (`--config=train/configs/sparsifiner_vit.py`) is the spec's CPU
check: scikit-learn digits upscaled to 16x16, patch 2 (64 tokens + CLS), a
4-layer ViT trained densely as the teacher, then Sparsifiner's two phases at
keep rate 0.25 with n = 65 // 6 = 10 slots, phase 2 twice as long as
phase 1 (the paper: 45 epochs against 5); about 6 minutes on a 2-core CPU.
Every field can be overridden, e.g. `--config.phase2_steps=0`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.teacher_steps = 400  # dense teacher, cross-entropy
  config.phase1_steps = 200  # predictor only, attention reconstruction
  config.phase2_steps = 400  # backbone only, CE + KL + token MSE
  config.batch_size = 64
  config.log_every = 50
  config.checkpoint_every = 100
  config.keep_checkpoints = 2

  config.data = ml_collections.ConfigDict()
  config.data.image_size = 16
  config.data.test_fraction = 0.2

  config.model = ml_collections.ConfigDict()
  config.model.patch_size = 2
  config.model.hidden_size = 64
  config.model.depth = 4
  config.model.num_heads = 4
  config.model.mlp_ratio = 2.0

  config.attn = ml_collections.ConfigDict()  # SparsifinerConfig fields
  config.attn.token_ratio = 6
  config.attn.channel_ratio = 2
  config.attn.keep_rate = 0.25
  config.attn.coef_topk = 8
  config.attn.basis_threshold = 0.02
  config.attn.basis = "abs"  # or "signed" (see SparsifinerConfig)
  config.attn.scale = "num_heads"
  config.attn.implementation = ml_collections.config_dict.placeholder(str)

  config.loss = ml_collections.ConfigDict()
  config.loss.recon_weight = 0.01
  config.loss.ce_weight = 1.0
  config.loss.kl_weight = 0.5
  config.loss.token_weight = 0.5

  config.optim = ml_collections.ConfigDict()
  config.optim.teacher_lr = 1e-3
  config.optim.predictor_lr = 1e-3
  config.optim.backbone_lr = 2e-4
  config.optim.end_lr_ratio = 0.1
  config.optim.warmup_fraction = 0.1
  config.optim.weight_decay = 0.05
  config.optim.grad_clip = 1.0
  return config
