"""Hostile and real-sized DICOM / NIfTI inputs, built in memory at test time (never committed).

The bombs are built without ever holding their inflated form: after a full flush, deflate output
does not refer back, so the compressed form of one block of zeros can be repeated.
"""

from __future__ import annotations

import gzip
import io
import struct
import tracemalloc
import zlib
from contextlib import contextmanager

import numpy as np

ZERO_BLOCK = 8 * 1024 * 1024


@contextmanager
def traced_peak():
    """{"bytes": peak of Python/numpy allocations inside the block} (filled in on exit)."""
    result = {}
    tracemalloc.start()
    try:
        yield result
    finally:
        result["bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def image_dataset(rows: int, cols: int, frames: int, bits: int = 16, transfer_syntax=None):
    """A secondary-capture MONOCHROME2 data set (no pixel data yet) with its file meta."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality = generate_uid(), "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = rows, cols, frames, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    return ds


def multiframe_dicom(rows: int, cols: int, frames: int, transfer_syntax=None, seed: int = 0) -> bytes:
    """A real (non-zero, 16-bit) multi-frame file, written by pydicom."""
    ds = image_dataset(rows, cols, frames, 16, transfer_syntax)
    pixels = np.random.default_rng(seed).integers(0, 4096, (frames, rows, cols), dtype=np.uint16)
    pixels[:, : rows // 4] = 0  # frames differ and each has its own min-max window
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def deflated_dicom_of_zeros(rows: int, cols: int, frames: int, pixel_bytes: int | None = None) -> bytes:
    """A Deflated Explicit VR Little Endian file whose 16-bit pixel data are zeros.

    `pixel_bytes` (default: what the header implies) sets the length of the pixel data element.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = image_dataset(rows, cols, frames, 16, DeflatedExplicitVRLittleEndian)
    nbytes = rows * cols * frames * 2 if pixel_bytes is None else pixel_bytes
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    header = body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, nbytes)
    return out.getvalue() + _deflate_zeros(header, nbytes, -zlib.MAX_WBITS)


def _deflate_zeros(prefix: bytes, zeros: int, wbits: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    parts = [compressor.compress(prefix), compressor.flush(zlib.Z_FULL_FLUSH)]
    blocks, rest = divmod(zeros, ZERO_BLOCK)
    if blocks:
        block = compressor.compress(bytes(ZERO_BLOCK)) + compressor.flush(zlib.Z_FULL_FLUSH)
        parts += [block] * blocks
    parts += [compressor.compress(bytes(rest)), compressor.flush()]
    return b"".join(parts)


def nifti_bytes(shape, dtype=np.uint8, zooms=None, data: np.ndarray | None = None) -> bytes:
    """An uncompressed single-file NIfTI-1 (zeros unless `data` is given)."""
    import nibabel as nib

    data = np.zeros(shape, dtype) if data is None else data
    image = nib.Nifti1Image(data, np.eye(4))
    if zooms is not None:
        image.header.set_zooms(zooms)
    return image.to_bytes()


def nifti_header_only(shape, dtype=np.float32) -> bytes:
    """A NIfTI-1 header claiming `shape`, followed by no data at all."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4


def gzip_bomb_nifti(shape, payload_zeros: int) -> bytes:
    """A .nii.gz whose header claims a small uint8 volume, followed by `payload_zeros` bytes."""
    head = nifti_header_only(shape, np.uint8)
    return gzip.compress(head + bytes(payload_zeros), compresslevel=1, mtime=0)
