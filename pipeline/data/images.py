"""Decoding medical images (PNG, JPEG, DICOM) into 8-bit RGB PIL images, and PNG encoding.

Every artifact stores images as encoded bytes (see `pipeline.schema`), so ingestion turns whatever a
dataset ships into one RGB image here and re-encodes it with `encode_png`.

DICOM handling, in the order DICOM's display pipeline (PS3.4 N.2) applies it:

1. Multi-frame files (CT/MR volumes, cine loops) keep only the **middle frame** (index
   ``n_frames // 2``): a VQA question is asked about one picture, and the middle slice of a volume is
   the one most likely to show the anatomy the series was taken for. Only that frame is decoded.
   Enhanced multi-frame files carry rescale and window values in functional groups; the chosen
   frame's values (per-frame first, then shared) are used.
2. The modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence) maps stored values to
   physical units (e.g. Hounsfield units).
3. The VOI LUT (Window Center/Width, first window when several are given, or a VOI LUT Sequence)
   selects the intensity range a radiologist would look at. The window's output range is mapped to
   0..255, so values outside the window saturate. Without any VOI information the image's own
   min..max is stretched to 0..255.
4. MONOCHROME1 (high values displayed dark, e.g. many radiographs) is inverted so that every output
   image reads "bright = high signal".
5. RGB / YBR images are converted to RGB by pydicom; PALETTE COLOR images go through their palette;
   colour samples deeper than 8 bits are scaled by their nominal bit depth. No LUTs apply to colour.

Compressed transfer syntaxes decode only when pydicom has a plugin for them (RLE and, through
Pillow, baseline JPEG and JPEG 2000 work; JPEG-LS and 12-bit JPEG need `pylibjpeg`); any failure is
an `ImageError` naming the file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

from pipeline.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom")
_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"
_COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")


class ImageError(DataError):
    """An image file or buffer could not be decoded into an RGB image."""


def is_dicom(data: bytes, name: str | None = None) -> bool:
    """True when `name` has a DICOM suffix or `data` carries the "DICM" magic at byte 128."""
    if name is not None and Path(name).suffix.lower() in DICOM_SUFFIXES:
        return True
    return data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == _DICOM_MAGIC


def load_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Load a PNG, JPEG or DICOM image from a path or from encoded bytes as an RGB image.

    `name` labels a bytes `source` in error messages and lets a ``.dcm`` name mark it as DICOM;
    for a path it defaults to the path. Raises `ImageError` (naming the image) on any failure.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or f"<{len(data)} bytes>"
    else:
        path = Path(source)
        label = name or str(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageError(f"{label}: cannot read image file ({e.strerror or e})") from e
    if not data:
        raise ImageError(f"{label}: image is empty (0 bytes)")
    if is_dicom(data, label):
        return _load_dicom(data, label)
    return _load_pil(data, label)


def decode_image(data: bytes, name: str | None = None) -> Image.Image:
    """Decode encoded image bytes (as stored in artifacts) into an RGB image (see `load_image`)."""
    return load_image(bytes(data), name=name)


def encode_png(image: Image.Image) -> bytes:
    """Encode `image` as PNG bytes (lossless, so re-encoding never degrades the data)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _load_pil(data: bytes, label: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            # Image.open is lazy: load now so truncated files fail here, inside the try.
            im.load()
            # Photographs (pathology, endoscopy) may carry an EXIF rotation the viewer applies.
            im = ImageOps.exif_transpose(im)
            return _pil_to_rgb(im)
    except UnidentifiedImageError as e:
        # PIL's own message names an anonymous BytesIO, which tells the user nothing.
        raise ImageError(f"{label}: not a PNG/JPEG/DICOM image (unrecognised format)") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{label}: not a readable PNG/JPEG/DICOM image ({e})") from e


def _pil_to_rgb(im: Image.Image) -> Image.Image:
    # convert("RGB") clips deep grayscale to 255, turning 16-bit X-rays white: rescale first.
    if im.mode.startswith("I;16"):
        arr = np.asarray(im, dtype=np.uint16)
        return Image.fromarray((arr >> 8).astype(np.uint8), mode="L").convert("RGB")
    if im.mode in ("I", "F"):
        return Image.fromarray(_stretch(np.asarray(im, dtype=np.float64)), mode="L").convert("RGB")
    return im.convert("RGB")


def _load_dicom(data: bytes, label: str) -> Image.Image:
    try:
        # force=True: DICOM files written without the 128-byte preamble are still valid to read.
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as e:  # pydicom raises many unrelated types on corrupt input
        raise ImageError(f"{label}: cannot parse DICOM ({type(e).__name__}: {e})") from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError(f"{label}: DICOM file has no pixel data (not an image object)")
    try:
        return _dicom_to_rgb(ds)
    except ImageError as e:
        raise ImageError(f"{label}: {e}") from e
    except Exception as e:  # decoders raise RuntimeError/NotImplementedError/ValueError/...
        raise ImageError(f"{label}: cannot decode DICOM pixel data ({type(e).__name__}: {e})") from e


def _dicom_to_rgb(ds: Dataset) -> Image.Image:
    n_frames = int(ds.get("NumberOfFrames") or 1)
    frame = n_frames // 2
    arr = pixel_array(ds, index=frame) if n_frames > 1 else pixel_array(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = int(ds.get("SamplesPerPixel") or 1)

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return Image.fromarray(_colour_to_uint8(rgb, np.iinfo(rgb.dtype).max), mode="RGB")
    if samples == 3 or photometric in _COLOUR_PHOTOMETRICS:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ImageError(f"{photometric} image has unexpected pixel shape {arr.shape}")
        bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
        return Image.fromarray(_colour_to_uint8(arr, 2**bits - 1), mode="RGB")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(f"unsupported Photometric Interpretation {photometric!r}")
    if arr.ndim != 2:
        raise ImageError(f"{photometric} frame has unexpected pixel shape {arr.shape}")

    view = _frame_view(ds, frame) if n_frames > 1 else ds
    values = apply_modality_lut(arr, view)
    voi_range = _voi_output_range(view)
    if voi_range is None:
        grey = _stretch(values.astype(np.float64))
    else:
        lo, hi = voi_range
        if view.get("VOILUTSequence") and not np.issubdtype(values.dtype, np.integer):
            # A VOI LUT is indexed by integer values; rescaled output is float.
            values = np.round(values).astype(np.int64)
        windowed = apply_voi_lut(values, view, index=0).astype(np.float64)
        grey = _scale(windowed, lo, hi)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return Image.fromarray(grey, mode="L").convert("RGB")


def _frame_view(ds: Dataset, frame: int) -> Dataset:
    """A copy of `ds` with the frame's functional-group rescale/window values at top level.

    pydicom's LUT functions read only top-level elements; enhanced multi-frame objects keep them in
    the Shared/Per-frame Functional Groups instead. Top-level values, when present, win.
    """
    groups: list[Dataset] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    if not groups:
        return ds
    # A new element dict (copy.copy would share it and mutate `ds`); elements themselves are shared.
    view = Dataset(dict(ds.items()))
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta
    view.set_original_encoding(*ds.original_encoding)
    lifted = {
        "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
        "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
    }
    for seq_name, keywords in lifted.items():
        for group in groups:
            seq = group.get(seq_name)
            if not seq:
                continue
            for keyword in keywords:
                if keyword not in view and keyword in seq[0]:
                    setattr(view, keyword, seq[0][keyword].value)
            break  # per-frame values take precedence over shared ones
    return view


def _voi_output_range(ds: Dataset) -> tuple[float, float] | None:
    """The (min, max) that `apply_voi_lut` can output for `ds`, or None when it has no VOI LUT.

    Scaling by this range (not the image's min..max) keeps the window's meaning: a CT lung window
    maps -1000..200 HU to 0..255 whatever the slice contains. The range is probed through pydicom
    itself so it always agrees with the transform actually applied.
    """
    has_lut = bool(ds.get("VOILUTSequence")) and all(
        ds.VOILUTSequence[0].get(k) is not None for k in ("LUTDescriptor", "LUTData")
    )
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_lut:
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        n_entries = int(descriptor[0]) or 2**16
        domain = np.arange(int(descriptor[1]), int(descriptor[1]) + n_entries, dtype=np.int64)
        table = apply_voi_lut(domain, ds, index=0)
        return float(table.min()), float(table.max())
    if has_window:
        with np.errstate(over="ignore", invalid="ignore"):
            ends = apply_voi_lut(np.array([-np.inf, np.inf]), ds, index=0)
        return float(ends.min()), float(ends.max())
    return None


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    unit = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    return np.round(unit * 255).astype(np.uint8)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Map the array's own min..max to 0..255 (a constant image becomes black)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    return _scale(np.nan_to_num(values, nan=float(finite.min())), float(finite.min()), float(finite.max()))


def _colour_to_uint8(arr: np.ndarray, full_scale: int) -> np.ndarray:
    if full_scale <= 255 and arr.dtype == np.uint8:
        return arr
    return _scale(arr.astype(np.float64), 0.0, float(full_scale))
