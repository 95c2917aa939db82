"""Language models described by ModelConfig: one block structure, a token mixer per layer.

    from flame.models import ModelConfig, build_model
    model = build_model(ModelConfig(mixer="gated_deltanet", attn_layers=[3, 7, 11], ...))
"""

from torch import nn

from flame.models.config import MIXERS, ModelConfig
from flame.models.lm import LanguageModel
from flame.models.mixers import MIXER_CLASSES


def build_mixer(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return MIXER_CLASSES[cfg.layer_mixers()[layer_idx]](cfg, layer_idx)


def build_model(cfg: ModelConfig) -> LanguageModel:
    """Validate cfg and build the model (on the current default device, meta included).
    Call `model.init_weights()` after materialising it."""
    cfg.validate()
    model = LanguageModel(cfg, [build_mixer(cfg, i) for i in range(cfg.n_layers)])
    if not any(p.is_meta for p in model.parameters()):
        model.init_weights()
    return model


__all__ = ["MIXERS", "ModelConfig", "LanguageModel", "build_model", "build_mixer"]
