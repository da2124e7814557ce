"""A causal LM with a real model's tokenizer and architecture but random weights, for speed and memory.

    python -m benchmarks.random_model --like smollm2-135m-instruct --out DIR/smollm2-like      # same shape
    python -m benchmarks.random_model --like DIR --out DIR/1.7b --set hidden_size=2048 \
        --set intermediate_size=8192 --set num_hidden_layers=24 --set num_attention_heads=32 --set num_key_value_heads=32

Step times and memory depend on the shapes, not on the weights' values, so such a model measures
what the real one would where its weights cannot be fetched (an offline GPU machine). Sampling is
the exception: random weights rarely emit EOS, so completions run to their length limit in both
tools (the same work for each, longer than a trained model's answers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def build(like: str, out: Path, overrides: dict[str, object], dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Write `like`'s tokenizer and its config with `overrides` applied, and random weights (std 0.02)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhfkit.models import load_tokenizer, resolve

    source = resolve(like)
    tokenizer = load_tokenizer(source)
    config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise SystemExit(f"--set {key}: {type(config).__name__} has no such field")
        setattr(config, key, value)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialise on the GPU where there is one: minutes on a CPU for billions of weights
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {type(model).__name__}, {parameters / 1e6:.1f}M parameters, {dtype}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--like", required=True, help="a model reference rlhfkit resolves (name, directory, .gguf)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="config field to change (YAML value)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, separator, value = item.partition("=")
        if not separator:
            raise SystemExit(f"--set {item}: expected FIELD=VALUE")
        overrides[key] = yaml.safe_load(value)
    build(args.like, args.out, overrides, args.dtype)


if __name__ == "__main__":
    main()
