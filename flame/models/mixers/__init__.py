"""Token mixers, one module each. Every mixer is an nn.Module built as `Mixer(cfg, layer_idx)`:

    forward(x [B, T, D], cu_seqlens=None, position_ids=None, state=None, use_cache=False,
            max_seqlen=None)
        -> (y [B, T, D], new_state)   # new_state is None unless use_cache
    init_weights(init_std, out_std)   # out_std for the projection back into the residual stream
    flops_per_token(seq_len)          # sequence-mixing training FLOPs per token

With cu_seqlens, B = 1 and the documents of the flattened batch stay independent; max_seqlen,
when given, bounds the longest document (attention sizes its kernel grid with it; the delta-rule
mixers run their serial passes over segments when it is long). Each module documents its
decoding state (a dict of tensors).
"""

from flame.models.mixers.attention import Attention
from flame.models.mixers.deltanet import DeltaNet
from flame.models.mixers.gated_deltanet import GatedDeltaNet
from flame.models.mixers.gla import GatedLinearAttention
from flame.models.mixers.mamba2 import Mamba2
from flame.models.mixers.retnet import MultiScaleRetention

MIXER_CLASSES = {
    "attention": Attention,
    "gated_deltanet": GatedDeltaNet,
    "gla": GatedLinearAttention,
    "deltanet": DeltaNet,
    "retnet": MultiScaleRetention,
    "mamba2": Mamba2,
}
