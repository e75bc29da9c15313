"""ml_collections configs of the training recipes."""
