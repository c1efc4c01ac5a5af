"""Checks that a defacing can be trusted, each independent of the registration it judges.

- the transform is plausible for a head (no mirror, scales within :data:`SCALES`);
- the template, once registered, resembles the image (normalised mutual information over the
  head, at least :data:`MIN_NMI`);
- the face mask lands on the head (a share of the head's voxels within :data:`FACE_SHARE`);
- the face mask spares the brain, estimated from the image's intensities alone
  (:func:`brain_estimate`): at most :data:`MAX_BRAIN_ZEROED` of it zeroed.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SCALES = (0.6, 1.6)  # singular values of the template -> image matrix
MIN_NMI = 1.03  # (H(A) + H(B)) / H(A, B): 1 when unrelated, 2 when one determines the other
FACE_SHARE = (0.01, 0.35)  # of the head's voxels
MAX_BRAIN_ZEROED = 0.01  # of the brain estimate's voxels


def otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of ``values`` (the two-class split of largest between-class variance)."""
    hist, edges = np.histogram(values, bins=bins)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * mids) / np.maximum(w0, 1)
    m1 = (np.sum(hist * mids) - np.cumsum(hist * mids)) / np.maximum(w1, 1)
    return float(mids[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def head_mask(data: np.ndarray) -> np.ndarray:
    """The head: above Otsu's threshold (of the non-zero voxels), holes filled, largest component."""
    values = data[data > 0]
    if values.size == 0:
        return np.zeros(data.shape, bool)
    mask = ndimage.binary_fill_holes(data > otsu(values) / 2)
    return _largest(mask)


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def brain_estimate(data: np.ndarray, zooms, *, depth_mm: float = 20.0, upper: float = 0.4) -> np.ndarray:
    """A conservative brain estimate from intensities and shape alone: head tissue (above half
    Otsu's threshold) at least ``depth_mm`` inside the head, in the ``upper`` share of the head's
    height (the image as nibabel's closest canonical orientation: third axis superior). Not a
    segmentation: a region the face mask must not touch."""
    zooms = np.asarray(zooms[:3], float)
    head = head_mask(data)
    if not head.any():
        return head
    depth = ndimage.distance_transform_edt(head, sampling=zooms)
    tissue = (data > otsu(data[head]) / 2) & (depth >= depth_mm)
    rows = np.nonzero(head.any(axis=(0, 1)))[0]
    top = rows.max() - upper * (rows.max() - rows.min())
    tissue[:, :, : int(np.ceil(top))] = False
    return tissue


def nmi(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """Normalised mutual information of two samples of voxels."""
    if a.size < 100 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 1.0
    joint, _, _ = np.histogram2d(a, b, bins=bins)
    p = joint / joint.sum()

    def h(q):
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    return (h(p.sum(0)) + h(p.sum(1))) / max(h(p.ravel()), 1e-12)


def problems(data: np.ndarray, zooms, template: np.ndarray, keep: np.ndarray, matrix) -> tuple[list[str], dict]:
    """What is wrong with a defacing (empty when nothing), and the measures behind it."""
    head = head_mask(data)
    brain = brain_estimate(data, zooms)
    face = ~keep
    measures = {
        "nmi": round(nmi(data[head], template[head]), 4) if head.any() else 1.0,
        "face_share_of_head": round(float((face & head).sum() / max(head.sum(), 1)), 4),
        "brain_estimate_voxels": int(brain.sum()),
        "brain_zeroed_share": round(float((face & brain).sum() / max(brain.sum(), 1)), 4),
    }
    found = []
    if matrix is not None:
        s = np.linalg.svd(matrix[:3, :3], compute_uv=False)
        measures["scales"] = [round(float(v), 3) for v in s]
        if np.linalg.det(matrix[:3, :3]) <= 0 or s.min() < SCALES[0] or s.max() > SCALES[1]:
            found.append(f"registration implausible for a head (scales {measures['scales']}, "
                         f"allowed {SCALES[0]}-{SCALES[1]}, no mirror)")
    if measures["nmi"] < MIN_NMI:
        found.append(f"template does not match the image (normalised mutual information {measures['nmi']} "
                     f"< {MIN_NMI}): not a head, or registration failed")
    if not FACE_SHARE[0] <= measures["face_share_of_head"] <= FACE_SHARE[1]:
        found.append(f"face mask covers {measures['face_share_of_head']:.1%} of the head "
                     f"(expected {FACE_SHARE[0]:.0%}-{FACE_SHARE[1]:.0%})")
    if brain.sum() == 0:
        found.append("no brain found in the image (is it a head image?)")
    elif measures["brain_zeroed_share"] > MAX_BRAIN_ZEROED:
        found.append(f"face mask covers {measures['brain_zeroed_share']:.1%} of the brain estimate "
                     f"(at most {MAX_BRAIN_ZEROED:.0%})")
    return found, measures
