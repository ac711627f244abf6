"""The embedded default benchmark: procedurally generated medical-phantom VQA.

Four imaging modalities (chest X-ray, abdominal CT, brain MRI, H&E histology) are drawn as simple
phantoms, and every question asks about a finding that can only be decided by looking at the image:
whether a lesion is present, on which side it is, how many there are, how large it is, or whether an
organ is enlarged. For each row the answer is sampled first and the image is then rendered to agree
with it.

The `train` split carries a language prior: for every question template one fixed answer appears with
probability `prior`. Every other split is balanced, so a model that answers from the question alone
is at chance on it. That gap is the modality misalignment that preference alignment (HSCR, MMedPO)
sets out to close, made measurable. See `docs/benchmark.md`.

Laterality follows the radiological convention: images are viewed as if facing the patient, so the
patient's left is on the image's right.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

DATASET = "phantom"
MODALITIES: tuple[str, ...] = ("chest_xray", "ct", "brain_mri", "histology")
QUESTION_TYPES: tuple[str, ...] = ("presence", "laterality", "count", "size", "organ_size")

# All geometry below is written for a 64x64 canvas and scaled to `image_size`, so the phantoms look
# the same at any resolution and the 64-pixel numbers (lesion radius >= 3 px, i.e. clearly visible
# inside one 16x16 ViT patch) hold at the default size.
_BASE = 64.0

YES_NO = ("yes", "no")
SIDES = ("left", "right")
COUNTS = ("1", "2", "3")
SIZES = ("small", "large")

# Lesion radii in 64-pixel units. Small and large are far apart so the size cue survives a coarse
# patch grid; the "any" radius is used where size is not what the question asks about.
_SMALL = (3.0, 4.0)
_LARGE = (7.0, 9.0)
_ANY_RADIUS = {
    "chest_xray": (3.0, 4.5),
    "ct": (3.0, 4.5),
    "brain_mri": (3.0, 5.0),
    "histology": (3.0, 3.6),
}
# How many lesions a "yes, there is one" image may show.
_MAX_PRESENT = {"chest_xray": 3, "ct": 3, "brain_mri": 1, "histology": 3}
# Where an organ-size question is asked, another lesion shows up this often, so that "a lesion is
# visible" does not become a shortcut for the question type.
_NUISANCE_LESION_P = 0.3
_PLACE_ATTEMPTS = 20


@dataclass(frozen=True)
class Template:
    """One question template: its wording, its answers, and the fixed answer the train prior favours."""

    modality: str
    question_type: str
    answer_type: str
    question: str
    answers: tuple[str, ...]
    majority: str
    # Which rendered property decides the answer: "presence", "side", "count", "lesion_size" or
    # "organ_size" (histology's nuclear size is an organ_size cue asked as a size question).
    cue: str
    side: str | None = None  # the side a closed laterality question names


TEMPLATES: tuple[Template, ...] = (
    # Chest X-ray: nodules in the lung fields, heart size (cardiothoracic ratio).
    Template("chest_xray", "presence", "closed", "Is there a nodule in the lungs?", YES_NO, "no", "presence"),
    Template("chest_xray", "laterality", "open", "Which lung contains the nodule?", SIDES, "left", "side"),
    Template(
        "chest_xray", "laterality", "closed", "Is the nodule in the left lung?", YES_NO, "yes", "side", "left"
    ),
    Template("chest_xray", "count", "open", "How many nodules are in the lungs?", COUNTS, "1", "count"),
    Template("chest_xray", "organ_size", "closed", "Is the heart enlarged?", YES_NO, "no", "organ_size"),
    # Abdominal CT: hypodense liver lesions.
    Template("ct", "presence", "closed", "Is there a lesion in the liver?", YES_NO, "no", "presence"),
    Template("ct", "count", "open", "How many lesions are in the liver?", COUNTS, "1", "count"),
    Template("ct", "size", "open", "Is the liver lesion small or large?", SIZES, "small", "lesion_size"),
    Template("ct", "size", "closed", "Is the liver lesion large?", YES_NO, "no", "lesion_size"),
    # Brain MRI (T1-like): a bright mass in one hemisphere, ventricle size.
    Template("brain_mri", "presence", "closed", "Is there a mass in the brain?", YES_NO, "no", "presence"),
    Template("brain_mri", "laterality", "open", "Which hemisphere contains the mass?", SIDES, "left", "side"),
    Template(
        "brain_mri",
        "laterality",
        "closed",
        "Is the mass in the right hemisphere?",
        YES_NO,
        "no",
        "side",
        "right",
    ),
    Template("brain_mri", "size", "open", "Is the mass small or large?", SIZES, "small", "lesion_size"),
    Template("brain_mri", "organ_size", "closed", "Are the ventricles enlarged?", YES_NO, "no", "organ_size"),
    # Histology (H&E): mitotic figures, nuclear size.
    Template("histology", "presence", "closed", "Is there a mitotic figure?", YES_NO, "no", "presence"),
    Template("histology", "count", "open", "How many mitotic figures are visible?", COUNTS, "1", "count"),
    Template("histology", "size", "open", "Are the nuclei small or large?", SIZES, "small", "organ_size"),
    Template("histology", "size", "closed", "Are the nuclei enlarged?", YES_NO, "no", "organ_size"),
)


@dataclass(frozen=True)
class Findings:
    """What an image shows, independent of the question asked about it.

    `radii` holds one entry per lesion (nodule, liver lesion, mass or mitotic figure) in 64-pixel
    units; `side` is the patient side all lesions lie on (None: anywhere); `enlarged` is the heart,
    the ventricles or the nuclei; `avoid_organ` keeps lesions clear of that organ so they never hide it.
    """

    radii: tuple[float, ...] = ()
    side: str | None = None
    enlarged: bool = False
    avoid_organ: bool = False


# --------------------------------------------------------------------------------------------------
# Answers


def answer_distribution(template: Template, split: str, prior: float | None) -> dict[str, float]:
    """The probability of each answer of `template` in `split`.

    Only `train` carries the prior: its fixed majority answer has probability `prior` and the other
    answers share the rest evenly. Any other split, or `prior=None`, is uniform.
    """
    k = len(template.answers)
    if prior is None or split != "train":
        return {a: 1.0 / k for a in template.answers}
    if not 0.0 <= prior <= 1.0:
        raise ValueError(f"prior must be in [0, 1], got {prior}")
    rest = (1.0 - prior) / (k - 1)
    return {a: (prior if a == template.majority else rest) for a in template.answers}


def _split_key(split: str) -> int:
    # hash() is salted per process; crc32 keeps the seed of a split stable across runs and machines.
    return zlib.crc32(split.encode("utf-8"))


def _check_args(n: int, seed: int, closed_fraction: float, modalities: Sequence[str]) -> tuple[str, ...]:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= closed_fraction <= 1.0:
        raise ValueError(f"closed_fraction must be in [0, 1], got {closed_fraction}")
    mods = tuple(modalities)
    if not mods:
        raise ValueError("modalities must not be empty")
    unknown = sorted(set(mods) - set(MODALITIES))
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; known: {list(MODALITIES)}")
    return mods


def plan_split(
    n: int,
    split: str,
    seed: int,
    prior: float | None,
    closed_fraction: float = 0.5,
    modalities: Sequence[str] = MODALITIES,
) -> list[tuple[Template, str]]:
    """The (template, answer) of each row of a split, without rendering any image.

    Exactly round(n * closed_fraction) rows are closed questions; the modality is uniform over
    `modalities`, the template uniform among that modality's templates of the row's answer type, and
    the answer is drawn from `answer_distribution`. `generate_split` renders exactly this plan.
    """
    mods = _check_args(n, seed, closed_fraction, modalities)
    rng = np.random.default_rng([seed, _split_key(split), 0])
    n_closed = int(np.floor(n * closed_fraction + 0.5))
    closed = rng.permutation(n) < n_closed
    by_kind = {
        (m, kind): [t for t in TEMPLATES if t.modality == m and t.answer_type == kind]
        for m in mods
        for kind in ("closed", "open")
    }
    plan = []
    for i in range(n):
        modality = mods[int(rng.integers(len(mods)))]
        pool = by_kind[(modality, "closed" if closed[i] else "open")]
        template = pool[int(rng.integers(len(pool)))]
        dist = answer_distribution(template, split, prior)
        p = np.array([dist[a] for a in template.answers])
        answer = template.answers[int(rng.choice(len(p), p=p / p.sum()))]
        plan.append((template, answer))
    return plan


def findings_for(template: Template, answer: str, rng: np.random.Generator) -> Findings:
    """Sample image findings that make `answer` the correct answer to `template`.

    Whatever the question does not ask about (heart size in a nodule question, a lesion in a heart
    question) is drawn at random so it cannot serve as a shortcut.
    """
    if answer not in template.answers:
        raise ValueError(f"{answer!r} is not an answer of {template.question!r}")
    m = template.modality
    yes = answer == "yes"

    def radius(lo_hi: tuple[float, float]) -> float:
        return float(rng.uniform(*lo_hi))

    enlarged = bool(rng.random() < 0.5)
    if template.cue == "presence":
        k = int(rng.integers(1, _MAX_PRESENT[m] + 1)) if yes else 0
        return Findings(tuple(radius(_ANY_RADIUS[m]) for _ in range(k)), None, enlarged)
    if template.cue == "side":
        if template.answer_type == "open":
            side = answer
        else:
            side = template.side if yes else _other_side(template.side)
        return Findings((radius(_ANY_RADIUS[m]),), side, enlarged)
    if template.cue == "count":
        return Findings(tuple(radius(_ANY_RADIUS[m]) for _ in range(int(answer))), None, enlarged)
    if template.cue == "lesion_size":
        large = answer == "large" or yes
        return Findings((radius(_LARGE if large else _SMALL),), None, enlarged)
    if template.cue == "organ_size":
        enlarged = answer == "large" or yes
        nuisance = rng.random() < _NUISANCE_LESION_P
        radii = (radius(_ANY_RADIUS[m]),) if nuisance else ()
        return Findings(radii, None, enlarged, avoid_organ=True)
    raise ValueError(f"unknown cue {template.cue!r}")


def _other_side(side: str | None) -> str:
    return "right" if side == "left" else "left"


# --------------------------------------------------------------------------------------------------
# Drawing


class _Canvas:
    """Pixel-centre coordinates in 64-pixel units, with soft-edged ellipse drawing."""

    def __init__(self, size: int) -> None:
        if size < 16:
            raise ValueError(f"image_size must be >= 16, got {size}")
        self.size = size
        self.unit = _BASE / size  # 64-pixel units per pixel
        c = (np.arange(size) + 0.5) * self.unit
        self.y = c[:, None]
        self.x = c[None, :]
        self.lesions: list[tuple[float, float, float]] = []  # (cy, cx, radius) of every lesion placed

    def lesion_mask(self, margin: float = 1.0) -> np.ndarray | None:
        """(size, size) bool map of every lesion placed, each grown by `margin` (64-pixel units) to
        cover its halo and soft edge; None when the image has none."""
        if not self.lesions:
            return None
        cover = np.zeros((self.size, self.size))
        for cy, cx, r in self.lesions:
            cover = np.maximum(cover, self.ellipse(cy, cx, r + margin, r + margin))
        return cover > 0

    def _window(self, cy: float, cx: float, reach: float) -> tuple[slice, slice]:
        lo_y = max(int((cy - reach) / self.unit) - 1, 0)
        hi_y = min(int((cy + reach) / self.unit) + 2, self.size)
        lo_x = max(int((cx - reach) / self.unit) - 1, 0)
        hi_x = min(int((cx + reach) / self.unit) + 2, self.size)
        return slice(lo_y, hi_y), slice(lo_x, hi_x)

    def _alpha(
        self, ys: slice, xs: slice, cy: float, cx: float, ry: float, rx: float, angle: float
    ) -> np.ndarray:
        dy = self.y[ys] - cy
        dx = self.x[:, xs] - cx
        if angle:
            c, s = np.cos(angle), np.sin(angle)
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        d = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
        # Antialiased edge about one pixel wide, so tiny shapes do not flicker between renderings.
        return np.clip((1.0 - d) * min(rx, ry) / self.unit + 0.5, 0.0, 1.0)

    def ellipse(self, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0) -> np.ndarray:
        """Full-canvas coverage (0..1) of an ellipse."""
        out = np.zeros((self.size, self.size))
        ys, xs = self._window(cy, cx, max(ry, rx))
        out[ys, xs] = self._alpha(ys, xs, cy, cx, ry, rx, angle)
        return out

    def paint(
        self,
        img: np.ndarray,
        cy: float,
        cx: float,
        ry: float,
        rx: float,
        value: float | np.ndarray,
        angle: float = 0.0,
    ) -> None:
        """Blend `value` into `img` over an ellipse, touching only its bounding box."""
        ys, xs = self._window(cy, cx, max(ry, rx))
        a = self._alpha(ys, xs, cy, cx, ry, rx, angle)
        if img.ndim == 3:
            a = a[..., None]
        img[ys, xs] += a * (np.asarray(value, dtype=float) - img[ys, xs])


def _blend(img: np.ndarray, alpha: np.ndarray, value: float | np.ndarray) -> None:
    if img.ndim == 3:
        alpha = alpha[..., None]
    img += alpha * (np.asarray(value, dtype=float) - img)


def _inside_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance in pixels from each pixel to the nearest pixel outside `mask`.

    Pixels beyond the image border count as outside. Exact, separable (row pass, then column pass),
    and small enough at these image sizes to avoid a scipy dependency.
    """
    size = mask.shape[0]
    idx = np.arange(size)
    left = np.maximum.accumulate(np.where(~mask, idx, -1), axis=1)
    right = np.minimum.accumulate(np.where(~mask, idx, size)[:, ::-1], axis=1)[:, ::-1]
    g2 = np.minimum(idx - left, right - idx).astype(np.float64) ** 2
    dy2 = (idx[:, None] - idx[None, :]).astype(np.float64) ** 2
    d2 = (dy2[:, :, None] + g2[None, :, :]).min(axis=1)
    border = np.minimum(idx + 1, size - idx).astype(np.float64) ** 2
    return np.sqrt(np.minimum(d2, border[:, None]))


def _place(
    cv: _Canvas,
    rng: np.random.Generator,
    region: np.ndarray,
    radii: Sequence[float],
    gap: float = 1.5,
    margin: float = 1.0,
) -> list[tuple[float, float]]:
    """Centres for non-overlapping discs of `radii` lying wholly inside `region` (a boolean mask).

    The centre is uniform over every admissible pixel, so lesions can turn up anywhere in the organ.
    """
    if not radii:
        return []
    # Centres are chosen on a grid of at most 64x64 samples: finer is pointless for placement, and
    # the distance transform is cubic in the grid side.
    grid = min(cv.size, int(_BASE))
    idx = ((np.arange(grid) + 0.5) * cv.size / grid).astype(int)
    gy, gx = cv.y[idx, :], cv.x[:, idx]
    depth = _inside_distance(region[np.ix_(idx, idx)]) * (_BASE / grid)
    # Sequential placement can paint itself into a corner (a first lesion in the middle of a small
    # organ leaves no room for the rest), so start over a few times before giving up.
    for _attempt in range(_PLACE_ATTEMPTS):
        centres: list[tuple[float, float]] = []
        for r in radii:
            ok = depth >= r + margin
            for (py, px), pr in zip(centres, radii, strict=False):
                ok &= (gy - py) ** 2 + (gx - px) ** 2 >= (r + pr + gap) ** 2
            cand = np.flatnonzero(ok)
            if cand.size == 0:
                break
            iy, ix = divmod(int(cand[rng.integers(cand.size)]), grid)
            centres.append((float(gy[iy, 0]), float(gx[0, ix])))
        else:
            cv.lesions.extend((cy, cx, r) for (cy, cx), r in zip(centres, radii, strict=True))
            return centres
    # The geometry is chosen so this does not happen; failing loudly beats rendering a wrong answer.
    raise RuntimeError(f"no room for lesions of radii {[round(r, 1) for r in radii]}")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a random `cells` x `cells` grid, bilinearly upsampled."""
    grid = rng.uniform(-1.0, 1.0, (cells, cells))
    pos = np.linspace(0.0, cells - 1.0, size)
    lo = np.minimum(pos.astype(int), cells - 2)
    frac = pos - lo
    interp = np.zeros((size, cells))
    interp[np.arange(size), lo] = 1.0 - frac
    interp[np.arange(size), lo + 1] = frac
    return interp @ grid @ interp.T


def _side_mask(cv: _Canvas, cx: float, side: str | None, offset: float = 0.0) -> np.ndarray:
    # Radiological convention: the patient's left is on the image's right.
    full = np.ones((cv.size, cv.size), dtype=bool)
    if side is None:
        return full
    if side == "left":
        return full & (cv.x >= cx + offset)
    return full & (cv.x <= cx - offset)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _chest_xray(cv: _Canvas, f: Findings, anat: np.random.Generator, les: np.random.Generator) -> np.ndarray:
    img = np.full((cv.size, cv.size), _u(anat, 5, 20))
    cy, cx, s = 33 + _u(anat, -1.5, 1.5), 32 + _u(anat, -1.5, 1.5), _u(anat, 0.95, 1.05)
    cv.paint(img, cy, cx, 28 * s, 27 * s, _u(anat, 150, 175))  # thorax and soft tissue
    cv.paint(img, cy, cx, 27 * s, 3.5 * s, _u(anat, 180, 195))  # spine and mediastinum
    lungs = {}
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * cv.y / _u(anat, 6.5, 7.5) + _u(anat, 0, 2 * np.pi))
    for side, sign in (("right", -1.0), ("left", 1.0)):  # patient's right lung is on the image's left
        alpha = cv.ellipse(
            cy - 3 * s, cx + sign * 11.5 * s, 19 * s * _u(anat, 0.95, 1.05), 9.5 * s * _u(anat, 0.95, 1.05)
        )
        _blend(img, alpha, _u(anat, 35, 55))
        img += alpha * 10 * ribs  # faint rib shadows, so lung fields are not flat
        lungs[side] = alpha > 0.5
    if f.enlarged:
        hy, hx = 11 * s * _u(anat, 0.94, 1.06), 14.5 * s * _u(anat, 0.94, 1.06)
    else:
        hy, hx = 8 * s * _u(anat, 0.94, 1.06), 9.5 * s * _u(anat, 0.94, 1.06)
    heart = cv.ellipse(cy + 10 * s, cx + 3.5 * s, hy, hx)  # heart sits toward the patient's left
    _blend(img, heart, _u(anat, 170, 190))
    sides = ("left", "right") if f.side is None else (f.side,)
    region = np.logical_or.reduce([lungs[sd] for sd in sides]) & (heart < 0.05)
    for (py, px), r in zip(_place(cv, les, region, f.radii), f.radii, strict=True):
        cv.paint(img, py, px, r, r, _u(les, 175, 205))
    return img


def _ct(cv: _Canvas, f: Findings, anat: np.random.Generator, les: np.random.Generator) -> np.ndarray:
    img = np.full((cv.size, cv.size), _u(anat, 0, 8))
    cy, cx, s = 33 + _u(anat, -1.5, 1.5), 32 + _u(anat, -1.5, 1.5), _u(anat, 0.96, 1.04)
    cv.paint(img, cy, cx, 23 * s, 29 * s, _u(anat, 65, 80))  # subcutaneous fat
    inner = cv.ellipse(cy, cx, 20 * s, 26 * s)
    _blend(img, inner, _u(anat, 100, 115))  # muscle and bowel
    # The liver lies on the patient's right, i.e. the image's left.
    liver = cv.ellipse(
        cy - 4 * s,
        cx - 10.5 * s,
        13.5 * s * _u(anat, 0.96, 1.04),
        15 * s * _u(anat, 0.96, 1.04),
        _u(anat, -0.15, 0.15),
    ) * np.clip(inner * 2 - 1, 0, 1)
    _blend(img, liver, _u(anat, 135, 150))
    cv.paint(img, cy - 6 * s, cx + 16 * s, 7 * s, 4.5 * s, _u(anat, 125, 140), 0.4)  # spleen
    kidneys = np.zeros_like(img)
    for sign in (-1.0, 1.0):
        k = cv.ellipse(cy + 11 * s, cx + sign * 11.5 * s, 4.5 * s, 3.5 * s, sign * 0.3)
        _blend(img, k, _u(anat, 150, 165))
        kidneys = np.maximum(kidneys, k)
    cv.paint(img, cy + 14 * s, cx, 5 * s, 5 * s, _u(anat, 215, 235))  # vertebral body
    cv.paint(img, cy + 6.5 * s, cx + 2 * s, 2.5 * s, 2.5 * s, _u(anat, 180, 200))  # aorta
    region = (liver > 0.5) & (kidneys < 0.05)
    for (py, px), r in zip(_place(cv, les, region, f.radii), f.radii, strict=True):
        cv.paint(img, py, px, r, r, _u(les, 40, 60))  # hypodense lesion
    return img


def _brain_mri(cv: _Canvas, f: Findings, anat: np.random.Generator, les: np.random.Generator) -> np.ndarray:
    img = np.full((cv.size, cv.size), _u(anat, 0, 8))
    cy, cx, s = 32 + _u(anat, -1.2, 1.2), 32 + _u(anat, -1.2, 1.2), _u(anat, 0.97, 1.03)
    cv.paint(img, cy, cx, 30.5 * s, 28 * s, _u(anat, 150, 175))  # scalp fat, bright on T1
    cv.paint(img, cy, cx, 29 * s, 26.5 * s, _u(anat, 25, 40))  # skull
    brain = cv.ellipse(cy, cx, 27.5 * s, 25 * s)
    _blend(img, brain, _u(anat, 95, 110))  # grey matter
    cv.paint(img, cy, cx, 23 * s, 20.5 * s, _u(anat, 135, 150))  # white matter
    cv.paint(img, cy, cx, 26 * s, 0.6, _u(anat, 60, 75))  # falx along the midline
    ventricles = np.zeros_like(img)
    if f.enlarged:
        off, vy, vx = 5.0, 10 * _u(anat, 0.94, 1.06), 4.5 * _u(anat, 0.94, 1.06)
    else:
        off, vy, vx = 3.2, 6 * _u(anat, 0.94, 1.06), 2.0 * _u(anat, 0.94, 1.06)
    for sign in (-1.0, 1.0):
        v = cv.ellipse(cy - s, cx + sign * off * s, vy * s, vx * s, -sign * 0.25)
        _blend(img, v, _u(anat, 20, 35))  # CSF, dark on T1
        ventricles = np.maximum(ventricles, v)
    side = f.side if f.side is not None else SIDES[int(les.integers(2))]
    # A mass keeps 1.5 units off the midline so its hemisphere is never ambiguous.
    region = (brain > 0.5) & _side_mask(cv, cx, side, offset=1.5)
    if f.avoid_organ:
        region &= ventricles < 0.05
    for (py, px), r in zip(_place(cv, les, region, f.radii), f.radii, strict=True):
        cv.paint(img, py, px, r, r, _u(les, 225, 245))
    return img


def _histology(cv: _Canvas, f: Findings, anat: np.random.Generator, les: np.random.Generator) -> np.ndarray:
    size = cv.size
    stroma = np.array([_u(anat, 225, 240), _u(anat, 150, 175), _u(anat, 190, 210)])
    texture = _smooth_noise(anat, size, 7)
    img = stroma[None, None, :] * (1.0 + 0.08 * texture[..., None])
    for _ in range(int(anat.integers(1, 4))):  # lumina / clear spaces
        r = _u(anat, 3, 6)
        cv.paint(
            img,
            _u(anat, 0, _BASE),
            _u(anat, 0, _BASE),
            r,
            r * _u(anat, 0.6, 1),
            (245, 236, 245),
            _u(anat, 0, 3.2),
        )
    if f.enlarged:  # nuclear pleomorphism: fewer, much larger nuclei
        n, radius = int(anat.integers(32, 43)), (3.0, 3.6)
    else:
        n, radius = int(anat.integers(70, 91)), (1.5, 2.1)
    for _ in range(n):
        r = _u(anat, *radius)
        colour = (_u(anat, 80, 110), _u(anat, 45, 70), _u(anat, 135, 165))
        cv.paint(
            img, _u(anat, 0, _BASE), _u(anat, 0, _BASE), r, r * _u(anat, 0.75, 1.0), colour, _u(anat, 0, 3.2)
        )
    region = np.ones((size, size), dtype=bool)
    for (py, px), r in zip(_place(cv, les, region, f.radii, gap=3.0, margin=2.0), f.radii, strict=True):
        # A mitotic figure: condensed, near-black chromatin with ragged arms in a clear halo.
        cv.paint(img, py, px, r + 1.5, r + 1.5, (238, 222, 236))
        dark = np.array([_u(les, 25, 45), _u(les, 8, 20), _u(les, 45, 70)])
        cv.paint(img, py, px, 0.75 * r, 0.75 * r, dark)
        for a in les.uniform(0, 2 * np.pi, int(les.integers(4, 7))):
            cv.paint(img, py + 0.55 * r * np.sin(a), px + 0.55 * r * np.cos(a), 0.45 * r, 0.9, dark, -a)
    return img


_RENDERERS = {"chest_xray": _chest_xray, "ct": _ct, "brain_mri": _brain_mri, "histology": _histology}


def render(modality: str, findings: Findings, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Draw one phantom as an RGB uint8 array of shape (image_size, image_size, 3).

    Anatomy, lesions and noise use three independent streams drawn from `rng`, so with the same
    `rng` state two renderings differ only where their findings differ.
    """
    return render_with_lesions(modality, findings, rng, image_size)[0]


def render_with_lesions(modality: str, findings: Findings, rng: np.random.Generator, image_size: int
                        ) -> tuple[np.ndarray, np.ndarray | None]:
    """`render`, and the map of the lesions it drew (None without any): the annotation MMedPO's
    visual dispreference noises. Recording them draws nothing from `rng`: the pixels are the same."""
    if modality not in _RENDERERS:
        raise ValueError(f"unknown modality {modality!r}; known: {list(MODALITIES)}")
    anat, les, noise = (np.random.default_rng(s) for s in rng.integers(0, 2**63, size=3))
    cv = _Canvas(image_size)
    img = _RENDERERS[modality](cv, findings, anat, les)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    # Global gain and offset jitter stand in for exposure and scanner differences.
    img = img * noise.uniform(0.92, 1.08) + noise.uniform(-8, 8)
    img = img + noise.normal(0.0, 5.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), cv.lesion_mask()


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 array; Pillow writes no timestamp, so equal pixels give equal bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def encode_mask_png(mask: np.ndarray) -> bytes:
    """PNG bytes (mode L, 255 = True) of a boolean map, e.g. a lesion annotation."""
    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Splits


def generate_split(
    n: int,
    split: str,
    seed: int,
    prior: float | None,
    image_size: int,
    closed_fraction: float = 0.5,
    modalities: Sequence[str] = MODALITIES,
    lesion_masks: bool = False,
) -> list[dict]:
    """`n` VQA rows (VQA_SCHEMA keys) of the phantom benchmark for `split`.

    Reproducible from (seed, split): the same arguments give byte-identical rows, and train and test
    draw from different streams. `prior` only affects the `train` split (see `answer_distribution`).
    With `lesion_masks`, each row also has `lesion_mask`: PNG bytes of the lesions drawn (mode L,
    255 = lesion), or None when the image has none.
    """
    plan = plan_split(n, split, seed, prior, closed_fraction, modalities)
    rows = []
    for i, (template, answer) in enumerate(plan):
        # One stream per row, so a row's image does not depend on how many rows precede it.
        rng = np.random.default_rng([seed, _split_key(split), 1, i])
        pixels, lesions = render_with_lesions(template.modality, findings_for(template, answer, rng), rng, image_size)
        extra = {}
        if lesion_masks:
            extra["lesion_mask"] = None if lesions is None else encode_mask_png(lesions)
        rows.append(
            {
                **extra,
                "id": f"{DATASET}-{split}-{i:05d}",
                "dataset": DATASET,
                "split": split,
                "image": encode_png(pixels),
                "question": template.question,
                "answer": answer,
                "answer_type": template.answer_type,
                "modality": template.modality,
                "question_type": template.question_type,
                "context": [],  # every phantom question is single-turn
            }
        )
    return rows


def generate_dataset(
    n_train: int, n_test: int, seed: int, prior: float | None, image_size: int, lesion_masks: bool = False
) -> tuple[list[dict], list[dict]]:
    """The `train` split (with the language prior; with `lesion_masks`, each row's `lesion_mask`) and
    the balanced `test` split."""
    train = generate_split(n_train, "train", seed, prior, image_size, lesion_masks=lesion_masks)
    test = generate_split(n_test, "test", seed, prior, image_size)
    return train, test
