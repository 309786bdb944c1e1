"""`HybridConfig`: a stack of mixer layers (attention, s4d, ema, mamba2, seqboat), each followed by a SwiGLU MLP."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

MIXER_KINDS = ("attention", "s4d", "ema", "mamba2", "seqboat")


def expand_layer_pattern(pattern: Any, num_layers: int) -> list[str]:
    """A comma-separated string or a list of kinds, repeated cyclically to `num_layers` entries."""
    if isinstance(pattern, str):
        kinds = [p.strip() for p in pattern.split(",") if p.strip()]
    else:
        kinds = [str(p).strip() for p in pattern]
    if not kinds:
        raise ValueError(f"layer_pattern is empty; give one or more of {list(MIXER_KINDS)}, e.g. 'mamba2,attention'")
    bad = sorted({k for k in kinds if k not in MIXER_KINDS})
    if bad:
        raise ValueError(f"layer_pattern: unknown mixer kind(s) {bad}; valid kinds are {list(MIXER_KINDS)}")
    return [kinds[i % len(kinds)] for i in range(num_layers)]


class HybridConfig(PretrainedConfig):
    model_type = "hetsp_hybrid"

    vocab_size: int = 256
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Mixer of every layer: "attention", "s4d", "ema", "mamba2", "seqboat"; repeated cyclically.
    layer_pattern: str | list[str] = "mamba2,attention"
    # S4D: number of complex modes is s4d_state_size / 2; init "lin" or "inv".
    s4d_state_size: int = 64
    s4d_init: str = "lin"
    s4d_dt_min: float = 1e-3
    s4d_dt_max: float = 1e-1
    # MEGA EMA (also inside SeqBoat): N expansion dimensions per channel.
    ema_dim: int = 16
    scan_chunk_size: int = 64
    # Mamba-2 block.
    mamba_d_state: int = 64
    mamba_head_dim: int = 64
    mamba_expand: int = 2
    mamba_n_groups: int = 1
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 64
    # SSD scan kernel: "hetsp" (models.kernels.ssd, Triton on CUDA) or "fla" (flash-linear-
    # attention's chunked kernels, CUDA only; choose it where bench/gpu_check.sh found it exact
    # and faster).
    ssd_kernel: str = "hetsp"
    # SeqBoat: local window over activated tokens, GAU query/key and value widths.
    seqboat_window: int = 1024
    seqboat_z_dim: int = 128
    seqboat_v_dim: int | None = None  # None: 2 * hidden_size

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.seqboat_v_dim is None:
            self.seqboat_v_dim = 2 * self.hidden_size
        if isinstance(self.layer_pattern, tuple):
            self.layer_pattern = list(self.layer_pattern)
        super().__post_init__(**kwargs)
        self.check()

    @property
    def layer_kinds(self) -> list[str]:
        return expand_layer_pattern(self.layer_pattern, self.num_hidden_layers)

    def check(self) -> None:
        """Raise ValueError naming the first inconsistent setting."""
        kinds = self.layer_kinds
        if self.hidden_size <= 0 or self.num_hidden_layers <= 0:
            raise ValueError("hidden_size and num_hidden_layers must be positive")
        if "attention" in kinds:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}); change one of them"
                )
            if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
                raise ValueError(
                    f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                    f"({self.num_key_value_heads}); change one of them"
                )
            if self.head_dim % 2:
                raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if "s4d" in kinds:
            if self.s4d_state_size < 2 or self.s4d_state_size % 2:
                raise ValueError(f"s4d_state_size ({self.s4d_state_size}) must be even (conjugate pairs of modes)")
            if self.s4d_init not in ("lin", "inv"):
                raise ValueError(f"s4d_init must be 'lin' or 'inv', got {self.s4d_init!r}")
            if not 0 < self.s4d_dt_min <= self.s4d_dt_max:
                raise ValueError(f"need 0 < s4d_dt_min <= s4d_dt_max, got {self.s4d_dt_min}, {self.s4d_dt_max}")
        if ("ema" in kinds or "seqboat" in kinds) and self.ema_dim <= 0:
            raise ValueError(f"ema_dim must be positive, got {self.ema_dim}")
        if "mamba2" in kinds:
            inner = self.mamba_expand * self.hidden_size
            if self.mamba_head_dim <= 0 or inner % self.mamba_head_dim:
                raise ValueError(
                    f"mamba_expand * hidden_size ({inner}) must be divisible by mamba_head_dim ({self.mamba_head_dim})"
                )
            heads = inner // self.mamba_head_dim
            if self.mamba_n_groups <= 0 or heads % self.mamba_n_groups:
                raise ValueError(
                    f"the Mamba-2 head count ({heads} = expand * hidden_size / head_dim) must be divisible by "
                    f"mamba_n_groups ({self.mamba_n_groups})"
                )
            if self.mamba_conv_kernel < 1:
                raise ValueError(f"mamba_conv_kernel must be at least 1, got {self.mamba_conv_kernel}")
        if "seqboat" in kinds:
            if self.seqboat_window <= 0:
                raise ValueError(
                    f"seqboat_window must be a positive number of activated tokens, got {self.seqboat_window}"
                )
            if self.seqboat_z_dim <= 0 or self.seqboat_z_dim % 2:
                raise ValueError(f"seqboat_z_dim must be positive and even (rotary), got {self.seqboat_z_dim}")
        if self.ssd_kernel not in ("hetsp", "fla"):
            raise ValueError(f"ssd_kernel must be 'hetsp' or 'fla', got {self.ssd_kernel!r}")
        for name in ("scan_chunk_size", "mamba_chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


__all__ = ["HybridConfig", "MIXER_KINDS", "expand_layer_pattern"]
