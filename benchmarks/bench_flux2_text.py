"""FLUX.2-klein text encoding: our Qwen3 (27 layers built, outputs of layers 9/18/27) vs transformers' full model
(all layers with output_hidden_states, as diffusers' Flux2KleinPipeline runs it), on the same weights.

Mid-size Qwen3 config: Qwen3-4B's depth (36 layers) and head layout (head_dim 128, 4:1 query to key/value heads) at a
smaller width (hidden 1024, 8 query / 2 key-value heads, MLP 3072), 512 tokens (klein pads every prompt to 512; a
~20-token prompt), batch 1, one thread, the two sides interleaved. Only the decoder layers differ in cost, so the
expected ratio is about 27/36 = 0.75.

    python benchmarks/bench_flux2_text.py [--windows 3] [--calls 2] [--dtypes bf16,fp32] [--causal-lm]
"""

import argparse

import torch
from common import interleaved, peak_rss_bytes
from fakes import rel

import flux2_klein as fk
from zimage import Qwen3Config, Qwen3Encoder, load_into


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--causal-lm", action="store_true", help="transformers side as Qwen3ForCausalLM (its LM head too)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import Qwen3Config as HFConfig
    from transformers import Qwen3ForCausalLM, Qwen3Model

    config = dict(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=36,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    hf_config = HFConfig(**config, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    ref = (Qwen3ForCausalLM if args.causal_lm else Qwen3Model)(hf_config).eval().requires_grad_(False)
    model = ref.model if args.causal_lm else ref
    unused = tuple(f"layers.{i}." for i in range(27, 36))  # and the final norm: never built
    sd = {k: v for k, v in model.state_dict().items() if k != "norm.weight" and not k.startswith(unused)}
    with torch.device("meta"):
        ours = Qwen3Encoder(Qwen3Config(**config, rope_theta=1e6), 27)
    ours = load_into(ours, sd, "benchmark").eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())

    ids = torch.full((1, 512), 151643)
    ids[0, :20] = torch.randint(0, 151000, (20,))
    mask = (ids != 151643).long()
    print(
        f"Qwen3 text encoding, {params / 1e6:.0f}M params (36 layers; ours builds 27), 512 tokens (20 real), 1 thread; "
        f"transformers side: {type(ref).__name__}; torch {torch.__version__}"
    )

    def run_ours():
        return torch.cat(ours(ids, mask, list(fk.TEXT_LAYERS)), -1)

    def run_ref():
        out = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        return torch.cat([out.hidden_states[k] for k in fk.TEXT_LAYERS], -1)

    inv_freq = model.rotary_emb.inv_freq.clone()
    for name in args.dtypes.split(","):
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        ours.to(dtype), ref.to(dtype)
        # As from_pretrained(dtype=...) leaves it: RoPE's frequencies in fp32 (`.to()` would round them to bf16).
        model.rotary_emb.inv_freq = inv_freq.clone()
        with torch.inference_mode():
            a, b = run_ours(), run_ref()
            err = rel(a, b)
            r = interleaved({"ours": run_ours, "transformers": run_ref}, args.windows, args.calls)
        print(
            f"{name}: ours {r['ours']:.3f} s, transformers {r['transformers']:.3f} s, "
            f"ratio {r['ours'] / r['transformers']:.3f}, util {r['util']:.2f}, rel diff {err:.1e}"
        )
    print(f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
