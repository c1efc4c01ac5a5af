"""Registration of pydeface's template onto an image: FSL ``flirt`` when it is on PATH, else SimpleITK.

Both give the same thing: pydeface's face mask (1 = keep, 0 = face) resampled into the image's
grid, and the template resampled likewise (for the quality checks of :mod:`.deface`). SimpleITK
works in the images' world coordinates as nibabel gives them (RAS); both images use the same
convention, so the transform found is the template → image one, as FSL's 12-dof ``flirt``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np

from ..childenv import child_env

FLIRT_TIMEOUT_S = 1800
SAMPLING = 0.05  # of the fixed image's voxels at each level, for the metric
ITERATIONS = 200
THREADS = 2  # SimpleITK's threads (the machine is shared with the run's other work)


def pydeface_data(name: str) -> Path:
    """A file pydeface ships (``mean_reg2mean.nii.gz``, ``facemask.nii.gz``), from its package folder."""
    path = Path(str(resources.files("pydeface") / "data" / name))
    if not path.is_file():
        raise FileNotFoundError(f"pydeface's {name} is missing from {path.parent}: reinstall pydeface "
                                "(pip install -c constraints.txt pydeface)")
    return path


@dataclass
class Registered:
    """The template and the face mask in the image's grid, and how they got there."""

    template: np.ndarray  # float32, the image's shape
    keep: np.ndarray  # bool, False where pydeface's mask marks the face
    tool: str  # "FSL flirt" or "SimpleITK"
    version: str
    matrix: np.ndarray | None = None  # 4x4, template world -> image world (None when flirt made it)
    details: dict = field(default_factory=dict)


def tool_name() -> str:
    """The registration tool this machine uses: ``flirt`` when it is on PATH."""
    return "FSL flirt" if shutil.which("flirt") else "SimpleITK"


def register(image: nib.Nifti1Image) -> Registered:
    """Register pydeface's template onto ``image`` (3D) and bring the face mask with it."""
    return _flirt(image) if shutil.which("flirt") else _simpleitk(image)


# -- SimpleITK ---------------------------------------------------------------------------
def _to_sitk(data: np.ndarray, affine: np.ndarray):
    import SimpleITK as sitk

    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float32))
    img.SetSpacing([float(z) for z in zooms])
    img.SetOrigin([float(v) for v in affine[:3, 3]])
    img.SetDirection([float(v) for v in (affine[:3, :3] / zooms).ravel()])
    return img


def _from_sitk(img) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def _shrinks(fixed, levels_mm: list[float]) -> list[int]:
    """Shrink factors giving the image's grid about ``levels_mm`` per voxel at each level."""
    finest = min(fixed.GetSpacing())
    return [max(1, round(mm / finest)) for mm in levels_mm]


def _stage(fixed, moving, initial, levels_mm: list[float], rate: float):
    """One registration stage: Mattes mutual information, gradient descent, one level per size."""
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(SAMPLING, seed=12345)  # fixed seed: the same image gives the same result
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=rate, minStep=1e-3, numberOfIterations=ITERATIONS,
                                                 relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(_shrinks(fixed, levels_mm))
    reg.SetSmoothingSigmasPerLevel([mm / 2 for mm in levels_mm])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    result = _first(reg.Execute(fixed, moving))
    return result, reg.GetMetricValue()


def _register_sitk(fixed, moving):
    """Moments-centred rigid (8 then 4 mm), then affine (4 then 2 mm): a face mask needs no finer."""
    import SimpleITK as sitk

    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    rigid, _ = _stage(fixed, moving, init, [8.0, 4.0], 2.0)
    rigid = sitk.Euler3DTransform(rigid)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    final, metric = _stage(fixed, moving, affine, [4.0, 2.0], 1.0)
    return sitk.AffineTransform(final), metric


def _first(transform):
    """The one transform a registration returns (SimpleITK wraps it in a composite)."""
    return transform.GetNthTransform(0) if transform.GetName() == "CompositeTransform" else transform


def _matrix(transform) -> np.ndarray:
    """The 4x4 template-world -> image-world matrix of a SimpleITK transform (which maps the other way)."""
    import SimpleITK as sitk

    a = sitk.AffineTransform(_first(transform))
    m = np.eye(4)
    m[:3, :3] = np.array(a.GetMatrix()).reshape(3, 3)
    c = np.array(a.GetCenter())
    m[:3, 3] = np.array(a.GetTranslation()) + c - m[:3, :3] @ c
    return np.linalg.inv(m)


def _simpleitk(image: nib.Nifti1Image) -> Registered:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(THREADS)
    tpl = nib.load(pydeface_data("mean_reg2mean.nii.gz"))
    mask = nib.load(pydeface_data("facemask.nii.gz"))
    fixed = _to_sitk(np.asanyarray(image.dataobj, dtype=np.float32), image.affine)
    moving = _to_sitk(np.asanyarray(tpl.dataobj, dtype=np.float32), tpl.affine)
    transform, metric = _register_sitk(fixed, moving)
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0)
    face = _to_sitk(np.asanyarray(mask.dataobj, dtype=np.float32), mask.affine)
    keep = sitk.Resample(face, fixed, transform, sitk.sitkLinear, 1.0)  # outside the mask's field: kept
    return Registered(template=_from_sitk(warped), keep=_from_sitk(keep) >= 0.5, tool="SimpleITK",
                      version=sitk.Version.VersionString(), matrix=_matrix(transform),
                      details={"metric": "Mattes mutual information", "metric_value": round(float(metric), 4),
                               "stages": "moments-centred rigid (8, 4 mm), then affine, 12 dof (4, 2 mm)"})


# -- FSL ---------------------------------------------------------------------------------
def _flirt_version() -> str:
    out = subprocess.run(["flirt", "-version"], capture_output=True, text=True, env=child_env(), timeout=60)
    return (out.stdout or out.stderr).strip().splitlines()[-1] if (out.stdout or out.stderr).strip() else "unknown"


def _flirt(image: nib.Nifti1Image) -> Registered:
    """pydeface's own calls: template → image with 12 dof, then the mask through the same matrix."""
    with tempfile.TemporaryDirectory(prefix="pacs2bids-flirt-") as tmp:
        t = Path(tmp)
        nib.save(image, t / "in.nii.gz")
        run = dict(capture_output=True, text=True, env=child_env(), timeout=FLIRT_TIMEOUT_S, check=True)
        subprocess.run(["flirt", "-in", str(pydeface_data("mean_reg2mean.nii.gz")), "-ref", str(t / "in.nii.gz"),
                        "-dof", "12", "-omat", str(t / "tpl.mat"), "-out", str(t / "tpl.nii.gz")], **run)
        subprocess.run(["flirt", "-in", str(pydeface_data("facemask.nii.gz")), "-ref", str(t / "in.nii.gz"),
                        "-applyxfm", "-init", str(t / "tpl.mat"), "-out", str(t / "mask.nii.gz")], **run)
        template = nib.load(t / "tpl.nii.gz").get_fdata(dtype=np.float32)
        keep = nib.load(t / "mask.nii.gz").get_fdata(dtype=np.float32) >= 0.5
        return Registered(template=template, keep=keep, tool="FSL flirt", version=_flirt_version(),
                          details={"dof": 12, "cost": "corratio (flirt's default)"})
