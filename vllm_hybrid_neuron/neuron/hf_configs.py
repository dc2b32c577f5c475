"""transformers config classes for Qwen3.5-MoE and Gemma 4, for a Neuron stack that lacks them.

The targeted Neuron stack (docs/neuron.md) pins transformers 4.57, which has no ``qwen3_5_moe``
or ``gemma4`` config types, and both vLLM and NxDI read a checkpoint's config through
``AutoConfig.from_pretrained``. On the neuron backend the plugin registers these small classes
for each missing type (and only then). They keep every field of config.json as an attribute
(what NxDI's ``load_pretrained_config`` copies into the port's InferenceConfig); the
``*ForConditionalGeneration`` configs also get the text model's attention fields at the top
level, where vllm-neuron's ``_get_model_configs`` reads them (it looks into ``text_config`` only
for three hard-coded multimodal architectures).
"""

from __future__ import annotations

from transformers import PretrainedConfig

# Read from the top level by vllm-neuron 0.2 (_get_model_configs) and vLLM (ModelConfig).
TOP_LEVEL_TEXT_FIELDS = ("num_key_value_heads", "head_dim", "num_attention_heads", "hidden_size",
                         "num_hidden_layers", "vocab_size", "max_position_embeddings")


class _TextConfig(PretrainedConfig):
    """A decoder's config.json, every key kept as an attribute."""


class _MultimodalConfig(PretrainedConfig):
    """A ``*ForConditionalGeneration`` config: ``text_config`` as a config object, towers as dicts,
    the text model's attention fields mirrored at the top level."""

    text_config_class = _TextConfig  # (no annotation: transformers 5 makes annotated names fields)
    sub_configs = {}  # towers stay plain dicts: the ports serve text only

    def __init__(self, text_config: dict | PretrainedConfig | None = None, **kwargs) -> None:
        # transformers 4.x: a plain __init__. (transformers 5 generates a dataclass __init__ for
        # each subclass and passes unknown keys, text_config among them, to __post_init__.)
        super().__init__(**kwargs)
        self.text_config = text_config
        self._adopt_text_config()

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        self._adopt_text_config()

    def _adopt_text_config(self) -> None:
        text = self.__dict__.get("text_config")
        if text is None or isinstance(text, dict):
            text = self.text_config_class(**(text or {}))
        self.text_config = text
        for field in TOP_LEVEL_TEXT_FIELDS:
            # The stored value: Gemma 4's head_dim / num_key_value_heads are the sliding layers'
            # (global layers have their own), and transformers 5 guards per-layer reads.
            value = text.__dict__.get(field)
            if field not in self.__dict__ and value is not None:
                setattr(self, field, value)

    def get_text_config(self, *args, **kwargs) -> PretrainedConfig:
        return self.text_config

    def to_dict(self) -> dict:
        out = super().to_dict()
        text = self.__dict__.get("text_config")  # (the base __init__ may call this before it is set)
        if text is not None:
            out["text_config"] = text.to_dict() if isinstance(text, PretrainedConfig) else dict(text)
        return out


class Qwen3_5MoeTextConfig(_TextConfig):
    model_type = "qwen3_5_moe_text"


class Qwen3_5MoeConfig(_MultimodalConfig):
    model_type = "qwen3_5_moe"
    text_config_class = Qwen3_5MoeTextConfig


class Gemma4TextConfig(_TextConfig):
    model_type = "gemma4_text"


class Gemma4Config(_MultimodalConfig):
    model_type = "gemma4"
    text_config_class = Gemma4TextConfig


CONFIG_CLASSES: tuple[type[PretrainedConfig], ...] = (
    Qwen3_5MoeTextConfig, Qwen3_5MoeConfig, Gemma4TextConfig, Gemma4Config)


def register_missing_config_types() -> list[str]:
    """Register each class whose model_type the installed transformers does not know.
    Returns the model types registered (none with transformers >= 5.x, which has them all)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    added = []
    for cls in CONFIG_CLASSES:
        if cls.model_type not in CONFIG_MAPPING:
            AutoConfig.register(cls.model_type, cls)
            added.append(cls.model_type)
    return added
