"""Readers that check what an input decodes to from its header, before decoding or inflating it.

A small file can claim (or inflate to) gigabytes: a deflated DICOM of zeros, a NumberOfFrames of a
million, a .nii.gz bomb, an 8000 × 8000 slice. Each reader here reads the header first, refuses
with `InputTooLarge` what is over its limit, and inflates compressed data in bounded steps, never
beyond what the header implies (plus a small allowance).

Limits (`Limits.of(section)` takes a config section's fields of these names, the defaults here for
those it lacks; serving passes its max_image_pixels and max_image_bytes):
    max_image_pixels   pixels of one image: a DICOM frame, a NIfTI slice (resampled or not)
    max_dicom_bytes    one DICOM file's pixel data as decoded: rows × columns × frames × samples × bytes
    max_volume_bytes   one NIfTI volume in memory: voxels × max(bytes per voxel, 4) (readers use float32)
"""

from __future__ import annotations

import gzip
import io
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np

from medisee.config import MAX_DICOM_BYTES, MAX_IMAGE_PIXELS, MAX_VOLUME_BYTES, MIB
from medisee.data.codec import BadRecord

INFLATE_CHUNK = MIB
INPUT_CHUNK = 64 * 1024
DATASET_ALLOWANCE = 16 * MIB  # what an inflated DICOM data set may hold besides its pixel data
GZIP_ALLOWANCE = MIB  # what a .nii.gz may inflate to beyond the end of the data its header implies
NIFTI_HEADER_BYTES = 348
NIFTI_SINGLE_OFFSET = 352


class InputTooLarge(BadRecord):
    """An input over a size limit (HTTP 413; a batch error row with reason too_large).

    `detail` is the message for a user; `str()` carries the reason in front, like any BadRecord.
    """

    def __init__(self, detail: str):
        super().__init__("too_large", detail)


@dataclass(frozen=True)
class Limits:
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_dicom_bytes: int = MAX_DICOM_BYTES
    max_volume_bytes: int = MAX_VOLUME_BYTES

    @classmethod
    def of(cls, section) -> Limits:
        """The limits a config section (or DecodeOptions) sets; the defaults for those it lacks."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls) if hasattr(section, f.name)})


def check_pixels(height: int, width: int, max_pixels: int, what: str = "image") -> None:
    if height * width > max_pixels:
        raise InputTooLarge(f"{what} of {width}×{height} pixels exceeds the limit of {max_pixels}")


# ----- DICOM -------------------------------------------------------------------------------------
def dicom_first_frame(data: bytes, max_pixels: int, max_bytes: int) -> np.ndarray:
    """The first frame as uint8 H×W×3, windowed as batch scoring does. InputTooLarge when over a
    limit; any other exception for a file that is not readable DICOM."""
    from medisee.config import PrepareConfig
    from medisee.data.display import dicom_frames

    ds = read_dicom(data, max_pixels, max_bytes)
    return dicom_frames(ds, PrepareConfig().ct_window, count=1)[0]


def read_dicom(data: bytes, max_pixels: int, max_bytes: int):
    """The parsed data set, its pixel data not yet decoded, after the header passed the limits.

    pydicom inflates a deflated data set in one unbounded call: those are inflated here instead.
    """
    import pydicom

    start, preamble, meta = _file_meta(data)
    if _is_deflated(meta):
        ds = _read_deflated(memoryview(data)[start:], preamble, meta, max_pixels, max_bytes)
    else:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    check_dicom_size(ds, max_pixels, max_bytes)
    return ds


def read_dicom_header(data: bytes):
    """The data set up to its pixel data, for a file or the first bytes of one (as planning reads):
    a deflated one is inflated no further than DATASET_ALLOWANCE bytes."""
    import pydicom
    from pydicom.dataset import FileDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    start, preamble, meta = _file_meta(data)
    if not _is_deflated(meta):
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    chunks = _inflate(memoryview(data)[start:], -zlib.MAX_WBITS, partial=True)
    buffer = DicomBytesIO(_first_bytes(chunks, DATASET_ALLOWANCE))
    dataset = read_dataset(buffer, False, True, stop_when=_at_pixel_data)
    return FileDataset(buffer, dataset, preamble, meta, is_implicit_VR=False, is_little_endian=True)


def _at_pixel_data(tag, vr, length) -> bool:
    return tag >> 16 == 0x7FE0  # (float / double float) pixel data


def read_stored(uri: str, settings=None) -> bytes:
    """A file's bytes as stored (never inflated on the way: readers here inflate within their bounds)."""
    from medisee import storage

    return storage.read_bytes(uri, settings)


def _file_meta(data: bytes):
    """(offset of the data set, preamble, file meta), read as dcmread reads them."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = DicomBytesIO(data)
    preamble = read_preamble(fp, force=True)
    meta = _read_file_meta_info(fp)  # private, but what dcmread uses: the same files are deflated
    return fp.tell(), preamble, meta


def _is_deflated(meta) -> bool:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    return meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian


def dicom_pixel_bytes(ds) -> int:
    """Bytes of the pixel data as decoded, from the header (1-bit data decodes to a byte a pixel)."""
    sizes = [
        int(ds.get(name) or default)
        for name, default in (
            ("Rows", 0), ("Columns", 0), ("NumberOfFrames", 1), ("SamplesPerPixel", 1),
        )
    ]  # fmt: skip
    bits = int(ds.get("BitsAllocated") or 8)
    if min(*sizes, bits) < 0:
        raise ValueError(f"negative image size in the DICOM header: {sizes}, {bits} bits")
    return math.prod(sizes) * math.ceil(bits / 8)


def check_dicom_size(ds, max_pixels: int, max_bytes: int) -> None:
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    check_pixels(rows, columns, max_pixels, "a DICOM frame")
    decoded = dicom_pixel_bytes(ds)
    if decoded > max_bytes:
        frames = int(ds.get("NumberOfFrames") or 1)
        raise InputTooLarge(
            f"{frames} DICOM frame(s) of {columns}×{rows} pixels decode to {decoded} bytes, "
            f"over the limit of {max_bytes}"
        )


def _read_deflated(zipped, preamble, meta, max_pixels: int, max_bytes: int):
    from pydicom.dataset import FileDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    chunks = _inflate(zipped, -zlib.MAX_WBITS)
    head = _first_bytes(chunks, INFLATE_CHUNK)
    limit = max_bytes + DATASET_ALLOWANCE
    header = _image_pixel_elements(head)
    if header is not None:  # refuse a bomb from its first megabyte, and inflate no more than it says
        check_dicom_size(header, max_pixels, max_bytes)
        limit = dicom_pixel_bytes(header) + DATASET_ALLOWANCE
    inflated = _joined(
        head, chunks, limit, f"the deflated DICOM data set inflates to more than {limit} bytes"
    )
    buffer = DicomBytesIO(inflated)
    dataset = read_dataset(buffer, is_implicit_VR=False, is_little_endian=True)
    ds = FileDataset(buffer, dataset, preamble, meta, is_implicit_VR=False, is_little_endian=True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


def _image_pixel_elements(head: bytes):
    """The size elements of an inflated data set's first bytes; None unless all of group 0028 is there."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.tag import Tag

    passed = []

    def past_image_pixel_group(tag, vr, length) -> bool:
        if tag.group <= 0x0028:
            return False
        passed.append(tag)
        return True

    tags = [Tag(k) for k in ("Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated")]
    try:
        header = read_dataset(
            DicomBytesIO(head), False, True, stop_when=past_image_pixel_group, specific_tags=tags
        )
    except Exception:  # a damaged head: the checks after inflating decide
        return None
    return header if passed else None


def _inflate(data, wbits: int, partial: bool = False) -> Iterator[bytes]:
    """Decompressed chunks of at most INFLATE_CHUNK bytes; a truncated stream raises ValueError
    (unless `partial`: the first bytes of a file are read as far as they go).

    The input goes in by pieces: zlib copies what it has not consumed on every call.
    """
    inflater = zlib.decompressobj(wbits)
    view = memoryview(data)
    for start in range(0, len(view), INPUT_CHUNK):
        pending = view[start : start + INPUT_CHUNK]
        while not inflater.eof:
            chunk = inflater.decompress(pending, INFLATE_CHUNK)
            pending = inflater.unconsumed_tail
            if not chunk and not pending:
                break  # this piece is consumed and its output drained
            if chunk:
                yield chunk
        if inflater.eof:
            return
    if not partial:
        raise ValueError("compressed data ends before its end-of-stream marker")


def _first_bytes(chunks: Iterator[bytes], size: int) -> bytes:
    """At least `size` bytes from `chunks` (less at their end), the rest left in the iterator."""
    parts, taken = [], 0
    for chunk in chunks:
        parts.append(chunk)
        taken += len(chunk)
        if taken >= size:
            break
    return b"".join(parts)


def _joined(head: bytes, chunks: Iterator[bytes], limit: int, refusal: str) -> bytes:
    """head + chunks, refused with InputTooLarge(refusal) as soon as they exceed `limit` bytes."""
    parts, size = [head], len(head)
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise InputTooLarge(refusal)
        parts.append(chunk)
    return b"".join(parts)


# ----- NIfTI -------------------------------------------------------------------------------------
def read_nifti_image(data: bytes, max_bytes: int | None, max_slice_pixels: int | None = None, axis: int = 2):
    """A NIfTI-1 image (data not yet read) whose header passed the limits; None skips a limit.

    A .nii.gz is inflated no further than its header's data offset + data size + GZIP_ALLOWANCE.
    """
    import nibabel as nib

    if data[:2] == b"\x1f\x8b":
        data = _gunzip_nifti(data, max_bytes, max_slice_pixels, axis)
    else:
        check_nifti_header(_nifti_header(data), max_bytes, max_slice_pixels, axis)
    return nib.Nifti1Image.from_bytes(data)


def check_nifti_header(header, max_bytes: int | None, max_slice_pixels: int | None, axis: int) -> int:
    """The file's size up to the end of its data, once the header passed the limits."""
    shape = tuple(int(n) for n in header.get_data_shape())
    itemsize = header.get_data_dtype().itemsize
    voxels = math.prod(shape)
    padded = (*shape, 1, 1, 1)[:3]
    if max_slice_pixels is not None:
        in_plane = [n for i, n in enumerate(padded) if i != axis]
        check_pixels(in_plane[0], in_plane[1], max_slice_pixels, f"a slice along axis {axis}")
    in_memory = voxels * max(itemsize, 4)
    if max_bytes is not None and in_memory > max_bytes:
        raise InputTooLarge(
            f"a NIfTI volume of {'×'.join(map(str, shape))} voxels needs {in_memory} bytes decoded, "
            f"over the limit of {max_bytes}"
        )
    return max(header.get_data_offset(), NIFTI_SINGLE_OFFSET) + voxels * itemsize


def _nifti_header(head: bytes):
    import nibabel as nib

    if len(head) < NIFTI_HEADER_BYTES:
        raise ValueError(f"{len(head)} bytes: too short for a NIfTI-1 header ({NIFTI_HEADER_BYTES})")
    return nib.Nifti1Header(head[:NIFTI_HEADER_BYTES])


def _gunzip_nifti(data: bytes, max_bytes: int | None, max_slice_pixels: int | None, axis: int) -> bytes:
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
        head = stream.read(NIFTI_HEADER_BYTES)
        end = check_nifti_header(_nifti_header(head), max_bytes, max_slice_pixels, axis)
        chunks = iter(lambda: stream.read(INFLATE_CHUNK), b"")  # never one read of what a header claims
        refusal = f"the .nii.gz inflates to more than its header implies ({end} bytes of header and data)"
        return _joined(head, chunks, end + GZIP_ALLOWANCE, refusal)
