"""Open calibration images safely and hand them over as RGB.

Everything that can go wrong with one image becomes `ImageRejected(reason)`, where `reason` is a
short stable key (counted in `CalibStats.skipped`). Images that are merely unusual (CMYK, grayscale,
alpha, palette, 16-bit) are converted, not rejected.
"""

from __future__ import annotations

import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# COCO images are at most 640x640; the Qwen processor resizes everything anyway. 40 MP is far
# above any real photo and below PIL's own bomb warning threshold (~89 MP).
DEFAULT_MAX_PIXELS = 40_000_000


class ImageRejected(Exception):
    """One image cannot be used for calibration; `reason` is a short key such as "truncated"."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def resolve_member(root: Path, rel: str) -> Path:
    """Resolve a dataset-relative path, refusing absolute paths and anything outside `root`."""
    if not isinstance(rel, str) or not rel.strip():
        raise ImageRejected("bad_path", repr(rel))
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise ImageRejected("absolute_path", rel)
    root_resolved = root.resolve()
    # resolve() follows symlinks too, so a link pointing out of the dataset is caught here.
    path = (root_resolved / rel).resolve()
    if not path.is_relative_to(root_resolved):
        raise ImageRejected("path_escape", rel)
    return path


def load_rgb(path: Path, root: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open `path` (relative to `root`, or absolute but inside it), fully decode it and return RGB.

    Raises `ImageRejected` for: path outside `root`, missing file, zero-byte file, not an image,
    truncated/corrupt data, more than `max_pixels` pixels, or a mode that cannot become RGB.
    """
    path = Path(path)
    if not path.is_absolute():
        path = resolve_member(root, str(path))
    else:
        path = path.resolve()
        if not path.is_relative_to(Path(root).resolve()):
            raise ImageRejected("path_escape", str(path))
    if not path.exists():
        raise ImageRejected("missing_file", str(path))
    if not path.is_file():
        raise ImageRejected("not_a_file", str(path))
    if path.stat().st_size == 0:
        raise ImageRejected("zero_byte", str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                # Check the header size before decoding so a bomb never allocates its pixels.
                if width * height > max_pixels:
                    raise ImageRejected("too_large", f"{width}x{height} > {max_pixels} pixels")
                im.load()
                return to_rgb(ImageOps.exif_transpose(im))
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected("too_large", str(err)) from err
    except UnidentifiedImageError as err:
        raise ImageRejected("not_an_image", str(path)) from err
    except PermissionError as err:
        raise ImageRejected("unreadable", str(err)) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # PIL reports truncated/corrupt data as OSError ("image file is truncated", "broken data
        # stream"), and some plugins as SyntaxError/ValueError.
        raise ImageRejected("corrupt", f"{path}: {err}") from err


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; alpha is composited on white, 16-bit/float is rescaled."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(im)), mode="L").convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageRejected("unsupported_mode", mode) from err


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """High-bit-depth grayscale to 8 bit, keeping absolute brightness where the range is known."""
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64))
        if arr.max(initial=0.0) <= 1.0:  # normalised float image
            arr = arr * 255.0
        return np.clip(arr + 0.5, 0, 255).astype(np.uint8)
    arr = arr.astype(np.int64)
    # 16-bit data (I;16, or 32-bit "I" holding 16-bit samples) maps 65535 -> 255.
    if arr.max(initial=0) > 255:
        arr = arr // 257
    return np.clip(arr, 0, 255).astype(np.uint8)
