"""nn.Modules over flame.kernels: norms, rotary embedding, short convolution, SwiGLU, and the
fused linear cross-entropy loss."""

from flame.modules.conv import ShortConvolution
from flame.modules.loss import FusedLinearCrossEntropyLoss
from flame.modules.norm import GatedRMSNorm, RMSNorm, SkipGatedRMSNorm
from flame.modules.rotary import RotaryEmbedding
from flame.modules.swiglu import SwiGLU

__all__ = [
    "RMSNorm",
    "GatedRMSNorm",
    "SkipGatedRMSNorm",
    "RotaryEmbedding",
    "ShortConvolution",
    "SwiGLU",
    "FusedLinearCrossEntropyLoss",
]
