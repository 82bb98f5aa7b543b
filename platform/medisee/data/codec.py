"""Image and mask encoding/decoding and the checks that send bad records to quarantine."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image, ImageOps


class BadRecord(ValueError):
    """A record that cannot be used; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def encode_png(array: np.ndarray) -> bytes:
    """uint8 H×W (grayscale) or H×W×3 → PNG bytes. An RGB image with R=G=B is stored as grayscale."""
    array = np.asarray(array)
    if (
        array.ndim == 3
        and array.shape[2] == 3
        and (array[..., 0] == array[..., 1]).all()
        and (array[..., 0] == array[..., 2]).all()
    ):
        array = array[..., 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Image bytes (PNG/JPEG/TIFF/BMP) → uint8 H×W×3, turned upright by its EXIF orientation: the one
    reader of encoded images for training, batch scoring and serving. The pixel count is checked from
    the header before pixels are decoded. Raises BadRecord: too_large or unreadable_image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise BadRecord("too_large", too_many_pixels(img.width, img.height, max_pixels))
            img.load()
            array = np.asarray(to_uint8_image(ImageOps.exif_transpose(img)))
    except BadRecord:
        raise
    except Image.DecompressionBombError:  # over PIL's own limit: refused before its header is trusted
        raise BadRecord("too_large", "over PIL's pixel limit (decompression bomb refused)") from None
    except Exception as exc:  # PIL raises many types for broken files (OSError, struct.error, ...)
        raise BadRecord("unreadable_image", f"{type(exc).__name__}: {exc}"[:200]) from None
    return as_rgb(array)


def too_many_pixels(width: int, height: int, max_pixels: int) -> str:
    return f"{width}×{height} pixels exceeds the limit of {max_pixels} (decompression bomb refused)"


def to_uint8_image(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I", "F"):
        array = np.asarray(img, dtype=np.float32)
        return Image.fromarray(window_to_uint8(array, float(array.min()), float(array.max())))
    if img.mode not in ("L", "RGB"):
        return img.convert("RGB")
    return img


def as_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise BadRecord("unreadable_image", f"unsupported image shape {array.shape}")
    return np.ascontiguousarray(array.astype(np.uint8, copy=False))


def window_to_uint8(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] and scale to 0..255 (CT windowing, MR min-max)."""
    array = np.asarray(array, dtype=np.float32)
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    scaled = (np.clip(array, low, high) - low) / (high - low) * 255.0
    return np.round(scaled).astype(np.uint8)


def decode_mask_png(data: bytes, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Mask bytes → bool H×W. Checks binary values, non-emptiness and the image shape."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            array = np.asarray(img)
    except Exception as exc:  # as in decode_image: PIL raises many types for broken files
        raise BadRecord("unreadable_mask", f"{type(exc).__name__}: {exc}"[:200]) from None
    if array.ndim == 3:
        array = array[..., 0]
    return check_mask(array, expected_shape)


def check_mask(array: np.ndarray, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    if expected_shape is not None and tuple(array.shape[:2]) != tuple(expected_shape):
        raise BadRecord(
            "mask_shape_mismatch", f"mask {tuple(array.shape[:2])} vs image {tuple(expected_shape)}"
        )
    if array.dtype == bool:
        mask = array
    else:
        values = np.unique(array)
        if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
            raise BadRecord("mask_not_binary", f"values {values[:8].tolist()}")
        mask = array > 0
    if not mask.any():
        raise BadRecord("empty_mask", "mask has no foreground pixel")
    return mask


def mask_box(mask: np.ndarray) -> list[float]:
    """Pixel xyxy box of a bool mask, [x_min, y_min, x_max, y_max] with the last foreground pixel
    included (not x_max + 1), as the reference derives its boxes: normalised, x_max / W."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def mask_to_rle(mask: np.ndarray) -> str:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return json.dumps({"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")})


def rle_to_mask(text: str) -> np.ndarray:
    from pycocotools import mask as mask_utils

    rle = json.loads(text)
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def row_mask(row: dict) -> np.ndarray | None:
    """The bool mask of a shard row, whichever encoding it uses (None for false queries)."""
    if row.get("mask_png"):
        with Image.open(io.BytesIO(row["mask_png"])) as img:
            return np.asarray(img) > 0
    if row.get("mask_rle"):
        return rle_to_mask(row["mask_rle"])
    return None
