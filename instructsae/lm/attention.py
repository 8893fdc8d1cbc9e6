"""Which attention implementation transformers runs a model with, decided from the model class, not its name."""


def causal_lm_class(config) -> type | None:
    """The class AutoModelForCausalLM builds for a config (None: one transformers does not know, remote code)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return None
    classes = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if not isinstance(classes, (list, tuple)):
        return classes
    named = {model_class.__name__: model_class for model_class in classes}
    return next((named[name] for name in (config.architectures or []) if name in named), classes[0])


def chosen_attn_implementation(config, requested: str) -> str | None:
    """`auto`: PyTorch's SDPA (flash / memory-efficient kernels on a GPU) where the model class says it supports
    it, else the model's own (eager) attention, which is what Gemma 2's soft-capped attention needs. None leaves
    the choice to transformers (a class it cannot name: it tries SDPA, then eager)."""
    if requested != "auto":
        return requested
    model_class = causal_lm_class(config)
    if model_class is None:
        return None
    return "sdpa" if model_class._supports_sdpa else "eager"
