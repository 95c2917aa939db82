"""ModelConfig: the `[model]` section of a flame TOML file, one field per key.

A model is a stack of identical blocks (norm -> token mixer -> residual -> norm -> SwiGLU MLP ->
residual) that differ only in their token mixer. `mixer` names it for every layer, or is a list
with one name per layer; `attn_layers` turns the listed layers into softmax attention, which is
the short way to write a hybrid (`mixer = "gated_deltanet"`, `attn_layers = [3, 7, 11]`).

Head sizes. Softmax attention uses `attn_n_heads` (default `n_heads`), `n_kv_heads` (grouped-query
attention; default: as many as query heads) and `attn_head_dim` (default `dim // attn_n_heads`).
The linear mixers use `n_heads` heads with query/key head size `head_dim` (default
`dim // n_heads`) and value head size `head_dim * expand_v`. For mamba2, `head_dim` is the SSM
state size N (B and C are shared by all heads, one group) and `head_dim * expand_v` is the
per-head channel count P, so `n_heads * head_dim * expand_v` is Mamba2's inner width.
"""

from dataclasses import dataclass, field, fields

# Token mixers, one file each in flame/models/mixers/.
MIXERS = ("attention", "gated_deltanet", "gla", "deltanet", "retnet", "mamba2")
LINEAR_MIXERS = tuple(m for m in MIXERS if m != "attention")

# The chunked kernels keep one [K, V] state tile per head in on-chip memory and feed K and V to
# tensor-core matmuls: both must be multiples of 16 and at most 256.
KERNEL_HEAD_DIM_MULTIPLE = 16
KERNEL_MAX_HEAD_DIM = 256
# SDPA's flash and memory-efficient backends take head sizes that are multiples of 8, up to 256.
ATTN_HEAD_DIM_MULTIPLE = 8
ATTN_MAX_HEAD_DIM = 256


@dataclass
class ModelConfig:
    # Which token mixer each layer uses: one name for all layers, or one name per layer.
    mixer: str | list[str] = "attention"
    # Layers (0-based) that use softmax attention whatever `mixer` says: hybrids.
    attn_layers: list[int] = field(default_factory=list)

    vocab_size: int = 32000
    dim: int = 1024
    n_layers: int = 24
    tie_embeddings: bool = False

    # SwiGLU MLP: hidden size `mlp_hidden_dim`, or by default mlp_ratio * dim rounded up to a
    # multiple of `mlp_multiple_of` (8/3 * dim keeps the parameter count of a 4x GELU MLP).
    mlp_hidden_dim: int | None = None
    mlp_ratio: float = 8 / 3
    mlp_multiple_of: int = 256

    # Linear-attention mixers.
    n_heads: int = 16
    head_dim: int | None = None
    expand_v: float = 1.0
    conv_size: int = 4  # short causal convolution on q, k, v (mamba2: on x, B, C)
    use_short_conv: bool = True
    gate_low_rank_dim: int = 16  # GLA: rank of the forget-gate projection
    gate_logit_normalizer: float = 16.0  # GLA: log-gate = logsigmoid(.) / normalizer

    # Softmax attention.
    attn_n_heads: int | None = None
    n_kv_heads: int | None = None
    attn_head_dim: int | None = None
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # each token sees itself and the previous W - 1 tokens

    norm_eps: float = 1e-6
    # Every weight matrix is drawn from N(0, init_std); the output projections of mixers and
    # MLPs (those that write into the residual stream) use init_std / sqrt(2 * n_layers).
    init_std: float = 0.02

    # ---- derived values -------------------------------------------------------------------

    def layer_mixers(self) -> list[str]:
        """The token mixer of every layer, after `attn_layers` is applied."""
        names = list(self.mixer) if isinstance(self.mixer, list) else [self.mixer] * self.n_layers
        for i in self.attn_layers:
            if 0 <= i < len(names):
                names[i] = "attention"
        return names

    @property
    def linear_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def linear_v_head_dim(self) -> int:
        return int(self.linear_head_dim * self.expand_v)

    @property
    def attn_heads(self) -> int:
        return self.attn_n_heads if self.attn_n_heads is not None else self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.attn_heads

    @property
    def attn_dim_per_head(self) -> int:
        return self.attn_head_dim if self.attn_head_dim is not None else self.dim // self.attn_heads

    @property
    def mlp_hidden(self) -> int:
        if self.mlp_hidden_dim is not None:
            return self.mlp_hidden_dim
        hidden = int(self.mlp_ratio * self.dim)
        m = self.mlp_multiple_of
        return m * ((hidden + m - 1) // m)

    # ---- checks ---------------------------------------------------------------------------

    def validate(self) -> "ModelConfig":
        """Raise ValueError, naming the key and what to change, for a model that cannot be built."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "conv_size", "mlp_multiple_of",
                     "gate_low_rank_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} = {value!r}: must be a positive integer")
        for name in ("head_dim", "attn_n_heads", "n_kv_heads", "attn_head_dim", "mlp_hidden_dim",
                     "sliding_window"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"model.{name} = {value!r}: must be a positive integer or left unset")
        for name in ("expand_v", "mlp_ratio", "init_std", "norm_eps", "rope_theta",
                     "gate_logit_normalizer"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} = {value!r}: must be a positive number")

        if isinstance(self.mixer, list):
            if len(self.mixer) != self.n_layers:
                raise ValueError(
                    f"model.mixer lists {len(self.mixer)} mixers but model.n_layers = {self.n_layers}; "
                    "give one mixer name per layer, or a single name for all layers")
            names = self.mixer
        elif isinstance(self.mixer, str):
            names = [self.mixer]
        else:
            raise ValueError(f"model.mixer = {self.mixer!r}: must be a mixer name or a list of names")
        for name in names:
            if name not in MIXERS:
                raise ValueError(f"model.mixer: unknown mixer {name!r}; valid mixers are {', '.join(MIXERS)}")
        for i in self.attn_layers:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.n_layers:
                raise ValueError(
                    f"model.attn_layers: {i!r} is not a layer index in 0..{self.n_layers - 1}")
        if len(set(self.attn_layers)) != len(self.attn_layers):
            raise ValueError(f"model.attn_layers = {self.attn_layers}: lists a layer twice")

        used = set(self.layer_mixers())
        if used & set(LINEAR_MIXERS):
            self._check_linear(used)
        if "attention" in used:
            self._check_attention()
        return self

    def _check_linear(self, used: set[str]) -> None:
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(
                f"model.n_heads = {self.n_heads} does not divide model.dim = {self.dim}; "
                "pick a head count that divides dim, or set model.head_dim explicitly")
        k, v = self.linear_head_dim, self.linear_head_dim * self.expand_v
        if v != int(v):
            raise ValueError(
                f"model.expand_v = {self.expand_v} gives a value head size of {v} "
                f"(head_dim {k} x expand_v); choose expand_v so that it is an integer")
        for what, size in (("head_dim (query/key head size)", k), ("head_dim * expand_v (value head size)", int(v))):
            if size % KERNEL_HEAD_DIM_MULTIPLE or size > KERNEL_MAX_HEAD_DIM:
                raise ValueError(
                    f"model.{what} = {size}: the chunked kernels support multiples of "
                    f"{KERNEL_HEAD_DIM_MULTIPLE} up to {KERNEL_MAX_HEAD_DIM}; change model.n_heads, "
                    "model.head_dim or model.expand_v")
        if self.use_short_conv and self.conv_size < 2:
            raise ValueError(f"model.conv_size = {self.conv_size}: a short convolution needs at least 2 taps "
                             "(or set model.use_short_conv = false)")

    def _check_attention(self) -> None:
        heads, kv = self.attn_heads, self.kv_heads
        if self.attn_head_dim is None and self.dim % heads:
            raise ValueError(
                f"model.attn_n_heads (default model.n_heads) = {heads} does not divide model.dim = "
                f"{self.dim}; pick a head count that divides dim, or set model.attn_head_dim")
        if heads % kv:
            raise ValueError(
                f"model.n_kv_heads = {kv} does not divide the {heads} attention heads; "
                "grouped-query attention needs n_kv_heads to divide attn_n_heads")
        d = self.attn_dim_per_head
        if d % ATTN_HEAD_DIM_MULTIPLE or d > ATTN_MAX_HEAD_DIM or d % 2:
            raise ValueError(
                f"model.attn_head_dim = {d}: attention supports even multiples of {ATTN_HEAD_DIM_MULTIPLE} "
                f"up to {ATTN_MAX_HEAD_DIM}; change model.attn_n_heads or model.attn_head_dim")

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """Build from a `[model]` table; unknown keys are a ValueError naming the valid ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"[model]: unknown key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**values).validate()
