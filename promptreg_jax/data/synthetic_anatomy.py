"""Synthetic anatomy: five template anatomies and the per-subject smooth invertible maps.

Templates are drawn analytically in normalised coordinates ``q in [-1, 1]^3`` (RAS+: +x is the
subject's left), as a list of (tissue, mask) painted in order. A tissue has a label (0 for
unlabelled tissue such as skull or fat), a mean intensity and a texture amplitude. Used by
``promptreg_jax.data.synthetic``, which writes the files.

Each subject draws its own shape (per-axis scale, shift, and a smooth deformation whose amplitude
and spatial frequency vary) and its own appearance (``appearance``): a contrast per tissue, texture
strength, blur, noise level, and for MR a gamma, a bias field of random strength, a random gain
and, for brain and hippocampus, an inverted contrast in some subjects (1 - mean per tissue: fluid
bright and white matter dark, as in T2). Changing what a subject looks like changes
``GENERATOR_VERSION``, which is part of the data set's completion marker, so a data set written
by another version is regenerated rather than reused.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable

import numpy as np
from scipy import ndimage

DOMAINS = ("brain", "abdomen", "hippocampus", "cardiac", "hip")
GENERATOR_VERSION = 2  # 1: fixed appearance and deformation scale per domain


def _ell(q, c, r):
    """Normalised squared radius of an axis-aligned ellipsoid (<= 1 inside)."""
    return sum(((q[i] - c[i]) / r[i]) ** 2 for i in range(3))


def _cyl(q, c, r):
    """Elliptic cylinder along z."""
    return ((q[0] - c[0]) / r[0]) ** 2 + ((q[1] - c[1]) / r[1]) ** 2


def _brain(q, phase):
    x, y, z = q
    folds = 0.22 * np.sin(7 * x) * np.sin(6 * y + 1) * np.sin(7 * z + 2)
    left = x > 0  # RAS: +x is the subject's left
    out = [("scalp", _ell(q, (0, 0, 0), (0.95, 0.97, 0.9)) <= 1),
           ("skull", _ell(q, (0, 0, 0), (0.88, 0.9, 0.83)) <= 1),
           ("csf", _ell(q, (0, 0, 0.03), (0.8, 0.84, 0.76)) <= 1)]
    cortex = _ell(q, (0, 0, 0.05), (0.74, 0.8, 0.66)) <= 1
    wm = _ell(q, (0, 0, 0.05), (0.6, 0.68, 0.52)) + folds <= 1
    out += [("cortex_r", cortex & ~left), ("cortex_l", cortex & left),
            ("wm_r", wm & ~left), ("wm_l", wm & left)]
    for side, s in (("r", -1), ("l", 1)):
        out += [(f"ventricle_{side}", _ell(q, (s * 0.14, 0.0, 0.16), (0.09, 0.34, 0.12)) <= 1),
                (f"thalamus_{side}", _ell(q, (s * 0.14, 0.1, -0.06), (0.12, 0.16, 0.11)) <= 1),
                (f"putamen_{side}", _ell(q, (s * 0.34, -0.12, 0.02), (0.08, 0.18, 0.12)) <= 1)]
    out += [("cerebellum", _ell(q, (0, 0.5, -0.5), (0.45, 0.26, 0.22)) <= 1),
            ("brainstem", (_cyl(q, (0, 0.18), (0.1, 0.1)) <= 1) & (z < -0.1) & (z > -0.95))]
    return out


def _abdomen(q, phase):
    body = (0, 0.05), (0.85, 0.62)
    return [("fat", _cyl(q, *body) <= 1),
            ("soft", _cyl(q, body[0], (0.78, 0.55)) <= 1),
            ("spine", _cyl(q, (0, 0.42), (0.11, 0.1)) <= 1),
            ("aorta", _cyl(q, (0.06, 0.25), (0.05, 0.05)) <= 1),
            ("liver", _ell(q, (-0.36, -0.02, 0.3), (0.4, 0.36, 0.38)) <= 1),
            ("spleen", _ell(q, (0.48, 0.2, 0.25), (0.18, 0.16, 0.25)) <= 1),
            ("kidney_r", _ell(q, (-0.34, 0.28, -0.25), (0.14, 0.11, 0.24)) <= 1),
            ("kidney_l", _ell(q, (0.34, 0.28, -0.2), (0.14, 0.11, 0.24)) <= 1)]


def _hippocampus(q, phase):
    x, y, z = q
    xc, zc = -0.05 + 0.2 * y ** 2, 0.15 * y
    r = 0.26 - 0.09 * (y + 0.7)  # the head (anterior, -y) is wider than the tail
    tube = ((x - xc) / r) ** 2 + ((z - zc) / (0.8 * r)) ** 2 + (y / 0.78) ** 8 <= 1
    return [("wm", _ell(q, (0.55, 0.1, 0.6), (0.75, 1.4, 0.55)) <= 1),
            ("horn", _ell(q, (0.3, -0.1, 0.3), (0.07, 0.55, 0.08)) <= 1),
            ("amygdala", _ell(q, (-0.05, -0.85, 0.05), (0.22, 0.14, 0.2)) <= 1),
            ("hippo_head", tube & (y < -0.1)), ("hippo_tail", tube & (y >= -0.1))]


def _cardiac(q, phase):
    es = phase == "es"  # end-systole: smaller cavities, thicker myocardium
    r_in, wall = (0.15, 0.11) if es else (0.22, 0.08)
    c_lv = (0.12, 0.0, 0.05)
    rv_scale = 0.85 if es else 1.0
    return [("body", _cyl(q, (0, 0), (0.92, 0.72)) <= 1),
            ("lung", (_cyl(q, (-0.52, 0.1), (0.3, 0.45)) <= 1) | (_cyl(q, (0.58, 0.1), (0.26, 0.45)) <= 1)),
            ("rv", _ell(q, (-0.22, -0.06, 0.1), (0.3 * rv_scale, 0.24 * rv_scale, 1.05)) <= 1),
            ("myo", _ell(q, c_lv, (r_in + wall, r_in + wall, 1.1)) <= 1),
            ("lv", _ell(q, c_lv, (r_in, r_in, 1.1 - wall)) <= 1)]


def _hip(q, phase):
    x, y, z = q
    ring = ((np.sqrt((x / 0.55) ** 2 + (y / 0.45) ** 2) - 1) / 0.24) ** 2 + ((z - 0.3) / 0.35) ** 2
    out = [("fat", _cyl(q, (0, 0), (0.95, 0.75)) <= 1),
           ("soft", _cyl(q, (0, 0), (0.88, 0.68)) <= 1),
           ("bladder", _ell(q, (0, -0.3, 0.1), (0.2, 0.18, 0.2)) <= 1),
           ("pelvis", ring <= 1), ("pelvis_marrow", ring <= 0.35)]
    for side, s in (("r", -1), ("l", 1)):
        bone = ((_ell(q, (s * 0.55, 0, 0.15), (0.14, 0.14, 0.14)) <= 1)
                | (_ell(q, (s * 0.62, 0, 0.03), (0.12, 0.08, 0.13)) <= 1)
                | ((_cyl(q, (s * 0.68, 0), (0.1, 0.1)) <= 1) & (z < 0.05)))
        marrow = (_cyl(q, (s * 0.68, 0), (0.055, 0.055)) <= 1) & (z < -0.05)
        out += [(f"femur_{side}", bone), (f"femur_marrow_{side}", marrow)]
    return out


@dataclasses.dataclass(frozen=True)
class _Spec:
    folder: str
    modality: str
    shape_factor: tuple          # volume shape = round(size * factor)
    fov_mm: tuple                # physical extent, sets the spacing
    flip: tuple                  # affine axis signs (cardiac is stored flipped, like scanner data)
    tissues: dict                # name -> (label, mean intensity, texture amplitude); first = background
    draw: Callable
    deform: float                # bound on |du_a/dp_b| summed over components
    noise: float                 # Gaussian noise (HU for CT, fraction of 1 for MR)
    phases: tuple = ("",)
    invert: float = 0.0          # probability of a T2-like inverted MR contrast per subject


SPECS = {
    "brain": _Spec("Brain", "mr", (1.0, 1.15, 1.0), (160, 192, 160), (1, 1, 1), {
        "air": (0, 0.0, 0.0), "scalp": (0, 0.5, 0.05), "skull": (0, 0.08, 0.02), "csf": (0, 0.18, 0.02),
        "cortex_r": (2, 0.52, 0.04), "cortex_l": (1, 0.52, 0.04), "wm_r": (4, 0.86, 0.03),
        "wm_l": (3, 0.86, 0.03), "ventricle_r": (6, 0.14, 0.01), "ventricle_l": (5, 0.14, 0.01),
        "thalamus_r": (8, 0.72, 0.03), "thalamus_l": (7, 0.72, 0.03), "putamen_r": (10, 0.64, 0.03),
        "putamen_l": (9, 0.64, 0.03), "cerebellum": (11, 0.6, 0.08), "brainstem": (12, 0.78, 0.03)},
        _brain, 0.12, 0.025, invert=0.2),
    "abdomen": _Spec("Abdominal", "ct", (1.0, 0.85, 1.15), (384, 320, 440), (1, 1, 1), {
        "air": (0, -1000.0, 0.0), "fat": (0, -95.0, 15.0), "soft": (0, 35.0, 20.0),
        "spine": (0, 450.0, 120.0), "aorta": (0, 185.0, 10.0), "liver": (4, 100.0, 8.0),
        "spleen": (1, 125.0, 8.0), "kidney_r": (2, 175.0, 20.0), "kidney_l": (3, 175.0, 20.0)},
        _abdomen, 0.12, 12.0),
    "hippocampus": _Spec("Hippocampus", "mr", (0.8, 1.0, 0.8), (36, 50, 35), (1, 1, 1), {
        "gm": (0, 0.5, 0.05), "wm": (0, 0.85, 0.03), "horn": (0, 0.15, 0.02),
        "amygdala": (0, 0.56, 0.03), "hippo_head": (1, 0.62, 0.03), "hippo_tail": (2, 0.62, 0.03)},
        _hippocampus, 0.18, 0.03, invert=0.2),
    "cardiac": _Spec("Cardiac", "mr", (1.0, 1.0, 0.25), (320, 320, 100), (-1, -1, 1), {
        "air": (0, 0.0, 0.0), "body": (0, 0.32, 0.06), "lung": (0, 0.05, 0.02), "rv": (3, 0.85, 0.03),
        "myo": (2, 0.24, 0.02), "lv": (1, 0.92, 0.03)},
        _cardiac, 0.14, 0.03, ("ed", "es")),
    "hip": _Spec("Hip", "ct", (1.2, 0.8, 0.9), (400, 260, 300), (1, 1, 1), {
        "air": (0, -1000.0, 0.0), "fat": (0, -95.0, 15.0), "soft": (0, 40.0, 20.0),
        "bladder": (0, 8.0, 5.0), "pelvis": (1, 850.0, 80.0), "pelvis_marrow": (1, 280.0, 60.0),
        "femur_r": (3, 900.0, 80.0), "femur_marrow_r": (3, 250.0, 50.0), "femur_l": (2, 900.0, 80.0),
        "femur_marrow_l": (2, 250.0, 50.0)},
        _hip, 0.12, 12.0),
}


def num_classes(key: str) -> int:
    return 1 + max(label for label, _, _ in SPECS[key].tissues.values())


def _shape(spec: _Spec, size: int) -> tuple[int, ...]:
    return tuple(max(8, int(round(size * f))) for f in spec.shape_factor)


def _smooth_field(rng, p, amplitude: float, n: int = 4, max_freq: int = 2):
    """``sum_k a_k sin(pi/2 f_k . p + phi_k)`` per axis, with sum_k |a_ka| pi/2 |f_kb| <= amplitude
    and integer frequencies ``|f_kb| <= max_freq``."""
    freqs = rng.integers(-max_freq, max_freq + 1, size=(n, 3))
    freqs[np.all(freqs == 0, axis=1), 0] = 1
    phases = rng.uniform(0, 2 * np.pi, size=(n, 3))
    amps = rng.normal(size=(n, 3))
    # Largest |du_a/dp_b| bound over (a, b); scale it to ``amplitude``.
    bound = (np.abs(amps)[:, :, None] * np.pi / 2 * np.abs(freqs)[:, None, :]).sum(0).max()
    amps *= amplitude / bound
    arg = [np.pi / 2 * sum(freqs[k, b] * p[b] for b in range(3)) for k in range(n)]
    return [sum(amps[k, a] * np.sin(arg[k] + phases[k, a]) for k in range(n)) for a in range(3)]


def _texture(q):
    x, y, z = q
    return (np.sin(9.1 * x + 1.0) * np.sin(8.3 * y + 2.0) * np.sin(9.7 * z + 0.5)
            + 0.5 * np.sin(17.0 * x + 3.0 * y) * np.sin(15.0 * z - 2.0 * y))


def subject_map(key: str, size: int, seed: int, index: int):
    """The subject's grid ``p`` and template coordinates ``q = S p + t + u(p)``, 3 arrays each."""
    spec = SPECS[key]
    rng = np.random.default_rng([seed, zlib.crc32(key.encode()), index, 0])
    shape = _shape(spec, size)
    p = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    # Every |du_a/dp_b| <= deform <= 0.18, so each row of S + grad u has a diagonal >= 0.72 above
    # its off-diagonal sum <= 0.36: strictly diagonally dominant, positive diagonal, det > 0.
    # The deformation's strength (a fraction of the bound) and its finest frequency vary per
    # subject: some subjects differ from the template mostly by pose and size, others locally.
    scale = rng.uniform(0.9, 1.1, 3)
    shift = rng.uniform(-0.1, 0.1, 3)
    strength = rng.uniform(0.35, 1.0)
    u = _smooth_field(rng, p, strength * spec.deform, max_freq=int(rng.integers(2, 4)))
    return p, [scale[a] * p[a] + shift[a] + u[a] for a in range(3)]


def appearance(key: str, seed: int, index: int) -> dict:
    """Subject ``index``'s imaging parameters (deterministic in its arguments).

    ``means``: intensity per tissue (the domain's table, each non-background tissue scaled by
    U(0.8, 1.2) for MR, shifted by N(0, 15) HU for CT; in an ``inverted`` MR subject 1 - mean
    first), ``texture``: texture amplitude factor, ``blur``: Gaussian sigma in voxels, ``noise``:
    noise standard deviation, ``gamma`` (MR, on intensities in [0, 1]), ``bias``: strength of the
    smooth multiplicative MR bias field (its log's gradient bound), ``gain`` (MR scanner units).
    """
    spec = SPECS[key]
    rng = np.random.default_rng([seed, zlib.crc32(key.encode()), index, 2])
    mr = spec.modality == "mr"
    means = np.asarray([m for _, m, _ in spec.tissues.values()], np.float64)
    inverted = bool(mr and rng.random() < spec.invert)
    if inverted:  # fluid bright, white matter dark (T2-like); the background stays as it is
        means[1:] = 1.0 - means[1:]
    if mr:
        means[1:] *= rng.uniform(0.8, 1.2, means.size - 1)
    else:
        means[1:] += rng.normal(0.0, 15.0, means.size - 1)
    return dict(means=means, inverted=inverted, texture=rng.uniform(0.5, 1.5),
                blur=rng.uniform(0.4, 1.1), noise=rng.uniform(0.15, 0.5) * spec.noise,
                gamma=rng.uniform(0.7, 1.4) if mr else 1.0,
                bias=rng.uniform(0.1, 0.45) if mr else 0.0,
                gain=rng.uniform(300, 1200) if mr else 1.0)


def make_subject(key: str, size: int, seed: int, index: int):
    """Renders subject ``index`` of a domain: ``{phase: (image, labels)}``, shape, spacing, affine."""
    spec = SPECS[key]
    p, q = subject_map(key, size, seed, index)
    shape = p[0].shape
    rng = np.random.default_rng([seed, zlib.crc32(key.encode()), index, 1])
    look = appearance(key, seed, index)
    mr = spec.modality == "mr"
    bias = np.exp(_smooth_field(rng, p, look["bias"], 3)[0]) if mr else 1.0
    names = list(spec.tissues)
    table = np.asarray([spec.tissues[n] for n in names], np.float32)
    means = look["means"].astype(np.float32)
    tex = _texture(q)
    out = {}
    for phase in spec.phases:
        tissue = np.zeros(shape, np.int16)
        for name, mask in spec.draw(q, phase):
            tissue[mask] = names.index(name)
        labels = table[tissue, 0].astype(np.uint8)
        image = means[tissue] + look["texture"] * table[tissue, 2] * tex
        image = ndimage.gaussian_filter(image, look["blur"])
        if mr:
            image = np.clip(image, 0, None) ** look["gamma"]
        # Noise below the tissue contrasts: with strong noise, a similarity loss can be lowered
        # by sub-voxel shifts that blur it (interpolation bias) instead of by alignment.
        image = image + rng.normal(0.0, look["noise"], shape).astype(np.float32)
        if mr:
            image = np.clip(image * bias * look["gain"], 0, 32767)
        out[phase] = (np.rint(image).astype(np.int16), labels)
    spacing = np.asarray(spec.fov_mm, np.float64) / np.asarray(shape)
    affine = np.diag(list(np.asarray(spec.flip) * spacing) + [1.0])
    affine[:3, 3] = -affine[:3, :3] @ (np.asarray(shape) - 1) / 2
    return out, shape, tuple(spacing), affine
