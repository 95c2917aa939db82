"""Hugging Face interop: flame models as `transformers` classes, and checkpoint conversion.

Importing this package registers FlameConfig / FlameForCausalLM with AutoConfig and
AutoModelForCausalLM (model_type "flame"), so that an exported folder loads with
`AutoModelForCausalLM.from_pretrained(path)` wherever flame is imported; without flame it loads
with `trust_remote_code=True` from the code written into the folder.

    python -m flame.convert to-hf --checkpoint <dump>/checkpoint/step-N --out <dir>
    python -m flame.convert from-hf --model <dir or hub id> --out <dump>/checkpoint/step-0
"""

from transformers import AutoConfig, AutoModelForCausalLM

from flame.hf.configuration_flame import FlameConfig
from flame.hf.modeling_flame import FlameCache, FlameForCausalLM

AutoConfig.register(FlameConfig.model_type, FlameConfig, exist_ok=True)
AutoModelForCausalLM.register(FlameConfig, FlameForCausalLM, exist_ok=True)

__all__ = ["FlameConfig", "FlameForCausalLM", "FlameCache"]
