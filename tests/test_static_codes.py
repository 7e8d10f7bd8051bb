"""The static cache over codes (static_codes.py) against references written here in plain torch.

The semantics under test: the tokens the source holds as codes stay codes; every token after them is exact
while it is among the last ``residual`` tokens and a code (``codec.encode`` then ``codec.decode``) once it is
older. The references build exactly that, the slow obvious way: at every step they re-encode every old
token and concatenate. The layer-level reference attends in float64, one (row, head) at a time; the
model-level one runs each row alone through a cache layer that returns those keys and values to the
model's own SDPA attention. Tokens are fed by teacher forcing (the static cache's greedy choices), so a
difference shows in the logits of the step it happens, not as a diverged continuation.
"""

from __future__ import annotations

import contextvars
import os

import pytest
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.codecs import FibQuant, TurboQuant
from pyramidkv.codecs.registry import make_codecs
from pyramidkv.static.cache import DecodeStep, StaticCompressedCache
from pyramidkv.static.coded import Encoder, StaticCodedLayer
from pyramidkv.static.graph import capture

from .conftest import make_tiny
from .test_static_cache import ROWS, _batch, replay_on_the_cpu  # the same batch and replay

RESIDUAL = 4
STEPS = 9
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


@pytest.fixture(autouse=True, scope="module")
def _codebooks_in_tmp(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYRAMIDKV_CACHE_DIR", str(tmp_path_factory.mktemp("codebooks")))
        yield


@pytest.mark.parametrize(
    "codec",
    [
        lambda: FibQuant(16, bits=2),  # k = 4, 8-bit indices
        lambda: FibQuant(16, bits=3),  # k = 2, 6-bit indices straddling bytes
        lambda: TurboQuant(16, 2),
        lambda: TurboQuant(16, 3),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_encoder_writes_the_codecs_codes(codec, dtype):
    codec = codec()
    x = (torch.randn(3, 2, 7, 16, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    x[0, 0, 0] = 0.0  # a zero vector: norm 0, some codeword
    indices, norms = Encoder(codec, x.device, dtype)(x)
    want = codec.encode(x)
    assert indices.dtype == torch.uint8 and torch.equal(indices, want.indices)
    assert torch.equal(norms, want.norms)


# ---------------------------------------------------------------------------------------------------
# one layer driven by random tensors


def _attention_reference(query, prefix, stream, codecs, scaling, device):
    """(batch, 1, q_heads, d) float64: each query over its row's ``prefix`` (a list per (b, h) of (keys,
    values) float64) then ``stream`` (b, kv, n, d), the last RESIDUAL exact, the older through the codec
    (encoded on ``device``, whose float32 arithmetic decides a near-tie of two codewords)."""
    stream_k, stream_v = stream
    old = max(0, stream_k.shape[2] - RESIDUAL)
    coded_k, coded_v = (
        codec.decode(codec.encode(s[:, :, :old].to(device)), torch.float64).cpu()
        for codec, s in ((codecs.keys, stream_k), (codecs.values, stream_v))
    )
    batch, q_heads, _, dim = query.shape
    groups = q_heads // stream_k.shape[1]
    out = torch.empty(batch, 1, q_heads, dim, dtype=torch.float64)
    for b in range(batch):
        for head in range(q_heads):
            h = head // groups
            prefix_k, prefix_v = prefix[b][h]
            keys = torch.cat([prefix_k, coded_k[b, h], stream_k[b, h, old:].double()])
            values = torch.cat([prefix_v, coded_v[b, h], stream_v[b, h, old:].double()])
            weights = torch.softmax(keys @ query[b, head, 0].double() * scaling, dim=0)
            out[b, 0, head] = weights @ values
    return out


def _drive_layer(codec: str, held: int, device: str, fused: bool, dim: int = 16):
    """A layer built from random codes of ragged rows (one row holds none) and ``held`` window tokens,
    decoded STEPS steps: (got, want) attention per step. ``codec`` "name:key_bits/value_bits" or "name:bits"."""
    batch, kv_heads, groups, width = 3, 2, 2, 12
    generator = torch.Generator().manual_seed(held)
    name, _, bits = codec.partition(":")
    key_bits, _, value_bits = bits.partition("/")
    codecs = make_codecs(
        name, dim, key_bits=float(key_bits), value_bits=float(value_bits or key_bits)
    )
    lengths = torch.tensor([[12, 9], [5, 1], [0, 3]])
    prompt_k, prompt_v = (
        torch.randn(batch, kv_heads, width, dim, generator=generator) for _ in range(2)
    )
    codes_k, codes_v = codecs.keys.encode(prompt_k), codecs.values.encode(prompt_v)
    decoded_k = codecs.keys.decode(codes_k, torch.float64)
    decoded_v = codecs.values.decode(codes_v, torch.float64)
    prefix = [
        [(decoded_k[b, h, : lengths[b, h]], decoded_v[b, h, : lengths[b, h]]) for h in range(2)]
        for b in range(batch)
    ]
    stream = [torch.randn(batch, kv_heads, held, dim, generator=generator) for _ in range(2)]

    def moved(codes):
        return type(codes)(codes.dtype, codes.indices.to(device), codes.norms.to(device))

    layer = StaticCodedLayer(
        0, codecs, moved(codes_k), moved(codes_v), lengths.to(device),
        stream[0].to(device), stream[1].to(device), RESIDUAL, width, STEPS, fused,
    )  # fmt: skip
    scaling = dim**-0.5
    results = []
    for _ in range(STEPS):
        key, value = (torch.randn(batch, kv_heads, 1, dim, generator=generator) for _ in range(2))
        query = torch.randn(batch, kv_heads * groups, 1, dim, generator=generator)
        stream = [torch.cat([stream[0], key], 2), torch.cat([stream[1], value], 2)]
        # update announces the layer to pyramidkv's attention: keep that out of the other tests' context
        contextvars.copy_context().run(layer.update, key.to(device), value.to(device))
        got = layer.attend(query.to(device), scaling).cpu()
        want = _attention_reference(query, prefix, stream, codecs, scaling, device)
        results.append((got, want))
    assert layer.capacity % 16 == 0 and layer.capacity >= 12 + held + STEPS - RESIDUAL
    return results


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("held", [0, 2, RESIDUAL])
@pytest.mark.parametrize(
    ("codec", "dim"),
    [
        ("fibquant:2", 16), ("turboquant:2", 16), ("fibquant:3/2", 16), ("uniform/fibquant:2", 16),
        ("uniform/fibquant:3", 64),  # keys in planes
    ],
)  # fmt: skip
def test_layer_attention_equals_a_float64_reference(codec, dim, held, device):
    for got, want in _drive_layer(codec, held, device, fused=False, dim=dim):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "codec,held,dim",
    [
        ("fibquant:2", 0, 16), ("turboquant:2", 3, 16), ("fibquant:3/2", 2, 16), ("uniform/fibquant:2", 2, 16),
        ("uniform:3", 2, 64),  # keys in planes, values of the grid in the stream
    ],
)  # fmt: skip
def test_layer_attention_through_the_kernels_equals_the_reference(codec, held, dim, device):
    """The decode kernel (Triton's interpreter on a CPU), the ring as the epilogue's masked window: the
    codebook and the rotated query enter the kernel's products in float16, hence the tolerance."""
    pytest.importorskip("triton")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(
            "the kernels run on CPU tensors in Triton's interpreter only (TRITON_INTERPRET=1)"
        )
    for got, want in _drive_layer(codec, held, device, fused=True, dim=dim):
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("codec,held", [("fibquant:2", 0), ("fibquant:3/2", 3)])
def test_the_commit_kernel_writes_what_the_torch_commit_writes(codec, held, device):
    """kernels/ring_commit.py against ``StaticCodedLayer._commit``, step by step, on every tensor of the
    layer's state: the store (index bytes and norms at each row's length), the lengths, the ring, the mask
    and the next slot; through ring wraps, rows of no codes and different key and value codes."""
    pytest.importorskip("triton")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(
            "the kernel runs on CPU tensors in Triton's interpreter only (TRITON_INTERPRET=1)"
        )
    from pyramidkv.kernels.ring_commit import commit

    name, _, bits = codec.partition(":")
    key_bits, _, value_bits = bits.partition("/")
    codecs = make_codecs(
        name, 16, key_bits=float(key_bits), value_bits=float(value_bits or key_bits)
    )
    generator = torch.Generator().manual_seed(held)
    prompt = [torch.randn(2, 3, 10, 16, generator=generator) for _ in range(2)]
    lengths = torch.tensor([[10, 0, 4], [7, 2, 10]], device=device)
    window = [torch.randn(2, 3, held, 16, generator=generator).to(device) for _ in range(2)]

    def build() -> StaticCodedLayer:
        codes = [c.encode(x) for c, x in zip((codecs.keys, codecs.values), prompt, strict=True)]
        codes = [type(c)(c.dtype, c.indices.to(device), c.norms.to(device)) for c in codes]
        return StaticCodedLayer(0, codecs, *codes, lengths, *window, RESIDUAL, 10, STEPS, False)

    torch_layer, kernel_layer = build(), build()
    for _ in range(STEPS):
        key, value = (torch.randn(2, 3, 1, 16, generator=generator).to(device) for _ in range(2))
        leaving = torch_layer.ring.index_select(3, torch_layer.slot)
        codes = [encode(x) for encode, x in zip(torch_layer.encoders, leaving, strict=True)]
        torch_layer._commit(codes, key, value)
        k = kernel_layer
        commit(
            codes, k.store, k.lengths, key, value, k.ring, k.step, k.order, k.visible, k.slot,
            k.offset, k.full_at,
        )  # fmt: skip
        for layer in (torch_layer, kernel_layer):
            layer.step.add_(1)
        for side in range(2):
            assert torch.equal(torch_layer.store[side].indices, kernel_layer.store[side].indices)
            assert torch.equal(torch_layer.store[side].norms, kernel_layer.store[side].norms)
        for name in ("lengths", "ring", "visible", "slot"):
            assert torch.equal(getattr(torch_layer, name), getattr(kernel_layer, name)), name
    assert int(torch_layer.lengths.sum()) == int(lengths.sum()) + 6 * (STEPS - (RESIDUAL - held))


# ---------------------------------------------------------------------------------------------------
# a model decoding through the cache


def _source(model, policy: str, codec: str, before: int, **options) -> tuple[CompressedCache, list]:
    """A prefilled CompressedCache that then decoded ``before`` greedy tokens; the tokens to feed next."""
    options = {"budget": "30%", **options}
    source = CompressedCache(
        model, policy, codec=codec, residual=RESIDUAL, kernel="torch", **options
    )
    ids, mask = _batch()
    logits = model(ids, attention_mask=mask, **cache_kwargs(model, source)).logits[:, -1]
    for _ in range(before):
        token = logits.argmax(-1, keepdim=True)
        logits = model(token, **cache_kwargs(model, source)).logits[:, -1]
    return source, logits.argmax(-1, keepdim=True)


def _decode(model, cache, token: torch.Tensor, steps: int, fed=None) -> torch.Tensor:
    """(steps, batch, vocab) logits of greedy decoding through ``cache`` from ``token``; with ``fed``
    (steps, batch, vocab) logits, the greedy tokens of those are fed instead (teacher forcing)."""
    out = []
    for i in range(steps):
        logits = model(token, **cache_kwargs(model, cache)).logits[:, -1]
        token = (logits if fed is None else fed[i]).argmax(-1, keepdim=True)
        out.append(logits)
    return torch.stack(out)


class _RingReference(CacheLayerMixin):
    """One row of one layer: the source's codes decoded (``prefix``), then every later token kept exactly;
    ``update`` hands attention the prefix, codec.decode(codec.encode(t)) of the tokens older than the last
    RESIDUAL and those last tokens as they are."""

    is_compileable = False
    is_sliding = False

    def __init__(self, prefix, window, codecs, seen: int):
        super().__init__()
        self.prefix, self.stream, self.codecs, self.seen = prefix, window, codecs, seen
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        new = (key_states, value_states)
        self.stream = [torch.cat([s, t], 2) for s, t in zip(self.stream, new, strict=True)]
        self.seen += 1
        old = max(0, self.stream[0].shape[2] - RESIDUAL)
        out = []
        codecs = (self.codecs.keys, self.codecs.values)
        for prefix, stream, codec in zip(self.prefix, self.stream, codecs, strict=True):
            coded = codec.decode(codec.encode(stream[:, :, :old]), stream.dtype)
            out.append(torch.cat([prefix, coded, stream[:, :, old:]], 2))
        return tuple(out)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.prefix[0].shape[2] + self.stream[0].shape[2] + query_length, 0

    def get_max_length(self) -> int:
        return -1


def _reference_logits(
    model, source: CompressedCache, row: int, tokens: torch.Tensor
) -> torch.Tensor:
    """(steps, vocab) logits of row ``row`` alone, fed ``tokens`` (steps,), through _RingReference layers."""
    layers = []
    for layer in source.layers:
        prefix = []
        for side in ("keys", "values"):
            heads = []
            for h in range(layer.keys.shape[1]):
                parts = []
                for (
                    block
                ) in layer.coded.blocks:  # each block decoded by its own codec (planned rates)
                    codec = getattr(block.codecs, side)
                    decoded = codec.decode(getattr(block, side), layer.dtype)[row, h]
                    kept = block.tokens if block.lengths is None else int(block.lengths[row, h])
                    parts.append(decoded[:kept])
                heads.append(torch.cat(parts))
            prefix.append(torch.stack(heads)[None])  # every head of a row keeps as many tokens
        window = [layer.keys[row : row + 1], layer.values[row : row + 1]]
        layers.append(_RingReference(prefix, window, source.codecs, layer.seen))
    cache = Cache(layers=layers)
    return torch.stack([
        model(tokens[i].view(1, 1), **cache_kwargs(model, cache)).logits[0, -1]
        for i in range(len(tokens))
    ])  # fmt: skip


@pytest.mark.parametrize(
    "family,policy,codec,before",
    [
        ("llama", "pyramidkv", "fibquant:2", 0),
        (
            "llama",
            "full",
            "turboquant:2",
            6,
        ),  # source flushed one block of 4 and holds 2 in its window
        ("qwen2", "pyramidkv", "turboquant:2", 3),
        ("qwen2", "full", "fibquant:2", 0),
        ("qwen2", "pyramidkv", "fibquant:2", 6),
    ],
)
def test_greedy_decoding_equals_the_ring_reference(family, policy, codec, before):
    model = make_tiny(family)
    with torch.no_grad():
        source, token = _source(model, policy, codec, before)
        lengths = source.layers[0].kept_tokens()
        assert bool((lengths != lengths.max()).any())  # ragged rows
        with StaticCompressedCache(model, source, max_new_tokens=STEPS) as static:
            got = _decode(model, static, token, STEPS)
        fed = torch.cat(
            [token.T, got[:-1].argmax(-1)]
        )  # (steps, batch): what the static cache was fed
        for row in range(len(ROWS)):
            want = _reference_logits(model, source, row, fed[:, row])
            torch.testing.assert_close(got[:, row], want, rtol=1e-4, atol=1e-4)
        source.close()


def test_a_planned_cache_decodes_as_its_ring_reference():
    """A planned source holds its prompt at several rates: the static copy keeps the blocks of other rates than
    the cache's codec frozen beside the store, and decodes as the reference that decodes each block with its
    own codec."""
    model = make_tiny("llama")
    with torch.no_grad():
        source, token = _source(
            model, "snapkv", "fibquant:3", 2, budget=None, kv_memory="20%", plan="auto:2+3+4"
        )
        rates = {b.codecs.label() for layer in source.layers for b in layer.coded.blocks}
        assert len(rates) >= 2, rates  # the comparison covers mixed rates
        with StaticCompressedCache(model, source, max_new_tokens=STEPS) as static:
            assert any(layer.frozen for layer in static.layers)
            got = _decode(model, static, token, STEPS)
        fed = torch.cat([token.T, got[:-1].argmax(-1)])
        for row in range(len(ROWS)):
            want = _reference_logits(model, source, row, fed[:, row])
            torch.testing.assert_close(got[:, row], want, rtol=1e-4, atol=1e-4)
        source.close()


@pytest.mark.parametrize("before", [0, 1])
def test_until_the_window_fills_it_decodes_as_the_compressed_cache(before):
    """While no token leaves the fp16 window the two caches hold the same tokens the same way."""
    model = make_tiny("llama")
    with torch.no_grad():
        source, token = _source(model, "pyramidkv", "fibquant:2", before)
        with StaticCompressedCache(model, source, max_new_tokens=RESIDUAL - before) as static:
            got = _decode(model, static, token, RESIDUAL - before)
        want = _decode(model, source, token, RESIDUAL - before)
        source.close()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_step_replays_with_the_host_state_of_capture_time():
    """What a CUDA graph does, on the CPU: warm up, rewind, run the step once ("capture"), rewind; then before
    every later call put the host counters back to their capture-time values and feed each greedy token
    through the fixed input buffer. The logits must be eager decoding's, and rewinding must restore the
    ring and the store's lengths."""
    model = make_tiny("qwen2")
    with torch.no_grad():
        source, token = _source(model, "pyramidkv", "fibquant:2", 2)
        with StaticCompressedCache(model, source, max_new_tokens=STEPS) as static:
            want = _decode(model, static, token, STEPS)
            static.rewind(0)
            got = replay_on_the_cpu(model, static, token, STEPS)
        source.close()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_what_a_static_cache_with_codes_refuses():
    model = make_tiny("llama")
    with torch.no_grad():
        source, token = _source(model, "snapkv", "fibquant:2", 0)
        with StaticCompressedCache(model, source, max_new_tokens=2) as static:
            with pytest.raises(ValueError, match="key_states: got 3 tokens"):
                model(token.repeat(1, 3), **cache_kwargs(model, static))
            _decode(model, static, token, 2)
            with pytest.raises(ValueError, match=r"max_new_tokens: .* built for 2 new tokens"):
                model(token, **cache_kwargs(model, static))
            with pytest.raises(ValueError, match="appended: got 1; a static cache with codes"):
                static.rewind(1)
            static.rewind(0)
            assert static.appended == 0 and int(static.layers[0].step) == 0
        with pytest.raises(ValueError, match="kernel"):
            StaticCompressedCache(model, source, max_new_tokens=2, kernel="cuda")
        source.close()
        kivi, _ = _source(model, "snapkv", "kivi:2", 0)
        with pytest.raises(ValueError, match=r"source: .*'kivi:2'.*FibQuant or TurboQuant"):
            StaticCompressedCache(model, kivi, max_new_tokens=2)
        kivi.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize(
    ("codec", "head_dim", "plan"),
    [
        ("fibquant:2", 64, None),
        ("turboquant:2", 64, None),
        ("fibquant:2.5", 128, None),
        ("uniform/fibquant:2", 128, None),
        ("fibquant:3", 64, "auto:2+3+4"),
    ],
)
def test_a_cuda_graph_replays_the_step_with_codes(codec, head_dim, plan):
    """On a GPU, codes the mma kernel reads (FibQuant's and TurboQuant's 2-bit at head dim 64, FibQuant's 5-bit
    indices at 128, packed in the graph, keys of a uniform grid read as int8, a planned cache's blocks at three
    rates), float16, residual 4 so tokens leave the window during the replays. The
    replayed graph's logits equal eager decoding's through the same cache; eager decoding through the kernels
    agrees with the torch reference path."""
    from pyramidkv.kernels import cuda_decode

    model = make_tiny("llama", head_dim=head_dim).to("cuda", torch.float16)
    ids, mask = (t.cuda() for t in _batch())
    with torch.no_grad():
        budget = dict(budget="30%") if plan is None else dict(kv_memory="20%", plan=plan)
        source = CompressedCache(model, "pyramidkv", codec=codec, residual=RESIDUAL, **budget)
        codecs = source.layers[0].coded.codecs
        assert cuda_decode.usable(codecs.keys, codecs.values, head_dim, 2, torch.device("cuda"))
        first = model(ids, attention_mask=mask, **cache_kwargs(model, source)).logits[:, -1]
        token = first.argmax(-1, keepdim=True)
        with StaticCompressedCache(model, source, max_new_tokens=STEPS + 3) as static:
            assert all(layer.fused for layer in static.layers)
            eager = _decode(model, static, token, STEPS)
            static.rewind(0)
            step = DecodeStep(model, static)
            graph, logits, greedy = capture(step, static, token)
            replayed, fed = [], token
            for _ in range(STEPS):
                step.input_ids.copy_(fed)
                graph.replay()
                replayed.append(logits.clone())
                fed = greedy.clone()
        with StaticCompressedCache(model, source, STEPS, kernel="torch") as reference:
            assert not any(layer.fused for layer in reference.layers)
            slow = _decode(model, reference, token, STEPS, fed=eager)
        source.close()
    torch.testing.assert_close(torch.stack(replayed), eager, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(eager.float(), slow.float(), rtol=5e-2, atol=5e-2)
