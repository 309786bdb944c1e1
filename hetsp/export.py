"""`hetsp-export`: a DeepSpeed ZeRO checkpoint (stage 1, 2 or 3) to a Hugging Face model folder.

Expected files (as written by `hetsp.checkpoint.save`)::

    RUN/config.toml                          the run's hetsp config (the model section is used)
    RUN/checkpoints/latest                   DeepSpeed's pointer to the newest tag
    RUN/checkpoints/TAG/*_model_states.pt    DeepSpeed model states (shapes, buffers, shared params)
    RUN/checkpoints/TAG/*_optim_states.pt    one per rank: the fp32 master weights, partitioned
    RUN/checkpoints/TAG/hetsp_meta.json      {"vocab_size": int, "step": int, ...}

CHECKPOINT_DIR is ``RUN/checkpoints`` (the tag comes from ``--tag`` or the
``latest`` file) or one tag folder itself. ``config.toml`` is looked up in
the tag folder, then CHECKPOINT_DIR, then its parent (the run folder);
``hetsp_meta.json`` in the tag folder, then CHECKPOINT_DIR.

The fp32 master weights are consolidated with DeepSpeed's own
``zero_to_fp32`` reader, loaded into the model that
`hetsp.model_registry.build_model` builds from the config (on the meta
device, so no second copy is initialised) and written with
``save_pretrained`` (safetensors). ``AutoModelForCausalLM.from_pretrained``
loads the result; for families that `models/` registers with transformers
(e.g. ``hybrid``), import ``models`` first.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("hetsp.export")

DTYPES = ("float32", "bfloat16", "float16")


class ExportError(ValueError):
    """A checkpoint folder that cannot be exported as given; the message says what is missing."""


def resolve_checkpoint(checkpoint_dir: Path, tag: str | None) -> tuple[Path, str]:
    """(DeepSpeed checkpoint root, tag) for CHECKPOINT_DIR as given on the command line."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ExportError(f"checkpoint folder {checkpoint_dir} does not exist")
    if any(checkpoint_dir.glob("*_model_states.pt")):
        if tag is not None and tag != checkpoint_dir.name:
            raise ExportError(f"{checkpoint_dir} is the folder of tag {checkpoint_dir.name!r}, but --tag {tag!r} was given")
        return checkpoint_dir.parent, checkpoint_dir.name
    tags = sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir() and any(p.glob("*_model_states.pt")))
    if tag is None:
        latest = checkpoint_dir / "latest"
        if not latest.is_file():
            raise ExportError(
                f"{checkpoint_dir} has no 'latest' file; pass --tag (tags found: {tags or 'none'})"
            )
        tag = latest.read_text().strip()
    if not (checkpoint_dir / tag).is_dir():
        raise ExportError(f"tag {tag!r} not found in {checkpoint_dir} (tags found: {tags or 'none'})")
    if not any((checkpoint_dir / tag).glob("*_model_states.pt")):
        raise ExportError(f"{checkpoint_dir / tag} holds no DeepSpeed *_model_states.pt file")
    return checkpoint_dir, tag


def _first_file(name: str, folders: list[Path]) -> Path:
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    raise ExportError(f"{name} not found; looked in: {', '.join(str(f) for f in folders)}")


def read_meta(root: Path, tag: str) -> dict[str, Any]:
    path = _first_file("hetsp_meta.json", [root / tag, root])
    meta = json.loads(path.read_text())
    if not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] < 1:
        raise ExportError(f"{path}: 'vocab_size' must be a positive integer, got {meta.get('vocab_size')!r}")
    return meta


def read_config(root: Path, tag: str) -> Any:
    from hetsp.config import load_config

    return load_config(_first_file("config.toml", [root / tag, root, root.parent]))


def match_keys(state: dict[str, Any], expected: set[str]) -> dict[str, Any]:
    """`state` with its keys renamed to the model's, or ExportError naming the mismatch.

    A training wrapper may have put a prefix on every name (``module.``); it is stripped.
    """
    if set(state) == expected:
        return state
    for prefix in sorted({k.split(".", 1)[0] + "." for k in state}):
        if all(k.startswith(prefix) for k in state) and {k[len(prefix):] for k in state} == expected:
            log.info("stripping the prefix %r from every checkpoint key", prefix)
            return {k[len(prefix):]: v for k, v in state.items()}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    raise ExportError(
        "checkpoint parameters do not match the model built from config.toml: "
        f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
        f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. "
        "Was the checkpoint written with this config (model section) and vocab size?"
    )


def consolidate(root: Path, tag: str) -> dict[str, Any]:
    """The full fp32 state dict of a ZeRO 1/2/3 checkpoint (name -> CPU tensor)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not any((root / tag).glob("*_optim_states.pt")):
        raise ExportError(
            f"{root / tag} holds no *_optim_states.pt files: only ZeRO (stage 1, 2 or 3) checkpoints "
            "with optimizer states can be consolidated"
        )
    return dict(get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag))


LORA_OUTPUTS = ("merged", "adapter")


def export(checkpoint_dir: Path, out_dir: Path, tag: str | None = None, dtype: str = "float32",
           overwrite: bool = False, lora_output: str = "merged") -> Path:
    """Write a Hugging Face folder for the checkpoint; return `out_dir`.

    A LoRA run (``lora.r > 0``) is written as the merged model (base from ``model.init_from``
    plus the trained adapter) or, with ``lora_output = "adapter"``, as a peft adapter folder.
    """
    import torch

    from hetsp.model_registry import build_model

    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if lora_output not in LORA_OUTPUTS:
        raise ExportError(f"lora_output must be one of {LORA_OUTPUTS}, got {lora_output!r}")
    root, tag = resolve_checkpoint(Path(checkpoint_dir), tag)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"output folder {out_dir} exists and is not empty; choose another or pass --overwrite")
    meta = read_meta(root, tag)
    cfg = read_config(root, tag)
    log.info("exporting %s (tag %s, step %s, model family %s)", root, tag, meta.get("step"), cfg.model.family)

    state = consolidate(root, tag)
    torch_dtype = getattr(torch, dtype)
    bkspc = bkspc_id_of(cfg, meta["vocab_size"])
    if cfg.lora.r > 0:
        from hetsp.lora import lora_model_for_export

        model = lora_model_for_export(cfg, state, merge=lora_output == "merged", vocab_size=meta["vocab_size"], bkspc=bkspc)
        if lora_output == "adapter":
            out_dir.mkdir(parents=True, exist_ok=True)
            # a SequenceMatch adapter carries its <bkspc> rows as trainable tokens, not the whole embedding
            model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
            _export_tokenizer(cfg.data.tokenizer, out_dir, bkspc=bkspc is not None)
            _write_info(out_dir, root, tag, meta, dtype, cfg.data.tokenizer, lora_output, bkspc)
            log.info("wrote the LoRA adapter to %s", out_dir)
            return out_dir
        model = model.to(torch_dtype)
    else:
        model = build_model(cfg.model, meta["vocab_size"], device="meta")
        if bkspc is not None and model.config.vocab_size < meta["vocab_size"]:
            # a SequenceMatch run from model.init_from: the run added the <bkspc> row to the checkpoint's shape
            model.resize_token_embeddings(meta["vocab_size"], mean_resizing=False)
        state = match_keys(state, set(model.state_dict()))
        state = {k: v.to(torch_dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (rotary frequencies) stay on the meta device: they are not saved,
    # and from_pretrained recomputes them from the config.
    model.config.dtype = torch_dtype
    if bkspc is not None:
        model.config.bkspc_token_id = bkspc
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    _export_tokenizer(cfg.data.tokenizer, out_dir, bkspc=bkspc is not None)
    _write_info(out_dir, root, tag, meta, dtype, cfg.data.tokenizer, lora_output if cfg.lora.r > 0 else None, bkspc)
    log.info("wrote %s", out_dir)
    return out_dir


def bkspc_id_of(cfg: Any, vocab_size: int) -> int | None:
    """The `<bkspc>` id of a SequenceMatch run (None for other objectives): the id its tokenizer gets
    from `add_bkspc`, which must be a row of the checkpoint's `vocab_size` rows."""
    if cfg.train.objective != "sequencematch":
        return None
    from hetsp.data.tokenizer import add_bkspc, load_tokenizer

    try:
        bkspc = add_bkspc(load_tokenizer(cfg.data.tokenizer)).bkspc_token_id
    except ValueError as e:
        raise ExportError(f"the run trained with <bkspc> but its tokenizer cannot be loaded to add it: {e}") from None
    if not 0 <= bkspc < vocab_size:
        raise ExportError(f"the run's <bkspc> id {bkspc} is not one of the checkpoint's {vocab_size} rows")
    return bkspc


def _write_info(out_dir: Path, root: Path, tag: str, meta: dict, dtype: str, tokenizer: str, lora: str | None,
                bkspc: int | None = None) -> None:
    """hetsp_export.json: where the folder came from; "tokenizer" is "bytes" when there are no tokenizer
    files (so data.tokenizer = "model" resolves to the byte tokenizer when fine-tuning it);
    "bkspc_token_id" for a SequenceMatch run (also in config.json)."""
    info = {"source": str(root.resolve()), "tag": tag, "meta": meta, "dtype": dtype,
            "tokenizer": "bytes" if tokenizer == "bytes" else "files"}
    if lora is not None:
        info["lora"] = lora
    if bkspc is not None:
        info["bkspc_token_id"] = bkspc
    (out_dir / "hetsp_export.json").write_text(json.dumps(info, indent=1))


def _export_tokenizer(tokenizer: str, out_dir: Path, bkspc: bool = False) -> None:
    """Copy a transformers tokenizer folder next to the model (with `<bkspc>` added as a special token
    when `bkspc`); the built-in byte tokenizer has no files (its `<bkspc>` is id 259)."""
    if tokenizer == "bytes":
        log.info("data.tokenizer is the built-in byte-level tokenizer: no tokenizer files are written")
        return
    if not Path(tokenizer).is_dir():
        log.warning("data.tokenizer %r is not a local folder: no tokenizer files are written", tokenizer)
        return
    from hetsp.data.tokenizer import add_bkspc, load_tokenizer

    tok = load_tokenizer(tokenizer)
    if bkspc:
        add_bkspc(tok)
    tok.hf.save_pretrained(out_dir)
    log.info("copied the tokenizer from %s%s", tokenizer, " with <bkspc>" if bkspc else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hetsp-export",
        description="Turn a hetsp DeepSpeed checkpoint (ZeRO 1, 2 or 3) into a Hugging Face model folder.",
    )
    parser.add_argument("checkpoint_dir", type=Path, help="RUN/checkpoints, or one tag folder inside it")
    parser.add_argument("out_dir", type=Path, help="folder to write (config.json, model.safetensors)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one named in 'latest')")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    parser.add_argument("--lora-output", default="merged", choices=LORA_OUTPUTS,
                        help="LoRA runs: the merged model (default) or the adapter folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from hetsp.config import ConfigError

    try:
        out = export(args.checkpoint_dir, args.out_dir, tag=args.tag, dtype=args.dtype, overwrite=args.overwrite,
                     lora_output=args.lora_output)
    except (ExportError, ConfigError, NotImplementedError) as e:
        print(f"hetsp-export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
