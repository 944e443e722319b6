"""Text generation on top of LlamaForCausalLM (being written: see the generation issue)."""


class GenerationMixin:
    """Adds ``generate()`` to LlamaForCausalLM."""
