"""Video files in and out: H.264 MP4 through PyAV or imageio-ffmpeg, animated WebP through Pillow as the fallback.

    import video
    path = video.write_video("out.mp4", frames, fps=24, metadata={"prompt": "a cat"})   # .mp4, or .webp without PyAV
    frames, fps, metadata = video.read_video(path)                                      # (F, H, W, 3) uint8
    count, fps, width, height = video.probe(path)             # a clip's length and size, for planning (train.py)
    for frame in video.read_frames(path, [0, 2, 4]): ...     # only the frames asked for, decoded in one pass

PyAV (`pip install av`) and imageio-ffmpeg (`pip install imageio-ffmpeg`) are optional (requirements-video.txt); each
bundles an FFmpeg with libx264. Without either, MP4 requests are written as animated WebP by Pillow, which is always
installed. The metadata (a dict of settings) is stored as JSON in the MP4 `comment` tag or in the WebP's EXIF
ImageDescription, as sample.py stores its settings in PNG text chunks.
"""

import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

EXIF_IMAGE_DESCRIPTION = 0x010E
BACKENDS = ("pyav", "imageio", "pillow")
VIDEO_EXTENSIONS = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v"}  # what train.py reads as clips


def available_backend() -> str:
    """The first of PyAV, imageio-ffmpeg (MP4) and Pillow (animated WebP) that is installed."""
    try:
        import av  # noqa: F401

        return "pyav"
    except ImportError:
        pass
    try:
        import imageio_ffmpeg  # noqa: F401

        return "imageio"
    except ImportError:
        return "pillow"


def as_frames(frames) -> np.ndarray:
    """A list of PIL images or HxWx3 arrays, or an (F, H, W, 3) array -> (F, H, W, 3) uint8, contiguous."""
    if isinstance(frames, np.ndarray):
        arr = frames
    else:
        arr = np.stack([np.asarray(f.convert("RGB") if hasattr(f, "convert") else f) for f in frames])
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected (frames, height, width, 3) uint8 frames, got {arr.shape} {arr.dtype}")
    if len(arr) == 0:
        raise ValueError("no frames to write")
    return np.ascontiguousarray(arr)


def write_video(path, frames, fps: float, metadata: dict | None = None, backend: str | None = None) -> Path:
    """Write frames as `path`: H.264 MP4 (yuv420p, CRF 18) for a .mp4 path with PyAV or imageio-ffmpeg, else animated
    WebP (quality 90) next to it with the suffix .webp. Returns the path written. The file appears atomically."""
    path, arr = Path(path), as_frames(frames)
    backend = backend or available_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if path.suffix.lower() != ".mp4" or backend == "pillow":
        path = path.with_suffix(".webp")
        backend = "pillow"
    elif arr.shape[1] % 2 or arr.shape[2] % 2:
        raise ValueError(f"H.264 (yuv420p) needs even frame sides, got {arr.shape[2]}x{arr.shape[1]}")
    # EXIF text is ASCII: the WebP gets JSON's \u escapes, the MP4 comment UTF-8.
    comment = json.dumps(metadata or {}, ensure_ascii=backend == "pillow")
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the suffix tells FFmpeg and Pillow the container
    {"pyav": _write_pyav, "imageio": _write_imageio, "pillow": _write_webp}[backend](tmp, arr, fps, comment)
    os.replace(tmp, path)
    return path


def _write_pyav(path: Path, arr: np.ndarray, fps: float, comment: str):
    import av

    with av.open(str(path), "w") as container:
        container.metadata["comment"] = comment
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = arr.shape[2], arr.shape[1], "yuv420p"
        stream.options = {"crf": "18"}
        for frame in arr:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames


def _write_imageio(path: Path, arr: np.ndarray, fps: float, comment: str):
    import imageio_ffmpeg

    params = ["-crf", "18", "-metadata", f"comment={comment}"]
    size = (arr.shape[2], arr.shape[1])
    writer = imageio_ffmpeg.write_frames(
        str(path), size, fps=fps, codec="libx264", pix_fmt_out="yuv420p", output_params=params, macro_block_size=1
    )
    writer.send(None)  # start the FFmpeg process
    for frame in arr:
        writer.send(frame)
    writer.close()


def _write_webp(path: Path, arr: np.ndarray, fps: float, comment: str):
    from PIL import Image

    images = [Image.fromarray(frame) for frame in arr]
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = comment
    # WebP stores each frame's duration in whole milliseconds: 24 fps plays at 1000/42 = 23.8 fps. The exact rate is
    # kept in the metadata (sample.py's "fps" setting).
    images[0].save(
        path,
        format="WEBP",
        save_all=True,
        append_images=images[1:],
        duration=max(1, round(1000 / fps)),
        loop=0,
        quality=90,
        exif=exif,
    )


def read_video(path) -> tuple[np.ndarray, float, dict]:
    """(frames (F, H, W, 3) uint8, frames per second, metadata dict) of an MP4 (PyAV, or imageio-ffmpeg without
    metadata) or an animated WebP/GIF (Pillow)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    if path.suffix.lower() in (".webp", ".gif"):
        return _read_pillow(path)
    backend = available_backend()
    if backend == "pyav":
        return _read_pyav(path)
    if backend == "imageio":
        return _read_imageio(path)
    raise ValueError(f"reading {path.suffix} files needs PyAV or imageio-ffmpeg (pip install av)")


def _metadata(text: str | None) -> dict:
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {"comment": text}


def _read_pyav(path: Path):
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.base_rate or 0)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            meta = _metadata(container.metadata.get("comment"))
    except (av.FFmpegError, IndexError) as e:
        raise ValueError(f"cannot read video {path}: {e}") from None
    if not frames:
        raise ValueError(f"video {path} has no frames")
    return np.stack(frames), fps, meta


def _read_imageio(path: Path):
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        info = next(reader)
        w, h = info["size"]
        frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
    except (OSError, RuntimeError, StopIteration) as e:
        raise ValueError(f"cannot read video {path}: {e}") from None
    if not frames:
        raise ValueError(f"video {path} has no frames")
    return np.stack(frames), float(info["fps"]), {}


def _read_pillow(path: Path):
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as im:
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
            duration = im.info.get("duration") or 0
            meta = _metadata(im.getexif().get(EXIF_IMAGE_DESCRIPTION))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read video {path}: {e}") from None
    return np.stack(frames), (1000 / duration if duration else 0.0), meta


# ----------------------------------------------------------------------------------------------------------------------
# Clips for training: their length and size without decoding them (where the container tells), and selected frames in
# one decoding pass, so a long clip never has to be held in memory whole.


def probe(path) -> tuple[int, float, int, int]:
    """(frame count, frames per second, width, height) of a clip. The count comes from the container's header where it
    has one (MP4 does, WebM often does not), else from decoding the clip once. ValueError if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    if path.suffix.lower() in (".webp", ".gif"):
        from PIL import Image

        try:
            with Image.open(path) as im:
                duration = im.info.get("duration") or 0
                return getattr(im, "n_frames", 1), (1000 / duration if duration else 0.0), im.width, im.height
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read video {path}: {e}") from None
    backend = available_backend()
    if backend == "pyav":
        import av

        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                fps = float(stream.average_rate or stream.base_rate or 0)
                count = stream.frames or sum(1 for _ in container.decode(stream))
                width, height = stream.codec_context.width, stream.codec_context.height
        except (av.FFmpegError, IndexError) as e:
            raise ValueError(f"cannot read video {path}: {e}") from None
    elif backend == "imageio":
        import imageio_ffmpeg

        try:
            reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
            info = next(reader)
            reader.close()
            count, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
        except (OSError, RuntimeError, StopIteration) as e:
            raise ValueError(f"cannot read video {path}: {e}") from None
        fps, (width, height) = float(info["fps"]), info["size"]
    else:
        raise ValueError(f"reading {path.suffix} files needs PyAV or imageio-ffmpeg (pip install av)")
    if not count:
        raise ValueError(f"video {path} has no frames")
    return count, fps, width, height


def read_frames(path, indices):
    """Yield the frames at `indices` (increasing frame numbers) of a clip as (H, W, 3) uint8 arrays, decoding it once
    and stopping after the last one. ValueError if the clip cannot be read or is shorter than the indices."""
    path, wanted = Path(path), list(indices)
    if any(b <= a for a, b in zip(wanted, wanted[1:])) or (wanted and wanted[0] < 0):
        raise ValueError(f"frame indices must increase from 0 or more, got {wanted}")
    if not wanted:
        return
    if path.suffix.lower() in (".webp", ".gif"):
        from PIL import Image, ImageSequence

        def decoded():
            with Image.open(path) as im:
                for frame in ImageSequence.Iterator(im):
                    yield np.asarray(frame.convert("RGB"))

    elif available_backend() == "pyav":
        import av

        def decoded():
            with av.open(str(path)) as container:
                for frame in container.decode(container.streams.video[0]):
                    yield frame.to_ndarray(format="rgb24")

    elif available_backend() == "imageio":
        import imageio_ffmpeg

        def decoded():
            reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
            try:
                w, h = next(reader)["size"]
                for raw in reader:
                    yield np.frombuffer(raw, np.uint8).reshape(h, w, 3)
            finally:
                reader.close()

    else:
        raise ValueError(f"reading {path.suffix} files needs PyAV or imageio-ffmpeg (pip install av)")
    target, count = iter(wanted), 0
    next_index = next(target)
    try:
        for count, frame in enumerate(decoded(), 1):
            if count - 1 == next_index:
                yield frame
                next_index = next(target, None)
                if next_index is None:
                    return
    except Exception as e:  # the decoders raise their own errors (av.FFmpegError, OSError, RuntimeError, ...)
        raise ValueError(f"cannot read video {path}: {e}") from None
    raise ValueError(f"video {path} has {count} frames; frame {next_index} was asked for")
