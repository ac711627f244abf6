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

Compressed transfer syntaxes decode only when pydicom has a plugin for them: RLE and, through
Pillow, baseline JPEG and JPEG 2000 work out of the box; lossless JPEG (Process 14), 12-bit JPEG,
JPEG-LS and HTJ2K need the project's ``dicom`` extra (pylibjpeg with its libjpeg and openjpeg
plugins, and pyjpegls). Without a decoder the `ImageError` names the file, the transfer syntax (name
and UID) and ``pip install "medalign[dicom]"``; any other failure is an `ImageError` naming the file
and keeping the decoder's own message.

Files without file meta (no preamble, no group 0002: "raw" datasets as older scanners and some
archives write them) are read with ``force=True``; pydicom infers implicit/explicit VR and byte
order from the first element, and that inferred encoding becomes the transfer syntax the pixel data
is decoded with (pydicom itself refuses to decode pixel data without a Transfer Syntax UID).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array

from pipeline.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom")
# What a user without a decoder for a compressed transfer syntax should run (pyproject's extra).
DICOM_EXTRA_INSTALL = 'pip install "medalign[dicom]"'
_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"
# pydicom's labels of the decoder plugins the `dicom` extra installs, and the syntaxes they read.
_EXTRA_PLUGINS = frozenset({"pylibjpeg", "pyjpegls"})
_EXTRA_SYNTAXES = frozenset(
    {
        uid.JPEGBaseline8Bit,
        uid.JPEGExtended12Bit,
        uid.JPEGLossless,
        uid.JPEGLosslessSV1,
        uid.JPEGLSLossless,
        uid.JPEGLSNearLossless,
        uid.JPEG2000Lossless,
        uid.JPEG2000,
        uid.HTJ2KLossless,
        uid.HTJ2KLosslessRPCL,
        uid.HTJ2K,
    }
)
_COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")


class ImageError(DataError):
    """An image file or buffer could not be decoded into an RGB image."""


def is_dicom(data: bytes, name: str | None = None) -> bool:
    """True when `name` has a DICOM suffix or `data` carries the "DICM" magic at byte 128."""
    if name is not None and Path(name).suffix.lower() in DICOM_SUFFIXES:
        return True
    return data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == _DICOM_MAGIC


def _looks_like_raw_dicom(data: bytes) -> bool:
    """True when `data` starts like a DICOM dataset written without file meta (and so without "DICM").

    Such a dataset starts with its first element, nearly always of group 0008 (Specific Character
    Set, Image Type, ...): tag (0008,eeee) in either byte order, then an explicit VR or, in implicit
    VR little endian, a 4-byte length that fits the data. Only consulted for data Pillow cannot
    identify, so an image format that happens to start alike is never misread.
    """
    if len(data) < 8:
        return False
    vr = data[4:6]
    explicit = vr.isalpha() and vr.isupper()
    for order in ("<", ">"):
        if struct.unpack(f"{order}H", data[:2])[0] != 0x0008:
            continue
        if explicit:
            return True
        if order == "<" and struct.unpack("<I", data[4:8])[0] <= len(data) - 8:
            return True
    return False


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
    try:
        return _load_pil(data, label)
    except ImageError as e:
        if isinstance(e.__cause__, UnidentifiedImageError) and _looks_like_raw_dicom(data):
            return _load_dicom(data, label)
        raise


def decode_image(data: bytes, name: str | None = None) -> Image.Image:
    """Decode encoded image bytes (as stored in artifacts) into an RGB image (see `load_image`)."""
    return load_image(bytes(data), name=name)


def decode_images(images: Sequence[bytes | Image.Image]) -> list[Image.Image]:
    """Each item decoded (`decode_image`) unless it is an image already."""
    return [im if isinstance(im, Image.Image) else decode_image(im) for im in images]


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


def read_dicom(data: bytes, label: str) -> Dataset:
    """Parse DICOM bytes into a dataset whose pixel data can be decoded (the first half of loading).

    A dataset without file meta gets the Transfer Syntax UID of the encoding it was actually read
    with. Raises `ImageError` (naming `label`) when the bytes are not DICOM, hold no pixel data, or
    hold pixel data in a compressed transfer syntax no installed decoder reads (then the message
    says which syntax and how to install the `dicom` extra).
    """
    try:
        # force=True: DICOM files written without the 128-byte preamble are still valid to read.
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as e:  # pydicom raises many unrelated types on corrupt input
        raise ImageError(f"{label}: cannot parse DICOM ({type(e).__name__}: {e})") from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError(f"{label}: DICOM file has no pixel data (not an image object)")
    tsyntax = _set_transfer_syntax(ds, label)
    _check_decoder(tsyntax, label)
    return ds


def _load_dicom(data: bytes, label: str) -> Image.Image:
    ds = read_dicom(data, label)
    try:
        return _dicom_to_rgb(ds)
    except ImageError as e:
        raise ImageError(f"{label}: {e}") from e
    except Exception as e:  # decoders raise RuntimeError/NotImplementedError/ValueError/...
        tsyntax = ds.file_meta.TransferSyntaxUID
        raise ImageError(
            f"{label}: cannot decode DICOM pixel data ({type(e).__name__}: {e}){_extra_hint(tsyntax)}"
        ) from e


def _set_transfer_syntax(ds: Dataset, label: str) -> uid.UID:
    """The dataset's transfer syntax; when its file meta has none, the encoding it was read with.

    pydicom infers implicit/explicit VR and the byte order of a dataset without file meta from its
    first element (and reads it correctly), but then refuses to decode its pixel data for want of a
    Transfer Syntax UID: record the encoding actually used, never an assumed default.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if meta.get("TransferSyntaxUID") is not None:
        return uid.UID(meta.TransferSyntaxUID)
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:
        raise ImageError(
            f"{label}: DICOM file has no file meta, so no Transfer Syntax UID, and its pixel data is "
            "compressed (encapsulated): the compression cannot be identified; rewrite the file with "
            "its file meta (e.g. dcmodify/gdcmconv, or pydicom's save_as(enforce_file_format=True))"
        )
    implicit_vr, little_endian = ds.original_encoding
    if implicit_vr:
        tsyntax = uid.ImplicitVRLittleEndian
    elif little_endian or little_endian is None:
        tsyntax = uid.ExplicitVRLittleEndian
    else:
        tsyntax = uid.ExplicitVRBigEndian
    meta.TransferSyntaxUID = tsyntax
    return tsyntax


def _check_decoder(tsyntax: uid.UID, label: str) -> None:
    """Raise `ImageError` when no installed pydicom plugin can decode `tsyntax`'s pixel data."""
    if not tsyntax.is_transfer_syntax or not tsyntax.is_compressed:
        return  # an unknown UID fails in pydicom's decoding, with its own message
    described = _describe(tsyntax)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as e:
        raise ImageError(
            f"{label}: DICOM pixel data in transfer syntax {described} cannot be decoded: "
            "pydicom has no decoder for it (convert the file to an uncompressed or JPEG syntax)"
        ) from e
    if decoder.is_available:
        return
    if tsyntax in _EXTRA_SYNTAXES:
        raise ImageError(
            f"{label}: DICOM pixel data is compressed as {described} and no installed decoder reads "
            f"it; install the project's `dicom` extra: {DICOM_EXTRA_INSTALL}"
        )
    missing = "; ".join(decoder.missing_dependencies) or "no plugin"
    raise ImageError(
        f"{label}: DICOM pixel data is compressed as {described} and no installed decoder reads it "
        f"(pydicom's plugins: {missing})"
    )


def _describe(tsyntax: uid.UID) -> str:
    """'JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)'; the bare UID when unnamed."""
    return f"{tsyntax.name} ({tsyntax})" if tsyntax.name != str(tsyntax) else str(tsyntax)


def _extra_hint(tsyntax: uid.UID) -> str:
    """A hint to install the `dicom` extra when its decoders would handle `tsyntax` and are missing.

    E.g. 12-bit JPEG: Pillow claims the syntax but fails on the data, which pylibjpeg would read.
    """
    if tsyntax not in _EXTRA_SYNTAXES:
        return ""
    try:
        available = set(get_decoder(tsyntax).available_plugins)
    except NotImplementedError:
        return ""
    if available & _EXTRA_PLUGINS:
        return ""
    return f"; {_describe(tsyntax)} may need the project's `dicom` extra: {DICOM_EXTRA_INSTALL}"


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
