"""Ready-made LlamaConfig presets, one config.json per published model (LlamaConfig.from_preset)."""
