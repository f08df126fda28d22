"""Run models bigger than the accelerator's memory: whole-component offload and per-block weight streaming.

Two tools that act on any pipeline of the contract (or any nn.Module), without changing the model code:

    import offload
    # A. every part (text encoders, transformer, AE encoder/decoder) is on the GPU only while it runs
    offload.enable_model_offload(pipe, "cuda")
    # B. the transformer streams its blocks through the GPU, the other parts as in A (FLUX.1-dev on a 24 GB card)
    offload.enable_block_streaming(pipe.transformer, "cuda")
    offload.enable_model_offload(pipe, "cuda")
    # LoRA training: load the base -> lora.add_lora -> enable_block_streaming -> create the optimizer

- Model offload: a forward pre-hook copies the component's weights to the device (and the call's tensor inputs),
  a forward hook points the weights back at their host copy (for the components a pipeline lists in `offload_stays`,
  its denoisers, only when another component loads). Peak device memory: the largest component.
- Block streaming: the block stacks (every outermost nn.ModuleList of >= 2 blocks: FLUX.1 `double_blocks`,
  `single_blocks`; Z-Image `noise_refiner`, `context_refiner`, `layers`) stay on the host; everything else lives on
  the device. Block i+1 is copied on a side CUDA stream while block i computes, and block i's device copy is freed
  as soon as it ran. LoRA training works through it: every block is checkpointed (only its inputs are kept) and the
  backward pass streams the blocks again in reverse order. Peak: resident parts + two blocks + activations.
  Where memory allows, `resident_blocks=k` keeps k blocks (spread evenly) on the device and streams the rest.

Host memory. The weights are copied once, at enable time, into flat host buffers (one per block; chunks of
CHUNK_BYTES for model offload) that are page-locked in place with cudaHostRegister, and every parameter/buffer
becomes a view into them. So there is one host copy (the mmapped checkpoint pages are dropped, the file is not read
again), a move is one DMA copy per block instead of hundreds of small ones, and the device side is one allocation
per block. Why not Tensor.pin_memory(): it goes through PyTorch's pinned allocator, which rounds every allocation up
to a power of two (a 680 MB FLUX.1 double block would lock 1 GB).

Only frozen tensors move: parameters with requires_grad=False and buffers (INT8 weights and scales of int8.py's
Int8Linear are buffers, so they stream like any frozen weight). Trainable parameters (LoRA) are moved to the device
once and stay there, so their gradients and optimizer state never cross the bus. Frozen weights are never copied
back (the host copy is still exact): offloading is only re-pointing the tensors, no device-to-host traffic.

Order with LoRA: add LoRA first, then enable (load base -> lora.add_lora -> enable_block_streaming -> optimizer).
Which tensors are trainable is read at enable time; a model changed afterwards is refused at its next call.

On a machine without CUDA every code path still runs with device="cpu": a "device copy" is then a second CPU buffer
and streams/events are skipped, which is how the tests check hooks, prefetch order, accounting and gradients.
"""

import fnmatch
import functools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ALIGN = 256  # byte alignment of each tensor inside a flat buffer (what cudaMalloc gives; kernels like >= 16)
CHUNK_BYTES = 256 << 20  # model offload packs a component in chunks this big: enabling never holds 2 copies of more


# ----------------------------------------------------------------------------------------------------------------------
# Flat host buffers


def _register(buffer: Tensor) -> bool:
    """Page-lock an existing host buffer in place, so host-to-device copies from it are asynchronous DMA."""
    if not torch.cuda.is_available() or buffer.numel() == 0:
        return False
    error = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 1))  # 1: portable
    if error:  # raised, not warned: the failed call also leaves a CUDA error that a later kernel launch would report
        raise RuntimeError(
            f"cudaHostRegister of {buffer.numel() >> 20} MiB failed (CUDA error {error}; locked-memory limit or host "
            "RAM?): pass pin=False to copy from pageable memory instead (slower, copies do not overlap compute)"
        )
    return True


class Pack:
    """Tensors (parameters or buffers) moved into one flat host buffer; each tensor's `.data` becomes a view of it.
    `.data` is re-pointed rather than modules re-assigned, so Parameter objects (held by optimizers, LoRA layers,
    other modules) keep their identity."""

    def __init__(self, tensors: list[Tensor], pin: bool):
        self.tensors, self.layout, offset = tensors, [], 0
        for t in tensors:
            if t.is_meta:
                raise ValueError("cannot offload tensors on the meta device: load the weights first")
            self.layout.append((offset, t.numel() * t.element_size(), t.dtype, t.shape))
            offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        self.nbytes = offset
        self.host = torch.empty(offset, dtype=torch.uint8)
        self.host_views = self.views(self.host)
        for t, view in zip(tensors, self.host_views):
            view.copy_(t.data)
            t.data = view  # the old storage (often mmapped checkpoint pages) is released here, one tensor at a time
        self.pinned = pin and _register(self.host)
        if self.pinned:  # unregistered when the Pack goes (before `host` frees the memory), or by unpin()
            self._unregister = weakref.finalize(self, torch.cuda.cudart().cudaHostUnregister, self.host.data_ptr())

    def views(self, flat: Tensor) -> list[Tensor]:
        return [flat[o : o + n].view(dtype).view(shape) for o, n, dtype, shape in self.layout]

    def point_to(self, flat: Tensor):
        for t, view in zip(self.tensors, self.views(flat)):
            t.data = view

    def point_home(self):
        for t, view in zip(self.tensors, self.host_views):
            t.data = view

    def at_home(self) -> bool:
        return all(t.data_ptr() == v.data_ptr() for t, v in zip(self.tensors, self.host_views))

    def unpin(self):
        if self.pinned:
            self._unregister()
            self.pinned = False


def _tensors(module: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """Parameters and buffers by name, each tensor once."""
    named, seen = {}, set()
    for name, t in [*module.named_parameters(prefix), *module.named_buffers(prefix)]:
        if id(t) not in seen:
            seen.add(id(t))
            named[name] = t
    return named


def _make_resident(tensors, device: torch.device):
    for t in tensors:
        t.data = t.data.to(device)
        if t.grad is not None:
            t.grad = t.grad.to(device)


def _to_device(x, device: torch.device):
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, list | tuple):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


# ----------------------------------------------------------------------------------------------------------------------
# Model offload: a whole component on the device while it runs


def _pipeline_modules(pipe) -> dict[str, nn.Module]:
    found = {}
    for name, value in vars(pipe).items():
        if isinstance(value, nn.Module) and all(value is not m for m in found.values()):
            found[name] = value
    return found


def _is_split(module: nn.Module) -> bool:
    """A module with no forward of its own (the autoencoder) is only used through its methods (ae.encode/ae.decode),
    which call its children: those are what runs, and what gets hooked. (Not "has a child named encoder": T5 has an
    `encoder` ModuleDict whose forward never runs.)"""
    return type(module).forward is nn.Module.forward and any(True for _ in module.children())


def components(pipe) -> dict[str, nn.Module]:
    """The modules a pipeline runs, by attribute name: its nn.Module attributes, a module without a forward replaced
    by its children ("ae.encoder", "ae.decoder")."""
    found = {}
    for name, module in _pipeline_modules(pipe).items():
        if _is_split(module):
            found.update({f"{name}.{child}": m for child, m in module.named_children()})
        else:
            found[name] = module
    return found


class ModelOffload:
    """Hooks that keep each component of a pipeline on the host except while its forward runs.

    Components the pipeline names in `offload_stays` (a sampler's denoiser, called every step: Wan's DiTs) stay on the
    device after their call until another component runs, so a generation copies each of them once instead of once
    per call; one component at a time is still on the device (peak: the largest).

    Accounting for tests and debugging: `log` lists ("load" | "free", component name) in order; `on_device()` the
    components whose weights are on the device now."""

    def __init__(self, pipe, device, pin: bool = True):
        self.pipe, self.device = pipe, torch.device(device)
        pin = pin and self.device.type == "cuda"
        self.modules, self.packs, self.hooks, self.resident, self.log = {}, {}, [], [], []
        for name, module in components(pipe).items():
            if getattr(module, "_offload", None) is not None:  # e.g. a block-streamed transformer: it moves itself
                continue
            module._offload = self
            tensors = _tensors(module).values()
            self.modules[name] = module
            self.packs[name] = [Pack(c, pin) for c in _chunks([t for t in tensors if not t.requires_grad], CHUNK_BYTES)]
            self.resident += [t for t in tensors if t.requires_grad]  # trainable: lives on the device
            self.hooks.append(module.register_forward_pre_hook(functools.partial(self._load, name), with_kwargs=True))
            self.hooks.append(module.register_forward_hook(functools.partial(self._free, name), always_call=True))
        for module in _pipeline_modules(pipe).values():
            if _is_split(module):  # its own tensors (none in our autoencoders) are read by its methods
                self.resident += [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        _make_resident(self.resident, self.device)
        pipe.execution_device = self.device  # the pipeline draws its noise and runs its sampler there
        self.stays = set(getattr(pipe, "offload_stays", ())) & set(self.packs)
        self.staying: list[str] = []  # components of `stays` left on the device after their call

    def _load(self, name, module, args, kwargs):
        # One copy per chunk on the current stream: the forward's kernels are queued after it, so no wait is needed,
        # and the device buffers are freed in stream order by _send_home. (No prefetch: one component at a time.)
        for other in [n for n in self.staying if n != name]:
            self._send_home(other)
        if name not in self.staying:
            for pack in self.packs[name]:
                flat = torch.empty(pack.nbytes, dtype=torch.uint8, device=self.device)
                pack.point_to(flat.copy_(pack.host, non_blocking=pack.pinned))
            self.log.append(("load", name))
        return _to_device(args, self.device), _to_device(kwargs, self.device)

    def _free(self, name, module, args, output):
        if name not in self.stays:
            self._send_home(name)
        elif name not in self.staying:
            self.staying.append(name)

    def _send_home(self, name):
        for pack in self.packs[name]:
            pack.point_home()  # drops the last reference to the device buffer; outputs stay on the device
        self.log.append(("free", name))
        if name in self.staying:
            self.staying.remove(name)

    def release(self):
        """Send the components left on the device (offload_stays) back to the host now."""
        for name in list(self.staying):
            self._send_home(name)

    def on_device(self) -> list[str]:
        return [name for name, packs in self.packs.items() if not all(p.at_home() for p in packs)]

    def remove(self):
        """Undo: hooks removed, host buffers unpinned, everything on the CPU (the weights keep their flat buffers)."""
        self.release()
        for hook in self.hooks:
            hook.remove()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no copy may still read a buffer we are about to unpin
        for name, module in self.modules.items():
            module._offload = None
            for pack in self.packs[name]:
                pack.point_home()
                pack.unpin()
        _make_resident(self.resident, torch.device("cpu"))
        self.pipe.execution_device = None


def _chunks(tensors: list[Tensor], max_bytes: int) -> list[list[Tensor]]:
    chunks, size = [[]], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        if chunks[-1] and size + n > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(t)
        size += n
    return [c for c in chunks if c]


def enable_model_offload(pipe, device="cuda", pin: bool = True) -> ModelOffload:
    """Keep every component of `pipe` on the host and move it to `device` only while it runs; the pipeline computes
    on `device` (pipe.execution_device). Components already streamed by enable_block_streaming are left to it."""
    if getattr(pipe, "_model_offload", None) is not None:
        raise ValueError("model offload is already enabled on this pipeline")
    pipe._model_offload = ModelOffload(pipe, device, pin)
    return pipe._model_offload


def disable_model_offload(pipe):
    if getattr(pipe, "_model_offload", None) is not None:
        pipe._model_offload.remove()
        pipe._model_offload = None


# ----------------------------------------------------------------------------------------------------------------------
# Block streaming


def find_block_stacks(model: nn.Module, min_blocks: int = 2) -> dict[str, nn.ModuleList]:
    """The outermost nn.ModuleLists with at least `min_blocks` children, in registration order (named_modules is a
    pre-order walk, so an outer stack is met before the lists inside its blocks, which are skipped)."""
    stacks = {}
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{s}.") or s == "" for s in stacks)
        if isinstance(module, nn.ModuleList) and len(module) >= min_blocks and not inside:
            stacks[name] = module
    return stacks


@dataclass
class _Arrival:
    flat: Tensor  # the block's device buffer
    ready: "torch.cuda.Event | None"  # recorded on the copy stream when the copy is done
    waited: bool = False  # the compute stream already waits for `ready`


class BlockStreamer:
    """Streams the block stacks of `model` through `device`; see the module docstring. Created by
    enable_block_streaming.

    Accounting (for tests and debugging):
    - `log`: (event, block, phase) in order; event "load" (copy issued), "use" (the block is about to compute),
      "free" (device copy released); phase "forward" or "backward".
    - `blocks_on_device`, `bytes_on_device` (resident tensors + blocks on the device), `resident_bytes`,
      `peak_blocks`, `peak_bytes`.

    Streams: the device buffer of a block is allocated on the compute stream (the current stream when it is needed),
    so memory freed by a finished block is reused in stream order, without record_stream or a CPU sync. Its copy runs
    on a side stream that first waits for the compute stream's queued work (the buffer may be the one the previous
    block just released: at that moment the compute stream has queued block i-1, and block i is about to be queued,
    so the copy of block i+1 overlaps block i: double buffering). The compute stream waits for the copy's event just
    before the block runs. A prefetched block never used (wrong guess) is waited for before it is freed."""

    def __init__(
        self, model: nn.Module, device="cuda", pin=True, min_blocks=2, keep_resident=(), resident_blocks: int = 0
    ):
        self.model, self.device = model, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stacks = find_block_stacks(model, min_blocks)
        if not self.stacks:
            raise ValueError(f"{type(model).__name__} has no nn.ModuleList of >= {min_blocks} blocks to stream")
        blocks = {f"{name}.{i}": block for name, stack in self.stacks.items() for i, block in enumerate(stack)}
        order = list(blocks)
        if not 0 <= resident_blocks < len(order):
            raise ValueError(f"resident_blocks must be in 0..{len(order) - 1}, got {resident_blocks}")
        # Resident blocks spread evenly: the copy of each streamed block then hides behind all the blocks up to it.
        kept = {order[int((i + 0.5) * len(order) / resident_blocks)] for i in range(resident_blocks)}
        streamed_order = [key for key in order if key not in kept]
        # Forward prefetch guesses registration order (the execution order of every model here): after any block,
        # the next streamed one. A wrong guess costs one unoverlapped copy, never correctness. Backward follows the
        # order recorded in the forward pass.
        self.next = {key: next((k for k in order[i + 1 :] if k not in kept), None) for i, key in enumerate(order)}
        self.first = streamed_order[0]

        self.packs, self.trainable, streamed = {}, {}, set()
        for key, block in blocks.items():
            named = _tensors(block, key)
            self.trainable[key] = [t for t in named.values() if t.requires_grad]
            if key in kept:
                continue
            frozen = [t for n, t in named.items() if not t.requires_grad and not _matches(n, keep_resident)]
            if any(id(t) in streamed for t in frozen):
                raise ValueError(f"{key} shares a tensor with another block; tied weights cannot be streamed")
            streamed.update(id(t) for t in frozen)
            self.packs[key] = Pack(frozen, pin and self.cuda)
        if not streamed:
            raise ValueError(
                "nothing to stream: every tensor in the blocks requires grad. Freeze the base first "
                "(model.requires_grad_(False); lora.add_lora does it and leaves the LoRA weights trainable)"
            )
        self.resident = [t for t in _tensors(model).values() if id(t) not in streamed]
        _make_resident(self.resident, self.device)
        self.resident_bytes = sum(t.numel() * t.element_size() for t in self.resident)
        self.signature = _signature(model)

        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.on_device: dict[str, _Arrival] = {}
        self.checkpointed: list[str] = []  # this forward pass's checkpointed blocks in order; backward walks it back
        self.log: list[tuple[str, str, str]] = []
        self.peak_blocks, self.peak_bytes = 0, self.resident_bytes

        self.blocks = blocks
        for key, block in blocks.items():
            # An instance attribute shadows the class's forward; module names (state dict, LoRA keys) are unchanged.
            block.forward = functools.partial(self._forward, key, block.forward)
        self.hooks = [
            model.register_forward_pre_hook(self._before_call),
            model.register_forward_hook(self._after_call, always_call=True),
        ]

    # -- accounting ----------------------------------------------------------------------------------------------------

    @property
    def blocks_on_device(self) -> list[str]:
        return list(self.on_device)

    @property
    def bytes_on_device(self) -> int:
        return self.resident_bytes + sum(self.packs[k].nbytes for k in self.on_device)

    def reset_stats(self):
        self.log.clear()
        self.peak_blocks, self.peak_bytes = len(self.on_device), self.bytes_on_device

    # -- moving blocks -------------------------------------------------------------------------------------------------

    def _load(self, key: str, phase: str):
        """Issue the copy of block `key` to the device (asynchronous on CUDA)."""
        pack = self.packs[key]
        flat = torch.empty(pack.nbytes, dtype=torch.uint8, device=self.device)  # on the compute stream, see above
        ready = None
        if self.cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                flat.copy_(pack.host, non_blocking=pack.pinned)
                ready = self.copy_stream.record_event()
        else:
            flat.copy_(pack.host)
        self.on_device[key] = _Arrival(flat, ready)
        self.log.append(("load", key, phase))
        self.peak_blocks = max(self.peak_blocks, len(self.on_device))
        self.peak_bytes = max(self.peak_bytes, self.bytes_on_device)

    def _wait(self, arrival: _Arrival):
        if self.cuda and not arrival.waited:
            torch.cuda.current_stream(self.device).wait_event(arrival.ready)  # a GPU-side wait: the CPU runs on
        arrival.waited = True

    def fetch(self, key: str, then: str | None, phase: str):
        """Make block `key` usable now (its tensors point at its device copy) and start copying block `then` (a
        streamed block). A resident block is always usable."""
        if key in self.packs:
            if key not in self.on_device:
                self._load(key, phase)  # not prefetched: the first block of a pass, or a wrong guess
            arrival = self.on_device[key]
            self._wait(arrival)
            self.packs[key].point_to(arrival.flat)
            self.log.append(("use", key, phase))
        if then is not None and then not in self.on_device:
            self._load(then, phase)

    def release(self, key: str, phase: str = "forward"):
        """Point block `key` back at its host copy and free its device copy. Its kernels are queued on the compute
        stream, where the buffer was allocated, so the allocator hands that memory out again only in stream order."""
        if key not in self.on_device:
            return  # a resident block
        arrival = self.on_device.pop(key)
        self._wait(arrival)  # an unused prefetch: its copy must be done before the buffer can be reused
        self.packs[key].point_home()
        self.log.append(("free", key, phase))

    def release_all(self, phase: str = "forward"):
        for key in list(self.on_device):
            self.release(key, phase)

    # -- hooks ---------------------------------------------------------------------------------------------------------

    def _before_call(self, model, args):
        if _signature(model) != self.signature:
            raise RuntimeError(
                "the model's parameters changed after enable_block_streaming (a LoRA added, requires_grad changed?): "
                "call offload.disable_block_streaming, change the model, then enable it again"
            )
        self.checkpointed = []  # a new list: autograd contexts of earlier passes keep theirs
        if self.first not in self.on_device:  # overlaps the first block's copy with the embedders
            self._load(self.first, "forward")

    def _after_call(self, model, args, output):
        self.release_all()  # prefetched blocks the model did not run (a text encoder that stops early)

    def _forward(self, key: str, forward, *args, **kwargs):
        if torch.is_grad_enabled() and (self.trainable[key] or _any_requires_grad(args, kwargs)):
            return _checkpoint(self, key, forward, args, kwargs)
        self.fetch(key, self.next.get(key), "forward")
        try:
            return forward(*args, **kwargs)
        finally:
            self.release(key)

    def remove(self):
        """Undo: original forwards and no hooks, host buffers unpinned, every tensor on the CPU."""
        self.release_all()
        if self.cuda:
            torch.cuda.synchronize(self.device)  # no copy may still read a buffer we are about to unpin
        for block in self.blocks.values():
            del block.forward
        for hook in self.hooks:
            hook.remove()
        for pack in self.packs.values():
            pack.unpin()
        _make_resident(self.resident, torch.device("cpu"))
        self.model._offload = None


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _signature(model: nn.Module) -> tuple[int, int, int]:
    """Cheap enough to check at every call: how many parameters, how many trainable, how many buffers."""
    params = list(model.parameters())
    return len(params), sum(p.requires_grad for p in params), sum(1 for _ in model.buffers())


def _any_requires_grad(args, kwargs) -> bool:
    return any(isinstance(v, Tensor) and v.requires_grad for v in (*args, *kwargs.values()))


def enable_block_streaming(
    model: nn.Module, device="cuda", pin: bool = True, min_blocks: int = 2, keep_resident=(), resident_blocks: int = 0
) -> BlockStreamer:
    """Stream the block stacks of `model` through `device`; every other tensor, and every trainable one, becomes
    resident there. Returns the BlockStreamer (its accounting is for tests and debugging).

    resident_blocks: how many blocks stay on the device instead (spread evenly), as memory allows. A pass then
    copies fewer bytes and each copy has more compute to hide behind: the way to trade memory for speed when the
    bus is the bottleneck (a 12B model at batch 1 on PCIe). min_blocks: a ModuleList needs this many children to
    count as a stack. keep_resident: fnmatch patterns of tensor names (as in model.named_parameters()) kept on the
    device although inside a block: tensors a model reads outside the block's own forward, e.g.
    "*relative_attention_bias*" for T5, whose first block's table is read by the encoder itself."""
    if getattr(model, "_offload", None) is not None:
        raise ValueError(f"{type(model).__name__} is already offloaded or streamed; disable that first")
    model._offload = BlockStreamer(model, device, pin, min_blocks, keep_resident, resident_blocks)
    return model._offload


def disable_block_streaming(model: nn.Module):
    if isinstance(getattr(model, "_offload", None), BlockStreamer):
        model._offload.remove()


# ----------------------------------------------------------------------------------------------------------------------
# Checkpointed, streamed blocks for training


def _checkpoint(streamer: BlockStreamer, key: str, forward, args, kwargs):
    """Run one block through _StreamedCheckpoint. Top-level tensor arguments get gradients; anything else (None,
    numbers) is passed through as is."""
    values, n_args, names = [*args, *kwargs.values()], len(args), list(kwargs)
    where = [i for i, v in enumerate(values) if isinstance(v, Tensor)]
    template = [None if i in where else v for i, v in enumerate(values)]  # holds no tensor: only ctx saves them

    def run(*tensors):
        vals = list(template)
        for i, t in zip(where, tensors):
            vals[i] = t
        return forward(*vals[:n_args], **dict(zip(names, vals[n_args:])))

    inputs = [values[i] for i in where]
    return _StreamedCheckpoint.apply(streamer, key, run, len(inputs), *inputs, *streamer.trainable[key])


class _StreamedCheckpoint(torch.autograd.Function):
    """Activation checkpointing of one streamed block (reentrant style, written out so that the backward pass can
    fetch the block before recomputing it and prefetch the block before it).

    Forward runs the block without building a graph and keeps only its inputs. Backward fetches the block again,
    prefetches the one that ran before it, recomputes the forward with the same RNG and autocast state, and takes
    the gradients of the inputs and of the block's trainable parameters. Those parameters are passed to apply() as
    extra inputs so the output requires grad even when the block's input does not (a frozen embedder before the
    first block): without that, that block's LoRA would silently get no gradient. Their gradients are returned like
    any input's and autograd accumulates them into .grad.

    Streaming needs this: a block's weights saved by autograd for backward would be its device copy, freed and
    reused by other blocks long before the backward pass reads it."""

    @staticmethod
    def forward(ctx, streamer, key, run, n_inputs, *tensors):
        inputs = tensors[:n_inputs]
        ctx.save_for_backward(*inputs)
        ctx.streamer, ctx.key, ctx.run, ctx.n_inputs = streamer, key, run, n_inputs
        ctx.order, ctx.position = streamer.checkpointed, len(streamer.checkpointed)
        streamer.checkpointed.append(key)
        ctx.rng = torch.get_rng_state(), torch.cuda.get_rng_state(streamer.device) if streamer.cuda else None
        device_type = streamer.device.type
        ctx.autocast = dict(
            device_type=device_type,
            enabled=torch.is_autocast_enabled(device_type),
            dtype=torch.get_autocast_dtype(device_type),
        )
        streamer.fetch(key, streamer.next.get(key), "forward")
        try:
            return run(*inputs)
        finally:
            streamer.release(key)

    @staticmethod
    def backward(ctx, *grad_outputs):
        s, n = ctx.streamer, ctx.n_inputs
        needs = ctx.needs_input_grad[4 : 4 + n]
        inputs = [x.detach().requires_grad_(need) for x, need in zip(ctx.saved_tensors, needs)]
        params = s.trainable[ctx.key]
        previous = next((k for k in reversed(ctx.order[: ctx.position]) if k in s.packs), None)  # streamed only
        s.fetch(ctx.key, previous, "backward")
        try:
            with torch.enable_grad(), _rng_restored(ctx.rng, s), torch.autocast(**ctx.autocast):
                out = ctx.run(*inputs)
            outs = (out,) if isinstance(out, Tensor) else tuple(out)
            pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
            wrt = [x for x in inputs if x.requires_grad] + params
            grads = [None] * len(wrt)
            if pairs and wrt:
                outputs, grads_out = zip(*pairs)
                grads = torch.autograd.grad(outputs, wrt, grads_out, allow_unused=True)
        finally:
            s.release(ctx.key, "backward")
        grads = iter(grads)
        input_grads = [next(grads) if x.requires_grad else None for x in inputs]
        return None, None, None, None, *input_grads, *grads


@contextmanager
def _rng_restored(state, streamer: BlockStreamer):
    """The RNG as it was when the block first ran (LoRA dropout draws the same mask), restored afterwards."""
    with torch.random.fork_rng(devices=[streamer.device] if streamer.cuda else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], streamer.device)
        yield
