"""FlameConfig: a flame model's `[model]` section as a `transformers` config.

The keys are exactly those of `flame.models.ModelConfig`, with the same defaults (a test holds
them equal). This file imports only `transformers`: it is also written into every exported
model as remote code, for machines where flame is not installed.
"""

from transformers import PretrainedConfig

# ModelConfig's keys and defaults, in its order.
MODEL_CONFIG_DEFAULTS = {
    "mixer": "attention",
    "attn_layers": [],
    "vocab_size": 32000,
    "dim": 1024,
    "n_layers": 24,
    "tie_embeddings": False,
    "mlp_hidden_dim": None,
    "mlp_ratio": 8 / 3,
    "mlp_multiple_of": 256,
    "n_heads": 16,
    "head_dim": None,
    "expand_v": 1.0,
    "conv_size": 4,
    "use_short_conv": True,
    "gate_low_rank_dim": 16,
    "gate_logit_normalizer": 16.0,
    "attn_n_heads": None,
    "n_kv_heads": None,
    "attn_head_dim": None,
    "rope_theta": 10000.0,
    "sliding_window": None,
    "norm_eps": 1e-6,
    "init_std": 0.02,
}


class FlameConfig(PretrainedConfig):
    model_type = "flame"
    # names that generic Hugging Face tools (lm-evaluation-harness, pipelines) look up
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "rms_norm_eps": "norm_eps",
        "initializer_range": "init_std",
    }

    def __init__(self, **kwargs):
        for key, default in MODEL_CONFIG_DEFAULTS.items():
            value = kwargs.pop(key, default)
            setattr(self, key, list(value) if isinstance(value, (list, tuple)) else value)
        # Tied embeddings are part of the model's structure (no lm_head module at all), so
        # transformers' own weight tying has nothing to do.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    def model_config_dict(self) -> dict:
        """The `[model]` table this config stands for."""
        return {key: getattr(self, key) for key in MODEL_CONFIG_DEFAULTS}

    def layer_mixers(self) -> list[str]:
        """The token mixer of every layer, after `attn_layers` is applied."""
        names = list(self.mixer) if isinstance(self.mixer, list) else [self.mixer] * self.n_layers
        for i in self.attn_layers:
            if 0 <= i < len(names):
                names[i] = "attention"
        return names
