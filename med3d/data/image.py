"""Reading and writing 3D medical images with their geometry.

One in-memory form for every file type: ``Image(array, geometry)`` with the array laid out
``(C, Z, Y, X)`` (SimpleITK's order with a channel axis in front) and the geometry in ITK's
LPS convention (spacing, origin and direction in x, y, z order). NIfTI goes through nibabel
(4D files hold the channels, as in the Decathlon); NRRD, MHA/MHD and DICOM series folders go
through SimpleITK. Any failure to read becomes one ``Med3DError`` line naming the file.

Before the voxels are read (decompressed, allocated), the header is checked:

* its geometry: a NaN or infinite affine, zero or negative spacing, or a singular direction is
  refused, since every later step (resampling, restoring predictions) would place voxels wrongly;
* its declared size: voxels x bytes per voxel must stay under ``max_image_bytes()``, half the
  machine's physical memory unless the environment variable ``MED3D_MAX_IMAGE_GB`` (gigabytes of
  2**30 bytes, e.g. ``MED3D_MAX_IMAGE_GB=64``) says otherwise, so a crafted or mistaken header
  is refused in one line instead of exhausting memory;
* a DICOM folder must hold one series (or the one chosen by ``series``, a SeriesInstanceUID),
  evenly spaced with no missing, duplicate or unreadable slice: otherwise the reader would
  return a shorter or distorted volume without a word.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import Med3DError
from ..atomic import atomic_path

PathLike = Union[str, Path]
NIFTI = (".nii", ".nii.gz")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
# NIfTI stores RAS+ world coordinates, ITK LPS+: the first two world axes change sign.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
MAX_IMAGE_GB_ENV = "MED3D_MAX_IMAGE_GB"
_GIB = 2 ** 30


@dataclass(frozen=True)
class Geometry:
    """Voxel grid in world space (ITK convention: x, y, z order, LPS, millimetres)."""

    shape: Tuple[int, int, int]  # array shape (Z, Y, X)
    spacing: Tuple[float, float, float]  # (x, y, z)
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]  # 3x3 row-major, columns are the voxel axes

    @property
    def spacing_zyx(self) -> Tuple[float, float, float]:
        return tuple(reversed(self.spacing))  # type: ignore[return-value]

    def affine_lps(self) -> np.ndarray:
        """4x4 voxel (x, y, z index) -> LPS world matrix."""
        aff = np.eye(4)
        aff[:3, :3] = np.asarray(self.direction).reshape(3, 3) * np.asarray(self.spacing)[None, :]
        aff[:3, 3] = self.origin
        return aff

    def affine_ras(self) -> np.ndarray:
        """4x4 voxel -> RAS world matrix, as nibabel and NIfTI write it."""
        aff = self.affine_lps()
        aff[:3] = _RAS_TO_LPS @ aff[:3]
        return aff

    def matches(self, other: "Geometry", atol_mm: float = 1e-3, rtol: float = 1e-4) -> str:
        """Empty string when both grids agree within tolerance, else what differs."""
        if self.shape != other.shape:
            return f"shape {self.shape} vs {other.shape}"
        if not np.allclose(self.spacing, other.spacing, rtol=rtol, atol=1e-6):
            return f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)}"
        # Origins are compared relative to the voxel size: MSD labels often differ by float noise.
        tol = max(atol_mm, 1e-3 * float(min(self.spacing)))
        if not np.allclose(self.origin, other.origin, atol=tol):
            return f"origin {_fmt(self.origin)} vs {_fmt(other.origin)}"
        if not np.allclose(self.direction, other.direction, atol=1e-3):
            return "direction (orientation) differs"
        return ""


def shifted_grid(geom: Geometry, shape_zyx: Sequence[int], start_zyx: Sequence[float],
                 scale_zyx: Sequence[float]) -> Geometry:
    """The grid of ``shape_zyx`` voxels whose first voxel centre sits at index ``start_zyx`` of ``geom``
    and whose voxels are ``scale_zyx`` of ``geom``'s (the same direction)."""
    direction = np.asarray(geom.direction, dtype=float).reshape(3, 3)
    spacing = np.asarray(geom.spacing, dtype=float)
    start_xyz = np.asarray(list(reversed([float(v) for v in start_zyx])))
    origin = np.asarray(geom.origin, dtype=float) + direction @ (start_xyz * spacing)
    new_spacing = spacing * np.asarray(list(reversed([float(v) for v in scale_zyx])))
    return Geometry(tuple(int(s) for s in shape_zyx), tuple(float(v) for v in new_spacing),  # type: ignore[arg-type]
                    tuple(float(v) for v in origin), geom.direction)  # type: ignore[arg-type]



def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


@dataclass
class Image:
    array: np.ndarray  # (C, Z, Y, X)
    geometry: Geometry

    @property
    def channels(self) -> int:
        return int(self.array.shape[0])


def is_nifti(path: PathLike) -> bool:
    return str(path).lower().endswith(NIFTI)


def _geometry_from_ras(affine: np.ndarray, shape_xyz: Sequence[int]) -> Geometry:
    with np.errstate(invalid="ignore"):  # a NaN affine is refused by check_geometry, with the file's name
        lps = _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    direction = lps[:, :3] / np.where(spacing > 0, spacing, 1.0)[None, :]
    return Geometry(shape=tuple(int(s) for s in reversed(shape_xyz[:3])),  # type: ignore[arg-type]
                    spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
                    origin=tuple(float(o) for o in lps[:, 3]),  # type: ignore[arg-type]
                    direction=tuple(float(d) for d in direction.reshape(-1)))


def max_image_bytes() -> int:
    """The largest image (declared voxels x bytes per voxel) med3d reads.

    Returns:
        ``MED3D_MAX_IMAGE_GB`` gigabytes (2**30 bytes) when set, else half the physical memory.

    Raises:
        Med3DError: ``MED3D_MAX_IMAGE_GB`` is not a positive number.
    """
    raw = os.environ.get(MAX_IMAGE_GB_ENV)
    if raw is None or not raw.strip():
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    try:
        gb = float(raw)
    except ValueError:
        gb = float("nan")
    if not np.isfinite(gb) or gb <= 0:
        raise Med3DError(f"{MAX_IMAGE_GB_ENV}={raw!r}: not a positive number of gigabytes; set it e.g. to 16, "
                         "or unset it for half the physical memory")
    return int(gb * _GIB)


def _check_size(path: Path, shape: Sequence[int], itemsize: int, what: str) -> None:
    """Refuse an image whose declared size exceeds the limit, before anything is allocated."""
    nbytes = int(np.prod([int(s) for s in shape], dtype=np.float64)) * int(itemsize)
    limit = max_image_bytes()
    if nbytes > limit:
        dims = "x".join(str(int(s)) for s in shape)
        raise Med3DError(f"{path}: header declares {dims} voxels of {what} ({nbytes / _GIB:.3g} GB), over the "
                         f"limit of {limit / _GIB:.3g} GB; if the file is right and the memory is there, raise "
                         f"the limit with {MAX_IMAGE_GB_ENV}=<gigabytes>")


def check_geometry(geometry: Geometry, where: str) -> None:
    """Refuse a grid that cannot place voxels in space: non-finite values, spacing <= 0, singular direction.

    Args:
        geometry: the grid as the header states it.
        where: the file, for the message.

    Raises:
        Med3DError: naming what is wrong.
    """
    spacing, origin = np.asarray(geometry.spacing, float), np.asarray(geometry.origin, float)
    direction = np.asarray(geometry.direction, float).reshape(3, 3)
    if not (np.isfinite(spacing).all() and np.isfinite(origin).all() and np.isfinite(direction).all()):
        what = "a NaN or infinite affine / spacing / origin"
    elif (spacing <= 0).any():
        what = f"spacing {_fmt(spacing)} mm is not positive"
    elif abs(np.linalg.det(direction)) < 1e-3:  # axes (nearly) parallel: voxels collapse onto a plane
        what = "a singular affine (its voxel axes are parallel or zero)"
    else:
        return
    raise Med3DError(f"{where}: the header's geometry is invalid ({what}); fix the file's affine / spacing "
                     "(e.g. export it again from the scanner software) before using it")


def _read_nifti(path: Path, dtype: np.dtype | None, header_only: bool = False) -> Optional[Image]:
    import nibabel as nib

    img = nib.load(str(path))  # the header only: the voxels are read below
    check_geometry(_geometry_from_ras(img.affine, (*img.shape, 1, 1)[:3]), str(path))
    disk, want = img.get_data_dtype(), np.dtype(dtype or img.get_data_dtype())
    _check_size(path, img.shape, max(disk.itemsize, want.itemsize),
                str(disk) if want.itemsize <= disk.itemsize else f"{disk}, read as {want}")
    if header_only:
        return None
    data = np.asarray(img.dataobj) if dtype is None else np.asarray(img.dataobj, dtype=dtype)
    if data.ndim == 3:
        data = data[None]
    elif data.ndim == 4:
        data = np.moveaxis(data, 3, 0)
    elif data.ndim == 5 and data.shape[3] == 1:  # (X, Y, Z, 1, C): vector images from ITK
        data = np.moveaxis(data[:, :, :, 0], 3, 0)
    else:
        raise Med3DError(f"{path}: a {data.ndim}D image of shape {data.shape}; med3d needs 3D volumes "
                         "(channels as a 4th axis)")
    array = np.ascontiguousarray(np.transpose(data, (0, 3, 2, 1)))  # (C, X, Y, Z) -> (C, Z, Y, X)
    return Image(array, _geometry_from_ras(img.affine, img.shape[:3]))


def _sitk_geometry(img) -> Geometry:
    size = img.GetSize()
    return Geometry(shape=tuple(int(s) for s in reversed(size)), spacing=tuple(img.GetSpacing()),
                    origin=tuple(img.GetOrigin()), direction=tuple(img.GetDirection()))


def _pixel_bytes(reader) -> Tuple[int, str]:
    """Bytes per voxel (all components) and the pixel type's name, from a reader's header."""
    import SimpleITK as sitk

    name = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    bits = re.search(r"(\d+)-bit", name)
    size = (int(bits.group(1)) // 8 if bits else 8) * (2 if "complex" in name else 1)
    return size * max(1, reader.GetNumberOfComponents()), name


def _header_reader(path: str):
    """An ``ImageFileReader`` that has read ``path``'s header (no voxels)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


def _read_sitk(path: Path, dtype: np.dtype | None, series: Optional[str] = None,
               header_only: bool = False) -> Optional[Image]:
    import SimpleITK as sitk

    if path.is_dir():
        from .dicom import series_files

        files = series_files(path, series)
        head = _header_reader(files[0])
        size = (*head.GetSize()[:2], len(files))
        itemsize, pixel = _pixel_bytes(head)
        _check_size(path, tuple(reversed(size)), max(itemsize, np.dtype(dtype or np.uint8).itemsize), pixel)
        if header_only:
            return None
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        img = reader.Execute()
    else:
        if series is not None and str(path).lower().endswith(".dcm"):
            raise Med3DError(f"{path}: --series chooses a series in a DICOM folder; give the folder")
        head = _header_reader(str(path))
        if head.GetDimension() != 3:
            raise Med3DError(f"{path}: a {head.GetDimension()}D image; med3d needs 3D volumes")
        check_geometry(_sitk_geometry(head), str(path))
        itemsize, pixel = _pixel_bytes(head)
        _check_size(path, tuple(reversed(head.GetSize())), max(itemsize, np.dtype(dtype or np.uint8).itemsize),
                    pixel)
        if header_only:
            return None
        img = head.Execute()
    check_geometry(_sitk_geometry(img), str(path))
    if img.GetDimension() != 3:
        raise Med3DError(f"{path}: a {img.GetDimension()}D image; med3d needs 3D volumes")
    view = sitk.GetArrayViewFromImage(img)  # (Z, Y, X) or (Z, Y, X, C) for vector images; valid while img lives
    if dtype is None or np.dtype(dtype) == view.dtype:
        arr = np.asarray(_ItkBuffer(img, view))  # no copy: the array keeps img (its owner) alive
    else:
        # One conversion out of ITK's buffer, which is freed with img on return: GetArrayFromImage
        # then astype would hold ITK's buffer, its copy and the converted array at once.
        arr = view.astype(dtype)
    geometry = _sitk_geometry(img)
    del view, img
    arr = np.moveaxis(arr, 3, 0) if arr.ndim == 4 else arr[None]
    return Image(np.ascontiguousarray(arr), geometry)


class _ItkBuffer:
    """A SimpleITK image's voxel buffer as NumPy sees it (``__array_interface__``), holding the image.

    ``np.asarray`` of it is an array over ITK's own memory whose base is this object, so the image
    lives exactly as long as the array: reading in the stored dtype costs one buffer, not two.
    The buffer is marked writable: the image was just read and nothing else refers to it.
    """

    def __init__(self, img, view: np.ndarray):
        self._img = img
        interface = dict(view.__array_interface__)
        interface["data"] = (interface["data"][0], False)
        self.__array_interface__ = interface


def read_image(path: PathLike, dtype: np.dtype | None = None, series: Optional[str] = None) -> Image:
    """Read one image file or DICOM series folder as ``Image`` (array ``(C, Z, Y, X)``).

    Args:
        path: the file, or a folder of one DICOM series.
        dtype: array dtype to read as (None: as stored).
        series: the SeriesInstanceUID to read from a DICOM folder holding several.

    Returns:
        The image.

    Raises:
        Med3DError: the file is missing, damaged, not 3D, its geometry invalid, its declared size over
            ``max_image_bytes()``, or a DICOM folder's series incomplete, uneven or ambiguous.
    """
    image = _read(Path(path), dtype, series, header_only=False)
    if image is None:  # _read returns None only for header_only
        raise Med3DError(f"{path}: cannot be read")
    if min(image.array.shape[1:]) < 2:
        raise Med3DError(f"{path}: a 2D image (shape {image.array.shape[1:]}); med3d needs 3D volumes")
    return image


def inspect_image(path: PathLike, dtype: np.dtype | None = np.float32, series: Optional[str] = None) -> None:
    """Check an image's header as ``read_image`` does (geometry, declared size, DICOM series), reading no voxels.

    ``predict`` calls it on its inputs before loading the model, so that a run none of whose inputs
    could be read is refused before any work.

    Args:
        path: the file, or a folder of one DICOM series.
        dtype: the dtype it will be read as (counts for the size limit).
        series: as for ``read_image``.

    Raises:
        Med3DError: as ``read_image``, for what the header shows.
    """
    _read(Path(path), dtype, series, header_only=True)


def _read(path: Path, dtype: np.dtype | None, series: Optional[str], header_only: bool) -> Optional[Image]:
    """``_read_nifti`` or ``_read_sitk``, with every failure turned into one line naming the file."""
    if not path.exists():
        raise Med3DError(f"{path}: file not found; check the path (and the dataset.json entry naming it)")
    try:
        if is_nifti(path):
            return _read_nifti(path, dtype, header_only)
        return _read_sitk(path, dtype, series, header_only)
    except Med3DError:
        raise
    except MemoryError:
        raise Med3DError(f"{path}: too large to read into memory")
    except Exception as err:  # nibabel/SimpleITK/zlib raise many types for damaged files
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise Med3DError(f"{path}: cannot be read ({reason}); the file is damaged or truncated, "
                         "re-export or re-download it")


def read_channels(paths: Sequence[PathLike], dtype: np.dtype | None = np.float32,
                  series: Optional[str] = None) -> Image:
    """Read one file per channel (nnU-Net layout) or one multi-channel file; check they share a grid.

    Args:
        paths: the channel files (or DICOM folders).
        dtype: array dtype to read as (None: as stored).
        series: the SeriesInstanceUID to read from DICOM folders (see ``read_image``).

    Returns:
        The channels stacked on one grid.

    Raises:
        Med3DError: as ``read_image``, or the channels' grids differ.
    """
    images = [read_image(p, dtype, series) for p in paths]
    first = images[0]
    for path, img in zip(paths[1:], images[1:]):
        diff = first.geometry.matches(img.geometry)
        if diff:
            raise Med3DError(f"{path}: channel grid differs from {paths[0]} ({diff}); resample the channels "
                             "onto one grid")
    array = first.array if len(images) == 1 else np.concatenate([i.array for i in images], axis=0)
    return Image(array, first.geometry)


def write_image(path: PathLike, array: np.ndarray, geometry: Geometry, overwrite: bool = True) -> Path:
    """Write a ``(Z, Y, X)`` or ``(C, Z, Y, X)`` array on ``geometry`` atomically; format from the suffix."""
    path = Path(path)
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[None]
    if tuple(array.shape[1:]) != tuple(geometry.shape):
        raise Med3DError(f"{path}: array shape {array.shape[1:]} does not match the grid {geometry.shape}")
    with atomic_path(path, overwrite=overwrite) as tmp:
        if is_nifti(path):
            import nibabel as nib

            data = np.transpose(array, (3, 2, 1, 0))  # (C, Z, Y, X) -> (X, Y, Z, C)
            data = data[..., 0] if data.shape[3] == 1 else data
            img = nib.Nifti1Image(np.ascontiguousarray(data), geometry.affine_ras())
            img.set_qform(geometry.affine_ras(), code=1)
            img.set_sform(geometry.affine_ras(), code=1)
            nib.save(img, str(tmp))
        else:
            import SimpleITK as sitk

            vec = array.shape[0] > 1
            img = sitk.GetImageFromArray(np.moveaxis(array, 0, 3) if vec else array[0], isVector=vec)
            img.SetSpacing(geometry.spacing)
            img.SetOrigin(geometry.origin)
            img.SetDirection(geometry.direction)
            sitk.WriteImage(img, str(tmp), useCompression=True)
    return path


def image_suffix(path: PathLike) -> str:
    """The full image suffix (``.nii.gz`` counts as one)."""
    name = Path(path).name.lower()
    for suffix in (*NIFTI[::-1], *SITK_SUFFIXES):
        if name.endswith(suffix):
            return Path(path).name[-len(suffix):]
    return Path(path).suffix


def strip_suffix(path: PathLike) -> str:
    name = Path(path).name
    suffix = image_suffix(path)
    return name[: -len(suffix)] if suffix else name


def list_images(folder: PathLike) -> List[Path]:
    """Image files (and DICOM series folders) directly inside ``folder``, sorted."""
    out = []
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() or image_suffix(p).lower() in (*NIFTI, *SITK_SUFFIXES):
            out.append(p)
    return out
