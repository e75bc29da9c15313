"""Helpers shared by the training recipes."""
