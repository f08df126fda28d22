"""Train a LoRA for any model by name.

    python train.py flux1 --data photos/ --output out/my-lora --steps 1000 --rank 16 --resolution 512 768
    python train.py zimage --data photos/ --output out/zimage-lora      # trains on Z-Image base (see --allow-distilled)
    python train.py flux1 --data photos/ --output out/my-lora --resume  # continue exactly where it stopped

Data: a folder of images with same-name .txt captions (cat.jpg + cat.txt), or a metadata.jsonl / metadata.csv of
file names and captions. Images are bucketed by aspect ratio (and by resolution when several are given), never
upscaled; latents and prompt embeddings are computed once and cached on disk, then the text encoders and the VAE
encoder are freed. The loss is the rectified-flow velocity MSE, |v(x_sigma, sigma) - (noise - x0)|^2, with sigma drawn
logit-normal (SD3, arXiv 2403.03206 §3.1) by default. Checkpoints are written atomically and --resume continues
bit-for-bit (optimizer, step, RNG and data order included). The final LoRA is written in the format other tools load
(FLUX.1: kohya; Z-Image, FLUX.2-klein: ComfyUI/diffusion_model).

Edit pairs, for models that take reference images (FLUX.2-klein): the references of x.png are x_ref0.png, x_ref1.png,
... beside it (any image extension); they are cropped to x's bucket and cached like it.
"""

import argparse
import csv
import glob
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from sample import UsageError, run_cli  # bad input: one line, no traceback

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


# ----------------------------------------------------------------------------------------------------------------------
# Data: captions, buckets, images


def scan(folder: Path) -> tuple[list[tuple[Path, str]], Counter]:
    """(image, caption) pairs from metadata.jsonl / metadata.csv, else from same-name .txt files; what is skipped
    (missing captions, missing files) is counted, not fatal."""
    skipped = Counter()
    if (folder / "metadata.jsonl").is_file() or (folder / "metadata.csv").is_file():
        rows = []
        if (folder / "metadata.jsonl").is_file():
            for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rows.append(json.loads(line))
        else:
            with open(folder / "metadata.csv", newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        items = []
        for row in rows:
            name = row.get("file_name") or row.get("file") or row.get("image")
            caption = row.get("text") or row.get("caption") or row.get("prompt")
            if not name or not (folder / name).is_file():
                skipped["missing image file"] += 1
            elif caption is None or not str(caption).strip():
                skipped["missing caption"] += 1
            else:
                items.append((folder / name, str(caption).strip()))
        return items, skipped
    items = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or REFERENCE_NAME.match(path.stem):
            continue
        caption = path.with_suffix(".txt")
        if not caption.is_file() or not caption.read_text(encoding="utf-8").strip():
            skipped["missing caption"] += 1
            continue
        items.append((path, caption.read_text(encoding="utf-8").strip()))
    return items, skipped


REFERENCE_NAME = re.compile(r".+_ref\d+$")  # x_ref0.png: a reference image of x.png, not a target


def find_references(path: Path) -> list[Path]:
    """Edit pairs: the reference images of target x.png are x_ref0.*, x_ref1.*, ... beside it, in that order (the
    numbering stops at the first gap)."""
    refs = []
    while True:
        found = path.parent.glob(f"{glob.escape(path.stem)}_ref{len(refs)}.*")
        found = [p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        if not found:
            return refs
        refs.append(sorted(found)[0])


def attach_references(samples: list[dict], module, skipped: Counter) -> list[dict]:
    """Give each sample its reference images (edit pairs). A model that takes none refuses them (module.MAX_REFERENCES
    says how many it takes); samples with more than that are skipped."""
    limit, kept = getattr(module, "MAX_REFERENCES", 0), []
    for s in samples:
        s["refs"] = find_references(s["path"])
        if s["refs"] and not limit:
            raise UsageError(f"{s['refs'][0]}: {module.__name__} takes no reference images (edit pairs)")
        if len(s["refs"]) > limit:
            skipped[f"more than {limit} reference images"] += 1
        else:
            kept.append(s)
    return kept


def bucket_size(width: int, height: int, resolution: int, step: int) -> tuple[int, int] | None:
    """(height, width) of the bucket for an image: about resolution^2 pixels at the image's aspect ratio, sides
    rounded down to multiples of `step`, never larger than the image (no upscaling). None if the image is smaller
    than one step."""
    scale = min(1.0, resolution / math.sqrt(width * height))
    h, w = int(height * scale) // step * step, int(width * scale) // step * step
    return (h, w) if h >= step and w >= step else None


def open_image(path: Path):
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")


def crop_to_bucket(image, height: int, width: int):
    """Resize (down) to cover the bucket, then center-crop: the crop loses the least of the picture."""
    from PIL import Image

    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS) if size != image.size else image
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def epoch_batches(buckets: dict, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: shuffled within each bucket, chunked, then the batches shuffled. A pure function of
    (seed, epoch), so a resumed run sees the same order."""
    rng = random.Random(seed * 1_000_003 + epoch)
    batches = []
    for key in sorted(buckets):
        indices = list(buckets[key])
        rng.shuffle(indices)
        batches += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return batches


# ----------------------------------------------------------------------------------------------------------------------
# Cache: one safetensors file per latent and per caption, keyed by content, model and settings


def digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def save_tensors(path: Path, tensors: dict):
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def cache_references(pipe, s: dict, cache: Path, model_id: str, encoded: Counter) -> bool:
    """Encode a sample's reference images as its target is (cropped to the target's bucket, so that a batch stacks);
    False if one is unreadable."""
    import numpy as np
    import torch

    s["ref_files"] = []
    for ref in s["refs"]:
        file = cache / f"latent-{digest(model_id, 'latent', ref.read_bytes(), s['bucket'])}.safetensors"
        if not file.is_file():
            try:
                image = crop_to_bucket(open_image(ref), *s["bucket"])
            except (OSError, ValueError):
                return False
            pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]
            save_tensors(file, {"latent": pipe.encode(pixels.float() / 127.5 - 1).float()})
            encoded["latents"] += 1
        s["ref_files"].append(file)
    return True


def batch_references(batch: list[dict], device) -> dict:
    """velocity() keyword for a batch of edit pairs: reference j of every sample, stacked ({} without references)."""
    import torch

    if not batch[0]["refs"]:
        return {}
    n = len(batch[0]["refs"])
    stacked = [torch.cat([load_tensors(s["ref_files"][j])["latent"] for s in batch]).to(device) for j in range(n)]
    return {"references": stacked}


def flatten_cond(cond: dict) -> dict:
    """A one-prompt conditioning dict -> flat tensors (lists, as Z-Image's per-prompt features, become key.i)."""
    flat = {}
    for key, value in cond.items():
        if isinstance(value, list):
            flat |= {f"{key}.{i}": v for i, v in enumerate(value)}
        else:
            flat[key] = value
    return flat


def collate(conds: list[dict]) -> dict:
    """Flat per-prompt conditionings -> one batch in the model's layout (tensors concatenated, lists joined)."""
    import torch

    out = defaultdict(list)
    for cond in conds:
        for key in sorted(cond, key=lambda k: (k.split(".")[0], int(k.split(".")[1]) if "." in k else 0)):
            out[key.split(".")[0] if "." in key else key].append((key, cond[key]))
    batch = {}
    for key, values in out.items():
        if any("." in k for k, _ in values):
            batch[key] = [v for _, v in values]
        else:
            batch[key] = torch.cat([v for _, v in values])
    return batch


# ----------------------------------------------------------------------------------------------------------------------
# Training


def resolve_model(name: str):
    """A family name means its training variant (Z-Image: the base model), a variant name itself."""
    import sample

    names = sample.catalogue()
    if name not in names:
        raise UsageError(f"unknown model {name!r}; valid names: {', '.join(names)}")
    module, variant = names[name]
    if name in sample.FAMILIES:
        variant = getattr(module, "TRAIN_VARIANT", variant)
    return module, variant


def enable_gradient_checkpointing(model):
    """Recompute each block's activations in backward instead of storing them (every block of every block stack)."""
    from functools import partial

    import torch
    from torch.utils.checkpoint import checkpoint

    for stack in model.children():
        if isinstance(stack, torch.nn.ModuleList) and len(stack) > 1:
            for block in stack:
                block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def atomic_torch_save(obj, path: Path):
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash leaves the previous checkpoint intact, never a half-written one


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model family or variant (flux1, flex1-alpha, zimage, zimage-base, ...)")
    p.add_argument("--data", required=True, help="folder of images + .txt captions, or with metadata.jsonl/.csv")
    p.add_argument("--weights", help="local folder laid out like the model's Hugging Face repo (default: download)")
    p.add_argument("--output", default="output", help="folder for the LoRA, checkpoints, cache and log")
    p.add_argument("--name", help="file name of the final LoRA (default: lora-<model>)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank, i.e. scale 1)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", nargs="+", help="fnmatch patterns of layers to train (default: the model's)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=0, help="linear learning-rate warm-up steps")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--resolution", type=int, nargs="+", default=[512], help="one or several target resolutions")
    p.add_argument("--bucket-step", type=int, default=64, help="bucket sides are multiples of this")
    p.add_argument("--timesteps", choices=["logit_normal", "uniform"], default="logit_normal")
    p.add_argument("--logit-mean", type=float, default=0.0)
    p.add_argument("--logit-std", type=float, default=1.0)
    p.add_argument("--caption-dropout", type=float, default=0.0, help="probability of training on an empty caption")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", nargs="?", const="auto", help="continue from OUTPUT/checkpoint.pt (or a given file)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--preview-every", type=int, default=0, help="render the preview prompts every N steps (0 = off)")
    p.add_argument("--preview", action="append", default=[], help="a preview prompt (repeatable)")
    p.add_argument("--preview-prompts", help="file with one preview prompt per line")
    p.add_argument("--preview-steps", type=int, help="solver steps for previews (default: the model's)")
    p.add_argument("--preview-size", help="WIDTHxHEIGHT of previews (default: the first resolution, square)")
    p.add_argument("--allow-distilled", action="store_true", help="train on a step-distilled variant (Z-Image-Turbo)")
    p.add_argument("--cache-dir", help="latent/embedding cache (default: OUTPUT/cache)")
    p.add_argument("--device", help="cuda, cpu, mps, ... (default: the best available)")
    p.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], help="base model dtype (default: bf16 on an accelerator)"
    )
    p.add_argument("--int8", action="store_true", help="INT8 base (torch._int_mm): less memory, LoRA stays fp32")
    p.add_argument(
        "--offload",
        action="store_true",
        help="for GPUs smaller than the model: stream the frozen transformer blocks from host memory (forward and "
        "backward); text encoders and VAE visit the device only while they run",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    return run_cli(train, build_parser().parse_args(argv))


def train(args) -> int:
    module, variant = resolve_model(args.model)
    data = Path(args.data)
    if not data.is_dir():
        raise UsageError(f"--data {data}: no such folder")
    if args.weights and not Path(args.weights).is_dir():
        raise UsageError(f"--weights {args.weights}: no such folder")
    if args.steps < 1 or args.batch_size < 1 or args.grad_accum < 1 or args.rank < 1:
        raise UsageError("--steps, --batch-size, --grad-accum and --rank must be at least 1")
    granularity = module.PIXELS_PER_TOKEN
    if args.bucket_step % granularity:
        raise UsageError(f"--bucket-step must be a multiple of {granularity} for {args.model}")
    variant_info = module.VARIANTS[variant]
    if getattr(variant_info, "distilled", False):
        if not args.allow_distilled:
            raise UsageError(
                f"{variant} is step-distilled: a LoRA trained on it loses the few-step distillation. "
                f"Train on {module.TRAIN_VARIANT} (the default) or pass --allow-distilled"
            )
        print(f"warning: training on {variant} (distilled): expect it to need more steps afterwards", file=sys.stderr)

    import numpy as np
    import torch
    from PIL import Image

    import lora
    import sample

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir) if args.cache_dir else out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    resume = None
    if args.resume:
        resume_path = checkpoint_path if args.resume == "auto" else Path(args.resume)
        if not resume_path.is_file():
            raise UsageError(f"--resume: no checkpoint at {resume_path}")
        try:
            resume = torch.load(resume_path, map_location="cpu", weights_only=False)
        except Exception as e:  # truncated or not a checkpoint: say so in one line
            raise UsageError(f"--resume: cannot read {resume_path} ({type(e).__name__}: {e})") from None

    # ---- data: scan, bucket
    items, skipped = scan(data)
    samples, sizes = [], {}
    for path, caption in items:
        try:
            with Image.open(path) as im:
                sizes[path] = im.size
        except (OSError, ValueError):
            skipped["unreadable image"] += 1
            continue
        for resolution in args.resolution:
            bucket = bucket_size(*sizes[path], resolution, args.bucket_step)
            if bucket is None:
                skipped["image smaller than one bucket step"] += 1
                break
            samples.append({"path": path, "caption": caption, "bucket": bucket})
    samples = attach_references(samples, module, skipped)
    device = sample.pick_device(args.device)
    dtype_name = args.dtype or ("fp32" if device == "cpu" else "bf16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    pipe = module.load(args.weights or variant, variant=variant, device="cpu" if args.offload else device, dtype=dtype)
    # ---- model: LoRA (fp32) on the frozen base. Set up before the caching pass, so that with --offload the
    # transformer is packed once, for block streaming, and model offload moves only the encoders and the VAE.
    transformer = pipe.transformer
    targets = args.lora_targets or module.LORA_TARGETS
    if args.int8:
        import int8

        int8.quantize(transformer)  # LoRA layers then wrap the INT8 linears; gradients flow through them
    torch.manual_seed(args.seed)  # the LoRA's initial A, then its dropout masks: the same seed, the same run
    names = lora.add_lora(transformer, targets, rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout)
    params = lora.lora_parameters(transformer)
    for p in params:
        p.data = p.data.to(device)
    if args.offload:  # after adding the LoRA (which stays resident) and before the optimizer sees the parameters
        import offload

        offload.enable_block_streaming(transformer, device)  # checkpoints every block itself
        offload.enable_model_offload(pipe, device)  # text encoders and VAE: one on the device at a time
    elif args.gradient_checkpointing:
        enable_gradient_checkpointing(transformer)
    model_id = (
        f"{args.model}:{variant}:{Path(args.weights).resolve() if args.weights else variant_info.repo}:{dtype_name}"
    )

    # ---- cache latents and prompt embeddings (each computed once, reused by later runs)
    encoded = Counter()
    kept = []
    for s in samples:
        key = digest(model_id, "latent", s["path"].read_bytes(), s["bucket"])
        s["latent_file"] = cache / f"latent-{key}.safetensors"
        s["cond_file"] = cache / f"cond-{digest(model_id, 'prompt', s['caption'])}.safetensors"
        if not s["latent_file"].is_file():
            try:
                image = crop_to_bucket(open_image(s["path"]), *s["bucket"])
            except (OSError, ValueError):
                skipped["unreadable image"] += 1
                continue
            pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]
            save_tensors(s["latent_file"], {"latent": pipe.encode(pixels.float() / 127.5 - 1).float()})
            encoded["latents"] += 1
        if not cache_references(pipe, s, cache, model_id, encoded):
            skipped["unreadable reference image"] += 1
            continue
        kept.append(s)
    samples = kept
    if not samples:
        raise UsageError(f"no usable images in {data} (skipped: {dict(skipped) or 'none found'})")
    prompts = {s["caption"]: s["cond_file"] for s in samples}
    prompts[""] = cache / f"cond-{digest(model_id, 'prompt', '')}.safetensors"  # caption dropout and CFG previews
    preview_prompts = list(args.preview)
    if args.preview_prompts:
        preview_prompts += [p.strip() for p in Path(args.preview_prompts).read_text().splitlines() if p.strip()]
    for p in preview_prompts:
        prompts.setdefault(p, cache / f"cond-{digest(model_id, 'prompt', p)}.safetensors")
    for caption, file in prompts.items():
        if not file.is_file():
            save_tensors(file, flatten_cond(pipe.encode_prompt([caption])))
            encoded["prompts"] += 1
    print(
        f"data: {len(items)} captioned images, {len(samples)} training samples in "
        f"{len({s['bucket'] for s in samples})} buckets ({sum(bool(s['refs']) for s in samples)} edit pairs); "
        f"skipped {dict(skipped) or 'none'}; "
        f"encoded {encoded['latents']} latents and {encoded['prompts']} prompts (the rest from {cache})"
    )

    # The text encoders and the VAE encoder are no longer needed: free them (the decoder stays for previews).
    if args.offload:
        offload.disable_model_offload(pipe)  # it holds the encoders' host buffers
    for name, value in list(vars(pipe).items()):
        if isinstance(value, torch.nn.Module) and value is not pipe.transformer and value is not pipe.ae:
            setattr(pipe, name, None)
    pipe.ae.encoder = None
    conds = {caption: load_tensors(file) for caption, file in prompts.items()}
    pipe.encode_prompt = lambda batch: collate([conds[p] for p in batch])  # previews read the cache too
    if args.offload:
        offload.enable_model_offload(pipe, device)  # now only the VAE decoder, for previews

    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    warmup = lambda step: min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    velocity_kwargs = pipe.training_kwargs()

    buckets = defaultdict(list)
    for i, s in enumerate(samples):
        buckets[(s["bucket"], len(s["refs"]))].append(i)  # a batch's samples have the same number of references
    gen = torch.Generator().manual_seed(args.seed)  # sigmas, noise and caption dropout
    step, epoch, position = 0, 0, 0
    if resume is not None:
        saved = resume["lora"]
        layers = lora.lora_layers(transformer)
        if set(saved) != {f"{n}.lora_{k}" for n in layers for k in "AB"} or any(
            saved[f"{n}.lora_A"].shape != m.lora_A.shape for n, m in layers.items()
        ):
            raise UsageError("--resume: the checkpoint was made with other LoRA settings (--rank / --lora-targets)")
        for name, layer in layers.items():
            layer.lora_A.data.copy_(saved[f"{name}.lora_A"]), layer.lora_B.data.copy_(saved[f"{name}.lora_B"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        step, epoch, position = resume["step"], resume["epoch"], resume["position"]
        gen.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        print(f"resumed from step {step}")
    batches = epoch_batches(buckets, args.batch_size, args.seed, epoch)

    def next_batch():
        nonlocal epoch, position, batches
        if position == len(batches):
            epoch, position = epoch + 1, 0
            batches = epoch_batches(buckets, args.batch_size, args.seed, epoch)
        batch = [samples[i] for i in batches[position]]
        position += 1
        return batch

    def save_checkpoint():
        state = {
            f"{n}.lora_{k}": getattr(m, f"lora_{k}").detach().cpu()
            for n, m in lora.lora_layers(transformer).items()
            for k in "AB"
        }
        atomic_torch_save(
            {
                "lora": state,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "epoch": epoch,
                "position": position,
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "args": vars(args),
            },
            checkpoint_path,
        )

    def preview():
        if not preview_prompts:
            return
        folder = out / "previews"
        folder.mkdir(exist_ok=True)
        h, w = sample.parse_size(args.preview_size, granularity) if args.preview_size else (args.resolution[0],) * 2
        transformer.eval()
        images = pipe.generate(
            preview_prompts, height=h, width=w, steps=args.preview_steps, seed=args.seed, progress=False
        )
        transformer.train()
        for i, image in enumerate(images):
            image.save(folder / f"step{step:06d}-{i:02d}.png")

    log_path = out / "log.csv"
    new_log = resume is None or not log_path.is_file()
    log = open(log_path, "w" if new_log else "a", newline="")
    writer = csv.writer(log)
    if new_log:
        writer.writerow(["step", "loss", "lr", "grad_norm", "images_per_s", "seconds"])
    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=step, disable=args.quiet, desc=f"train {variant}")
    start, seen = time.time(), 0
    while step < args.steps:
        total_loss = 0.0
        for _ in range(args.grad_accum):
            batch = next_batch()
            x0 = torch.cat([load_tensors(s["latent_file"])["latent"] for s in batch]).to(device)
            captions = ["" if torch.rand((), generator=gen) < args.caption_dropout else s["caption"] for s in batch]
            cond = collate([conds[c] for c in captions])
            n = x0.shape[0]
            if args.timesteps == "logit_normal":
                sigma = torch.sigmoid(args.logit_mean + args.logit_std * torch.randn(n, generator=gen))
            else:
                sigma = torch.rand(n, generator=gen)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            sigma = sigma.to(device)
            x_sigma = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
            v = pipe.velocity(x_sigma, sigma, cond, **velocity_kwargs, **batch_references(batch, device))
            loss = torch.nn.functional.mse_loss(v.float(), noise - x0)
            (loss / args.grad_accum).backward()  # the mean over every micro-batch, as one big batch would give
            total_loss += loss.item() / args.grad_accum
            seen += n
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        rate = seen / (time.time() - start)
        writer.writerow(
            [
                step,
                f"{total_loss:.6f}",
                f"{scheduler.get_last_lr()[0]:.3g}",
                f"{float(grad_norm):.4g}",
                f"{rate:.3f}",
                f"{time.time() - start:.1f}",
            ]
        )
        log.flush()
        bar.set_postfix(loss=f"{total_loss:.4f}", img_s=f"{rate:.2f}")
        bar.update()
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_checkpoint()
        if args.preview_every and step % args.preview_every == 0:
            preview()
    bar.close()
    log.close()

    final = out / f"{args.name or 'lora-' + args.model}.safetensors"
    metadata = {
        "base_model": variant,
        "base_repo": variant_info.repo,
        "rank": args.rank,
        "alpha": args.alpha or args.rank,
        "targets": json.dumps(targets),
        "layers": len(names),
        "format": module.LORA_FORMAT,
        "training": json.dumps({k: v for k, v in vars(args).items() if isinstance(v, int | float | str | list)}),
    }
    lora.save(transformer, final, module.LORA_FORMAT, metadata)
    print(f"wrote {final} ({len(names)} layers, rank {args.rank}) after {step} steps; log {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
