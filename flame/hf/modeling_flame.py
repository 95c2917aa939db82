"""FlameForCausalLM: every flame model as a `transformers` causal LM, with a recurrent cache.

One class covers every mixer; the config says which layer runs which. The network itself is
flame's `LanguageModel` when this file is imported as part of flame (flame's Triton kernels on
GPU), and the plain-PyTorch copy in reference_model.py when it runs as remote code from an
exported folder (`trust_remote_code=True`, flame not installed). Both have the same parameter
names and the same per-layer decoding states.

Generation. `FlameCache` carries each layer's state between forward calls: the recurrent
state and short-convolution inputs of linear-attention layers (fixed size: O(1) work per new
token) and the key/value cache of softmax-attention layers. A batch whose attention_mask has
padding runs row by row, each row on its unpadded tokens with its own states, so padding never
enters a recurrent state.

Positions: rotary positions (attention, RetNet) count the tokens each row has consumed;
`position_ids` passed by callers are not used.
"""

import importlib

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_flame import FlameConfig
from .reference_model import LanguageModel as ReferenceLanguageModel

# transformers renamed the output field `past_key_values` to `cache` (5.2x); fill whichever exists.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# "flame": flame's LanguageModel and kernels; "reference": reference_model.py (pure PyTorch).
DEFAULT_BACKBONE = "flame" if __name__.startswith("flame.") else "reference"


def build_backbone(config: FlameConfig, backbone: str = DEFAULT_BACKBONE) -> torch.nn.Module:
    """flame's LanguageModel inside flame; the plain-PyTorch one in an exported folder."""
    if backbone == "flame":
        # imported by name: an import statement would make transformers require flame on
        # machines that run this file as remote code
        models = importlib.import_module("flame.models")
        return models.build_model(models.ModelConfig.from_dict(config.model_config_dict()))
    model = ReferenceLanguageModel(config)
    if not any(p.is_meta for p in model.parameters()):
        model.init_weights()
    return model


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


class FlameCache:
    """Per-layer decoding states between forward calls.

    `states`: one entry per layer, in the mixer's own format (tensors with the batch first),
    for a batch without padding; `rows`: one FlameCache per batch row once padding was seen.
    `seen_tokens`: input columns consumed (padding included), which tells generate() where
    the new tokens start."""

    is_compileable = False
    is_croppable = False

    def __init__(self, states=None, rows=None, seen_tokens: int = 0):
        self.states = states
        self.rows = rows
        self.seen_tokens = seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def __len__(self) -> int:
        return 0 if self.states is None else len(self.states)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select (and repeat) batch rows, for beam search."""
        if self.rows is not None:
            self.rows = [self.rows[i] for i in beam_idx.tolist()]
        elif self.states is not None:
            self.states = _map_tensors(self.states, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.rows is not None:
            self.rows = [r for r in self.rows for _ in range(repeats)]
        elif self.states is not None:
            self.states = _map_tensors(self.states, lambda t: t.repeat_interleave(repeats, dim=0))


class FlamePreTrainedModel(PreTrainedModel):
    config_class = FlameConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False
    _is_stateful = True

    def _init_weights(self, module):
        # Weights come from the checkpoint; a model built from a config is initialised by the
        # network's own init_weights (flame's initialisation) in __init__.
        pass

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # FlameCache, created by forward()


class FlameForCausalLM(FlamePreTrainedModel, GenerationMixin):
    backbone = DEFAULT_BACKBONE

    def __init__(self, config: FlameConfig):
        super().__init__(config)
        self.model = build_backbone(config, self.backbone)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return None if self.config.tie_embeddings else self.model.lm_head

    # ---- forward -------------------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                return_dict=None, logits_to_keep=0, **kwargs):
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported by flame models; pass input_ids")
        if input_ids is None:
            raise ValueError("input_ids is required")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, FlameCache):
            if cache.get_seq_length() > 0:
                raise ValueError(f"cache: a {type(cache).__name__} with content cannot continue a flame "
                                 "model; pass the FlameCache a previous call returned, or none")
            cache = None
        if use_cache is None:
            use_cache = cache is not None
        T = input_ids.shape[1]
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be [batch, length] of 0/1; got shape "
                                 f"{tuple(attention_mask.shape)}")
            mask = attention_mask[:, -T:].to(torch.bool)

        padded = (mask is not None and not bool(mask.all())) or (cache is not None and cache.rows is not None)
        if padded:
            logits, rows = self._forward_rows(input_ids, mask, cache, use_cache, logits_to_keep)
            new_cache = FlameCache(rows=rows) if use_cache else None
        else:
            states = cache.states if cache is not None else None
            hidden, new_states = self.model.hidden_states(input_ids, states=states, use_cache=use_cache)
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            logits = self.model.logits(hidden)
            new_cache = FlameCache(states=new_states) if use_cache else None
        if new_cache is not None:
            new_cache.seen_tokens = (cache.seen_tokens if cache is not None else 0) + T
            if cache is not None:  # continue the caller's object, as transformers' caches do
                cache.states, cache.rows, cache.seen_tokens = new_cache.states, new_cache.rows, new_cache.seen_tokens
                new_cache = cache

        loss = None
        if labels is not None:
            shift = logits[:, :-1].float()
            loss = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: new_cache})

    def _forward_rows(self, input_ids, mask, cache, use_cache, logits_to_keep):
        """Each row on its own unpadded tokens; logits at padded positions are zero."""
        B, T = input_ids.shape
        if mask is None:
            mask = torch.ones_like(input_ids, dtype=torch.bool)
        if cache is not None and cache.rows is None:
            # a batched cache meets padding: split it into rows
            cache.rows = [FlameCache(states=_map_tensors(cache.states, lambda t, b=b: t[b:b + 1]))
                          for b in range(B)]
        logits = None
        rows = []
        for b in range(B):
            row_cache = cache.rows[b] if cache is not None else None
            ids = input_ids[b][mask[b]][None]
            states = row_cache.states if row_cache is not None else None
            if ids.shape[1]:
                hidden, states = self.model.hidden_states(ids, states=states, use_cache=use_cache)
                row_logits = self.model.logits(hidden)[0]
                if logits is None:
                    logits = row_logits.new_zeros(B, T, row_logits.shape[-1])
                logits[b, mask[b]] = row_logits
            rows.append(FlameCache(states=states))
        if logits is None:
            logits = self.model.logits(self.model.embeddings.weight.new_zeros(B, T, self.config.dim))
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return logits, rows

    # ---- generation ------------------------------------------------------------------------

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      use_cache=True, inputs_embeds=None, logits_to_keep=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if isinstance(cache, FlameCache) and cache.seen_tokens > 0:
            input_ids = input_ids[:, cache.seen_tokens:]  # only the tokens the cache has not seen
        inputs = {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask,
                  "use_cache": use_cache}
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    def _reorder_cache(self, cache, beam_idx):
        cache.reorder_cache(beam_idx)
        return cache
