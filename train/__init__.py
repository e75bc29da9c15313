"""Training recipes (Optax + Orbax, laptop CPU to TPU pods)."""
