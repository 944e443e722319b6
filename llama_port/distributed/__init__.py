"""Scale-out on torch.distributed: FSDP2 fine-tuning (fsdp.py)."""

from .fsdp import save_full_checkpoint, shard_model

__all__ = ["save_full_checkpoint", "shard_model"]
