"""How stored pixel values become the image the model sees (uint8 H×W×3), for every front end:
`prepare` (training shards), batch scoring, serving and `medisee predict` call these, so the same file
gives the same model input everywhere.

- DICOM frames: the modality LUT (rescale slope / intercept), MONOCHROME1 inverted, then the file's
  own WindowCenter / WindowWidth, else the CT window for Modality CT, else the frame's min-max; RGB
  frames are clipped, not windowed.
- NIfTI slices: voxel (i, j) axes turned to the radiological display orientation; one window per
  volume: the CT window for a CT volume, the 0.5-99.5th percentiles otherwise. Where the modality is
  not known (NIfTI does not store it), a volume reaching down to air (below -500 HU) is taken as CT.
"""

from __future__ import annotations

import numpy as np

from medisee.data.codec import as_rgb, window_to_uint8

AIR_BELOW_HU = -500.0
UNKNOWN_MODALITIES = (None, "", "unknown", "ot")


def dicom_window(ds, frame: np.ndarray, ct_window: tuple[float, float]) -> tuple[float, float]:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center = float(center[0] if hasattr(center, "__len__") and not isinstance(center, str) else center)
        width = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
        if width > 1:
            return center - width / 2, center + width / 2
    if str(ds.get("Modality", "")).upper() == "CT":
        return ct_window
    return float(frame.min()), float(frame.max())


def dicom_frames(ds, ct_window: tuple[float, float], count: int | None = None) -> list[np.ndarray]:
    """Frames decoded one at a time, through the modality LUT, then windowed (grey) or clipped (RGB)."""
    from pydicom.pixels import apply_modality_lut, iter_pixels

    frames_count = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    used = frames_count if count is None else min(count, frames_count)
    out = []
    for raw in iter_pixels(ds, indices=range(used)):
        frame = apply_modality_lut(raw, ds).astype(np.float32)
        single_colour_frame = frame.ndim == 3 and frame.shape[-1] == 3 and frames_count == 1
        if photometric.startswith("RGB") or single_colour_frame:
            out.append(np.clip(frame, 0, 255).astype(np.uint8))
            continue
        if photometric == "MONOCHROME1":
            frame = frame.max() - frame
        low, high = dicom_window(ds, frame, ct_window)
        out.append(as_rgb(window_to_uint8(frame, low, high)))
    return out


def volume_window(
    volume: np.ndarray, modality: str | None, ct_window: tuple[float, float]
) -> tuple[float, float]:
    """The display window of a whole volume (see the module docstring)."""
    is_ct = modality == "ct" or (modality in UNKNOWN_MODALITIES and float(volume.min()) < AIR_BELOW_HU)
    if is_ct:
        return ct_window
    low, high = (float(v) for v in np.percentile(volume, [0.5, 99.5]))
    return low, high


def to_display(slice2d: np.ndarray) -> np.ndarray:
    """Voxel (i, j) axes -> image rows/columns with the usual radiological orientation."""
    return np.ascontiguousarray(np.rot90(slice2d))


def volume_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice `index` along `axis` in display orientation, in the volume's own values."""
    return to_display(np.take(volume, index, axis=axis))


def slice_image(volume: np.ndarray, axis: int, index: int, window: tuple[float, float]) -> np.ndarray:
    return as_rgb(window_to_uint8(volume_slice(volume, axis, index), *window))
