"""Model FLOPs, device peak FLOPs and model FLOPs utilisation (MFU).

Model FLOPs follow the PaLM accounting (Chowdhery et al. 2022, appendix B):
per token of a sequence of length T, ``6 N + 12 L H Q T`` for forward and
backward, where N is the parameter count without the input embedding
(a lookup, not a matmul), L the number of attention layers, H the heads and
Q the head dimension. The attention term counts the full T x T score matrix
even under a causal mask, as PaLM, Megatron and nanoGPT report it.
Activation recomputation is not counted (that would be hardware FLOPs).

Peak FLOPs are dense bf16/fp16 tensor-core figures from the vendors' data
sheets, looked up by device name; an unknown device (or CPU, or another
dtype) gives None and MFU is then not reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from hetsp.metrics.device import device_name

# Dense (no sparsity) bf16 tensor-core peak per device, FLOP/s. Checked against
# NVIDIA's and AMD's data sheets; keys are matched case-insensitively as
# substrings of torch.cuda.get_device_name(), most specific first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4e12),
    ("H200 NVL", 835.5e12),
    ("H200", 989.4e12),  # SXM
    ("H100 NVL", 835.5e12),
    ("H100 PCIe", 756.5e12),
    ("H100", 989.4e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),  # SXM and PCIe, 40 and 80 GB
    ("A800", 312e12),
    ("L40S", 362.05e12),
    ("L40", 181.05e12),
    ("L4", 121e12),
    ("MI300X", 1307.4e12),
    ("MI250X", 383e12),
)
PEAK_DTYPES = ("bf16", "bfloat16", "fp16", "float16")


def peak_flops(device: Any, dtype: str = "bf16") -> float | None:
    """Peak dense FLOP/s of one `device` (torch.device, "cuda:0", or a device name) for `dtype`.

    None when the device is a CPU, the name is not in `PEAK_BF16_FLOPS`, or
    `dtype` is not bf16/fp16 (tensor-core fp32/tf32 peaks are not tabled).
    """
    if str(dtype).replace("torch.", "") not in PEAK_DTYPES:
        return None
    name = device_name(device)
    if not name:
        return None
    lowered = name.lower()
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in lowered:
            return flops
    return None


@dataclass(frozen=True)
class ModelFlops:
    """Training FLOPs of a model: ``dense_per_token + attn_per_token_per_ctx * T`` per token.

    dense_per_token: 6 N (N: parameters without the input embedding).
    attn_per_token_per_ctx: 12 L H Q (L attention layers, H heads of dimension Q).
    """

    dense_per_token: float
    attn_per_token_per_ctx: float

    def per_token(self, seq_len: int) -> float:
        """FLOPs of one token of a sequence of `seq_len` tokens (forward and backward)."""
        return self.dense_per_token + self.attn_per_token_per_ctx * seq_len

    def for_lengths(self, lengths: Sequence[int]) -> float:
        """FLOPs of a batch of sequences of these lengths: sum over sequences of s * per_token(s)."""
        total_tokens = sum(lengths)
        return self.dense_per_token * total_tokens + self.attn_per_token_per_ctx * sum(s * s for s in lengths)

    @classmethod
    def from_param_count(cls, num_params: int, num_attention_layers: int = 0, attn_dim: int = 0) -> "ModelFlops":
        """From a parameter count (already without the input embedding) and the attention shape."""
        return cls(6.0 * num_params, 12.0 * num_attention_layers * attn_dim)

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "ModelFlops":
        """From a transformers config: the model is built on the meta device to count parameters.

        See `from_model` for what counts as an attention layer.
        """
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        return cls.from_model(model, hf_config)

    @classmethod
    def from_model(cls, model: Any, hf_config: Any | None = None, num_attention_layers: int | None = None) -> "ModelFlops":
        """From a built model (any device, meta included).

        Attention layers (when `num_attention_layers` is not given) are the outermost
        modules whose class name contains "Attention" (LlamaAttention, BambaAttention,
        the hybrid models' AttentionMixer); SSM and convolution mixers contribute through
        their parameters only (their scans are linear in T and not counted).
        """
        hf_config = hf_config if hf_config is not None else model.config
        seen: set[int] = set()
        num_params = 0
        for p in model.parameters():  # parameters() already skips tied duplicates
            if id(p) not in seen:
                seen.add(id(p))
                num_params += p.numel()
        embed = model.get_input_embeddings()
        output = model.get_output_embeddings()
        if embed is not None and (output is None or output.weight is not embed.weight):
            num_params -= embed.weight.numel()
        if num_attention_layers is None:
            num_attention_layers = _count_attention_modules(model)
        num_heads = getattr(hf_config, "num_attention_heads", 0) or 0
        head_dim = getattr(hf_config, "head_dim", None) or (hf_config.hidden_size // num_heads if num_heads else 0)
        return cls.from_param_count(num_params, num_attention_layers, num_heads * head_dim)


def _count_attention_modules(model: Any) -> int:
    count = 0
    inside: list[str] = []  # names of attention modules already counted (skip their children)
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if "Attention" in type(module).__name__:
            inside.append(name)
            count += 1
    return count


def model_flops_per_token(hf_config_or_param_count: Any, seq_len: int) -> float:
    """Training FLOPs per token at `seq_len` (6N + 12 L H Q T; 6N alone for a bare parameter count)."""
    if isinstance(hf_config_or_param_count, (int, float)):
        return ModelFlops.from_param_count(int(hf_config_or_param_count)).per_token(seq_len)
    return ModelFlops.from_hf_config(hf_config_or_param_count).per_token(seq_len)


def mfu(model_flops: float, seconds: float, num_ranks: int, peak_flops_per_rank: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved FLOP/s over the ranks' summed peak; None when the peak is unknown."""
    if peak_flops_per_rank is None or peak_flops_per_rank <= 0 or seconds <= 0 or num_ranks < 1:
        return None
    return model_flops / seconds / (num_ranks * peak_flops_per_rank)
