"""Checkpoint I/O (being written: see the checkpoint issue)."""


class CheckpointMixin:
    """Adds ``from_pretrained`` / ``save_pretrained`` to the models."""
