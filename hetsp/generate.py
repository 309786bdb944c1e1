"""`hetsp-generate MODEL_OR_RUN --prompt TEXT [--max-new-tokens N] [--temperature T]`: a quick look at a model.

MODEL_OR_RUN is an exported Hugging Face folder (`hetsp-export`, or any folder with config.json
and safetensors), a peft adapter folder (`hetsp-export --lora-output adapter`; its base model is
read from adapter_config.json), or a run folder / its checkpoints folder, whose latest checkpoint
is consolidated first (as `hetsp-export` does, into a temporary folder). One process, stock
attention, transformers' `generate` with the model's cache. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("hetsp.generate")


def _is_checkpoint_folder(path: Path) -> bool:
    return (path / "checkpoints" / "latest").is_file() or (path / "latest").is_file() or any(path.glob("*_model_states.pt"))


def _tokenizer_for(folder: Path, fallback: Path | None = None) -> Any:
    from hetsp.data import load_tokenizer
    from hetsp.loading import TOKENIZER_FILES

    for f in [folder] + ([fallback] if fallback else []):
        if any((f / name).is_file() for name in TOKENIZER_FILES):
            return load_tokenizer(str(f))
        info = f / "hetsp_export.json"
        if info.is_file() and json.loads(info.read_text()).get("tokenizer") == "bytes":
            return load_tokenizer("bytes")
    raise ValueError(f"{folder} has no tokenizer files and no hetsp_export.json naming the byte tokenizer")


def _from_pretrained(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    from hetsp.loading import _import_family, checkpoint_config, family_of

    _import_family(family_of(checkpoint_config(str(folder)), str(folder / "config.json")))
    return AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)


def load_for_generation(path: str | Path) -> tuple[Any, Any]:
    """(model in eval mode, hetsp tokenizer) for MODEL_OR_RUN."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: no such folder (give an exported model folder or a run folder)")
    if _is_checkpoint_folder(path):
        from hetsp.export import export

        ckpt = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        with tempfile.TemporaryDirectory(prefix="hetsp_generate_") as tmp:
            export(ckpt, Path(tmp), overwrite=True)
            model, tokenizer = _from_pretrained(Path(tmp)), _tokenizer_for(Path(tmp))
    elif (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = Path(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])
        model = _from_pretrained(base)
        info = path / "hetsp_export.json"
        vocab = json.loads(info.read_text())["meta"]["vocab_size"] if info.is_file() else 0
        if vocab > model.config.vocab_size:  # a SequenceMatch adapter: its <bkspc> rows are trainable tokens
            model.resize_token_embeddings(vocab, mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        tokenizer = _tokenizer_for(path, base)
    elif (path / "config.json").is_file():
        model, tokenizer = _from_pretrained(path), _tokenizer_for(path)
    else:
        raise ValueError(f"{path} is neither a model folder (config.json), an adapter folder, nor a run with checkpoints")
    return model.eval(), tokenizer


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, top_p: float = 1.0) -> str:
    """The text the model appends to `prompt` (transformers' `generate` with its cache; stops at eos).

    Temperature 0 is greedy; otherwise sampling from softmax(logits / T) (no top-k), restricted to
    the smallest set of tokens of probability >= `top_p` (1: no restriction).
    """
    import torch

    if temperature < 0:
        raise ValueError(f"--temperature {temperature}: must be >= 0 (0 is greedy)")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("--prompt is empty")
    limit = getattr(model.config, "max_position_embeddings", None) or len(ids) + max_new_tokens
    max_new_tokens = min(max_new_tokens, max(0, limit - len(ids)))
    rows = model.config.vocab_size
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p {top_p}: must be in (0, 1]")
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            # rows of the embedding past the tokenizer's ids are never produced
            suppress_tokens=list(range(tokenizer.vocab_size, rows)) or None, **sampling,
        )
    new = [t for t in out[0, len(ids):].tolist() if t != tokenizer.eos_token_id]
    return tokenizer.decode(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hetsp-generate", description=__doc__.split("\n")[0])
    parser.add_argument("model_or_run", help="exported model folder, adapter folder, or run folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: the whole distribution)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        model, tokenizer = load_for_generation(args.model_or_run)
        text = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed,
                        top_p=args.top_p)
    except (ValueError, NotImplementedError) as e:
        print(f"hetsp-generate: error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
