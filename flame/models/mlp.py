"""The MLP of every block: SwiGLU from flame.modules, sized by ModelConfig."""

from torch import nn

from flame import modules
from flame.models.config import ModelConfig


def build_mlp(cfg: ModelConfig) -> nn.Module:
    """SwiGLU(dim -> mlp_hidden -> dim); its `down_proj` writes into the residual stream."""
    return modules.SwiGLU(cfg.dim, cfg.mlp_hidden)
