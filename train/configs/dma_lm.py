"""Configs of train/dma_lm.py: a small byte-level LM with DMA attention.

Presets (`--config=train/configs/dma_lm.py:<preset>`), `<task>_<attention>`:
  task: "text" (Shakespeare's plays, bytes, split by whole plays) or "mqar"
    (synthetic multi-query associative recall);
  attention: "dense" (causal MHA/GQA), "window" (causal sliding window of
    `attn.window` keys) or "dma" (DMA keeping `attn.window` keys).
The three attentions of a task share every other field (model, data, steps,
seed), so their runs see the same parameters' init and the same tokens.
The default, text_dma, runs in a few minutes on a 2-core CPU.
"""

import ml_collections

TASKS = ("text", "mqar")
ATTENTIONS = ("dense", "window", "dma")


def get_config(preset: str = "text_dma") -> ml_collections.ConfigDict:
  """Returns the config of `preset`, e.g. "text_dma" or "mqar_window"."""
  task, _, attention = preset.partition("_")
  if task not in TASKS or attention not in ATTENTIONS:
    raise ValueError(
        f"preset must be <task>_<attention> with task in {TASKS} and "
        f"attention in {ATTENTIONS}, got {preset!r}")
  config = ml_collections.ConfigDict()
  config.task = task
  config.seed = 0
  config.num_steps = 300
  config.batch_size = 16  # global, split over all devices of all hosts
  config.seq_len = 128
  config.log_every = 25
  config.eval_every = 100
  config.checkpoint_every = 100
  config.keep_checkpoints = 2

  config.data = ml_collections.ConfigDict()
  config.data.data_dir = ""  # "" -> $JSPARSE_DATA_DIR or ~/.cache/jsparse
  config.data.val_every = 10  # every 10th play (by name) is validation
  config.data.eval_windows = 32

  config.mqar = ml_collections.ConfigDict()
  config.mqar.num_pairs = 8
  config.mqar.num_keys = 32
  config.mqar.num_values = 32
  config.mqar.eval_batches = 4

  config.model = ml_collections.ConfigDict()
  config.model.num_layers = 2
  config.model.d_model = 64
  config.model.num_heads = 4
  config.model.num_kv_heads = 2
  config.model.mlp_hidden = 176
  config.model.rope_theta = 10000.0
  config.model.block_size = 32

  config.attn = ml_collections.ConfigDict()
  config.attn.kind = attention
  config.attn.window = 32  # keys per query of window and DMA
  config.attn.variant = "per_row"  # DMA: or "query_agnostic"
  config.attn.granularity = "element"  # DMA: or "block"
  config.attn.exp_bias = False
  # DMA ablation, not the paper: keep the most recent local_keys of the
  # window keys, top-(window - local_keys) of the older ones.
  config.attn.local_keys = 0
  config.attn.implementation = ml_collections.config_dict.placeholder(str)

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 30
  config.optim.end_lr_ratio = 0.1
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.weight_decay = 0.1
  config.optim.grad_clip = 1.0

  config.mesh = ml_collections.ConfigDict()
  config.mesh.fsdp = 1

  if task == "mqar":
    config.num_steps = 600
    config.log_every = 50
    config.eval_every = 200
    config.checkpoint_every = 200
    config.optim.warmup_steps = 60
  return config
