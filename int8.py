"""INT8 linear layers for any model of this project: quantise once, run with `torch._int_mm`, train LoRAs on top.

Scheme (W8A8, symmetric, as in LLM.int8()'s vector-wise quantisation, Dettmers et al., arXiv 2208.07339, without
its outlier decomposition; and SmoothQuant's "per-token dynamic" activations, Xiao et al., arXiv 2211.10438):
- the weight (out, in) is quantised once, one scale per output channel: s_w = amax(|W[n, :]|) / 127;
- the activations are quantised at run time, one scale per token (row of the flattened (M, in) input):
  s_x = amax(|x[m, :]|) / 127, computed in fp32;
- out[m, n] = s_x[m] * s_w[n] * sum_k x_q[m, k] W_q[n, k] (+ bias), the sum in int32 by `torch._int_mm`, the rest in
  fp32, the result cast back to the input's dtype.
Both scales factor out of the sum over k, which is why the weight is scaled per output channel and the activations per
token (and not, say, the weight per input channel).

Costs: the int8 weight is half of bf16's memory; the per-token quantisation is an extra pass over the activations,
which `torch.compile` fuses into one kernel (see benchmarks/bench_int8.py for what that buys on this CPU).

    import int8
    names = int8.quantize(pipe.transformer)            # every nn.Linear that benefits, in place
    int8.save_quantized(pipe.transformer, "flux1-dev-int8.safetensors")
    # later: build the float model on the meta device and assign the saved INT8 weights (no float weights read)
    int8.load_quantized(model_on_meta, "flux1-dev-int8.safetensors")
"""

import fnmatch
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from flux1 import load_into, read_weights

FORMAT = "rectified-flow-int8"

# Layers quantize() leaves in float, as fnmatch patterns over module names (a LoRA's ".base" suffix is ignored).
DEFAULT_SKIP = [
    # FLUX.1: the modulation and embedder layers are fed the per-sample conditioning vector, so their input has only
    # batch-many rows (M = B, often 1 or 2): int8 saves nothing there (the GEMM is a matrix-vector product bound by
    # reading the weight; CUDA's _int_mm would even need the rows padded to 17), and their outputs scale, shift and
    # gate every token of every block, so their error would be felt everywhere.
    "*.img_mod.lin",
    "*.txt_mod.lin",
    "*.modulation.lin",
    "time_in.*",
    "vector_in.*",
    "guidance_in.*",
    "final_layer.adaLN_modulation.*",
    # FLUX.1: Flux.forward reads the compute dtype from img_in.weight (an int8 buffer would turn the latents into
    # int8), and img_in is tiny anyway (in_features 64).
    "img_in",
    # Z-Image: the same per-sample conditioning layers (timestep embedding -> adaLN scale/gate of every block); the
    # timestep embedder also reads its compute dtype from its first weight.
    "*adaLN_modulation*",
    "t_embedder.*",
    # Wan2.2: the timestep embedding and projection (one row per latent frame) and the output head run in float32 in
    # the official model, and the head is the last layer (see MIN_FEATURES).
    "time_embedding.*",
    "time_projection.*",
    "head.head",
    # FLUX.2-klein: its three model-wide modulations, fed the timestep vector (same reasons as FLUX.1's).
    "*_stream_modulation*",
]

# Layers narrower than this on either side are left in float: the patch embedders and output projections of the
# image models (64 wide). They are a sliver of the compute, and being the first/last layers their error is not
# averaged out by anything that follows.
MIN_FEATURES = 128

# ----------------------------------------------------------------------------------------------------------------------
# Quantisation and the INT8 matmul


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row of a 2-D tensor: (x_q int8, scale fp32 (rows, 1)) with x ~= x_q * scale. Scale and
    rounding are computed in fp32 whatever x's dtype (the amax itself is exact in any dtype, so it is taken first)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=1e-12) / 127  # an all-zero row quantises to zeros instead of 0/0
    # -128 unused: keeps the range symmetric. In place on the fresh quotient: two fewer temporaries of x's size.
    x_q = (x.float() / scale).round_().clamp_(-127, 127).to(torch.int8)
    return x_q, scale


def int_mm_plan(m: int, k: int, n: int, device) -> str:
    """How to run an (m, k) x (k, n) INT8 matmul on `device`: "int_mm" (torch._int_mm as is), "pad" (pad the rows up
    to 17 first) or "float" (dequantise the weight, float matmul). Pure shape logic, so it is testable without a GPU.

    CUDA's _int_mm (cuBLASLt int8 GEMM) requires m > 16 and k, n multiples of 8 (PyTorch's checks in
    aten/src/ATen/native/cuda/Blas.cpp) and compute capability >= 7.5; zero rows are free to add, columns are not.
    The CPU kernel (oneDNN) takes any shape. Other backends: float, to never fail."""
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return "int_mm"
    if device.type != "cuda":
        return "float"
    if k % 8 or n % 8:
        return "float"
    if torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (7, 5):
        return "float"
    return "pad" if m <= 16 else "int_mm"


def dequantize(weight: Tensor, weight_scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (weight.float() * weight_scale.float()[:, None]).to(dtype)


def int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, plan: str | None = None):
    """x (M, K) float, weight (N, K) int8, weight_scale (N,) -> (M, N) in x's dtype. `plan`: see int_mm_plan (default:
    the one for these shapes and x's device; tests force the others on CPU)."""
    m, k = x.shape
    plan = plan or int_mm_plan(m, k, weight.shape[0], x.device)
    if plan == "float":  # weight-only INT8: the activations stay float, which is only more accurate
        return F.linear(x, dequantize(weight, weight_scale, x.dtype), None if bias is None else bias.to(x.dtype))
    x_q, x_scale = quantize_rows(x)
    if plan == "pad":
        x_q = F.pad(x_q, (0, 0, 0, 17 - m))
    # weight.t() is a view of the contiguous (N, K) tensor, i.e. a column-major (K, N) operand: what cuBLASLt's int8
    # GEMM wants (a contiguous (K, N) copy is several times slower on CUDA) and also the faster layout for oneDNN here
    # (~1.6x at 256x3072x3072 on this CPU).
    out = torch._int_mm(x_q, weight.t())[:m].float()
    out.mul_(x_scale).mul_(weight_scale.float())  # in place: ~5% faster eager; torch.compile fuses either form
    if bias is not None:
        out.add_(bias.float())
    return out.to(x.dtype)


class Int8LinearFunction(torch.autograd.Function):
    """int8_linear with a gradient for the input only: the base layer is frozen, so no weight (or bias) gradient.

    Backward: grad_x = grad_out @ (s_w * W_q), in the input's dtype (a float matmul with the dequantised weight).
    That is the exact gradient of the layer's quantised linear map, taken straight through the activation rounding
    (the rounding's own derivative is zero almost everywhere, which would stop all learning upstream). An INT8
    backward is possible (fold s_w into grad_out's columns, quantise it per row, _int_mm with W_q as the (N, K) second
    operand), but that operand is the slow layout for _int_mm on both CUDA and CPU, and it would add int8 noise to the
    gradients; the float matmul keeps LoRA training on an INT8 base as accurate as on the dequantised float base."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
        return int8_linear(x, weight, weight_scale, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, weight_scale, _ = inputs
        ctx.save_for_backward(weight, weight_scale)
        ctx.x_dtype = x.dtype

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight, weight_scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            # s_w scales grad_out's columns (the weight's rows), so W_q only needs a cast, not a float copy to scale.
            g = (grad_out.float() * weight_scale.float()).to(ctx.x_dtype)
            grad_x = g @ weight.to(ctx.x_dtype)
        return grad_x, None, None, None


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear running in INT8. Buffers: `weight` int8 (out, in), `weight_scale` fp32 (out,) and `bias`
    (the original float dtype) or None. Buffers, not parameters: the layer is frozen, and `model.parameters()` then
    lists only what can be trained (e.g. LoRAs on top)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """Quantise an nn.Linear's weight per output channel (on its device; a meta layer gives meta buffers)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        weight, scale = quantize_rows(w)
        layer.weight, layer.weight_scale = weight, scale[:, 0]
        layer.bias = None if linear.bias is None else linear.bias.detach()
        return layer

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() cast every float buffer, which would round the scales to bf16 (0.4% error on
        # every output). Keep them fp32, only moved; the int8 weight is left alone by those casts anyway.
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight this layer computes with, (out, in)."""
        return dequantize(self.weight, self.weight_scale, dtype)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and x.requires_grad:
            out = Int8LinearFunction.apply(x2, self.weight, self.weight_scale, self.bias)
        else:  # inference: no autograd node, which also keeps torch.compile's graph plain
            out = int8_linear(x2, self.weight, self.weight_scale, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


# ----------------------------------------------------------------------------------------------------------------------
# Swapping a model's layers


def _logical_name(name: str) -> str:
    """A LoRALinear's base layer is matched by the name of the layer it stands for."""
    return name.removesuffix(".base") if name.endswith(".base") else name


def _set_module(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantizable(model: nn.Module, skip=DEFAULT_SKIP, min_features: int = MIN_FEATURES) -> list[str]:
    """Names of the layers quantize() would swap: plain nn.Linear modules (not subclasses such as the one inside
    nn.MultiheadAttention, whose owner reads .weight directly), not matching `skip`, at least `min_features` wide on
    both sides. Int8Linear and LoRALinear modules are not nn.Linear, so they are never swapped themselves; the
    nn.Linear inside a LoRALinear (`<name>.base`) is."""
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if min(module.in_features, module.out_features) < min_features:
            continue
        if any(fnmatch.fnmatchcase(_logical_name(name), pattern) for pattern in skip):
            continue
        names.append(name)
    return names


@torch.no_grad()
def quantize(model: nn.Module, skip=DEFAULT_SKIP, min_features: int = MIN_FEATURES) -> list[str]:
    """Swap the linear layers that benefit for Int8Linear, in place, on whatever device they are (meta included:
    meta buffers, to be assigned from a saved file). Returns the swapped names. Quantise first, then add LoRAs
    (lora.add_lora wraps Int8Linear like any linear), or quantise a model that has LoRAs: their bases are swapped."""
    names = quantizable(model, skip, min_features)
    for name in names:
        _set_module(model, name, Int8Linear.from_linear(model.get_submodule(name)))
    return names


def quantized_layers(model: nn.Module) -> dict[str, Int8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}


# ----------------------------------------------------------------------------------------------------------------------
# Saving and loading quantised weights


def save_quantized(model: nn.Module, path, metadata: dict[str, str] | None = None):
    """The whole state dict (int8 weights, their scales and every float tensor) as one safetensors file. Which layers
    are INT8 is told by the file itself: the keys ending in `.weight_scale`."""
    state = model.state_dict()
    if not quantized_layers(model):
        raise ValueError("the model has no Int8Linear layer: call int8.quantize(model) before save_quantized")
    if on_meta := [k for k, v in state.items() if v.is_meta]:
        raise ValueError(f"cannot save tensors on the meta device (not loaded?): {on_meta[:3]}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {
        "format": FORMAT,
        "version": "1",
        "scheme": "w8a8 symmetric: weight per output channel, activation per token",
    }
    save_file(tensors, str(path), metadata={**meta, **(metadata or {})})


def read_metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f.metadata() or {}


def load_quantized(model: nn.Module, path) -> nn.Module:
    """Make `model` (a float model, best built on the meta device; loaded works too) hold the INT8 weights saved by
    save_quantized: the layers saved as INT8 become (meta) Int8Linear, then every tensor of the file is assigned
    (mmapped, no copy) with strict key checking. Move the model to its device afterwards."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quantised weights file not found: {path}")
    fmt = read_metadata(path).get("format")
    if fmt != FORMAT:
        raise ValueError(
            f"{path} is not a {FORMAT} file (its metadata says format={fmt!r}); quantise a float model with "
            "int8.quantize() and save it with int8.save_quantized()"
        )
    state = read_weights(path)
    for name in sorted(k.removesuffix(".weight_scale") for k in state if k.endswith(".weight_scale")):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path} has an INT8 layer {name!r} that {type(model).__name__} does not have") from None
        if isinstance(module, Int8Linear):
            continue
        if type(module) is not nn.Linear:
            raise ValueError(f"{path} has {name!r} as INT8, but it is a {type(module).__name__}, not an nn.Linear")
        bias = module.bias is not None
        _set_module(model, name, Int8Linear(module.in_features, module.out_features, bias=bias, device="meta"))
    return load_into(model, state, path)
