"""PreTrainedModel: what transformers' clients (Trainer, PEFT, pipelines, lm-eval, accelerate) call
on a model besides its forward, as transformers' PreTrainedModel provides it.

The checkpoint entry points (from_pretrained, save_pretrained, push_to_hub) hand over to
llama_port.checkpoints, imported when called: no model module imports a file format. The rest is
model-agnostic: submodule accessors over ``base_model_prefix``, resize_token_embeddings as
transformers draws it, input require-grads hooks, sizes. A subclass provides ``config``,
``_init_weights(module)``, ``tie_weights()`` and the embedding modules.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .generation import GenerationMixin


class PreTrainedModel(nn.Module):
    """transformers' PreTrainedModel surface, in torch alone (see the module docstring)."""

    # transformers' class attributes that its clients read.
    main_input_name = "input_ids"
    base_model_prefix = "model"

    # --------------------------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **options):
        """Load a checkpoint (a local folder or file in any supported format, or a Hub repo id) into
        this class; eval mode. ``options`` are llama_port.checkpoints.load_pretrained's (dtype,
        device, device_map, attn_implementation, strict, revision, config, gguf_file, quantize, and
        transformers' low_cpu_mem_usage / trust_remote_code, accepted and ignored), documented there."""
        from .checkpoints.loading import load_pretrained

        return load_pretrained(cls, name_or_path, **options)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        max_shard_size: int | str = "5GB",
        safe_serialization: bool = True,
        state_dict: dict[str, Tensor] | None = None,
    ) -> Path:
        """Write config.json and the weights (safetensors, sharded past ``max_shard_size``) as
        transformers does; ``safe_serialization=False`` writes pytorch_model*.bin. Returns the folder.

        ``state_dict``: the weights to write instead of the model's own (transformers' argument).
        A model whose parameters are DTensors (``llama_port.distributed.shard_model``) is saved
        collectively, so call this on every rank: the full weights are gathered, rank 0 writes them,
        every rank returns once the folder is complete (``distributed.save_full_checkpoint``)."""
        from .checkpoints.saving import holds_dtensors, save_pretrained

        options = {"max_shard_size": max_shard_size, "safe_serialization": safe_serialization}
        # The state dict, not parameters(): FSDP2 leaves plain unsharded tensors registered between a
        # forward and its backward (reshard_after_forward=False), and its state-dict hook reshards.
        if state_dict is None and holds_dtensors(self.state_dict().values()):
            from .distributed.fsdp import save_full_checkpoint

            return save_full_checkpoint(self, save_directory, **options)
        return save_pretrained(self, save_directory, state_dict=state_dict, **options)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str = "Upload model",
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str = "5GB",
        safe_serialization: bool = True,
    ) -> str:
        """save_pretrained into a temporary folder, then upload it to the Hub repo ``repo_id``
        (created if missing) with huggingface_hub; returns the commit's URL. Offline: a one-line
        ConnectionError naming the repo."""
        from .checkpoints.saving import push_to_hub

        return push_to_hub(
            self, repo_id, commit_message=commit_message, private=private, token=token, revision=revision,
            create_pr=create_pr, max_shard_size=max_shard_size, safe_serialization=safe_serialization,
        )

    def quantize(self, method: str = "int8", *, skip: tuple[str, ...] = ()):
        """Quantize this model's weights in place (llama_port.quantization.quantize_weights):
        "int8" makes every nn.Linear not named in ``skip`` (module names, e.g. ``("lm_head",)``) a
        weight-only int8 Int8Linear with per-channel scales; inference only. Returns the model;
        ValueError for another ``method``. What ``from_pretrained(..., quantize="int8")`` does after
        loading each layer, for a model already built."""
        from .quantization import quantize_weights

        return quantize_weights(self, method, skip=skip)

    @property
    def name_or_path(self) -> str:
        """What from_pretrained was given ("" for a model built from a config), as transformers keeps it."""
        return self.config.name_or_path

    @classmethod
    def can_generate(cls) -> bool:
        """Whether ``generate()`` is available: True for LlamaForCausalLM."""
        return issubclass(cls, GenerationMixin)

    # ---------------------------------------------------------------------------------- submodules
    @property
    def base_model(self) -> nn.Module:
        """The decoder stack (transformers' ``base_model_prefix`` attribute, or the model itself)."""
        return getattr(self, self.base_model_prefix, self)

    def get_decoder(self) -> nn.Module:
        return self.base_model

    def set_decoder(self, decoder: nn.Module) -> None:
        if self.base_model is self:
            raise ValueError("set_decoder: a LlamaModel is the decoder itself; call it on a LlamaForCausalLM")
        setattr(self, self.base_model_prefix, decoder)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.base_model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear | None:
        """The language-model head; None for a model without one (the bare LlamaModel)."""
        return None

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Give the vocabulary ``new_num_tokens`` rows (rounded up to a multiple of
        ``pad_to_multiple_of``), as transformers does: the kept rows unchanged, rows past the end
        dropped, added rows of the embedding and the head drawn from a normal around the old rows'
        mean with 1e-9 times their covariance (``mean_resizing``) or from the config's init
        (normal(0, initializer_range)), drawing from torch's RNG in transformers' order. Updates
        ``config.vocab_size`` and keeps the tie. Returns the input embedding; with neither argument,
        changes nothing."""
        embeddings = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return embeddings
        if pad_to_multiple_of is not None:
            if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
                raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of!r}; expected a positive int or None")
            new_num_tokens = embeddings.num_embeddings if new_num_tokens is None else new_num_tokens
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        if not isinstance(new_num_tokens, int) or new_num_tokens < 1:
            raise ValueError(f"new_num_tokens={new_num_tokens!r}; expected a positive int or None")

        weight = embeddings.weight
        if weight.shape[0] != new_num_tokens:
            resized = nn.Embedding(new_num_tokens, weight.shape[1], device=weight.device, dtype=weight.dtype)
            self._fill_resized(weight, resized, mean_resizing)
            # In place, as transformers: the module (its padding_idx, its hooks) and a tied head stay.
            weight.data = resized.weight.data
            if embeddings.padding_idx is not None and embeddings.padding_idx >= new_num_tokens:
                embeddings.padding_idx = None
        embeddings.num_embeddings = new_num_tokens
        head = self.get_output_embeddings()
        if head is not None and head.weight.shape[0] != new_num_tokens:
            resized_head = nn.Linear(head.in_features, new_num_tokens, bias=False, device=head.weight.device,
                                     dtype=head.weight.dtype)
            self._fill_resized(head.weight, resized_head, mean_resizing)
            resized_head.requires_grad_(head.weight.requires_grad)
            self.set_output_embeddings(resized_head)
        elif head is not None:
            head.out_features = new_num_tokens  # a tied head was resized with the embedding
        self.config.vocab_size = new_num_tokens
        self.vocab_size = new_num_tokens
        self.base_model.vocab_size = new_num_tokens
        self.tie_weights()
        return embeddings

    @torch.no_grad()
    def _fill_resized(self, old: Tensor, new: nn.Embedding | nn.Linear, mean_resizing: bool) -> None:
        """``new``'s weight (N', C): the first min(N, N') rows of ``old`` (N, C); added rows as
        transformers' _init_added_embeddings_weights_with_mean or _init_weights."""
        old_rows, new_rows = old.shape[0], new.weight.shape[0]
        if new_rows > old_rows and mean_resizing:
            new.weight[old_rows:] = _rows_around_the_mean(old, new_rows - old_rows)
        elif new_rows > old_rows:
            self._init_weights(new)
        kept = min(old_rows, new_rows)
        new.weight[:kept] = old[:kept]

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require grad (a forward hook), so gradients reach
        adapters or checkpointed layers when the embedding itself is frozen."""
        self.disable_input_require_grads()
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(_output_requires_grad)

    def disable_input_require_grads(self) -> None:
        """Remove enable_input_require_grads' hook (nothing to do if there is none)."""
        hook = self.__dict__.pop("_require_grads_hook", None)
        if hook is not None:
            hook.remove()

    # --------------------------------------------------------------------------------------- sizes
    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters (a tied tensor once), plus the buffers with ``return_buffers``."""
        size = sum(p.nelement() * p.element_size() for p in self.parameters())
        if return_buffers:
            size += sum(b.nelement() * b.element_size() for b in self.buffers())
        return size

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count, each shared (tied) tensor counted once."""
        excluded = set()
        if exclude_embeddings:
            excluded = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        unique = {id(p): p for p in self.parameters()}
        return sum(
            p.numel() for i, p in unique.items() if i not in excluded and (p.requires_grad or not only_trainable)
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _return_dict(self, return_dict: bool | None) -> bool:
        """forward's return_dict resolved: None means the config's ``use_return_dict``."""
        return self.config.use_return_dict if return_dict is None else return_dict


def _output_requires_grad(module: nn.Module, inputs: tuple, output: Tensor) -> None:
    output.requires_grad_(True)


def _rows_around_the_mean(old: Tensor, count: int) -> Tensor:
    """``count`` rows (count, C) drawn as transformers' _init_added_embeddings_weights_with_mean:
    from a normal with the mean of ``old`` (N, C) and 1e-9 times its covariance, or the mean itself
    when that covariance is not positive definite; in old's dtype."""
    old32 = old.float()
    mean = old32.mean(dim=0)  # (C,)
    centered = old32 - mean
    covariance = 1e-9 * (centered.T @ centered / old.shape[0])  # (C, C)
    if torch.distributions.constraints.positive_definite.check(covariance).all():
        sample = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance).sample((count,))
    else:
        sample = mean[None, :].repeat(count, 1)
    return sample.to(old.dtype)
