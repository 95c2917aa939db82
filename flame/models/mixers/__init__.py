"""Token mixers, one module each. Every mixer is an nn.Module built as `Mixer(cfg, layer_idx)`:

    forward(x [B, T, D], cu_seqlens=None, position_ids=None, state=None, use_cache=False)
        -> (y [B, T, D], new_state)   # new_state is None unless use_cache
    init_weights(init_std, out_std)   # out_std for the projection back into the residual stream
    flops_per_token(seq_len)          # sequence-mixing training FLOPs per token

With cu_seqlens, B = 1 and the documents of the flattened batch stay independent. Each module
documents its decoding state.
"""

from flame.models.mixers.attention import Attention

MIXER_CLASSES = {
    "attention": Attention,
}
