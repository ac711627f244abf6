"""DICOM robustness: compressed transfer syntaxes (the `dicom` extra) and files without file meta.

Every file is generated here from a small numpy array: JPEG-LS through pydicom's own encoder
(pyjpegls), lossless JPEG (Process 14, SV1) through the tiny encoder below, since pydicom cannot
encode it. Both must decode to exactly the original pixels. Without the extra's decoders the error
must name the file, the transfer syntax and the extra to install.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmwrite, uid
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder, pixel_array

from pipeline.data.images import DICOM_EXTRA_INSTALL, ImageError, load_image, read_dicom
from pipeline.errors import DataError

REPO = Path(__file__).resolve().parents[1]
EXTRA_PLUGINS = ("pylibjpeg", "pyjpegls")  # pydicom's labels of the `dicom` extra's decoders

# ---------------------------------------------------------------------------------------------
# helpers


def encode_lossless_jpeg(arr: np.ndarray, precision: int) -> bytes:
    """A lossless JPEG codestream (ITU T.81 Annex H: SOF3, predictor 1, Pt 0, one component).

    Prediction: the first pixel from 2**(P-1), the rest of the first row from the left neighbour,
    the first column from the pixel above, every other pixel from its left neighbour (selection
    value 1, i.e. DICOM's "SV1" transfer syntax). Differences are taken modulo 2**16 and coded as
    category SSSS (one Huffman table, 17 five-bit codes) plus SSSS extra bits (none for SSSS 16).
    """
    rows, cols = arr.shape
    x = arr.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    diff = (x - pred) % 65536
    diff[diff > 32768] -= 65536  # representable differences: -32767..32768 (H.1.2.1)

    out = bytearray()
    acc = n_bits = 0

    def put(value: int, length: int) -> None:
        nonlocal acc, n_bits
        acc, n_bits = (acc << length) | (value & ((1 << length) - 1)), n_bits + length
        while n_bits >= 8:
            n_bits -= 8
            byte = (acc >> n_bits) & 0xFF
            out.append(byte)
            if byte == 0xFF:
                out.append(0x00)  # byte stuffing
        acc &= (1 << n_bits) - 1

    for d in diff.ravel().tolist():
        ssss = abs(d).bit_length()
        put(ssss, 5)  # canonical code of category ssss: its 5-bit value (0..16, never all ones)
        if 0 < ssss < 16:
            put(d if d > 0 else d - 1, ssss)
    if n_bits:
        put(0xFF, 8 - n_bits)  # pad with 1-bits

    def segment(marker: int, payload: bytes) -> bytes:
        return struct.pack(">HH", marker, len(payload) + 2) + payload

    sof3 = struct.pack(">BHHB", precision, rows, cols, 1) + bytes([1, 0x11, 0])
    dht = bytes([0x00]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # one component, table 0, Ss = predictor 1, Se, Ah/Al
    return (
        b"\xff\xd8"
        + segment(0xFFC3, sof3)
        + segment(0xFFC4, dht)
        + segment(0xFFDA, sos)
        + bytes(out)
        + b"\xff\xd9"
    )


def mono_dataset(arr: np.ndarray, bits_stored: int) -> FileDataset:
    """An uncompressed MONOCHROME2 secondary-capture dataset (explicit VR little endian) of `arr`."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    return ds


def write_jpeg_ls(path: Path, arr: np.ndarray, bits_stored: int) -> Path:
    ds = mono_dataset(arr, bits_stored)
    ds.compress(uid.JPEGLSLossless, arr, encoding_plugin="pyjpegls")
    ds.save_as(path, enforce_file_format=True)
    return path


def write_lossless_jpeg(path: Path, arr: np.ndarray, bits_stored: int, stream: bytes | None = None) -> Path:
    """`arr` as JPEG Lossless SV1; `stream` replaces the codestream (to write a corrupt one)."""
    ds = mono_dataset(arr, bits_stored)
    ds.file_meta.TransferSyntaxUID = uid.JPEGLosslessSV1
    ds.PixelData = encapsulate([stream or encode_lossless_jpeg(arr, bits_stored)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


def write_uncompressed(path: Path, arr: np.ndarray, bits_stored: int) -> Path:
    mono_dataset(arr, bits_stored).save_as(path, enforce_file_format=True)
    return path


def raw_dataset_bytes(arr: np.ndarray, implicit_vr: bool, little_endian: bool) -> bytes:
    """`arr` as a bare dataset: no preamble, no "DICM", no group 0002 (as older scanners write)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"  # the first element, group 0008, as is usual
    ds.SOPClassUID = uid.SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid.generate_uid()
    ds.Modality = "OT"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.Rows, ds.Columns = arr.shape
    # OW values are written as given: supply them in the byte order of the encoding.
    ds.PixelData = arr.astype("<u2" if little_endian else ">u2").tobytes()
    buf = io.BytesIO()
    dcmwrite(buf, ds, implicit_vr=implicit_vr, little_endian=little_endian, enforce_file_format=False)
    return buf.getvalue()


def grey(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    assert img.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0]


def hide_extra_decoders(monkeypatch: pytest.MonkeyPatch, tsyntax: uid.UID) -> None:
    """Make pydicom's decoder for `tsyntax` look as it does without the `dicom` extra installed."""
    decoder = get_decoder(tsyntax)
    available = {k: v for k, v in decoder._available.items() if k not in EXTRA_PLUGINS}
    unavailable = dict(decoder._unavailable)
    unavailable.update({k: (f"{k} (the dicom extra)",) for k in EXTRA_PLUGINS if k in decoder._available})
    monkeypatch.setattr(decoder, "_available", available)
    monkeypatch.setattr(decoder, "_unavailable", unavailable)


RNG = np.random.default_rng(12)
# 16-bit noise (every SSSS category, wrap-around differences) with the extreme jumps 0 -> 32768
# (SSSS 16) and 0 -> 65535 spelled out; 12-bit noise; 8-bit noise spanning exactly 0..255.
IMG16 = RNG.integers(0, 65536, (32, 32), dtype=np.uint16)
IMG16[0, :4] = [0, 32768, 0, 65535]
IMG12 = RNG.integers(0, 4096, (32, 32), dtype=np.uint16)
IMG8 = RNG.integers(0, 256, (32, 31), dtype=np.uint8)
IMG8[0, :2] = [0, 255]
CASES = [
    pytest.param(IMG16, 16, id="16bit"),
    pytest.param(IMG12, 12, id="12bit"),
    pytest.param(IMG8, 8, id="8bit"),
]


# ---------------------------------------------------------------------------------------------
# compressed transfer syntaxes with the `dicom` extra


def test_the_dicom_extra_is_installed() -> None:
    # scripts/install.sh installs requirements.lock, which holds the extra: the tests below need it.
    for uid_, plugin in [(uid.JPEGLosslessSV1, "pylibjpeg"), (uid.JPEGLSLossless, "pyjpegls")]:
        assert plugin in get_decoder(uid_).available_plugins, (
            f"pydicom's {plugin} decoder is unavailable: run scripts/install.sh or {DICOM_EXTRA_INSTALL}"
        )


@pytest.mark.parametrize("writer", [write_jpeg_ls, write_lossless_jpeg], ids=["jpeg-ls", "jpeg-lossless-sv1"])
@pytest.mark.parametrize(("arr", "bits"), CASES)
def test_lossless_compressed_dicom_decodes_to_the_original_pixels(
    tmp_path: Path, writer, arr: np.ndarray, bits: int
) -> None:
    path = writer(tmp_path / "c.dcm", arr, bits)
    ds = read_dicom(path.read_bytes(), path.name)
    expected_syntax = uid.JPEGLSLossless if writer is write_jpeg_ls else uid.JPEGLosslessSV1
    assert ds.file_meta.TransferSyntaxUID == expected_syntax
    assert np.array_equal(pixel_array(ds), arr)  # lossless: every stored value comes back

    # The rendered image is exactly that of the same pixels stored uncompressed ...
    rendered = grey(load_image(path))
    assert np.array_equal(rendered, grey(load_image(write_uncompressed(tmp_path / "u.dcm", arr, bits))))
    if arr.dtype == np.uint8:
        # ... and for 8-bit data spanning 0..255 it is the original itself.
        assert np.array_equal(rendered, arr)


def test_lossless_jpeg_encoder_writes_a_genuine_process_14_stream() -> None:
    # The codestream is a real SOF3 (lossless, Huffman) stream that libjpeg itself decodes.
    import libjpeg  # pylibjpeg-libjpeg, from the `dicom` extra

    stream = encode_lossless_jpeg(IMG16, 16)
    assert stream[:4] == b"\xff\xd8\xff\xc3"
    assert np.array_equal(libjpeg.decode(stream), IMG16)


# ---------------------------------------------------------------------------------------------
# compressed transfer syntaxes without the `dicom` extra


@pytest.mark.parametrize(
    ("writer", "tsyntax"),
    [(write_jpeg_ls, uid.JPEGLSLossless), (write_lossless_jpeg, uid.JPEGLosslessSV1)],
    ids=["jpeg-ls", "jpeg-lossless-sv1"],
)
def test_missing_decoder_names_the_syntax_and_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer, tsyntax: uid.UID
) -> None:
    path = writer(tmp_path / "scan.dcm", IMG16, 16)
    hide_extra_decoders(monkeypatch, tsyntax)
    with pytest.raises(DataError) as info:
        load_image(path)
    message = str(info.value)
    assert isinstance(info.value, ImageError)
    assert str(path) in message
    assert f"{tsyntax.name} ({tsyntax})" in message
    assert 'pip install "medalign[dicom]"' in message and DICOM_EXTRA_INSTALL in message
    assert "`dicom` extra" in message


def test_pillow_failing_on_12bit_jpeg_keeps_its_message_and_suggests_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pydicom's bundled JPEG Extended 12-bit file, without the extra: Pillow claims the syntax but
    # cannot decode 12-bit samples (pylibjpeg is the decoder for those; this particular file has a
    # marker layout libjpeg rejects, so only the message is checked here).
    path = get_testdata_file("JPEG-lossy.dcm", download=False)
    assert path is not None, "pydicom test file JPEG-lossy.dcm is not bundled"
    hide_extra_decoders(monkeypatch, uid.JPEGExtended12Bit)
    assert get_decoder(uid.JPEGExtended12Bit).available_plugins == ("pillow",)
    with pytest.raises(ImageError) as info:
        load_image(path)
    message = str(info.value)
    assert "JPEG-lossy.dcm: cannot decode DICOM pixel data" in message
    assert "Pillow does not support 'JPEG Extended' for samples with 12-bit precision" in message  # kept
    assert f"JPEG Extended (Process 2 and 4) ({uid.JPEGExtended12Bit}) may need" in message
    assert DICOM_EXTRA_INSTALL in message


def test_other_decoding_errors_are_not_blamed_on_the_extra(tmp_path: Path) -> None:
    # A corrupt codestream with the extra installed: the decoder's error, no install advice.
    stream = encode_lossless_jpeg(IMG8, 8)
    dht = stream.index(b"\xff\xc4")
    no_table = stream[:dht] + stream[dht + 2 + int.from_bytes(stream[dht + 2 : dht + 4], "big") :]
    path = write_lossless_jpeg(tmp_path / "corrupt.dcm", IMG8, 8, no_table)
    with pytest.raises(ImageError) as info:
        load_image(path)
    message = str(info.value)
    assert "corrupt.dcm: cannot decode DICOM pixel data" in message
    assert "medalign[dicom]" not in message


def test_without_the_extra_installed_the_error_names_it(tmp_path: Path) -> None:
    # The real thing, not a patched registry: a fresh interpreter in which the extra's modules
    # cannot be imported, as after a plain `pip install medalign`.
    path = write_jpeg_ls(tmp_path / "ls.dcm", IMG8, 8)
    script = textwrap.dedent(
        f"""
        import sys
        for module in ("pylibjpeg", "libjpeg", "openjpeg", "jpeg_ls"):
            sys.modules[module] = None  # import fails as if not installed
        from pipeline.data.images import ImageError, load_image
        try:
            load_image({str(path)!r})
        except ImageError as e:
            print(e)
        else:
            print("decoded")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "ls.dcm" in run.stdout
    assert "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)" in run.stdout
    assert 'pip install "medalign[dicom]"' in run.stdout


# ---------------------------------------------------------------------------------------------
# files without file meta


@pytest.mark.parametrize(
    ("implicit_vr", "little_endian", "tsyntax"),
    [
        (True, True, uid.ImplicitVRLittleEndian),
        (False, True, uid.ExplicitVRLittleEndian),
        (False, False, uid.ExplicitVRBigEndian),
    ],
    ids=["implicit-le", "explicit-le", "explicit-be"],
)
def test_dicom_without_file_meta_is_read_with_its_own_encoding(
    tmp_path: Path, implicit_vr: bool, little_endian: bool, tsyntax: uid.UID
) -> None:
    data = raw_dataset_bytes(IMG12, implicit_vr, little_endian)
    assert b"DICM" not in data[:200] and data[:2] in (b"\x08\x00", b"\x00\x08")  # truly bare

    ds = read_dicom(data, "raw.dcm")
    assert ds.file_meta.TransferSyntaxUID == tsyntax  # inferred from the data, not assumed
    assert np.array_equal(pixel_array(ds), IMG12)

    expected = grey(load_image(write_uncompressed(tmp_path / "u.dcm", IMG12, 12)))
    path = tmp_path / "raw.dcm"
    path.write_bytes(data)
    assert np.array_equal(grey(load_image(path)), expected)
    # Without a .dcm suffix (e.g. "IM000001") there is no "DICM" marker to go by either.
    bare = tmp_path / "IM000001"
    bare.write_bytes(data)
    assert np.array_equal(grey(load_image(bare)), expected)
    assert np.array_equal(grey(load_image(data)), expected)  # bytes, as embedded in Parquet


def test_dicom_without_file_meta_and_compressed_pixels_is_refused(tmp_path: Path) -> None:
    ds = mono_dataset(IMG8, 8)
    ds.PixelData = encapsulate([encode_lossless_jpeg(IMG8, 8)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    bare = Dataset(dict(ds.items()))  # no file meta, no preamble
    buf = io.BytesIO()
    dcmwrite(buf, bare, implicit_vr=False, little_endian=True, enforce_file_format=False)
    path = tmp_path / "raw_jpeg.dcm"
    path.write_bytes(buf.getvalue())
    with pytest.raises(ImageError, match=r"raw_jpeg\.dcm: DICOM file has no file meta.*compressed"):
        load_image(path)


def test_unknown_bytes_starting_like_a_dataset_are_still_unrecognised() -> None:
    # Group 0008 tag but neither a VR nor a plausible length: not taken for a bare DICOM.
    with pytest.raises(ImageError, match="unrecognised format"):
        load_image(b"\x08\x00\x05\x00" + b"\xff" * 20, name="x.bin")
