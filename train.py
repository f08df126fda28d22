"""Train a LoRA for any model by name.

    python train.py flux1 --data photos/ --output out/my-lora --steps 1000 --rank 16 --resolution 512 768
    python train.py zimage --data photos/ --output out/zimage-lora      # trains on Z-Image base (see --allow-distilled)
    python train.py flux1 --data photos/ --output out/my-lora --resume  # continue exactly where it stopped
    torchrun --nproc-per-node 8 train.py flux1 --data photos/ --output out/my-lora  # 8 GPUs (see distributed.py)

Data: a folder of images with same-name .txt captions (cat.jpg + cat.txt), or a metadata.jsonl / metadata.csv of
file names and captions. Images are bucketed by aspect ratio (and by resolution when several are given), never
upscaled; latents and prompt embeddings are computed once and cached on disk, then the text encoders and the VAE
encoder are freed. The loss is the rectified-flow velocity MSE, |v(x_sigma, sigma) - (noise - x0)|^2, with sigma drawn
logit-normal (SD3, arXiv 2403.03206 §3.1) by default. Checkpoints are written atomically and --resume continues
bit-for-bit (optimizer, step, RNG and data order included); Ctrl-C writes one at the current step. The final LoRA is
written in the format other tools load (FLUX.1: kohya; Z-Image, FLUX.2-klein: ComfyUI/diffusion_model).

Edit pairs, for models that take reference images (FLUX.2-klein): the references of x.png are x_ref0.png, x_ref1.png,
... beside it (any image extension); they are cropped to x's bucket and cached like it.

The phases, in the order train() runs them: check the arguments (and a checkpoint to resume) before anything
expensive; data (scan, bucket); model (load, LoRA, INT8, offload); cache (latents, prompt embeddings); the steps;
checkpoints and the exported LoRA.
"""

import argparse
import csv
import glob
import hashlib
import json
import math
import random
import re
import signal
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import distributed
from sample import UsageError, atomic_write, run_cli  # bad input: one line, no traceback

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


class Diverged(UsageError):
    """The loss or the gradients stopped being finite: nothing more is written (exit code 1)."""

    exit_code = 1
    raised_on_every_rank = True  # under torchrun: decided from all-reduced values, so rank 0 alone prints it


class Interrupted(UsageError):
    """Ctrl-C: a checkpoint of the current step was written (exit code 130, as for any interrupted command)."""

    exit_code = 130
    raised_on_every_rank = True


# ----------------------------------------------------------------------------------------------------------------------
# Data: captions, buckets, images


def scan(folder: Path, videos: bool = False) -> tuple[list[tuple[Path, str]], Counter]:
    """(image, caption) pairs from metadata.jsonl / metadata.csv, else from same-name .txt files; what is skipped
    (missing or empty captions, missing files) is counted, not fatal. videos (video models): clips too, as video files
    (cat.mp4 + cat.txt) or folders of numbered frames (cat/0001.png, ... + cat.txt beside the folder)."""
    from video import VIDEO_EXTENSIONS

    skipped = Counter()
    if (folder / "metadata.jsonl").is_file() or (folder / "metadata.csv").is_file():
        rows = []
        if (folder / "metadata.jsonl").is_file():
            for n, line in enumerate((folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UsageError(f"{folder / 'metadata.jsonl'} line {n} is not JSON: {e}") from None
        else:
            with open(folder / "metadata.csv", newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        items = []
        for row in rows:
            name = row.get("file_name") or row.get("file") or row.get("image")
            caption = row.get("text") or row.get("caption") or row.get("prompt")
            clip = videos and name and (folder / name).is_dir()  # a folder of frames
            if not name or not ((folder / name).is_file() or clip):
                skipped["missing image file"] += 1
            elif caption is None:
                skipped["missing caption"] += 1
            elif not str(caption).strip():
                skipped["empty caption"] += 1
            else:
                items.append((folder / name, str(caption).strip()))
        return items, skipped
    items, frame_folders = [], set()
    if videos:  # a folder with images and a caption named after it holds one clip's frames, not images
        frame_folders = {d for d in folder.rglob("*") if d.is_dir() and caption_of(d).is_file() and frame_files(d)}
    for path in sorted(folder.rglob("*")):
        if path.parent in frame_folders:
            continue
        clip = path in frame_folders or (videos and path.suffix.lower() in VIDEO_EXTENSIONS)
        if not clip and (path.suffix.lower() not in IMAGE_EXTENSIONS or REFERENCE_NAME.match(path.stem)):
            continue
        caption = caption_of(path)
        if not caption.is_file():
            skipped["missing caption"] += 1
        elif not (text := caption.read_text(encoding="utf-8").strip()):
            skipped["empty caption"] += 1
        else:
            items.append((path, text))
    return items, skipped


def caption_of(path: Path) -> Path:
    """cat.png, cat.mp4 and the frame folder cat/ all take their caption from cat.txt."""
    return path.parent / f"{path.name}.txt" if path.is_dir() else path.with_suffix(".txt")


def frame_files(folder: Path) -> list[Path]:
    """The images of a frame folder in frame order: by the number in their names (frame2 before frame10)."""
    numbers = lambda p: [int(n) for n in re.findall(r"\d+", p.stem)] or [-1]  # noqa: E731
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(files, key=lambda p: (numbers(p), p.name))


def bucket_size(width: int, height: int, resolution: int, step: int) -> tuple[int, int] | None:
    """(height, width) of the bucket for an image: about resolution^2 pixels at the image's aspect ratio, sides
    rounded down to multiples of `step`, never larger than the image (no upscaling). None if the image is smaller
    than one step."""
    scale = min(1.0, resolution / math.sqrt(width * height))
    h, w = int(height * scale) // step * step, int(width * scale) // step * step
    return (h, w) if h >= step and w >= step else None


EXIF_ORIENTATION = 0x0112  # values 5-8 rotate by 90 degrees (width and height swap when displayed)


def displayed_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image is shown, after its EXIF orientation (read from the header only)."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        return (height, width) if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)


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


def plan_samples(items, resolutions: list[int], step: int, skipped: Counter, clips=None) -> list[dict]:
    """One training sample per image and distinct bucket: an image that lands in the same bucket at two resolutions
    (a small one, say) is trained once, not twice. clips (video models: --frames, --frame-sampling, --frame-stride):
    clips too, each with the frames it trains on, and images as 1-frame videos. Reads headers only."""
    samples = []
    for path, caption in items:
        kind = "image"
        try:
            if clips is None or not (path.is_dir() or path.suffix.lower() not in IMAGE_EXTENSIONS):
                size, count = displayed_size(path), 1
            else:
                kind = "frames" if path.is_dir() else "video"
                size, count = clip_size(path)
        except (OSError, ValueError):
            skipped["unreadable image" if kind == "image" else "unreadable clip"] += 1
            continue
        buckets = [bucket_size(*size, resolution, step) for resolution in resolutions]
        if None in buckets:
            skipped["image smaller than one bucket step"] += 1
            continue
        sample = {"path": path, "caption": caption, "kind": kind}
        if clips is not None:
            sample["indices"] = clips.indices(count)
            sample["frames"] = len(sample["indices"])
        for bucket in dict.fromkeys(buckets):
            samples.append({**sample, "bucket": bucket})
    return samples


def clip_size(path: Path) -> tuple[tuple[int, int], int]:
    """((width, height), frame count) of a video file or a frame folder, from headers."""
    if path.is_dir():
        files = frame_files(path)
        return displayed_size(files[0]), len(files)
    import video

    count, _, width, height = video.probe(path)
    return (width, height), count


@dataclass
class ClipFrames:
    """Which frames of a clip train (--frames, --frame-sampling, --frame-stride): as many as the longest of `lengths`
    that fits, else the clip's own longest 4k + 1; `stride` takes every stride-th frame from the start, `uniform`
    spreads them over the whole clip."""

    lengths: list[int]
    sampling: str = "stride"
    stride: int = 1

    def indices(self, count: int) -> list[int]:
        span = (lambda n: (n - 1) * self.stride + 1) if self.sampling == "stride" else (lambda n: n)
        fitting = [n for n in self.lengths if span(n) <= count]
        if fitting:
            n = max(fitting)
        else:  # shorter than every length asked for: its own longest 4k + 1 (its bucket by frame count)
            n = 4 * ((count - 1) // (self.stride if self.sampling == "stride" else 1) // 4) + 1
        if self.sampling == "stride":
            return [i * self.stride for i in range(n)]
        return sorted({round(i * (count - 1) / max(n - 1, 1)) for i in range(n)})


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

    atomic_write(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp))


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


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


def cache_latent(pipe, path: Path, bucket, cache: Path, model_id: str) -> tuple[Path, bool]:
    """The latent of an image cropped to a bucket, encoded unless cached (a file per content, bucket and model):
    (its file, whether it was new). OSError / ValueError for an unreadable image."""
    from flux1 import from_pil

    file = cache / f"latent-{digest(model_id, 'latent', path.read_bytes(), bucket)}.safetensors"
    if file.is_file():
        return file, False
    save_tensors(file, {"latent": pipe.encode(from_pil(crop_to_bucket(open_image(path), *bucket))).float()})
    return file, True


def clip_content(path: Path) -> bytes:
    """A digest of a clip's bytes: a video file's, or a frame folder's frame names and bytes in frame order."""
    content = hashlib.sha256()
    for f in frame_files(path) if path.is_dir() else [path]:
        content.update(f.name.encode() + b"\0" + f.read_bytes())
    return content.digest()


def clip_frames(s: dict, indices):
    """The frames at `indices` (increasing) of a sample's clip, a video file or a frame folder, as PIL images, decoded
    in one pass as they are consumed."""
    if s["kind"] == "frames":
        files = frame_files(s["path"])
        return (open_image(files[i]) for i in indices)
    from PIL import Image

    import video

    return (Image.fromarray(f) for f in video.read_frames(s["path"], indices))


def cache_clip(pipe, s: dict, cache: Path, model_id: str, content: bytes) -> tuple[Path, bool]:
    """The latents of a clip's training frames, each cropped to the bucket, encoded unless cached (a file per content
    (clip_content), frames, bucket and model), with what the model keeps beside them (pipe.training_condition:
    I2V-A14B's first-frame condition). The frames are decoded in one pass and cropped as they come, so a long clip is
    never held whole. OSError / ValueError for a clip that cannot be read."""
    import numpy as np
    import torch

    file = cache / f"clip-{digest(model_id, 'clip', content, s['bucket'], s['indices'])}.safetensors"
    if file.is_file():
        return file, False
    arrays = [np.asarray(crop_to_bucket(frame, *s["bucket"])) for frame in clip_frames(s, s["indices"])]
    pixels = torch.from_numpy(np.stack(arrays)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, F, H, W)
    extras = pipe.training_condition(pixels) if hasattr(pipe, "training_condition") else {}
    save_tensors(file, {"latent": pipe.encode(pixels).float(), **{k: v.float() for k, v in extras.items()}})
    return file, True


def first_frame(s: dict):
    """The first training frame of a sample (an image, a clip or a frame folder), cropped to its bucket (PIL)."""
    frame = open_image(s["path"]) if s.get("kind", "image") == "image" else next(clip_frames(s, s["indices"][:1]))
    return crop_to_bucket(frame, *s["bucket"])


def cache_latents(pipe, samples: list[dict], cache: Path, model_id: str, skipped: Counter, progress: bool) -> int:
    """Encode every sample's cropped image, and its reference images cropped to the same bucket, once; returns how many
    were new. Samples with an image that turns out unreadable here are dropped from `samples` and counted."""
    from tqdm.auto import tqdm

    from flux1 import bar_disabled

    encoded, kept, contents = 0, [], {}  # contents: a clip in several buckets is read and hashed once
    for s in tqdm(samples, desc="caching latents", disable=bar_disabled(progress)):
        if s.get("kind", "image") != "image":
            try:
                if s["path"] not in contents:
                    contents[s["path"]] = clip_content(s["path"])
                s["latent_file"], new = cache_clip(pipe, s, cache, model_id, contents[s["path"]])
            except (OSError, ValueError):
                skipped["unreadable clip"] += 1
                continue
            s["ref_files"] = []
            encoded += new
            kept.append(s)
            continue
        try:
            s["latent_file"], new = cache_latent(pipe, s["path"], s["bucket"], cache, model_id)
            encoded += new
            s["ref_files"] = []
            for ref in s["refs"]:
                file, new = cache_latent(pipe, ref, s["bucket"], cache, model_id)
                s["ref_files"].append(file)
                encoded += new
        except (OSError, ValueError):
            skipped["unreadable image"] += 1
            continue
        kept.append(s)
    samples[:] = kept
    return encoded


def cache_prompts(pipe, prompts: list[str], cache: Path, model_id: str, progress: bool) -> tuple[dict, int]:
    """{prompt: cache file}, encoding each prompt not cached yet; returns the map and how many were new."""
    from tqdm.auto import tqdm

    from flux1 import bar_disabled

    files, encoded = {}, 0
    for prompt in tqdm(dict.fromkeys(prompts), desc="caching prompts", disable=bar_disabled(progress)):
        files[prompt] = cache / f"cond-{digest(model_id, 'prompt', prompt)}.safetensors"
        if not files[prompt].is_file():
            save_tensors(files[prompt], flatten_cond(pipe.encode_prompt([prompt])))
            encoded += 1
    return files, encoded


def cache_latents_shared(world, pipe, samples: list[dict], cache: Path, model_id: str, skipped: Counter, progress):
    """cache_latents split over the processes of a torchrun launch (one process: cache_latents itself). Rank r encodes
    samples r, r + N, ...: the pass takes 1/N of the time with every GPU busy, where "rank 0 encodes, the others wait"
    would leave N - 1 GPUs idle for nothing (the encoders fit any GPU that trains, and they are freed after caching).
    The ranks then exchange the samples they kept (with the cache files recorded in them) and what they skipped, so
    every rank trains on the list one process would, in its order, and counts the same skips. All ranks read the one
    cache; a file a rank cannot see (nodes that do not share --cache-dir) it encodes itself."""
    if world.size == 1:
        return cache_latents(pipe, samples, cache, model_id, skipped, progress)
    mine = list(range(world.rank, len(samples), world.size))
    share, skipped_here = [samples[i] for i in mine], Counter()
    with world.together():  # a failure on one rank (a full disk) stops every rank, said once
        encoded = cache_latents(pipe, share, cache, model_id, skipped_here, progress)
    kept = {id(s) for s in share}
    merged, total = {}, 0
    for their_samples, their_skipped, their_encoded in world.gather(
        ({i: samples[i] for i in mine if id(samples[i]) in kept}, skipped_here, encoded)
    ):
        merged |= their_samples
        skipped.update(their_skipped)
        total += their_encoded
    samples[:] = [merged[i] for i in sorted(merged)]
    unseen = [s for s in samples if not all(f.is_file() for f in (s["latent_file"], *s["ref_files"]))]
    with world.together():
        if unseen:
            cache_latents(pipe, unseen, cache, model_id, Counter(), progress=False)
    return total


def cache_prompts_shared(world, pipe, prompts: list[str], cache: Path, model_id: str, progress) -> tuple[dict, int]:
    """cache_prompts split over the processes as cache_latents_shared splits the latents: rank r encodes distinct
    prompts r, r + N, ...; then every rank maps all of them to the one cache (encoding only what it cannot see)."""
    if world.size == 1:
        return cache_prompts(pipe, prompts, cache, model_id, progress)
    distinct = list(dict.fromkeys(prompts))
    with world.together():
        _, encoded = cache_prompts(pipe, distinct[world.rank :: world.size], cache, model_id, progress)
    total = sum(world.gather(encoded))
    with world.together():
        files, _ = cache_prompts(pipe, distinct, cache, model_id, progress=False)
    return files, total


# ----------------------------------------------------------------------------------------------------------------------
# Model


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


def setup_model(args, module, variant: str, device: str, dtype):
    """Load the frozen base, put the (fp32) LoRA on it, then INT8 / offload / checkpointing as asked. Returns the
    pipeline, the module holding the LoRA (the transformer, or the trained experts), its layer names and the trainable
    parameters. With --offload the transformer is packed once, for
    block streaming, before the caching pass; model offload then moves only the encoders and the VAE."""
    import torch

    import lora
    import sample

    pipe = sample.load_pipeline(module, variant, args, device, dtype)
    if args.shard:  # the encoders and the VAE run whole on every GPU; the denoisers are sharded at the end
        for part in vars(pipe).values():
            if isinstance(part, torch.nn.Module) and all(part is not d for d in sample.denoisers(pipe)):
                part.to(device)
    if args.int8:
        import int8

        for denoiser in sample.denoisers(pipe):  # LoRA layers then wrap the INT8 linears; gradients flow through them
            int8.quantize(denoiser)
    parts = trained_parts(pipe, args.expert)
    # One LoRA per trained part (Wan2.2 A14B: per expert), all held by `transformer`: the checkpoint and the optimizer
    # see them together, each part's layers named after it ("high.blocks.0...").
    transformer = parts[""] if list(parts) == [""] else torch.nn.ModuleDict(parts)
    torch.manual_seed(args.seed)  # the LoRA's initial A, then its dropout masks: the same seed, the same run
    targets = args.lora_targets or module.LORA_TARGETS
    targets = [f"{name}.{t}" if name else t for name in parts for t in targets]
    names = lora.add_lora(transformer, targets, rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout)
    params = lora.lora_parameters(transformer)
    for p in params:
        p.data = p.data.to(device)
    for part in parts.values():
        if args.offload:  # after adding the LoRA (which stays resident) and before the optimizer sees the parameters
            import offload

            offload.enable_block_streaming(part, device)  # checkpoints every block itself
        elif args.gradient_checkpointing:
            enable_gradient_checkpointing(part)
    if args.offload:
        offload.enable_model_offload(pipe, device)  # text encoders, VAE (and an expert not trained): one at a time
    if args.shard:  # FSDP2 replaces the parameters with sharded ones: collect them again. (The LoRA's initial values
        # were drawn on the host, where the base was, so on GPUs they differ from a run without --shard.) Each
        # denoiser is its own FSDP2 root, an expert not trained (previews need it) included.
        for denoiser in sample.denoisers(pipe):
            distributed.shard(distributed.current(), denoiser, device)
        pipe.execution_device = torch.device(device)  # where the pipeline runs, for previews (not its weights')
        params = lora.lora_parameters(transformer)
    return pipe, transformer, names, params


def trained_parts(pipe, expert: str | None) -> dict:
    """The transformer(s) a LoRA is trained on: the one transformer ({"": ...}), or of a model whose noise levels are
    split between experts (pipe.experts(): Wan2.2 A14B) the --expert one, or both."""
    experts = pipe.experts() if hasattr(pipe, "experts") else {"": pipe.transformer}
    return {name: m for name, m in experts.items() if expert in (None, "both", name)}


def free_encoders(pipe, conds: dict, offloaded: bool, device: str, keep_vae_encoder: bool = False):
    """After caching: drop the text encoders and the VAE encoder (the decoder stays for previews; the encoder too with
    keep_vae_encoder, for previews from a first frame); prompts are then read from the cache, previews included."""
    import torch

    if offloaded:
        import offload

        offload.disable_model_offload(pipe)  # it holds the encoders' host buffers
    import sample

    kept = [pipe.ae, *sample.denoisers(pipe)]
    for name, value in list(vars(pipe).items()):
        if isinstance(value, torch.nn.Module) and all(value is not m for m in kept):
            setattr(pipe, name, None)
    if not keep_vae_encoder:
        pipe.ae.encoder = None
    pipe.encode_prompt = lambda batch: collate([conds[p] for p in batch])
    if offloaded:
        offload.enable_model_offload(pipe, device)  # now only the VAE decoder, for previews


# ----------------------------------------------------------------------------------------------------------------------
# One optimizer step


def draw_sigmas(args, n: int, gen, between: tuple[float, float] = (0.0, 1.0)):
    """n sigmas from --timesteps' distribution, or from that distribution cut to [lo, hi] (an expert's noise levels):
    drawn through the inverse of its cumulative distribution, so the shape within the range is kept."""
    import torch

    lo, hi = between
    if (lo, hi) == (0.0, 1.0):
        if args.timesteps == "logit_normal":
            return torch.sigmoid(args.logit_mean + args.logit_std * torch.randn(n, generator=gen))
        return torch.rand(n, generator=gen)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    if args.timesteps == "logit_normal":
        normal = torch.distributions.Normal(torch.tensor(args.logit_mean, dtype=torch.float64), args.logit_std)
        ends = normal.cdf(torch.logit(torch.tensor([lo, hi], dtype=torch.float64)))
        sigma = torch.sigmoid(normal.icdf((ends[0] + u * (ends[1] - ends[0])).clamp(1e-12, 1 - 1e-12)))
    else:
        sigma = lo + u * (hi - lo)
    return sigma.float().clamp(lo, hi)


def batch_references(batch: list[dict], device) -> dict:
    """velocity() keyword for a batch of edit pairs: reference j of every sample, stacked ({} without references)."""
    import torch

    if not batch[0]["refs"]:
        return {}
    n = len(batch[0]["refs"])
    stacked = [torch.cat([load_tensors(s["ref_files"][j])["latent"] for s in batch]).to(device) for j in range(n)]
    return {"references": stacked}


def micro_step(
    pipe, batch: list[dict], conds: dict, args, gen, device, velocity_kwargs: dict, share=None, expert=""
) -> float:
    """Forward and backward of one micro-batch; returns its loss (the mean over its elements). Sigma, noise and caption
    dropout come from `gen` in a fixed order, so a resumed run draws the same ones. Gradients are scaled by
    1 / grad_accum, so the accumulated gradient is the mean over every micro-batch, as one big batch would give.
    Under torchrun `batch` is the global micro-batch and `share` (distributed.Group.share) this rank's (slice, loss
    weight): every rank draws for the whole batch, as one process would, and trains on its slice.
    expert: whose noise levels the sigmas come from (pipe.expert_sigmas; "" = all). Video models: with probability
    --first-frame a clip is trained as image-to-video, its first frame the condition, as pipe.training_inputs says."""
    import torch

    part, weight = share or (slice(None), 1.0)
    cached = [load_tensors(s["latent_file"]) for s in batch[part]]
    x0 = torch.cat([c["latent"] for c in cached]).to(device)
    extras = {k: torch.cat([c[k] for c in cached]).to(device) for k in cached[0] if k != "latent"}
    captions = ["" if torch.rand((), generator=gen) < args.caption_dropout else s["caption"] for s in batch]
    cond = collate([conds[c] for c in captions[part]])
    between = pipe.expert_sigmas(expert) if hasattr(pipe, "expert_sigmas") else (0.0, 1.0)
    sigma = draw_sigmas(args, len(batch), gen, between)[part]
    noise = torch.randn((len(batch), *x0.shape[1:]), generator=gen)[part].to(device)
    s = sigma.to(device).view(-1, *[1] * (x0.ndim - 1))  # images (B, C, H, W) and videos (B, C, F, H, W) alike
    x_sigma = (1 - s) * x0 + s * noise
    kwargs, weights = {}, None
    if getattr(args, "first_frame", None):  # a clip of one latent frame has nothing left to predict from its first
        first = (torch.rand(len(batch), generator=gen) < args.first_frame)[part] & torch.tensor(x0.shape[2] > 1)
        x_sigma, kwargs, weights = pipe.training_inputs(x0, x_sigma, first, extras)
    v = pipe.velocity(
        x_sigma, sigma.to(device), cond, **velocity_kwargs, **kwargs, **batch_references(batch[part], device)
    )
    if weights is None:
        loss = torch.nn.functional.mse_loss(v.float(), noise - x0)
    else:  # frames given as conditions are left out: each sample's mean over what it predicts, then the batch's mean
        # (so every sample weighs the same, as in mse_loss, and a rank's share of the batch is a share of the loss)
        weights = weights.expand_as(v).flatten(1)
        loss = (((v.float() - (noise - x0)) ** 2).flatten(1) * weights).sum(1).div(weights.sum(1)).mean()
    (loss * weight / args.grad_accum).backward()  # weight 1 for one process
    return loss.item() * weight


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints and the exported LoRA

# Settings a checkpoint must be resumed with as they were: they shape the LoRA or the data order and RNG stream.
RESUME_FIXED = [
    "rank",
    "alpha",
    "lora_targets",
    "lora_dropout",
    "batch_size",
    "grad_accum",
    "resolution",
    "bucket_step",
    "timesteps",
    "logit_mean",
    "logit_std",
    "caption_dropout",
    "seed",
    "frames",
    "frame_sampling",
    "frame_stride",
    "first_frame",
    "expert",
]
# Optimizer and schedule settings a resumed run may change: the new value applies from the resumed step on.
RESUME_ADJUSTABLE = ["lr", "weight_decay", "warmup", "max_grad_norm"]


@dataclass
class Position:
    """Where training is: optimizer steps done, the data order (epoch, batch index) and time spent so far."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    seconds: float = 0.0
    history: list = field(default_factory=list)  # [step, {setting: value}] each time a resume changed settings


def read_checkpoint(args, checkpoint_path: Path, processes: int = 1) -> dict | None:
    """The checkpoint to resume, checked against the arguments before anything is loaded or cached. Under torchrun
    the data order and the draws depend on the global micro-batch (--batch-size x processes), not on how it is split:
    a checkpoint resumes exactly with any number of processes that keeps it (one process included), except with
    --lora-dropout, whose masks each process draws from its own generator."""
    if not args.resume:
        return None
    import torch

    path = checkpoint_path if args.resume == "auto" else Path(args.resume)
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = state["args"]
    except Exception as e:  # truncated or not a checkpoint: say so in one line
        raise UsageError(f"--resume: cannot read {path} ({type(e).__name__}: {e})") from None
    if saved.get("variant", resolve_model(saved.get("model", "?"))[1]) != args.variant:
        raise UsageError(
            f"--resume: {path} was trained on {saved.get('variant', saved.get('model'))}, not {args.variant}; "
            "resume with the same model or start a new --output"
        )
    if "position" not in state:
        raise UsageError(f"--resume: {path} was written by an older version of train.py; start a new --output")
    saved_processes = state.get("world_size", 1)

    def same(k):
        if k == "batch_size":  # compared as the global micro-batch
            return saved[k] * saved_processes == args.batch_size * processes
        return saved[k] == getattr(args, k)

    changed = [k for k in RESUME_FIXED if k in saved and not same(k)]
    if changed:

        def shown(k, value, n):  # a batch size with its number of processes, when either run had several
            return f"{value} x {n} processes" if k == "batch_size" and {saved_processes, processes} != {1} else value

        was = ", ".join(
            f"--{k.replace('_', '-')} {shown(k, saved[k], saved_processes)} "
            f"(now {shown(k, getattr(args, k), processes)})"
            for k in changed
        )
        raise UsageError(f"--resume: {path} was made with {was}; these must stay the same to resume")
    if saved_processes != processes and saved.get("lora_dropout"):
        raise UsageError(
            f"--resume: {path} was trained by {saved_processes} processes with --lora-dropout {saved['lora_dropout']}; "
            f"each process draws its own dropout masks, so it resumes exactly only with {saved_processes} processes"
        )
    state["adjusted"] = {k: getattr(args, k) for k in RESUME_ADJUSTABLE if k in saved and saved[k] != getattr(args, k)}
    return state


def save_checkpoint(path: Path, transformer, optimizer, scheduler, position: Position, gen, args):
    """Under torchrun every rank calls it (sharded tensors are gathered whole) and rank 0 writes the one file, in the
    single-process format plus every rank's RNG state, so any number of processes can resume it."""
    import torch

    import lora

    world = distributed.current()
    state = {
        f"{n}.lora_{k}": world.full(getattr(m, f"lora_{k}")).detach().cpu()
        for n, m in lora.lora_layers(transformer).items()
        for k in "AB"
    }
    checkpoint = {
        "lora": state,
        "optimizer": distributed.full_optimizer_state(world, optimizer),
        "scheduler": scheduler.state_dict(),
        "position": vars(position),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "args": vars(args),
        **world.rng_states(),
    }
    with world.together():
        if world.rank == 0:
            atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), "the previous checkpoint is intact")


def restore_checkpoint(state: dict, transformer, optimizer, scheduler, gen, args) -> Position:
    import torch

    import lora

    saved, layers = state["lora"], lora.lora_layers(transformer)
    if set(saved) != {f"{n}.lora_{k}" for n, m in layers.items() for k in "AB"} or any(
        saved[f"{n}.lora_A"].shape != m.lora_A.shape for n, m in layers.items()
    ):
        raise UsageError("--resume: the checkpoint's LoRA layers differ from this model's (other --lora-targets?)")
    for name, layer in layers.items():
        distributed.copy_into(layer.lora_A, saved[f"{name}.lora_A"])
        distributed.copy_into(layer.lora_B, saved[f"{name}.lora_B"])
    world = distributed.current()
    optimizer.load_state_dict(
        distributed.sharded_optimizer_state(state["optimizer"], optimizer) if world.sharded else state["optimizer"]
    )
    scheduler.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if world.size > 1 and state.get("world_size") == world.size:  # this rank's LoRA-dropout stream
        cpu, cuda = state["rank_rng"][world.rank]
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, world.device)
    position = Position(**state["position"])
    if state["adjusted"]:  # the new optimizer settings take over from the resumed step (the state dicts hold the old)
        scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = args.lr, args.lr * factor(scheduler.last_epoch)
            group["weight_decay"] = args.weight_decay
        position.history.append([position.step, state["adjusted"]])
    return position


class LogFile:
    """OUTPUT/log.csv, one row per optimizer step; on resume the rows after the checkpoint's step (written before an
    interruption) are dropped, so no step appears twice. Under torchrun only rank 0 writes it (path None elsewhere)."""

    header = ["step", "loss", "lr", "grad_norm", "images_per_s", "seconds"]

    def __init__(self, path: Path | None, resume_step: int | None):
        self.file = None
        if path is None:
            return
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r for r in rows if r and r[0].isdigit() and int(r[0]) <= resume_step]
        self.file = open(path, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerows([self.header, *rows])
        self.file.flush()

    def write(self, *values):
        if self.file:
            self.writer.writerow(values)
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


class StopOnInterrupt:
    """First Ctrl-C: finish the current step, write a checkpoint, stop. A second Ctrl-C aborts at once (the last
    checkpoint written stays intact). Under torchrun, which forwards the signal it gets to every process (and kills
    them 30 s later), SIGTERM (a scheduler's stop) is handled the same way."""

    def __init__(self, signals=(signal.SIGINT,)):
        self.signals = signals

    def __enter__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in self.signals}
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step to write a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def public_settings(args) -> dict:
    """The training settings worth keeping in the LoRA file: no local paths (folder names only)."""
    paths = {"data", "output", "weights", "cache_dir", "resume", "preview_prompts"}
    out = {}
    for key, value in vars(args).items():
        if key in paths:
            value = Path(value).name if value not in (None, "auto") else value
        if isinstance(value, int | float | str | list | type(None)):
            out[key] = value
    return out


def export_lora(
    path: Path, transformer, module, variant: str, names: list[str], targets, args, position: Position, expert=""
):
    import lora

    metadata = {
        **({"expert": f"{expert}_noise", "boundary": module.VARIANTS[variant].boundary} if expert else {}),
        **getattr(module, "LORA_METADATA", {}),  # what kohya's trainers write, read by other tools
        "modelspec.title": path.stem,
        "modelspec.resolution": f"{args.resolution[0]}x{args.resolution[0]}",
        "base_model": variant,
        "base_repo": module.VARIANTS[variant].repo,
        "rank": args.rank,
        "alpha": args.alpha or args.rank,
        "targets": json.dumps(targets),
        "layers": len(names),
        "format": module.LORA_FORMAT,
        "steps": position.step,
        "training": json.dumps(public_settings(args)),
        "resumed_with_changes": json.dumps(position.history),
    }
    try:
        lora.save(transformer, path, module.LORA_FORMAT, metadata, dtype=lora.SAVE_DTYPES[args.save_dtype])
    except OSError as e:
        raise UsageError(
            f"could not write {path}: {e.strerror or e}; the checkpoint holds the trained LoRA, so free space and "
            "rerun with --resume to export it"
        ) from None


# ----------------------------------------------------------------------------------------------------------------------
# The command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("model", help="model family or variant (flux1, flex1-alpha, zimage, zimage-base, ...)")
    p.add_argument("--data", required=True, help="folder of images + .txt captions, or with metadata.jsonl/.csv")
    p.add_argument("--weights", help="local folder laid out like the model's Hugging Face repo (default: download)")
    p.add_argument("--output", default="output", help="folder for the LoRA, checkpoints, cache and log")
    p.add_argument("--name", help="file name of the final LoRA (default: lora-<model>)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank, i.e. scale 1)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    p.add_argument("--lora-targets", nargs="+", help="fnmatch patterns of layers to train (default: the model's)")
    p.add_argument(
        "--save-dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the exported LoRA file"
    )
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=0, help="linear learning-rate warm-up steps")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    p.add_argument("--batch-size", type=int, default=1, help="images per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--resolution", type=int, nargs="+", default=[512], help="one or several target resolutions")
    p.add_argument("--bucket-step", type=int, default=64, help="bucket sides are multiples of this")
    p.add_argument("--timesteps", choices=["logit_normal", "uniform"], default="logit_normal", help="sigma sampling")
    p.add_argument("--logit-mean", type=float, default=0.0, help="logit-normal mean")
    p.add_argument("--logit-std", type=float, default=1.0, help="logit-normal standard deviation")
    p.add_argument("--caption-dropout", type=float, default=0.0, help="probability of training on an empty caption")
    p.add_argument(
        "--frames",
        type=int,
        nargs="+",
        help="video models: clip lengths in frames, 4k+1 (default: the model's); a clip trains at the longest that "
        "fits, a shorter one at its own longest 4k+1; images train as 1 frame",
    )
    p.add_argument(
        "--frame-sampling",
        choices=["stride", "uniform"],
        default="stride",
        help="video models: the frames from the clip's start, every --frame-stride-th, or spread over the whole clip",
    )
    p.add_argument("--frame-stride", type=int, default=1, help="video models: take every Nth frame (stride sampling)")
    p.add_argument(
        "--first-frame",
        type=float,
        help="image-to-video models: share of clips trained conditioned on their first frame (default: the model's; "
        "Wan2.2 TI2V-5B 0.5, I2V-A14B 1)",
    )
    p.add_argument(
        "--expert",
        choices=["high", "low", "both"],
        help="two-expert models (Wan2.2 A14B): the expert whose LoRA trains, each on its own noise levels (default "
        "both, taking turns step by step); written as NAME_high_noise / NAME_low_noise.safetensors",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA init, data order, sigmas and noise")
    p.add_argument(
        "--resume", nargs="?", const="auto", help="continue from OUTPUT/checkpoint.pt (or the given checkpoint file)"
    )
    p.add_argument("--checkpoint-every", type=int, default=250, help="write OUTPUT/checkpoint.pt every N steps")
    p.add_argument("--preview-every", type=int, default=0, help="render the preview prompts every N steps (0 = off)")
    p.add_argument("--preview", action="append", default=[], help="a preview prompt (repeatable)")
    p.add_argument("--preview-prompts", help="file with one preview prompt per line")
    p.add_argument("--preview-steps", type=int, help="solver steps for previews (default: the model's)")
    p.add_argument("--preview-size", help="WIDTHxHEIGHT of previews (default: the first resolution, square)")
    p.add_argument("--allow-distilled", action="store_true", help="train on a step-distilled variant (Z-Image-Turbo)")
    p.add_argument("--cache-dir", help="latent/embedding cache (default: OUTPUT/cache)")
    p.add_argument("--device", help="cuda, cpu, mps, ... (default: the best available)")
    p.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], help="base model dtype (default: bf16 on a GPU, else fp32)"
    )
    p.add_argument("--int8", action="store_true", help="INT8 base (torch._int_mm): less memory, LoRA stays fp32")
    p.add_argument(
        "--offload",
        action="store_true",
        help="for GPUs smaller than the model: stream the frozen transformer blocks from host memory (forward and "
        "backward); text encoders and VAE visit the device only while they run",
    )
    p.add_argument(
        "--shard",
        action="store_true",
        help="under torchrun: shard the frozen transformer, the LoRA and its optimizer state over the GPUs (FSDP2), "
        "for models that do not fit one GPU",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default in --help."""


def main(argv=None) -> int:
    return run_cli(distributed.launch(train), build_parser().parse_args(argv))  # launch: train itself in one process


def check_args(args, module, variant: str):
    """Everything that can be checked without loading a model or reading images."""
    data = Path(args.data)
    if not data.is_dir():
        raise UsageError(f"--data {data}: no such folder")
    if args.weights and not Path(args.weights).is_dir():
        raise UsageError(f"--weights {args.weights}: no such folder")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise UsageError(f"--output {args.output} is a file; give a folder (it is created if missing)")
    for name in ("steps", "batch_size", "grad_accum", "rank", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    finite = lambda x: math.isfinite(x)  # noqa: E731
    if not (finite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr {args.lr}: must be a positive number")
    if not (finite(args.weight_decay) and args.weight_decay >= 0) or args.warmup < 0:
        raise UsageError("--weight-decay and --warmup must be >= 0")
    if not (finite(args.max_grad_norm) and args.max_grad_norm >= 0):
        raise UsageError(f"--max-grad-norm {args.max_grad_norm}: must be >= 0 (0 = off)")
    if not (finite(args.logit_mean) and finite(args.logit_std) and args.logit_std > 0):
        raise UsageError("--logit-mean must be a number and --logit-std a positive number")
    if not 0 <= args.caption_dropout <= 1 or not 0 <= args.lora_dropout < 1:
        raise UsageError("--caption-dropout must be in [0, 1] and --lora-dropout in [0, 1)")
    if args.alpha is not None and not (finite(args.alpha) and args.alpha > 0):
        raise UsageError(f"--alpha {args.alpha}: must be a positive number")
    import sample

    granularity = sample.pixels_per_token(module, variant)
    check_video_args(args, module, variant)
    if args.bucket_step < granularity or args.bucket_step % granularity:
        raise UsageError(f"--bucket-step must be a multiple of {granularity} for {args.model}")
    if min(args.resolution) < args.bucket_step:
        raise UsageError(f"--resolution {min(args.resolution)} is smaller than --bucket-step {args.bucket_step}")
    if args.preview_prompts and not Path(args.preview_prompts).is_file():
        raise UsageError(f"--preview-prompts {args.preview_prompts}: no such file")
    if args.preview_size:
        sample.parse_size(args.preview_size, granularity)
    if args.shard and args.offload:
        raise UsageError(
            "--shard and --offload do not combine: --offload streams every block from this process's host memory, "
            "while --shard keeps 1/N of every block on each GPU and gathers it there; with --shard the frozen base "
            "already takes 1/N of its size per GPU (use more GPUs), or use --offload without --shard"
        )
    if args.shard and distributed.current().size == 1:
        raise UsageError(
            "--shard splits the model over the processes of a torchrun launch (torchrun --nproc-per-node N "
            "train.py ... --shard); one process has nothing to share it with"
        )
    if getattr(module.VARIANTS[variant], "distilled", False):
        if not args.allow_distilled:
            raise UsageError(
                f"{variant} is step-distilled: a LoRA trained on it loses the few-step distillation. "
                f"Train on {module.TRAIN_VARIANT} (the default) or pass --allow-distilled"
            )
        print(f"warning: training on {variant} (distilled): expect it to need more steps afterwards", file=sys.stderr)


def check_video_args(args, module, variant: str):
    """The video options, checked and resolved to the model's defaults (so a resumed run compares the values used)."""
    v = module.VARIANTS[variant]
    stride = getattr(module, "TEMPORAL_STRIDE", None)
    if stride is None:
        given = [flag for flag, value in (("--frames", args.frames), ("--first-frame", args.first_frame)) if value]
        if given or args.frame_stride != 1 or args.frame_sampling != "stride":
            options = " and ".join(given) or "the frame options"
            raise UsageError(f"{options}: for video models; {args.model} makes images")
    else:
        args.frames = sorted(set(args.frames or [v.frames]))
        if any(n < 1 or (n - 1) % stride for n in args.frames):
            raise UsageError(f"--frames {' '.join(map(str, args.frames))}: each must be {stride}k+1 (e.g. 49, 81)")
        if args.frame_stride < 1:
            raise UsageError(f"--frame-stride must be at least 1, got {args.frame_stride}")
        takes = getattr(v, "image", "none")  # whether the model takes a first frame: none, optional, required
        if args.first_frame is None:
            args.first_frame = getattr(v, "train_first_frame", 0.0)
        if not 0 <= args.first_frame <= 1:
            raise UsageError(f"--first-frame {args.first_frame}: a share, between 0 and 1")
        if args.first_frame and takes == "none":
            raise UsageError(f"--first-frame: {variant} makes videos from text only (no first-frame condition)")
        if args.first_frame != 1 and takes == "required":
            raise UsageError(f"--first-frame {args.first_frame}: {variant} always takes a first frame (use 1)")
    if getattr(v, "boundary", None) is None:
        if args.expert:
            raise UsageError(f"--expert is for two-expert models (Wan2.2 A14B); {variant} has one transformer")
    elif args.expert is None:
        args.expert = "both"


def train(args) -> int:
    # ---- arguments, and the checkpoint to resume: all before anything expensive
    module, variant = resolve_model(args.model)
    args.variant = variant
    world = distributed.current()  # rank 0 of 1, unless started by torchrun
    check_args(args, module, variant)
    out = Path(args.output)
    checkpoint_path = out / "checkpoint.pt"
    resume = read_checkpoint(args, checkpoint_path, world.size)

    # ---- data: scan, bucket (image and clip headers only)
    data = Path(args.data)
    videos = getattr(module, "TEMPORAL_STRIDE", None) is not None  # a video model: clips, and images as 1 frame
    clips = ClipFrames(args.frames, args.frame_sampling, args.frame_stride) if videos else None
    items, skipped = scan(data, videos)
    if videos:
        import video

        if video.available_backend() == "pillow" and any(p.suffix.lower() in video.VIDEO_EXTENSIONS for p, _ in items):
            raise UsageError("reading video files needs PyAV or imageio-ffmpeg: pip install -r requirements-video.txt")
    samples = plan_samples(items, args.resolution, args.bucket_step, skipped, clips)
    if videos and args.first_frame == 1:  # every sample conditioned on its first frame: a single frame teaches nothing
        skipped["single frame (image-to-video trains on clips)"] += sum(s["frames"] == 1 for s in samples)
        samples = [s for s in samples if s["frames"] > 1]
    samples = attach_references(samples, module, skipped)
    what = "clips or images" if videos else "images"
    if not samples:
        raise UsageError(f"no usable {what} in {data} (skipped: {dict(skipped) or 'no files found'})")
    preview_prompts = list(args.preview)
    if args.preview_prompts:
        preview_prompts += [p.strip() for p in Path(args.preview_prompts).read_text().splitlines() if p.strip()]

    import torch

    import sample

    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir) if args.cache_dir else out / "cache"
    cache.mkdir(parents=True, exist_ok=True)

    # ---- model
    device = sample.pick_device(args.device)
    dtype_name, dtype = sample.pick_dtype(args.dtype, device)
    with world.together():  # under torchrun a rank that fails to load (memory, a file) stops every rank
        pipe, transformer, names, params = setup_model(args, module, variant, device, dtype)
    if world.rank > 0:  # its own LoRA-dropout masks (the LoRA's initial values, drawn before, are the same everywhere)
        torch.manual_seed(int(digest(args.seed, "rank", world.rank), 16) % 2**63)
    experts = list(transformer) if isinstance(transformer, torch.nn.ModuleDict) else [""]  # trained in turns
    source = Path(args.weights).resolve() if args.weights else module.VARIANTS[variant].repo
    model_id = f"{args.model}:{variant}:{source}:{dtype_name}"

    # ---- cache latents and prompt embeddings (each computed once, reused by later runs)
    progress = not args.quiet
    new_latents = cache_latents_shared(world, pipe, samples, cache, model_id, skipped, progress)
    if not samples:
        raise UsageError(f"no usable {what} in {data} (skipped: {dict(skipped)})")
    prompts = [s["caption"] for s in samples] + [""] + preview_prompts  # "": caption dropout and CFG previews
    if preview_prompts and hasattr(module, "NEGATIVE_PROMPT"):  # what previews' CFG uses for "" (Wan's official one)
        prompts.append(module.NEGATIVE_PROMPT)
    prompt_files, new_prompts = cache_prompts_shared(world, pipe, prompts, cache, model_id, progress)
    clips_note = f"{sum(s['kind'] != 'image' for s in samples)} from clips; " if videos else ""
    print(
        f"data: {len(items)} captioned {'files' if videos else 'images'}, {len(samples)} training samples "
        f"({clips_note}{sum(bool(s['refs']) for s in samples)} edit pairs) in "
        f"{len({(s['bucket'], s.get('frames')) for s in samples})} buckets; "
        f"skipped {dict(skipped) or 'none'}; "
        f"encoded {new_latents} latents and {new_prompts} prompts (the rest from {cache})"
    )
    conds = {prompt: load_tensors(file) for prompt, file in prompt_files.items()}
    # Previews of a model that needs a first frame (I2V-A14B) encode it: the VAE encoder stays for them.
    image_previews = bool(preview_prompts) and getattr(module.VARIANTS[variant], "image", None) == "required"
    free_encoders(pipe, conds, args.offload, device, keep_vae_encoder=image_previews)

    # ---- optimizer, and the resumed state
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    warmup = lambda step: min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    gen = torch.Generator().manual_seed(args.seed)  # sigmas, noise and caption dropout
    position = Position()
    if resume is not None:
        with world.together():
            position = restore_checkpoint(resume, transformer, optimizer, scheduler, gen, args)
        note = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in resume["adjusted"].items())
        print(f"resumed from step {position.step}" + (f" with the new {note}" if note else ""))
    velocity_kwargs = pipe.training_kwargs()
    buckets = defaultdict(list)
    for i, s in enumerate(samples):
        buckets[(s["bucket"], s.get("frames"), len(s["refs"]))].append(i)  # one size, length, number of references

    order = {}  # {epoch: its batches}, for the current epoch only

    def next_batch():
        if position.epoch not in order:
            order.clear()
            # Under torchrun: the global micro-batches (N x --batch-size), each split by rank in micro_step.
            order[position.epoch] = epoch_batches(buckets, args.batch_size * world.size, args.seed, position.epoch)
        if position.batch == len(order[position.epoch]):
            position.epoch, position.batch = position.epoch + 1, 0
            return next_batch()
        position.batch += 1
        return [samples[i] for i in order[position.epoch][position.batch - 1]]

    preview_kw = {}  # what every preview is generated with, worked out once
    if args.preview_every and preview_prompts:
        h, w = (None, None)
        if args.preview_size:
            h, w = sample.parse_size(args.preview_size, sample.pixels_per_token(module, variant))
        preview_kw = {"height": h or args.resolution[0], "width": w or args.resolution[0]}
        if videos:
            preview_kw["frames"] = min(args.frames)
        if videos and getattr(module.VARIANTS[variant], "image", None) == "required":  # from the first clip's start
            preview_kw["image"] = first_frame(samples[0])

    def preview():
        folder = out / "previews"
        folder.mkdir(exist_ok=True)
        transformer.eval()  # under torchrun every rank renders (--shard needs them all), rank 0 writes
        images = pipe.generate(preview_prompts, steps=args.preview_steps, seed=args.seed, progress=False, **preview_kw)
        transformer.train()
        with world.together():
            for i, image in enumerate(images if world.rank == 0 else []):
                name = folder / f"step{position.step:06d}-{i:02d}"
                if videos:
                    import video

                    video.write_video(name.with_suffix(".mp4"), image, module.VARIANTS[variant].fps)
                else:
                    image.save(name.with_suffix(".png"))

    # ---- the steps
    from tqdm.auto import tqdm

    from flux1 import bar_disabled

    with world.together():
        log = LogFile(out / "log.csv" if world.rank == 0 else None, position.step if resume is not None else None)
    bar = tqdm(total=args.steps, initial=position.step, disable=bar_disabled(progress), desc=f"train {variant}")
    start, session_start, seen = time.time() - position.seconds, time.time(), 0
    last_checkpoint = position.step if resume is not None else None
    with StopOnInterrupt((signal.SIGINT, signal.SIGTERM) if world.size > 1 else (signal.SIGINT,)) as interrupt:
        while position.step < args.steps:
            loss = 0.0
            for _ in range(args.grad_accum):
                batch = next_batch()
                share = world.share(len(batch))
                expert = experts[position.step % len(experts)]  # two experts: each optimizer step trains one
                loss += (
                    micro_step(pipe, batch, conds, args, gen, device, velocity_kwargs, share, expert) / args.grad_accum
                )
                seen += len(batch)
            world.sync_gradients(params)  # under torchrun: the sum of the ranks' (weighted) gradients
            loss = world.sum(loss)  # the global micro-batches' mean, the same on every rank
            clip = args.max_grad_norm if args.max_grad_norm > 0 else math.inf
            grad_norm = float(world.full(torch.nn.utils.clip_grad_norm_(params, clip)))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                where = f"the last good checkpoint is {checkpoint_path} (step {last_checkpoint})"
                raise Diverged(
                    f"training diverged at step {position.step + 1}: loss {loss}, gradient norm {grad_norm}; nothing "
                    f"was written. {where if last_checkpoint is not None else 'No checkpoint was written yet'}; "
                    "try a lower --lr (or --max-grad-norm)"
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            position.step += 1
            position.seconds = time.time() - start
            rate = seen / max(time.time() - session_start, 1e-9)
            lr = f"{scheduler.get_last_lr()[0]:.3g}"
            log.write(position.step, f"{loss:.6f}", lr, f"{grad_norm:.4g}", f"{rate:.3f}", f"{position.seconds:.1f}")
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update()
            stop = world.any(interrupt.requested)  # under torchrun: every rank stops after the same step
            if position.step % args.checkpoint_every == 0 or position.step == args.steps or stop:
                save_checkpoint(checkpoint_path, transformer, optimizer, scheduler, position, gen, args)
                last_checkpoint = position.step
            if stop:
                bar.close()
                raise Interrupted(
                    f"interrupted: checkpoint of step {position.step} written to {checkpoint_path}; to continue, "
                    "run the same command with --resume"
                )
            if args.preview_every and position.step % args.preview_every == 0 and preview_prompts:
                preview()
    bar.close()
    log.close()

    # ---- the LoRA, in the format other tools load
    final = out / f"{args.name or 'lora-' + args.model}.safetensors"
    targets = args.lora_targets or module.LORA_TARGETS
    if world.sharded:
        distributed.gather_lora(world, transformer)
    written = []
    for expert in experts:  # two experts: one file each, NAME_high_noise / NAME_low_noise (ai-toolkit's names)
        path = final.with_name(f"{final.stem}_{expert}_noise{final.suffix}") if expert else final
        part = transformer[expert] if expert else transformer
        layers = [n for n in names if n.startswith(f"{expert}.")] if expert else names
        with world.together():
            if world.rank == 0:
                export_lora(path, part, module, variant, layers, targets, args, position, expert)
        written.append(str(path))
    print(
        f"wrote {' and '.join(written)} ({len(names)} layers, rank {args.rank}) after {position.step} steps; "
        f"log {out / 'log.csv'}"
    )
    return 0


if __name__ == "__main__":
    import sample

    sample.entry(main)
