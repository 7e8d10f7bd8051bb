"""Why a codec costs more on one model than another: the geometry of each layer's keys and the attention-logit
error their codes cause.

    python benchmarks/key_geometry.py --model gemma3-270m --codec fibquant:3 --length 1000

For every layer that holds the whole prompt (sliding-window layers are left out), on one corpus window: the
mean key norm, the norm of the keys' mean (a direction every key shares, which the softmax ignores), the
codec's relative squared error of keys and values, and the error its key codes put into the attention logits
of the last 8 queries (each query's constant shift removed: the softmax ignores it), for the keys as they are,
centred on their plain mean and on their attention-weighted mean (the cache's key shift,
:mod:`pyramidkv.cache.centring`), beside the logits' own spread: its std over every key, and its root mean
square under the queries' attention (the error on the keys attended, which is what moves the output). Writes
benchmarks/results/key_geometry_<model>.json.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

import machine  # sibling script
from pyramidkv.cache.centring import attended_mean
from pyramidkv.codecs.registry import make_codecs, parse_codec
from pyramidkv.eval.corpus import shuffled_paragraphs
from pyramidkv.eval.prefill import prefill
from pyramidkv.eval.results import write_json
from pyramidkv.models import load

RESULTS = Path(__file__).parent / "results"
QUERIES = 8


def logit_error(
    codec, keys: torch.Tensor, shift: torch.Tensor, queries: torch.Tensor, logits: torch.Tensor
) -> tuple[float, float]:
    """The error of the logits when ``keys`` minus ``shift`` are stored by ``codec`` (each query's constant
    removed): its std over every key, and its root mean square under the queries' own attention (the error on
    the keys attended, which moves the output)."""
    decoded = codec.decode(codec.encode(keys - shift), torch.float32) + shift
    error = queries @ decoded.transpose(-1, -2) - logits
    error = error - error.mean(-1, keepdim=True)
    attended = (logits.softmax(-1) * error.square()).sum(-1).mean().sqrt()
    return float(error.std()), float(attended)


def measure(model, tokenizer, codec_name: str, length: int) -> list[dict]:
    ids = tokenizer(" ".join(shuffled_paragraphs(0)), return_tensors="pt")["input_ids"][:, :length]
    captured = prefill(model, ids.to(model.device))
    dim = model.config.get_text_config().head_dim
    name, bits = parse_codec(codec_name)
    codecs = make_codecs(name, dim, bits)
    rows = []
    for index, (keys, values, queries) in enumerate(
        zip(captured.keys, captured.values, captured.queries, strict=True)
    ):
        if keys.shape[-2] < ids.shape[1]:  # a sliding-window layer: its window only
            continue
        keys, values, queries = keys.float(), values.float(), queries.float()
        heads = keys.shape[1]
        group = queries.shape[1] // heads
        q = queries[:, :, -QUERIES:].reshape(1, heads, group * QUERIES, dim) * captured.scaling
        logits = q @ keys.transpose(-1, -2)
        mean = keys.mean(dim=-2, keepdim=True)
        valid = torch.ones(1, keys.shape[-2], dtype=torch.bool)
        attended = attended_mean(keys, queries[:, :, -QUERIES:], valid, captured.scaling)
        errors = {
            name: logit_error(codecs.keys, keys, shift, q, logits)
            for name, shift in (
                ("", torch.zeros_like(mean)),
                ("_centred", mean),
                ("_shifted", attended),
            )
        }

        def relative(codec, x):
            decoded = codec.decode(codec.encode(x), torch.float32)
            return float(((decoded - x).square().sum(-1) / x.square().sum(-1)).mean())

        rows.append(
            {
                "layer": index,
                "key_norm": float(keys.norm(dim=-1).mean()),
                "mean_key_norm": float(mean.norm(dim=-1).mean()),
                "key_relative_error": relative(codecs.keys, keys),
                "value_relative_error": relative(codecs.values, values),
                "logit_spread": float(logits.std(-1).mean()),
                "attended_shift_norm": float(attended.norm(dim=-1).mean()),
                **{f"logit_error{name}": error[0] for name, error in errors.items()},
                **{f"attended_logit_error{name}": error[1] for name, error in errors.items()},
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model (default: the embedded SmolLM2)")
    parser.add_argument("--codec", default="fibquant:3")
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    model, tokenizer = load(args.model, device="cpu")
    rows = measure(model, tokenizer, args.codec, args.length)
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.model or "smollm2")
    record = {
        **machine.header(
            "key geometry and the logit error of key codes", "key_geometry.py", argv, None
        ),
        "model": args.model or "embedded SmolLM2-135M-Instruct",
        "codec": args.codec,
        "length": args.length,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"key_geometry_{label}.json"
    write_json(path, record)
    for row in rows:
        print(
            f"layer {row['layer']:2d}: |k| {row['key_norm']:6.1f} (mean {row['mean_key_norm']:6.1f})  "
            f"rel. error k {row['key_relative_error']:.4f} v {row['value_relative_error']:.4f}  logit error "
            f"{row['logit_error']:.3f} (mean-centred {row['logit_error_centred']:.3f}, attention-centred "
            f"{row['logit_error_shifted']:.3f}) of spread {row['logit_spread']:.3f}; on the keys attended "
            f"{row['attended_logit_error']:.3f} / {row['attended_logit_error_centred']:.3f} / "
            f"{row['attended_logit_error_shifted']:.3f}"
        )
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
