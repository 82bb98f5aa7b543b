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

# What each layout must contain, for the message when an input has nothing usable.
EXPECTS = {
    "sa-med2d": "SAMed2D_v1.json, a *class_mapping*.json and the images/ and masks/ they list",
    "mlmr-sd": "train.json and/or test.jsonl (with prompts.json) and the images/ and masks/ they list",
    "sam-med2d-demo": "images/*.png|jpg, optionally image2label_train.json / label2image_test.json",
    "image-folder": "images/<stem>.(png|jpg|jpeg|bmp|tif|tiff), optionally masks/<stem>/<class>.png",
    "nifti": "index.json (or the input is a .json index) listing at least one volume",
    "dicom": "DICOM files (not hidden, not *.png|jpg|json|txt|md|csv), optionally labels.json",
    "phantom": "prepare.phantom_images > 0 (no input is read)",
}

# Specs whose loading is shared: a plain image file plus mask files.
LOADERS = {"file": files.load, "nifti": nifti.load, "dicom": dicom.load, "phantom": phantom_source.load}


def load_spec(spec: dict, ctx) -> list:
    return LOADERS[spec["kind"]](spec, ctx)
