"""LoRA training on several GPUs with torch.distributed: the mechanics train.py needs under torchrun.

    torchrun --nproc-per-node 8 train.py flux1 --data photos/ --output out/lora --batch-size 2          # data parallel
    torchrun --nproc-per-node 8 train.py wan22 --data clips/ --output out/lora --shard                  # FSDP2

One process per GPU, rank r of N. `python train.py` (or torchrun with one process) is the single-process path: its
`current()` is a World of size 1 whose methods do nothing (or return their argument). Nothing here knows a model
family: it sees the transformer's block stacks, its LoRA parameters and an optimizer.

The rules (train.py applies them; the reasons are in the functions below):
- Data: one global order, the one a single process with --batch-size N x B would use; every rank draws sigma, noise
  and caption dropout for the whole global micro-batch from the shared seeded generator and trains on its slice
  (`share`), with a loss weight that makes the summed gradient the big batch's mean (up to float rounding).
- Gradients: plain data parallel sums the LoRA gradients with one all-reduce per optimizer step (`sync_gradients`);
  `--shard` (FSDP2 `fully_shard` per transformer block, `shard`) reduce-scatters them itself, summed too.
- Checkpoints: one file, the single-process format, written by rank 0 (`full` gathers sharded tensors), plus every
  rank's RNG state (`rng_states`), so any N (or one process) can resume it.
- Errors: a failure in a region without collectives is agreed on (`together`), so every rank stops and rank 0 prints
  it once; a rank that dies inside a collective is noticed by the others as a lost connection (gloo at once; NCCL
  through torchrun, which stops the other workers, or the TIMEOUT), reported in one line by rank 0.
"""

import functools
import gc
import os
import sys
import traceback
from contextlib import contextmanager
from datetime import timedelta

# How long a collective may wait for the slowest rank before the run is declared hung. It bounds the waits at the
# agreement points too (a rank still loading or caching its share), so it is generous; a crashed rank is noticed much
# sooner (gloo: its closed connection; NCCL: torchrun stops the other workers as soon as one exits).
TIMEOUT = timedelta(minutes=30)


def launched() -> bool:
    """Started by torchrun (or anything that sets its variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class RaisedEverywhere(Exception):
    """Rank 0's own failure, which every rank now knows of (Group.agree): launch raises the original on rank 0, printed
    as one process prints it. (train.py's errors decided from all-reduced values, which every rank raises at the same
    step, say so with a `raised_on_every_rank` class attribute instead.)"""


class Stopped(Exception):
    """This rank stops because another one failed; it carries that rank's exit code and message."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class World:
    """One process: rank 0 of 1. Every method is what a single process does (nothing, or the identity)."""

    rank, size = 0, 1
    sharded = False

    def share(self, n: int):
        return None  # micro_step's single-process path: the whole batch, weight 1

    def any(self, flag: bool) -> bool:
        return flag

    def sum(self, value: float) -> float:
        return value

    def sync_gradients(self, params):
        pass

    def full(self, t):
        return t

    def gather(self, obj) -> list:
        return [obj]

    def rng_states(self) -> dict:
        return {}

    @contextmanager
    def together(self):
        yield


_world = World()


def current() -> World:
    return _world


# ----------------------------------------------------------------------------------------------------------------------
# The process group


class Group(World):
    """Rank `rank` of a torchrun launch: the process group (NCCL on GPUs, gloo on the CPU) and FSDP2's device mesh."""

    def __init__(self, device: str):
        import torch
        import torch.distributed as dist

        self.rank, self.size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        kw = {"device_id": self.device} if self.device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=TIMEOUT, **kw)
        self.agreed_once = False  # until the first agreement, a failing rank reports itself there (see launch)

    # -- the global batch

    def share(self, n: int) -> tuple[slice, float]:
        """This rank's slice of a global micro-batch of n samples, and its loss weight. Rank r takes samples
        [r n / N, (r + 1) n / N): B each for a full batch of N x B, as even as possible for the short last batch of a
        bucket. Each rank's loss is the mean over its k samples times k / n, and the ranks' gradients are summed, so
        the result is exactly the gradient of the mean over all n samples (what one process computes; every sample
        of a batch has the bucket's shape, so the mean over samples is the mean over elements). A rank left with no
        sample (n < N) runs the batch's first sample with weight 0: FSDP2 needs every rank in every forward, and it
        costs no wall time, the other ranks being busy with theirs."""
        lo, hi = self.rank * n // self.size, (self.rank + 1) * n // self.size
        return (slice(lo, hi), (hi - lo) / n) if hi > lo else (slice(0, 1), 0.0)

    # -- collectives (every rank calls them in the same order)

    def _reduce(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is on any: a Ctrl-C seen by one rank (or by each at a different moment) stops
        all of them after the same step."""
        return self._reduce([float(flag)])[0] > 0

    def sum(self, value: float) -> float:
        return self._reduce([value])[0]

    def sync_gradients(self, params):
        """Data parallel: sum the LoRA gradients of all ranks, once per optimizer step (after the accumulation), in one
        flat all-reduce. Why not DistributedDataParallel: it averages (the per-rank weights of `share` need a sum), it
        reduces after every backward unless told not to, and it wants every rank in every forward; a LoRA's gradients
        are small (tens of MB) next to a multi-second backward of the frozen base, so overlapping their reduction
        with the backward, which is what DDP adds, would gain little. With --shard, FSDP2 already reduced them."""
        if self.sharded:
            return
        import torch
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)

    def full(self, t):
        """A sharded tensor (FSDP2's DTensor) gathered whole on every rank; anything else as it is. Collective."""
        from torch.distributed.tensor import DTensor

        return t.full_tensor() if isinstance(t, DTensor) else t

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order."""
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def rng_states(self) -> dict:
        """Every rank's torch RNG states (CPU, and its GPU's): they draw each rank's LoRA-dropout masks. The shared
        generator (sigma, noise, caption dropout) is the same on every rank and saved once, as in one process."""
        import torch

        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"world_size": self.size, "rank_rng": self.gather((torch.get_rng_state(), cuda))}

    # -- errors

    @contextmanager
    def together(self):
        """A region without collectives that may fail on some ranks only (loading, caching a share, writing a file
        on rank 0): at its end every rank says whether it failed, and if any did, all stop with the first failure."""
        try:
            yield
        except Exception as e:
            self.agree(e)
            raise  # not reached: agree raises
        self.agree(None)

    def agree(self, error: BaseException | None):
        reports = self.gather(None if error is None else _report(error))
        self.agreed_once = True
        failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        if not failed:
            return
        rank, (message, exit_code, usage) = failed[0]
        if rank == self.rank and self.rank != 0 and not usage:
            traceback.print_exception(error, file=sys.__stderr__)  # a bug: its traceback, from where it happened
        if rank == self.rank == 0:
            raise RaisedEverywhere() from error  # unwrapped in launch: rank 0 prints its own error as usual
        raise Stopped(message if rank == 0 else f"rank {rank}: {message}", exit_code)


def _report(error: BaseException) -> tuple[str, int, bool]:
    """(one-line message, exit code, whether it is bad input rather than a bug): what sample.run_cli prints."""
    from sample import error_report

    report = error_report(error)
    return (*report, True) if report else (f"{type(error).__name__}: {error}", 1, False)


def _lost_contact(error: BaseException) -> bool:
    """A collective failed because another rank is gone (its connection closed, or the timeout passed)."""
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return isinstance(error, RuntimeError) and any(f"torch{os.sep}distributed" in f.filename for f in frames)


def launch(command):
    """`command(args)` as it is in one process; under torchrun, as one rank of the group. Output: rank 0 prints as one
    process would; the other ranks are silent (no bars, no stdout, no warnings) except for an error of their own.
    Errors: every rank ends with the same exit code, the message shown once (see Group.agree and _lost_contact)."""
    if not launched():
        return command

    @functools.wraps(command)
    def run(args):
        global _world
        import torch

        from sample import UsageError, pick_device

        rank = int(os.environ["RANK"])
        if rank != 0:
            args.quiet = True
            sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
        device = pick_device(args.device)
        if torch.device(device).type not in ("cuda", "cpu") or torch.device(device).index is not None:
            raise UsageError(
                f"--device {device}: under torchrun each process takes the GPU of its local rank; pass --device "
                "cuda or --device cpu (or leave it out)"
            )
        local = int(os.environ.get("LOCAL_RANK", "0"))
        _world = Group(f"cuda:{local}" if torch.device(device).type == "cuda" else "cpu")
        args.device = str(_world.device)
        try:
            result = command(args)
        except BaseException as error:
            raise _settle(_world, error) from None  # no destroy_process_group: exiting is enough, and cannot hang
        import torch.distributed as dist

        # Unreferenced cycles may still hold gloo work objects; freed at interpreter exit, they abort the process now
        # and then ("terminate called without an active exception", seen about once in 10-30 CPU runs here). Freed
        # now, while the interpreter is whole, they did not (0 in 10 of the benchmark's workers, against 1 in 10).
        gc.collect()
        dist.destroy_process_group()
        return result

    return run


def _settle(world: Group, error: BaseException) -> BaseException:
    """What this rank raises to sample.run_cli (which prints it, silently on ranks other than 0)."""
    from sample import UsageError

    if isinstance(error, RaisedEverywhere):
        return error.__cause__
    if isinstance(error, Stopped):
        return _quiet(error, error.exit_code, show=world.rank == 0)
    if getattr(error, "raised_on_every_rank", False):
        return error
    if not world.agreed_once:  # failed before the first agreement point, where the other ranks now wait
        try:
            world.agree(error)
        except (Stopped, RaisedEverywhere) as agreed:
            return _settle(world, agreed)
        except Exception:  # the others are gone too: report this rank's own error below
            pass
    if _lost_contact(error):
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        message = (
            "lost contact with another process of this run (it stopped with an error, shown above, or was killed): "
            f"{first}. Checkpoints written so far are intact: rerun the same command with --resume to continue"
        )
        return _quiet(UsageError(message), 1, show=world.rank == 0)
    if world.rank == 0:
        return error
    if isinstance(error, KeyboardInterrupt):  # every rank got the same Ctrl-C; rank 0 says so
        return _quiet(error, 130, show=False)
    message, code, usage = _report(error)
    if not usage:
        traceback.print_exception(error, file=sys.__stderr__)
    print(f"error: rank {world.rank}: {message}", file=sys.__stderr__)
    return _quiet(error, code, show=False)


def _quiet(error: BaseException, exit_code: int, show: bool):
    """A UsageError with the exit code, printed by run_cli on rank 0 only (the others' stderr is silenced)."""
    from sample import UsageError

    e = UsageError(str(error) if show else "")
    e.exit_code = exit_code
    return e


# ----------------------------------------------------------------------------------------------------------------------
# --shard: FSDP2


def shard(world: Group, transformer, device: str):
    """FSDP2 `fully_shard` on every block of every block stack, then on the transformer (its remaining parameters:
    embedders, final layer). Each rank keeps 1/N of every parameter, frozen base and LoRA alike; a block's weights
    are all-gathered just before it runs (forward, and again in backward) and freed after. The LoRA's gradients are
    reduce-scattered, so its optimizer state is sharded too (AdamW works on the DTensor shards). Call after the LoRA
    and gradient checkpointing are in place (checkpointing recomputes inside the block, after FSDP2 gathered it), and
    collect the parameters for the optimizer afterwards: FSDP2 replaces them with sharded ones."""
    import warnings

    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    import offload

    # FSDP2 warns when a sharded module returns a view (an in-place op on it would skip its backward hook). The
    # transformers' outputs are views (a slice of the token sequence); every pipeline's velocity() uses them out of
    # place (cast to float32, negated, unpatchified), and the --shard tests compare its gradients with one process's.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    _int8_weights_as_parameters(transformer)
    mesh = init_device_mesh(torch.device(device).type, (world.size,))
    for stack in offload.find_block_stacks(transformer).values():
        for block in stack:
            fully_shard(block, mesh=mesh)
    fully_shard(transformer, mesh=mesh)
    for module in transformer.modules():
        if isinstance(module, FSDPModule):
            # Sum, not FSDP2's default mean: each rank's loss is already weighted (Group.share). Forcing a plain SUM
            # reduction also keeps gloo working (a custom divide factor would use NCCL's PREMUL_SUM).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    world.sharded = True


def _int8_weights_as_parameters(model):
    """int8.py keeps an INT8 layer's weight, scale and bias as buffers (frozen, out of model.parameters()); FSDP2
    shards parameters only and would copy buffers whole to every GPU. Registered as frozen parameters they are sharded
    like the bf16 weights (FSDP2 all-gathers mixed dtypes as bytes); nothing trains them."""
    from torch import nn

    import int8

    for layer in model.modules():
        if isinstance(layer, int8.Int8Linear):
            for name in ("weight", "weight_scale", "bias"):
                tensor = layer._buffers.get(name)
                if tensor is not None:
                    del layer._buffers[name]
                    layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


def copy_into(param, full):
    """Load a whole tensor (from a checkpoint) into a parameter, sharded or not."""
    import torch
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            # every rank read the same file: each keeps its own shard of it, no communication
            full = full.to(param.device, param.dtype)
            param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
        else:
            param.copy_(full)


def full_optimizer_state(world: World, optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor gathered whole: the single-process format."""
    state = optimizer.state_dict()
    if not world.sharded:
        return state
    state["state"] = {i: {k: world.full(v).cpu() for k, v in s.items()} for i, s in state["state"].items()}
    return state


def sharded_optimizer_state(state: dict, optimizer) -> dict:
    """The inverse, before optimizer.load_state_dict: each whole state tensor laid out like its parameter."""
    import torch
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for i, s in state["state"].items():
        p = params[i]
        out[i] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape
            else v
            for k, v in s.items()
        }
    return {**state, "state": out}


def gather_lora(world: World, transformer):
    """After training with --shard: every LoRA weight gathered whole on every rank (collective), as plain tensors, so
    lora.save can write them from rank 0."""
    from torch import nn

    import lora

    for layer in lora.lora_layers(transformer).values():
        for name in ("lora_A", "lora_B"):
            setattr(layer, name, nn.Parameter(world.full(getattr(layer, name)).detach(), requires_grad=False))
