"""offload.py on CPU: model offload and block streaming give the same images and the same LoRA training step as the
plain model, and their hooks move, prefetch and free exactly what they should, in order.

What runs here, on CPU with device="cpu" (a "device copy" is a second CPU buffer):
- outputs and LoRA gradients/weights equal to the plain model's (generate; one AdamW step, LoRA dropout included);
- every leaf module computes with a device copy, never a host-buffer tensor (OnDeviceCheck), which catches weights
  read outside a hooked forward: on CPU those would silently work, on CUDA they are a device mismatch;
- the order of loads/uses/frees (prefetch of the next block while one computes, reverse order in backward, at most
  two blocks on the device, nothing left after a call) from the streamer's own accounting;
- the CUDA branches themselves, against fake streams/events that record into the same log: each copy on the side
  stream after a wait for the compute stream, the compute stream waiting for a block's copy event before using or
  freeing it, and no waits that would serialise copies with compute.
What it cannot prove: CUDA's real semantics under that protocol (that the copies do overlap compute, the caching
allocator's stream-ordered reuse as relied on, cudaHostRegister), real peak device memory, and speed.
benchmarks/bench_offload.py measures those on a GPU."""

import pytest
import torch
import torch.nn.functional as F
from fakes import rel
from torch import nn

import flux1
import lora
import offload
import zimage

GENERATE = dict(height=32, width=48, steps=2, output="pt", progress=False, seed=3)


def same(a, b) -> bool:
    """Equal up to float rounding: the packed weights are 256-byte aligned copies while the loaded ones are views of
    the safetensors file at arbitrary addresses, and CPU GEMM kernels may sum in another order for another alignment
    (seen: 1e-7 relative on Z-Image; FLUX.1 comes out bit-exact)."""
    return rel(a, b) <= 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


# Z-Image's tiny config has 1-block refiners: min_blocks=1 streams them too, as the real model's 2-block ones are.
MODELS = {"flux1": (flux1, "flux1_repo", {}), "zimage": (zimage, "zimage_repo", {"min_blocks": 1})}


def load(request, name):
    module, repo, stream_kw = MODELS[name]
    return module.load(request.getfixturevalue(repo)[0], dtype=torch.float32), stream_kw


def host_ranges(packs) -> list[tuple[int, int]]:
    return [(p.host.data_ptr(), p.host.data_ptr() + p.nbytes) for p in packs if p.nbytes]


class OnDeviceCheck:
    """A global forward pre-hook on every module: a leaf module (where weights are used: Linear, Embedding, norms,
    convolutions) must never compute with a tensor that lives in an offloader's host buffer. This catches weights
    read outside the hooked forward (e.g. a component whose forward never runs), which on CPU would silently work."""

    def __init__(self, packs):
        self.ranges, self.ran, self.bad = host_ranges(packs), 0, []

    def __enter__(self):
        self.handle = nn.modules.module.register_module_forward_pre_hook(self.check)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def check(self, module, args):
        if next(module.children(), None) is not None:
            return
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            self.ran += 1
            if any(lo <= t.data_ptr() < hi for lo, hi in self.ranges):
                self.bad.append(f"{type(module).__name__}.{name}")


def all_packs(handler) -> list:
    if isinstance(handler, offload.BlockStreamer):
        return list(handler.packs.values())
    return [p for packs in handler.packs.values() for p in packs]


def check_stream_log(log, phase, order):
    """Blocks are used in `order`; each is freed right after it ran, and the next one's copy was issued before that
    (it is prefetched while this block computes). At most two blocks are on the device at any time."""
    events = [(e[0], e[1]) for e in log if e[0] in ("load", "use", "free") and e[2] == phase]
    assert [k for e, k in events if e == "use"] == order
    for i, key in enumerate(order):
        use, free = events.index(("use", key)), events.index(("free", key))
        assert ("load", key) in events[:use]
        assert all(e != "use" for e, _ in events[use + 1 : free])  # freed before the next block runs
        if i + 1 < len(order):
            assert ("load", order[i + 1]) in events[:free]  # prefetched while `key` computed
    on_device = set()
    for e, k in events:
        on_device = on_device | {k} if e == "load" else on_device - {k} if e == "free" else on_device
        assert len(on_device) <= 2


@pytest.mark.parametrize("name", MODELS)
def test_model_offload_generate_matches(request, name):
    pipe, _ = load(request, name)
    ref = pipe.generate("a red fox in the snow", **GENERATE)

    handler = offload.enable_model_offload(pipe, "cpu")
    assert pipe.device == torch.device("cpu") and pipe.execution_device == torch.device("cpu")
    with OnDeviceCheck(all_packs(handler)) as check:
        out = pipe.generate("a red fox in the snow", **GENERATE)
    assert same(out, ref)
    assert check.ran > 50 and not check.bad, check.bad

    # Every component ran (the AE as its decoder: generate never encodes) and went back right after.
    text = ["t5", "clip"] if name == "flux1" else ["text_encoder"]
    assert set(handler.packs) == {*text, "transformer", "ae.encoder", "ae.decoder"}
    loaded = [k for e, k in handler.log if e == "load"]
    assert set(loaded) == {*text, "transformer", "ae.decoder"}
    assert loaded.count("transformer") == GENERATE["steps"]
    assert handler.log == [(e, k) for k in loaded for e in ("load", "free")]
    assert handler.on_device() == [] and all(p.at_home() for p in all_packs(handler))

    offload.disable_model_offload(pipe)
    assert getattr(pipe, "execution_device", None) is None
    assert not pipe.transformer._forward_hooks and not pipe.transformer._forward_pre_hooks
    assert same(pipe.generate("a red fox in the snow", **GENERATE), ref)


@pytest.mark.parametrize("name", MODELS)
def test_block_streaming_generate_matches(request, name):
    pipe, stream_kw = load(request, name)
    ref = pipe.generate("a red fox in the snow", **GENERATE)

    streamer = offload.enable_block_streaming(pipe.transformer, "cpu", **stream_kw)
    expected = {
        "flux1": ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1"],
        "zimage": ["noise_refiner.0", "context_refiner.0", "layers.0", "layers.1"],
    }[name]
    assert list(streamer.packs) == expected
    assert streamer.bytes_on_device == streamer.resident_bytes > 0 and streamer.blocks_on_device == []
    with OnDeviceCheck(all_packs(streamer)) as check:
        out = pipe.generate("a red fox in the snow", **GENERATE)
    assert same(out, ref)
    assert check.ran > 50 and not check.bad, check.bad

    calls = GENERATE["steps"]
    assert [k for e, k, _ in streamer.log if e == "use"] == expected * calls
    check_stream_log(streamer.log[: len(streamer.log) // calls], "forward", expected)
    assert streamer.peak_blocks == 2
    assert streamer.peak_bytes == streamer.resident_bytes + max(
        streamer.packs[a].nbytes + streamer.packs[b].nbytes for a, b in zip(expected, expected[1:])
    )
    assert streamer.blocks_on_device == [] and streamer.bytes_on_device == streamer.resident_bytes
    assert all(p.at_home() for p in all_packs(streamer))

    offload.disable_block_streaming(pipe.transformer)
    assert all("forward" not in block.__dict__ for block in streamer.blocks.values())
    assert same(pipe.generate("a red fox in the snow", **GENERATE), ref)


def test_block_streaming_with_model_offload_for_the_rest(request):
    """How a 24 GB card runs FLUX.1-dev: the transformer streams its blocks, the other parts are model-offloaded."""
    pipe, _ = load(request, "flux1")
    ref = pipe.generate("a cat", **GENERATE)
    streamer = offload.enable_block_streaming(pipe.transformer, "cpu")
    handler = offload.enable_model_offload(pipe, "cpu")
    assert "transformer" not in handler.packs  # left to the streamer
    with OnDeviceCheck(all_packs(streamer) + all_packs(handler)) as check:
        out = pipe.generate("a cat", **GENERATE)
    assert same(out, ref) and not check.bad
    assert streamer.blocks_on_device == [] and handler.on_device() == []
    with pytest.raises(ValueError, match="already"):
        offload.enable_block_streaming(pipe.clip, "cpu")
    offload.disable_model_offload(pipe)
    offload.disable_block_streaming(pipe.transformer)
    assert same(pipe.generate("a cat", **GENERATE), ref)


def test_resident_blocks(request):
    """resident_blocks=2 of 4: every other block stays on the device; the streamed ones are prefetched across it."""
    pipe, _ = load(request, "flux1")
    ref = pipe.generate("a cat", **GENERATE)
    streamer = offload.enable_block_streaming(pipe.transformer, "cpu", resident_blocks=2)
    streamed = ["double_blocks.0", "single_blocks.0"]
    assert list(streamer.packs) == streamed
    with OnDeviceCheck(all_packs(streamer)) as check:
        assert same(pipe.generate("a cat", **GENERATE), ref)
    assert not check.bad
    check_stream_log(streamer.log[: len(streamer.log) // GENERATE["steps"]], "forward", streamed)
    assert streamer.peak_blocks == 2 and streamer.blocks_on_device == []
    offload.disable_block_streaming(pipe.transformer)

    _, params = add_lora(pipe, "flux1")  # training: resident blocks are checkpointed too, and get their gradients
    streamer = streamed_step_matches(pipe, params, "flux1", {"guidance": 3.5}, {"resident_blocks": 2})
    check_stream_log(streamer.log, "backward", streamed[::-1])
    assert streamer.blocks_on_device == []


# ----------------------------------------------------------------------------------------------------------------------
# LoRA training through streamed blocks

LORA_TARGETS = {
    # Blocks only, plus one resident layer: the first block's input then does not require grad (img_in is frozen),
    # the case where a plain reentrant checkpoint would silently give that block's LoRA no gradient.
    "flux1": ["double_blocks.*", "single_blocks.*", "final_layer.linear"],
    "zimage": ["noise_refiner.*", "context_refiner.*", "layers.*", "all_final_layer.*"],
}


def batch(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 16, 4, 6, generator=g)
    sigma = torch.rand(2, generator=g)
    if name == "flux1":
        cond = {"txt": torch.randn(2, 7, 48, generator=g), "vec": torch.randn(2, 24, generator=g)}
    else:
        cond = {"caps": [torch.randn(5, 32, generator=g), torch.randn(9, 32, generator=g)]}
    return x0, noise, sigma, cond


def train_step(pipe, params, name, kw):
    """One step of the project's LoRA objective: mse(velocity(x_sigma, sigma, cond), noise - x0), AdamW."""
    x0, noise, sigma, cond = batch(name)
    x = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
    torch.manual_seed(1)  # LoRA dropout: the same masks in both runs, and the recomputation must replay them
    loss = F.mse_loss(pipe.velocity(x, sigma, cond, **kw), noise - x0)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grads, [p.detach().clone() for p in params]


def add_lora(pipe, name):
    torch.manual_seed(0)
    names = lora.add_lora(pipe.transformer, LORA_TARGETS[name], rank=4, dropout=0.1)
    params = lora.lora_parameters(pipe.transformer)
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.05)  # B = 0 at init would make every A gradient exactly zero: test both
    return names, params


def streamed_step_matches(pipe, params, name, kw, stream_kw, prepare=None) -> offload.BlockStreamer:
    """One training step without, then (from the same LoRA weights) with block streaming: same gradients, same
    weights after the step. `prepare(streamer)` runs just after streaming is enabled."""
    start = [p.detach().clone() for p in params]
    ref_grads, ref_after = train_step(pipe, params, name, kw)
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    streamer = offload.enable_block_streaming(pipe.transformer, "cpu", **stream_kw)
    if prepare is not None:
        prepare(streamer)
    with OnDeviceCheck(all_packs(streamer)) as check:
        grads, after = train_step(pipe, params, name, kw)
    assert not check.bad, check.bad
    assert all(g.abs().max() > 0 for g in grads)  # every LoRA, the first block's included, learned something
    assert max(rel(g, r) for g, r in zip(grads, ref_grads)) <= 1e-6
    assert max(rel(a, r) for a, r in zip(after, ref_after)) <= 1e-6
    return streamer


@pytest.mark.parametrize("name", MODELS)
def test_lora_training_step_matches(request, name):
    pipe, stream_kw = load(request, name)
    _, params = add_lora(pipe, name)
    kw = {"guidance": 3.5} if name == "flux1" else {}
    streamer = streamed_step_matches(pipe, params, name, kw, stream_kw)

    assert all(t.requires_grad for ts in streamer.trainable.values() for t in ts)
    assert sum(map(len, streamer.trainable.values())) < len(params)  # the final layer's LoRA is resident
    order = list(streamer.packs)
    check_stream_log(streamer.log, "forward", order)
    check_stream_log(streamer.log, "backward", order[::-1])
    assert streamer.peak_blocks == 2
    assert streamer.blocks_on_device == [] and streamer.bytes_on_device == streamer.resident_bytes


def test_int8_base_streams_like_any_frozen_weight(request):
    int8 = pytest.importorskip("int8")
    pipe, _ = load(request, "flux1")
    assert int8.quantize(pipe.transformer, min_features=32)  # the tiny model is 64 wide
    x0, _, sigma, cond = batch("flux1")
    with torch.no_grad():
        ref = pipe.velocity(x0, sigma, cond, guidance=3.5)
    _, params = add_lora(pipe, "flux1")  # on top of the INT8 base, as int8.py documents

    streamer = streamed_step_matches(pipe, params, "flux1", {"guidance": 3.5}, {})
    packed = {id(t) for p in streamer.packs.values() for t in p.tensors}
    int8_layers = int8.quantized_layers(pipe.transformer.double_blocks).values()
    assert int8_layers and all(m.weight.dtype == torch.int8 and id(m.weight) in packed for m in int8_layers)
    assert all(id(m.weight_scale) in packed for m in int8_layers)
    lora.set_scale(pipe.transformer, 0.0)  # the streamed INT8 base alone gives the plain INT8 base's output
    with torch.no_grad():
        assert same(pipe.velocity(x0, sigma, cond, guidance=3.5), ref)


def test_lora_added_after_enabling_is_refused(request):
    pipe, _ = load(request, "flux1")
    offload.enable_block_streaming(pipe.transformer, "cpu")
    lora.add_lora(pipe.transformer, ["single_blocks.*"], rank=2)
    x0, _, sigma, cond = batch("flux1")
    with pytest.raises(RuntimeError, match="disable_block_streaming"):
        pipe.velocity(x0, sigma, cond)
    offload.disable_block_streaming(pipe.transformer)  # the supported order: disable, add LoRA, enable again
    streamer = offload.enable_block_streaming(pipe.transformer, "cpu")
    assert sum(map(len, streamer.trainable.values())) == len(lora.lora_parameters(pipe.transformer)) > 0
    pipe.velocity(x0, sigma, cond).square().mean().backward()
    assert all(p.grad is not None for p in lora.lora_parameters(pipe.transformer))


def test_text_encoder_streaming_and_tensors_read_outside_their_block(request):
    """T5's encoder reads block 0's relative-attention table itself, outside block 0's forward: streaming that table
    would compute with the host copy (a device mismatch on CUDA). OnDeviceCheck sees it; keep_resident fixes it."""
    pipe, _ = load(request, "flux1")
    ids = pipe.t5_tokenizer(["a red fox in the snow"])
    with torch.no_grad():
        ref = pipe.t5(ids)
        streamer = offload.enable_block_streaming(pipe.t5, "cpu")
        with OnDeviceCheck(all_packs(streamer)) as check:
            assert same(pipe.t5(ids), ref)
        assert check.bad == ["Embedding.weight"]
        offload.disable_block_streaming(pipe.t5)

        streamer = offload.enable_block_streaming(pipe.t5, "cpu", keep_resident=["*relative_attention_bias*"])
        assert list(streamer.stacks) == ["encoder.block"]  # not the 2-entry `layer` lists inside each block
        with OnDeviceCheck(all_packs(streamer)) as check:
            assert same(pipe.t5(ids), ref)
        assert not check.bad and streamer.blocks_on_device == []


# ----------------------------------------------------------------------------------------------------------------------
# The CUDA code paths, run against fake streams and events


class FakeStream:
    """Records what the streamer asks of a CUDA stream into the streamer's own log, in program order."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event):
        self.log.append(("wait_event", self.name, event))

    def record_event(self):
        event = object()
        self.log.append(("record", self.name, event))
        return event


@pytest.fixture
def fake_cuda(monkeypatch):
    """Make a CPU streamer take its CUDA branches: streams and events become FakeStreams, the CUDA RNG the CPU one."""
    current = []

    def use(streamer):
        compute, copy = FakeStream("compute", streamer.log), FakeStream("copy", streamer.log)
        current[:] = [compute]
        streamer.cuda, streamer.copy_stream = True, copy

    class StreamContext:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            current.append(self.stream)

        def __exit__(self, *exc):
            current.pop()

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.get_rng_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return use


def check_stream_protocol(log):
    """What makes the CUDA streaming race-free, checked on the recorded program order of both streams:
    - every copy is issued on the copy stream, after a wait for the compute stream issued after its buffer was
      allocated (the buffer may be memory the compute stream just freed);
    - the compute stream waits for a block's copy event before the block is used, and before it is freed (an unused
      prefetch must not have its memory handed out while the copy still writes it);
    - the copy stream never waits on an event, and the compute stream never waits for the copy stream as a whole
      (that would serialise every copy with all compute: no overlap)."""
    synced, last_event, ready, waited = False, None, {}, set()
    for entry in log:
        kind, what = entry[0], entry[1]
        if kind == "wait_stream":
            assert entry[1:] == ("copy", "compute")
            synced = True
        elif kind == "record":
            assert what == "copy" and synced
            last_event = entry[2]
        elif kind == "load":
            assert synced and last_event is not None
            ready[what], synced, last_event = last_event, False, None
        elif kind == "wait_event":
            assert what == "compute"
            waited.add(entry[2])
        elif kind in ("use", "free"):
            assert ready[what] in waited, f"{kind} {what} before the compute stream waited for its copy"


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_cuda_stream_protocol(request, fake_cuda, phase):
    pipe, _ = load(request, "flux1")
    if phase == "forward":
        x0, _, sigma, cond = batch("flux1")
        with torch.no_grad():
            ref = pipe.velocity(x0, sigma, cond, guidance=3.5)
            streamer = offload.enable_block_streaming(pipe.transformer, "cpu")
            fake_cuda(streamer)
            assert same(pipe.velocity(x0, sigma, cond, guidance=3.5), ref)
    else:
        _, params = add_lora(pipe, "flux1")
        streamer = streamed_step_matches(pipe, params, "flux1", {"guidance": 3.5}, {}, prepare=fake_cuda)
    check_stream_log(streamer.log, phase, list(streamer.packs)[:: 1 if phase == "forward" else -1])
    events = [e[0] for e in streamer.log]
    assert events.count("wait_stream") == events.count("load") == events.count("record") > 0
    check_stream_protocol(streamer.log)
    assert streamer.blocks_on_device == []
    offload.disable_block_streaming(pipe.transformer)


def test_cuda_stream_protocol_unused_prefetch(request, fake_cuda):
    """Qwen3 run up to its first layer: the second layer is prefetched, never used, and freed at the end of the
    call; the compute stream must wait for that copy before freeing it."""
    pipe, _ = load(request, "zimage")
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        (ref,) = pipe.text_encoder(ids, mask, [1])
        streamer = offload.enable_block_streaming(pipe.text_encoder, "cpu")
        fake_cuda(streamer)
        (out,) = pipe.text_encoder(ids, mask, [1])
    assert same(out, ref)
    assert [(e, k) for e, k, *_ in streamer.log if e in ("use", "free")] == [
        ("use", "layers.0"),
        ("free", "layers.0"),
        ("free", "layers.1"),
    ]
    check_stream_protocol(streamer.log)
    assert streamer.blocks_on_device == []
