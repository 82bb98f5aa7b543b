"""Input images for the stages: any uint8 grayscale / RGB / RGBA array becomes H×W×3 uint8.

A stage takes either the decoded image or a `PreparedImage`: the model-sized inputs it would build
from it, plus the original size. The prepared form is what crosses between processes (Serve
replicas, a batch job's handle calls): its size depends on the model, not on the image, so a 4k
radiograph costs what a 128 px phantom does (and stays far below gRPC's message limit).

For a model whose MLLM shares the SAM image encoder (medisee-lite), the MLLM stage returns each
image's embedding; `with_embedding` attaches it, and the decoder stage then does not encode again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from medisee.data.preprocess import SamFrame, clip_input, sam_input


class BadImage(ValueError):
    """An image the model cannot take (wrong dtype or shape); the message says what was wrong."""


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise BadImage(f"images must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, 2)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise BadImage(f"images must be H×W, H×W×3 or H×W×4, got shape {image.shape}")
    return np.ascontiguousarray(image)


def flatten_queries(queries: list[list[str]]) -> tuple[list[int], list[str]]:
    """Per-image query lists -> (image index of each query, queries) in order."""
    index = [i for i, qs in enumerate(queries) for _ in qs]
    return index, [q for qs in queries for q in qs]


@dataclass(frozen=True)
class PreparedImage:
    clip: np.ndarray  # clip_size × clip_size × 3 uint8 (CLIP's resize + centre crop)
    sam: np.ndarray  # sam_size × sam_size × 3 uint8 (longest side resized, padded bottom / right)
    height: int  # of the original image: boxes and masks come back in its pixels
    width: int
    embedding: np.ndarray | None = None  # (P, g, g) SAM image embedding once computed (float16 in Serve)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def nbytes(self) -> int:
        extra = self.embedding.nbytes if self.embedding is not None else 0
        return self.clip.nbytes + self.sam.nbytes + extra


def with_embedding(image: PreparedImage, embedding: np.ndarray | None) -> PreparedImage:
    return image if embedding is None else replace(image, embedding=np.asarray(embedding))


def embedding_of(image: np.ndarray | PreparedImage) -> np.ndarray | None:
    return image.embedding if isinstance(image, PreparedImage) else None


def prepare_image(image: np.ndarray, clip_size: int, sam_size: int) -> PreparedImage:
    rgb = as_rgb_uint8(image)
    sam, _ = sam_input(rgb, sam_size)
    return PreparedImage(clip_input(rgb, clip_size), sam, rgb.shape[0], rgb.shape[1])


def clip_of(image: np.ndarray | PreparedImage, size: int) -> np.ndarray:
    if isinstance(image, PreparedImage):
        if image.clip.shape != (size, size, 3):
            raise BadImage(f"prepared for CLIP at {image.clip.shape[:2]}, the model takes {size}")
        return image.clip
    return clip_input(as_rgb_uint8(image), size)


def sam_of(image: np.ndarray | PreparedImage, size: int) -> tuple[np.ndarray, SamFrame]:
    """(SAM input, frame of the original image in it)."""
    if isinstance(image, PreparedImage):
        if image.sam.shape != (size, size, 3):
            raise BadImage(f"prepared for SAM at {image.sam.shape[:2]}, the model takes {size}")
        return image.sam, SamFrame(image.height, image.width, size)
    return sam_input(as_rgb_uint8(image), size)


def original_shape(image: np.ndarray | PreparedImage) -> tuple[int, int]:
    return image.shape if isinstance(image, PreparedImage) else tuple(np.asarray(image).shape[:2])
