"""flame: pretraining linear-attention and hybrid language models."""

__version__ = "0.1.0"

# Importing flame registers its models with transformers' AutoConfig / AutoModelForCausalLM.
from flame import hf as _hf  # noqa: E402,F401
