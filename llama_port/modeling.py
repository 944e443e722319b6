"""The LLaMA decoder (Touvron et al. 2023), module for module as transformers' ``modeling_llama.py``.

Token embedding -> N x [RMSNorm -> grouped-query self-attention with RoPE and a causal mask ->
residual -> RMSNorm -> SwiGLU feed-forward -> residual] -> RMSNorm -> linear head (logits; softmax
is left to the loss and the sampler). Module and parameter names are transformers', so a
transformers state dict loads with no renaming. This module knows nothing of checkpoint formats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .activations import ACTIVATIONS
from .attention import AttentionBackend, default_attn_implementation, get_backend
from .attention.masks import BackendMask, PreparedMask, mask_for_forward
from .cache import DynamicCache, KVCache
from .configuration import LlamaConfig, as_llama_config
from .generation import GenerationConfig, GenerationMixin
from .outputs import CausalLMOutput, LlamaModelOutput
from .pretrained import PreTrainedModel
from .rope import ROPE_TYPES, apply_rotary_pos_emb, compute_inv_freq


class LlamaRMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight, no mean subtraction, no bias."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)  # parity: the statistics in float32
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)  # parity: cast before the weight multiply

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LlamaRotaryEmbedding(nn.Module):
    """RoPE: cos/sin (B, T, D) for given positions, from ``config.rope_parameters`` (see rope.py).

    Rope types with an ``update`` in rope.ROPE_TYPES (dynamic NTK, longrope) change their
    frequencies with the sequence length, statefully as in transformers; this module holds that
    state (inv_freq, original_inv_freq, max_seq_len_cached, long_inv_freq).
    """

    def __init__(self, config: LlamaConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.rope_type = ROPE_TYPES[config.rope_parameters["rope_type"]]
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        inv_freq, self.attention_scaling = compute_inv_freq(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
        self.long_inv_freq: Tensor | None = None  # longrope's frequencies past the original context

    def reset_parameters(self) -> None:
        """Recompute the frequencies on inv_freq's device (after the module was built on the meta device)."""
        inv_freq, self.attention_scaling = compute_inv_freq(self.config, self.inv_freq.device)
        self.inv_freq = inv_freq
        self.original_inv_freq = inv_freq.clone()
        self.long_inv_freq = None
        self.max_seq_len_cached = self.original_max_seq_len

    def _apply(self, fn, recurse: bool = True):
        # model.to(torch.bfloat16) casts every floating buffer; the frequencies must stay float32
        # (as transformers' from_pretrained(dtype=bf16) keeps them), so recompute them exactly.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.reset_parameters()
        return self

    @torch.no_grad()
    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """position_ids (B or 1, T) -> cos, sin (B or 1, T, D) in x's dtype."""
        if self.rope_type.update is not None:
            self.rope_type.update(self, position_ids)
        device_type = x.device.type if x.device.type != "mps" else "cpu"
        # The angles are computed in float32 whatever the weights' dtype or an enclosing autocast:
        # positions times frequencies lose whole radians in bf16 at long context.
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # (B, T, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D): the half-split layout of rotate_half
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)  # parity: cast to the activations' dtype last


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(act(gate(x)) * up(x)), act = SiLU for LLaMA."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaAttention(nn.Module):
    """Grouped-query self-attention (Ainslie et al. 2023) with RoPE: H query heads share Hkv
    key/value heads (Hkv = H: multi-head; Hkv = 1: multi-query). The kernel is the backend named by
    ``config._attn_implementation``, the one place the model's choice is kept."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    @property
    def backend(self) -> AttentionBackend:
        return get_backend(self.config._attn_implementation)

    def forward(
        self, hidden_states: Tensor, cos: Tensor, sin: Tensor, mask: BackendMask,
        past_key_values: KVCache | None, cache_position: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """hidden_states (B, T, C) -> ((B, T, C), attention weights (B, H, T, S) or None).

        Writes this layer's keys/values into ``past_key_values`` when given."""
        B, T, _ = hidden_states.shape
        D = self.head_dim
        query_states = self.q_proj(hidden_states).view(B, T, -1, D).transpose(1, 2)  # (B, H, T, D)
        key_states = self.k_proj(hidden_states).view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
        value_states = self.v_proj(hidden_states).view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(
                key_states, value_states, self.layer_idx, cache_position
            )  # (B, Hkv, S, D)

        dropout = self.attention_dropout if self.training else 0.0
        attn_output, attn_weights = self.backend.forward(
            self, query_states, key_states, value_states, mask, self.scaling, dropout
        )  # (B, T, H, D)
        attn_output = attn_output.reshape(B, T, -1).contiguous()  # (B, T, H * D)
        return self.o_proj(attn_output), attn_weights


class LlamaDecoderLayer(nn.Module):
    """One pre-norm transformer block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, hidden_states: Tensor, cos: Tensor, sin: Tensor, mask: BackendMask,
        past_key_values: KVCache | None, cache_position: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """(B, T, C) -> ((B, T, C), attention weights or None)."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, attn_weights = self.self_attn(hidden_states, cos, sin, mask, past_key_values, cache_position)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states, attn_weights


class LlamaPreTrainedModel(PreTrainedModel):
    """What LlamaModel and LlamaForCausalLM share: the config, the attention backend, weight
    initialisation as transformers does it, gradient checkpointing. What transformers' clients
    call besides forward (from_pretrained, resize_token_embeddings, ...) is PreTrainedModel's."""

    config: LlamaConfig
    supports_gradient_checkpointing = True

    def __init__(self, config: LlamaConfig, attn_implementation: str | None = None) -> None:
        super().__init__()
        config = as_llama_config(config)
        self.config = config
        if attn_implementation is None:
            # Chosen from where the parameters are about to be created (torch's default device/dtype).
            attn_implementation = default_attn_implementation(torch.get_default_device(), torch.get_default_dtype())
        get_backend(attn_implementation)  # an unknown name fails before the config is touched
        config._attn_implementation = attn_implementation

    # -------------------------------------------------------------------------- attention backend
    @property
    def attn_implementation(self) -> str:
        """The attention backend's name (kept in ``config._attn_implementation``, shared by every layer)."""
        return self.config._attn_implementation

    @property
    def attention_backend(self) -> AttentionBackend:
        return get_backend(self.config._attn_implementation)

    def set_attn_implementation(self, name: str) -> None:
        """Switch every layer to the backend called ``name`` (ValueError for an unknown one)."""
        backend = get_backend(name)
        if backend.check_available is not None:
            backend.check_available(self._device_or_none())
        self.config._attn_implementation = name

    def _check_backend_available(self) -> None:
        """Raise if the chosen backend cannot run where the parameters are (flash without CUDA)."""
        backend = self.attention_backend
        if backend.check_available is not None:
            backend.check_available(self._device_or_none())

    def _device_or_none(self) -> torch.device | None:
        param = next(self.parameters(), None)
        return None if param is None else param.device

    # ------------------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' init: normal(0, initializer_range) for Linear and Embedding weights (the
        padding row zeroed), zero biases, ones for RMSNorm."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, LlamaRMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, LlamaRotaryEmbedding):
            module.reset_parameters()

    def init_weights(self) -> None:
        """(Re)initialise every parameter, then re-tie the embeddings if the config says so."""
        self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Nothing to tie in the bare model; LlamaForCausalLM ties lm_head to the embedding."""

    # ------------------------------------------------------------------------------------ training
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each decoder layer's activations in the backward pass instead of storing them.

        gradient_checkpointing_kwargs: passed to torch.utils.checkpoint.checkpoint (e.g.
        ``{"use_reentrant": True}``); default ``{"use_reentrant": False}``, as transformers. As
        transformers, the input embeddings' output then requires grad (enable_input_require_grads),
        so a frozen model with adapters still gets gradients through the recomputed layers."""
        kwargs = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else dict(gradient_checkpointing_kwargs)
        for module in self.modules():
            if isinstance(module, LlamaModel):
                module.gradient_checkpointing = True
                module.gradient_checkpointing_kwargs = kwargs
        self.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, LlamaModel):
                module.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(m.gradient_checkpointing for m in self.modules() if isinstance(m, LlamaModel))

class LlamaModel(LlamaPreTrainedModel):
    """The decoder stack without the head: token ids -> final hidden states (B, T, C)."""

    def __init__(self, config: LlamaConfig, attn_implementation: str | None = None) -> None:
        super().__init__(config, attn_implementation)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.gradient_checkpointing_kwargs: dict = {"use_reentrant": False}
        if type(self) is LlamaModel:
            self.init_weights()
            self._check_backend_available()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | PreparedMask | None = None,
        position_ids: Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        cache_position: Tensor | None = None,
        return_dict: bool | None = None,
        token_type_ids: Tensor | None = None,
    ) -> LlamaModelOutput | tuple:
        """input_ids (B, T) or inputs_embeds (B, T, C), exactly one.

        attention_mask: (B, S) 1 for real tokens, 0 for padding (left or right), S = cached + T; or
            a PreparedMask already in the backend's format, used as given (generate()'s decode step).
        position_ids: (B, T); default: positions after the cached tokens (for left padding pass
            ``attention_mask.cumsum(-1) - 1`` as generate() does).
        past_key_values: a DynamicCache or StaticCache to read and extend; with ``use_cache`` and
            none given, a DynamicCache is created and returned.
        cache_position: (T,) slots of the cache the new tokens go to (default: after the cached ones).
        output_hidden_states, output_attentions, return_dict: None means the config's default
            (False, False, True); ``return_dict=False`` returns ``output.to_tuple()``.
        token_type_ids: accepted and ignored, as transformers' Llama ignores it (tokenizers emit it).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        backend = self.attention_backend
        if output_attentions and not backend.returns_weights:
            raise ValueError(
                f"output_attentions=True needs attention weights, which attn_implementation="
                f"{backend.name!r} does not compute; use attn_implementation='eager'"
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, C)
        use_cache, past_key_values = self._cache_for_forward(use_cache, past_key_values)
        mask, position_ids, cache_position = self._mask_and_positions(
            attention_mask, position_ids, cache_position, past_key_values, inputs_embeds
        )

        hidden_states = inputs_embeds
        cos, sin = self.rotary_emb(hidden_states, position_ids)  # (B or 1, T, D)
        all_hidden_states: list[Tensor] = []
        all_attentions: list[Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            if self.gradient_checkpointing and self.training:
                hidden_states, attn_weights = checkpoint(
                    layer, hidden_states, cos, sin, mask, past_key_values, cache_position,
                    **self.gradient_checkpointing_kwargs,
                )
            else:
                hidden_states, attn_weights = layer(hidden_states, cos, sin, mask, past_key_values, cache_position)
            if output_attentions:
                all_attentions.append(attn_weights)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)  # as transformers: the last one is after the norm

        output = LlamaModelOutput(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache or past_key_values is not None else None,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )
        return output if self._return_dict(return_dict) else output.to_tuple()

    def _cache_for_forward(self, use_cache: bool | None, past_key_values: KVCache | None) -> tuple[bool, KVCache | None]:
        """use_cache resolved (config default; off when recomputing layers in training) and the
        cache to extend (a new DynamicCache when caching and none was given)."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            # Recomputing a layer in the backward pass would append its keys to the cache again.
            if past_key_values is not None:
                raise ValueError("past_key_values cannot be used with gradient checkpointing in training mode")
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        return use_cache, past_key_values

    def _mask_and_positions(
        self,
        attention_mask: Tensor | PreparedMask | None,
        position_ids: Tensor | None,
        cache_position: Tensor | None,
        past_key_values: KVCache | None,
        inputs_embeds: Tensor,
    ) -> tuple[BackendMask, Tensor, Tensor]:
        """(the backend's mask, position_ids (B or 1, T), cache_position (T,)) for T new tokens,
        defaults after the tokens already cached."""
        backend = self.attention_backend
        batch_size, q_length = inputs_embeds.shape[:2]
        prepared = _check_attention_mask(attention_mask, backend)
        # A prepared mask plus cache_position (generate()'s decode step) says where the tokens go, so
        # the cache's host bookkeeping is not read and a compiled step does not specialise on it.
        past_seen = 0
        if past_key_values is not None and not (prepared is not None and cache_position is not None):
            past_seen = past_key_values.get_seq_length()
        if cache_position is None:
            cache_position = torch.arange(past_seen, past_seen + q_length, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)  # (1, T)
        if prepared is not None:
            return prepared.value, position_ids, cache_position
        mask = mask_for_forward(
            backend.mask_format, attention_mask, position_ids=position_ids, past_key_values=past_key_values,
            past_seen=past_seen, batch_size=batch_size, q_length=q_length, dtype=inputs_embeds.dtype,
            device=inputs_embeds.device,
        )
        return mask, position_ids, cache_position


class LlamaForCausalLM(LlamaPreTrainedModel, GenerationMixin):
    """LlamaModel plus the language-model head: token ids -> next-token logits (B, T, V).

    ``generate()`` comes from llama_port.generation; its defaults from ``generation_config``
    (derived from the config here, replaced by generation_config.json at from_pretrained)."""

    # transformers' name for this model's loss (next-token cross-entropy, labels shifted inside):
    # the Trainer reads it to count num_items_in_batch over labels[..., 1:], as for its own Llama.
    loss_type = "ForCausalLM"
    # forward takes num_items_in_batch (by name, not through **kwargs, which is what the Trainer
    # looks for otherwise), so the Trainer normalises the loss over all accumulated micro-batches.
    accepts_loss_kwargs = True

    def __init__(self, config: LlamaConfig, attn_implementation: str | None = None) -> None:
        super().__init__(config, attn_implementation)
        self.generation_config = GenerationConfig.from_model_config(config)
        self.model = LlamaModel(config, self.attn_implementation)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_weights()
        self._check_backend_available()

    def tie_weights(self) -> None:
        """With ``tie_word_embeddings``, lm_head and embed_tokens share one tensor."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        next_sequence_length: int | None = None,
        past_key_values: KVCache | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        is_first_iteration: bool = False,
        **model_kwargs: object,
    ) -> dict[str, object]:
        """The forward arguments of one step of transformers' (5.x) decode loop, with its contract:
        what wrappers such as PEFT call and extend. input_ids (B, T) cut to the last
        ``next_sequence_length`` tokens (all when None); inputs_embeds instead, on the first
        iteration only; position_ids, when the loop passes them, cut alike. ``model_kwargs`` (the
        loop's use_cache, cache_position, ...) go through to forward, whose explicit signature
        refuses unknown ones. llama_port's own generate() does not use it: its decode loops keep
        positions and masks in place."""
        keep = slice(-next_sequence_length, None) if next_sequence_length is not None else slice(None)
        if inputs_embeds is not None and is_first_iteration:
            inputs: dict[str, object] = {"input_ids": None, "inputs_embeds": inputs_embeds[:, keep]}
            length = inputs["inputs_embeds"].shape[1]
        else:
            inputs = {"input_ids": input_ids[:, keep]}
            length = inputs["input_ids"].shape[1]
        if past_key_values is not None:
            inputs["past_key_values"] = past_key_values
        position_ids = model_kwargs.pop("position_ids", None)
        if position_ids is not None:
            inputs["position_ids"] = position_ids[..., -length:]  # (B, T_new)
        inputs["attention_mask"] = attention_mask
        inputs.update(model_kwargs)
        return inputs

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | PreparedMask | None = None,
        position_ids: Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None, use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        cache_position: Tensor | None = None,
        return_dict: bool | None = None,
        token_type_ids: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> CausalLMOutput | tuple:
        """Arguments as LlamaModel.forward, plus:

        labels: (B, T) token ids; the loss is the mean cross-entropy of predicting labels[:, t + 1]
            from position t, positions labelled -100 ignored (shifted here, as transformers does).
        num_items_in_batch: the Trainer's count of labelled tokens over all its micro-batches; given,
            the loss is the sum of this batch's token losses divided by it (transformers' ForCausalLMLoss).
        logits_to_keep: int n -> logits for the last n positions only (0: all); a 1-D tensor of
            positions; a 2-D integer (B, K) tensor of positions per row.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            cache_position=cache_position,
            return_dict=True,
        )
        hidden_states = _keep_positions(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)  # (B, T', V)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch=num_items_in_batch)
        output = CausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if self._return_dict(return_dict) else output.to_tuple()


def _check_attention_mask(attention_mask: Tensor | PreparedMask | None, backend: AttentionBackend) -> PreparedMask | None:
    """The PreparedMask when one is given (checked against the backend's format), else None after
    checking that ``attention_mask`` is a (B, S) padding mask or None."""
    if isinstance(attention_mask, PreparedMask):
        if attention_mask.mask_format != backend.mask_format:
            raise ValueError(
                f"attention_mask is a PreparedMask in format {attention_mask.mask_format!r}, but "
                f"attn_implementation={backend.name!r} takes {backend.mask_format!r}"
            )
        return attention_mask
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected a (B, S) padding mask "
            "(1 = real token, 0 = padding) or a llama_port.attention.masks.PreparedMask"
        )
    return None


def _keep_positions(hidden_states: Tensor, logits_to_keep: int | Tensor) -> Tensor:
    """(B, T, C) -> (B, T', C): the positions whose logits are wanted."""
    if isinstance(logits_to_keep, Tensor) and logits_to_keep.ndim == 2:
        return torch.take_along_dim(hidden_states, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep={logits_to_keep}; expected an int >= 0 (0 keeps all) or a tensor")
        logits_to_keep = slice(-logits_to_keep, None)
    return hidden_states[:, logits_to_keep, :]


def causal_lm_loss(
    logits: Tensor, labels: Tensor, ignore_index: int = -100, num_items_in_batch: int | Tensor | None = None
) -> Tensor:
    """Cross-entropy of logits (B, T, V) at t against labels (B, T) at t + 1, in float32: the mean
    over labelled tokens, or with ``num_items_in_batch`` their sum divided by it (as transformers)."""
    logits = logits.float()  # parity: the loss in float32 whatever the model dtype
    labels = F.pad(labels, (0, 1), value=ignore_index)
    shift_labels = labels[..., 1:].contiguous().view(-1).to(logits.device)  # (B * T,)
    flat_logits = logits.view(-1, logits.shape[-1])  # (B * T, V)
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, shift_labels, ignore_index=ignore_index)
    loss = F.cross_entropy(flat_logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


__all__ = [
    "CausalLMOutput",
    "LlamaAttention",
    "LlamaDecoderLayer",
    "LlamaForCausalLM",
    "LlamaMLP",
    "LlamaModel",
    "LlamaModelOutput",
    "LlamaPreTrainedModel",
    "LlamaRMSNorm",
    "LlamaRotaryEmbedding",
]
