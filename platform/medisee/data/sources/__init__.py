"""Converters: each turns one input layout into processing specs (driver side, cheap) and
loads one spec into LoadedImage objects (worker side, does the I/O and decoding).

    FORMATS["sa-med2d"].specs(input_uri, ctx) -> Iterator[dict]
    FORMATS["sa-med2d"].load(spec, ctx)       -> list[LoadedImage]
"""

from __future__ import annotations

from medisee.data.sources import (
    dicom,
    files,
    image_folder,
    mlmr_sd,
    nifti,
    phantom_source,
    sa_med2d,
    sam_med2d_demo,
)

FORMATS = {
    "sa-med2d": sa_med2d,
    "mlmr-sd": mlmr_sd,
    "sam-med2d-demo": sam_med2d_demo,
    "image-folder": image_folder,
    "nifti": nifti,
    "dicom": dicom,
    "phantom": phantom_source,
}

# Specs whose loading is shared: a plain image file plus mask files.
LOADERS = {"file": files.load, "nifti": nifti.load, "dicom": dicom.load, "phantom": phantom_source.load}


def load_spec(spec: dict, ctx) -> list:
    return LOADERS[spec["kind"]](spec, ctx)
