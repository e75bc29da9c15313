"""A run's work directory and its config.json, checked on every resume.

config.json holds the config in effect. A rerun whose config differs is
refused before anything in the workdir is touched, with the differing
fields listed, unless the change is allowed (--allow_config_change): then
the change (time, each field's old and new value, and the whole previous
config) is appended to config_history.jsonl and config.json holds the new
config.
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
from absl import logging
import jax

ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume a --workdir whose config.json differs from this run's config "
    "(without it such a run is refused); the change is recorded in "
    "config_history.jsonl.")

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
_MISSING = "<missing>"


def flatten(tree: dict, prefix: str = "") -> dict:
  """Nested dicts -> {"a.b.c": leaf}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
  """{field: (old value, new value)} of the fields that differ."""
  old, new = flatten(old), flatten(new)
  return {key: (old.get(key, _MISSING), new.get(key, _MISSING))
          for key in sorted(old.keys() | new.keys())
          if old.get(key, _MISSING) != new.get(key, _MISSING)}


def _write_atomic(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def _record_change(workdir: str, old: dict,
                   changes: dict[str, tuple]) -> None:
  """Appends one accepted config change to config_history.jsonl."""
  record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "changes": {k: {"old": a, "new": b}
                        for k, (a, b) in changes.items()},
            "previous_config": old}
  with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
    f.write(json.dumps(record) + "\n")


def prepare(workdir: str, config, allow_config_change: bool = False) -> str:
  """Checks `config` against the workdir's config.json, then writes it.

  Args:
    workdir: the run's directory (made if missing).
    config: the run's ml_collections config.
    allow_config_change: accept a config that differs from config.json,
      recording the change in config_history.jsonl.

  Returns:
    The absolute workdir.

  Raises:
    ValueError: config.json differs from `config` (listing each field) and
      the change is not allowed; nothing in the workdir was changed.
  """
  workdir = os.path.abspath(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  text = config.to_json_best_effort(indent=2)
  new = json.loads(text)
  old = changes = None
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    changes = config_changes(old, new)
  if changes:
    listing = "\n".join(f"  {k}: {a!r} -> {b!r}"
                        for k, (a, b) in changes.items())
    if not allow_config_change:
      raise ValueError(
          f"the config differs from {path}, which this workdir was run "
          f"with:\n{listing}\nRerun with the same config, use another "
          "--workdir, or pass --allow_config_change to resume under the "
          f"new config (recorded in {HISTORY_FILE}).")
    logging.warning("config changed (--allow_config_change):\n%s", listing)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    if changes:
      _record_change(workdir, old, changes)
    if changes or old is None:
      _write_atomic(path, text)
  return workdir
