"""A model split over devices (``device_map``): the compressed cache follows each layer's device (issue 8).

accelerate's ``dispatch_model`` places each decoder layer on a device and moves activations between layers
with hooks. With ``main_device="cpu"`` a layer mapped to ``"cpu"`` also *runs* there (by default accelerate
only stores such a layer on the CPU and runs it on the GPU), so one GPU gives a model whose layers alternate
between two devices — the code paths of a model spread over several GPUs. The split model must give the
unsplit model's greedy tokens and logits for every policy and codec, keep every per-layer tensor of the
cache on its layer's device, and copy nothing across devices at a decode step (accelerate's hooks move the
activations; that is the model's own traffic).

torch has no second CPU-like device to split over on a CPU-only machine, so there the split tests skip;
what runs everywhere is the hook path: the same model dispatched with hooks, all on the CPU, equals the
undispatched one bit for bit.

Models are float64 so that CPU and CUDA agree closely; the tolerances below follow from the stages that
still compute in float32, the model's RMSNorm and pyramidkv's attention over codes (see :data:`TOLERANCE`).
"""

from __future__ import annotations

import copy
import functools
import traceback
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from accelerate import dispatch_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pyramidkv
import pyramidkv.cache.layers
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.eval.prefill import greedy_rows, prefill

from .conftest import make_tiny

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
FAMILIES = ("llama", "qwen2")
POLICIES = ("pyramidkv", "snapkv", "h2o", "streamingllm", "key-norm", "random", "full")
CODECS = ("none", "fibquant:2", "turboquant:2", "kivi:2")
PROMPT = torch.arange(3, 50).unsqueeze(0)  # 47 tokens
STEPS = 8
OPTIONS = dict(
    budget=12, residual=4
)  # residual 4 < STEPS: decode steps flush the window into codes
# Largest |logit difference| allowed, relative to the largest |logit|. The models are float64, but their
# RMSNorm computes in float32 (transformers' LlamaRMSNorm/Qwen2RMSNorm upcast to float32, not to the input's
# dtype), and CUDA's float32 mean/rsqrt round differently from the CPU's: the H200 run of 2026-11-29 measured
# 2e-7 of the largest logit without a codec (scores are float32 too, but only choose tokens). With a codec,
# attention over codes runs in float32 (chunked_attention), so a decode step differs by ~1e-7 between
# devices, and a token flushed into codes later may round its fp16 norm one ulp apart (2^-11 of one
# vector): ~1e-4 at most. A missing, extra or wrongly masked token moves logits by ~1e-2.
TOLERANCE = {"none": 1e-6, "codec": 1e-3}
KERNEL_TOLERANCE = (
    1e-2  # the fused kernel feeds tl.dot 10-bit mantissas (tests/test_kernel_fibquant.py)
)

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA: layers are split between the CPU and cuda:0 (torch offers no second CPU-like "
    "device to split over)",
)
needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA devices: layers alternate cuda:0 / cuda:1"
)


@pytest.fixture(autouse=True, scope="module")
def _codebooks_in_tmp(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYRAMIDKV_CACHE_DIR", str(tmp_path_factory.mktemp("codebooks")))
        yield


def device_map(layers: list[torch.device], embed: torch.device, head: torch.device) -> dict:
    """accelerate's map for a tiny llama/qwen2: embeddings and rotary on ``embed``, norm and head on ``head``."""
    return {
        "model.embed_tokens": embed,
        "model.rotary_emb": embed,
        **{f"model.layers.{i}": device for i, device in enumerate(layers)},
        "model.norm": head,
        "lm_head": head,
    }


def split(model, layers: list[torch.device], embed=CPU, head=GPU, **kwargs):
    """A copy of ``model`` dispatched layer by layer; each layer runs on its device (``main_device="cpu"``)."""
    placement = device_map(layers, embed, head)
    return dispatch_model(copy.deepcopy(model), placement, main_device="cpu", **kwargs)


def alternating(
    n: int, first: torch.device = CPU, second: torch.device = GPU
) -> list[torch.device]:
    """Layer i on ``first`` when i is even, else on ``second``: every layer hands over to another device."""
    return [first if i % 2 == 0 else second for i in range(n)]


@functools.cache
def split_pair(family: str):
    """(the unsplit float64 model on the CPU, a copy whose layers alternate CPU / cuda:0, their devices)."""
    model = make_tiny(family).double()
    layers = alternating(model.config.num_hidden_layers)
    return model, split(model, layers), layers


def greedy(model, cache, ids=PROMPT, attention_mask=None, steps=STEPS):
    """Greedy ``generate`` through ``cache``: (new tokens, logits of each step), both on the CPU."""
    with torch.no_grad():
        out = model.generate(
            ids.to(model.device),
            attention_mask=None if attention_mask is None else attention_mask.to(model.device),
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
            **cache_kwargs(model, cache),
        )
    return out.sequences[:, ids.shape[1] :].cpu(), torch.stack(out.logits).cpu()


def assert_same_output(got, want, tolerance: float) -> None:
    tokens, logits = got
    want_tokens, want_logits = want
    assert torch.equal(tokens, want_tokens)
    scale = want_logits.abs().max().item()
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=tolerance * scale)


def layer_tensors(layer) -> list[tuple[str, torch.Tensor]]:
    """Every tensor a compressed layer holds: kept / recent keys and values, lengths, each block's codes."""
    found = [(name, getattr(layer, name)) for name in ("kept_keys", "kept_values", "lengths")]
    found += [("keys", layer.keys), ("values", layer.values)]
    coded = getattr(layer, "coded", None)
    for number, block in enumerate(coded.blocks if coded is not None else []):
        found.append((f"block {number} lengths", block.lengths))
        for side, codes in (("keys", block.keys), ("values", block.values)):
            found += [
                (f"block {number} {side}.{f.name}", getattr(codes, f.name)) for f in fields(codes)
            ]
    return [(name, t) for name, t in found if isinstance(t, torch.Tensor)]


def assert_on_layer_devices(cache, devices: list[torch.device]) -> None:
    for index, (layer, device) in enumerate(zip(cache.layers, devices, strict=True)):
        held = layer_tensors(layer)
        assert any(name == "lengths" for name, _ in held), f"layer {index} was never compressed"
        if getattr(layer, "coded", None) is not None:
            assert layer.coded.blocks, f"layer {index} holds no codes"
        for name, tensor in held:
            assert tensor.device == device, (
                f"layer {index} {name} is on {tensor.device}, not {device}"
            )


def configurations() -> list[tuple[str, str, str]]:
    """Every policy with every codec on llama; on qwen2 (biased projections) each policy once, codecs in turn."""
    llama = [("llama", p, c) for p in POLICIES for c in CODECS]
    qwen2 = [("qwen2", p, CODECS[(i + 1) % len(CODECS)]) for i, p in enumerate(POLICIES)]
    return llama + qwen2


def cache_options(policy: str, codec: str, **extra) -> dict:
    options = dict(policy=policy, codec=codec, **OPTIONS, **extra)
    return options if policy != "random" else {**options, "seed": 3}


@pytest.mark.parametrize(("policy", "codec"), [("pyramidkv", "fibquant:2"), ("h2o", "kivi:2")])
def test_model_behind_hooks_on_one_device_equals_the_plain_model(policy, codec):
    """Runs everywhere. accelerate's hooks (on, although all layers are on the CPU) hand the cache through
    untouched: no ``skip_keys``, as :func:`pyramidkv.models.load` dispatches; the output is bit for bit the same.
    """
    model = make_tiny("llama").double()
    hooked = dispatch_model(
        copy.deepcopy(model), device_map([CPU] * 4, CPU, CPU), main_device="cpu", force_hooks=True
    )
    assert hasattr(hooked, "_hf_hook")
    options = cache_options(policy, codec)
    with CompressedCache(model, **options) as cache:
        want = greedy(model, cache)
    with CompressedCache(hooked, **options) as cache:
        got = greedy(hooked, cache)
        assert_on_layer_devices(cache, [CPU] * 4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_cuda
@pytest.mark.parametrize(("family", "policy", "codec"), configurations())
def test_split_model_gives_the_unsplit_output(family, policy, codec):
    """Greedy tokens and logits of the split model equal the unsplit one's; every cache tensor sits on its
    layer's device (kernel="torch" here: the fused kernel has its own test below)."""
    model, dispatched, devices = split_pair(family)
    options = cache_options(policy, codec, kernel="torch")
    with CompressedCache(model, **options) as cache:
        want = greedy(model, cache)
        want_bytes, want_kept = cache.nbytes(), cache.kept_tokens()
    with CompressedCache(dispatched, **options) as cache:
        got = greedy(dispatched, cache)
        assert_on_layer_devices(cache, devices)
        assert cache.nbytes() == want_bytes  # the bytes held do not depend on where they are held
        assert torch.equal(cache.kept_tokens(), want_kept)
    assert_same_output(got, want, TOLERANCE["none" if codec == "none" else "codec"])


@needs_cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("policy", "codec"), [("pyramidkv", "none"), ("snapkv", "fibquant:2"), ("h2o", "kivi:2")]
)
def test_split_model_with_a_left_padded_batch(family, policy, codec):
    """Rows of different lengths: the ragged masks (kept rows, padding) are built on each layer's device."""
    model, dispatched, devices = split_pair(family)
    ids = torch.cat([PROMPT, torch.cat([torch.zeros(1, 9, dtype=torch.long), PROMPT[:, 9:]], 1)])
    mask = (ids != 0).long()
    options = cache_options(policy, codec, kernel="torch")
    with CompressedCache(model, **options) as cache:
        want = greedy(model, cache, ids, mask)
    with CompressedCache(dispatched, **options) as cache:
        got = greedy(dispatched, cache, ids, mask)
        assert_on_layer_devices(cache, devices)
    assert_same_output(got, want, TOLERANCE["none" if codec == "none" else "codec"])


@needs_cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("policy", "codec"), [("pyramidkv", "none"), ("h2o", "fibquant:2")])
def test_one_prefill_runner_on_a_split_model(family, policy, codec):
    """The evaluation runner's path: one captured prefill, a cache rebuilt from it per configuration. The
    captured padding mask is shared by all layers and must follow each layer to its device."""
    model, dispatched, devices = split_pair(family)
    options = cache_options(policy, codec, kernel="torch")
    with CompressedCache(model, **options) as cache:
        want_tokens, _ = greedy(model, cache)
        want_kept = cache.kept_tokens()
    captured = prefill(dispatched, PROMPT)
    with captured.cache(**options) as cache:
        tokens = greedy_rows(dispatched, cache, captured.logits, STEPS)[0]
        assert_on_layer_devices(cache, devices)
        assert torch.equal(
            cache.kept_tokens(), want_kept + 1
        )  # generate never feeds its last token
    assert tokens == want_tokens[0].tolist()


class CrossDeviceOps(TorchDispatchMode):
    """Records every tensor operation whose inputs and outputs span devices that pyramidkv's code issued
    (a pyramidkv source file on the Python stack); accelerate's hooks, called by the model, are not."""

    package = str(Path(pyramidkv.__file__).parent)

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = tree_leaves((args, kwargs, out))
        if len({t.device for t in leaves if isinstance(t, torch.Tensor)}) > 1:
            ours = [f for f in traceback.extract_stack() if f.filename.startswith(self.package)]
            if ours:
                self.found.append(f"{func} at {ours[-1].filename}:{ours[-1].lineno}")
        return out


@needs_cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("codec", ["none", "fibquant:2", "kivi:2"])
def test_no_cross_device_copy_at_a_decode_step(family, codec):
    """After the first decode step (which may copy a codec's rotation and codebook to a device once, cached
    per device and dtype), pyramidkv moves no tensor between devices, window flushes included."""
    _, dispatched, _ = split_pair(family)
    with torch.no_grad(), CompressedCache(dispatched, **cache_options("pyramidkv", codec)) as cache:
        logits = dispatched(PROMPT, **cache_kwargs(dispatched, cache)).logits[:, -1]
        step = logits.argmax(-1, keepdim=True).to(dispatched.device)
        logits = dispatched(step, **cache_kwargs(dispatched, cache)).logits[:, -1]
        with CrossDeviceOps() as spy:
            for _ in range(STEPS):
                step = logits.argmax(-1, keepdim=True).to(dispatched.device)
                logits = dispatched(step, **cache_kwargs(dispatched, cache)).logits[:, -1]
        if codec != "none":
            assert all(len(layer.coded.blocks) >= 2 for layer in cache.layers)  # flushed at decode
    assert spy.found == []


@needs_cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("codec", ["fibquant:2", "turboquant:2"])
def test_default_kernel_follows_each_layer(family, monkeypatch, codec):
    """``kernel="auto"``: layers on cuda:0 read codes with the fused kernel, layers on the CPU with the torch
    reference, and the output is the unsplit CPU model's."""
    model, dispatched, devices = split_pair(family)
    seen: dict[str, set] = {"fused": set(), "reference": set()}

    def spy(name, function):
        def wrapped(query, *args, **kwargs):
            seen[name].add(query.device)
            return function(query, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(
        pyramidkv.cache.layers,
        "fused_attention",
        spy("fused", pyramidkv.cache.layers.fused_attention),
    )
    monkeypatch.setattr(
        pyramidkv.cache.layers,
        "rotated_attention",
        spy("reference", pyramidkv.cache.layers.rotated_attention),
    )
    options = cache_options("snapkv", codec)
    with CompressedCache(model, **options, kernel="torch") as cache:
        want = greedy(model, cache)
    seen["reference"].clear()
    with CompressedCache(dispatched, **options) as cache:
        got = greedy(dispatched, cache)
        fused = cache.fused_ok
        assert_on_layer_devices(cache, devices)
    assert seen["reference"] == ({CPU} if fused else {CPU, GPU})
    assert seen["fused"] == ({GPU} if fused else set())
    assert_same_output(got, want, KERNEL_TOLERANCE)


@needs_two_gpus
@pytest.mark.parametrize("codec", ["none", "fibquant:2", "kivi:2"])
def test_split_over_two_gpus(codec):
    """Layers alternate cuda:0 / cuda:1 with the default kernel: each layer's cache and kernel launch stay
    on its GPU whatever the current CUDA device is (a Triton launch goes to the current device)."""
    model = make_tiny("llama").double()
    layers = alternating(4, torch.device("cuda", 0), torch.device("cuda", 1))
    dispatched = dispatch_model(
        copy.deepcopy(model), device_map(layers, layers[0], layers[1]), main_device=layers[0]
    )
    options = cache_options("pyramidkv", codec)
    with CompressedCache(model, **options, kernel="torch") as cache:
        want = greedy(model, cache)
    torch.cuda.set_device(0)
    with CompressedCache(dispatched, **options) as cache:
        got = greedy(dispatched, cache)
        assert_on_layer_devices(cache, layers)
    assert_same_output(got, want, KERNEL_TOLERANCE if codec != "none" else TOLERANCE["none"])
