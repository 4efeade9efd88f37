"""The adult abdomen the phantoms are drawn from: organs, vessels, bowel, bones, in adult millimetres and HU.

:class:`Anatomy` is one random patient, drawn once from a numpy generator; :meth:`Anatomy.render` evaluates its
HU and organ ids at arbitrary points, so :mod:`fedseg.common.synthetic.phantoms` can sample it on any site's grid.
The tissue values and the per-case variation are listed in :mod:`fedseg.common.synthetic.phantoms`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.interpolate import make_interp_spline

#: Organ ids of :meth:`Anatomy.render`'s organ map (5 = left kidney, so sites can number the kidneys apart).
ORGANS: dict[int, str] = {1: "pancreas", 2: "spleen", 3: "kidney", 4: "liver", 5: "kidney"}
PANCREAS, SPLEEN, KIDNEY_R, LIVER, KIDNEY_L = 1, 2, 3, 4, 5
_JITTERED = ("liver_r", "liver_l", "spleen", "stomach", "gallbladder", "kidney_r", "kidney_l")


@dataclass(frozen=True)
class _Field:
    """A smooth random field of unit variance: a sum of random plane waves, independent of the grid."""

    k: np.ndarray  # (n, 3) wave vectors, rad per adult mm
    phase: np.ndarray  # (n,)

    @classmethod
    def draw(cls, rng: np.random.Generator, n: int, wavelength: float) -> _Field:
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        k = direction * (2 * math.pi / wavelength) * rng.uniform(0.7, 1.3, (n, 1))
        return cls(k.astype(np.float32), rng.uniform(0, 2 * math.pi, n).astype(np.float32))

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = np.zeros(x.shape, np.float32)
        for (kx, ky, kz), phase in zip(self.k, self.phase, strict=True):
            out += np.cos(kx * x + ky * y + kz * z + phase)
        return out * np.float32(math.sqrt(2.0 / len(self.phase)))


def _ellipsoid(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: np.ndarray, semi: np.ndarray, angle: float = 0.0
) -> np.ndarray:
    """Implicit ellipsoid value ``Σ (u/a)²`` (< 1 inside), its axes turned in-plane by ``angle`` degrees."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    dx, dy = x - centre[0], y - centre[1]
    u, v = c * dx + s * dy, -s * dx + c * dy
    result: np.ndarray = (u / semi[0]) ** 2 + (v / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2
    return result


def _tube(x: np.ndarray, y: np.ndarray, z: np.ndarray, knots: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Boolean mask of a tube of varying radius swept along a cubic spline through ``knots`` (K, 3)."""
    t = np.linspace(0.0, 1.0, len(knots))
    ts = np.linspace(0.0, 1.0, 64)
    points = make_interp_spline(t, knots, k=min(3, len(knots) - 1))(ts)
    radius = np.interp(ts, t, radii)
    lo, hi = points.min(axis=0) - radius.max(), points.max(axis=0) + radius.max()
    near = (x > lo[0]) & (x < hi[0]) & (y > lo[1]) & (y < hi[1]) & (z > lo[2]) & (z < hi[2])
    xs, ys, zs = x[near], y[near], z[near]
    hit = np.zeros(xs.shape, bool)
    for (px, py, pz), r in zip(points, radius, strict=True):
        hit |= (xs - px) ** 2 + (ys - py) ** 2 + (zs - pz) ** 2 < r * r
    inside = np.zeros(x.shape, bool)
    inside[near] = hit
    return inside


def _paint(hu: np.ndarray, organ: np.ndarray, mask: np.ndarray, value: float | np.ndarray, organ_id: int = 0) -> None:
    """Set ``hu`` to ``value`` (scalar or full-size array) and ``organ`` to ``organ_id`` where ``mask``."""
    hu[mask] = value[mask] if isinstance(value, np.ndarray) else value
    organ[mask] = organ_id


class Anatomy:
    """One random patient, drawn once from ``rng``; :meth:`render` evaluates it at any adult-mm points.

    Axes follow LPS: x towards the patient's left, y posterior, z superior; the spine sits at ``+y``.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.ax = 140.0 * rng.uniform(0.9, 1.1)
        self.ay = 100.0 * rng.uniform(0.9, 1.1)
        self.shift = np.array([rng.normal(0, 6), rng.normal(0, 6), rng.uniform(-15, 15)])
        self.fat = rng.uniform(6.0, 22.0)
        self.wall = rng.uniform(9.0, 14.0)
        self.warp = [_Field.draw(rng, 4, 260.0) for _ in range(3)]
        self.bowel = _Field.draw(rng, 24, 60.0)
        self.gas = _Field.draw(rng, 24, 35.0)
        self.texture = _Field.draw(rng, 16, 25.0)
        self.jitter = {
            n: (rng.normal(0, 5, 3), rng.uniform(0.88, 1.12) * rng.uniform(0.95, 1.05, 3)) for n in _JITTERED
        }
        self.knots = rng.normal(0, 4, (6, 3))
        self.pancreas_scale = rng.uniform(0.88, 1.12)
        self.ys = 0.3 * 0.92 * self.ay  # vertebral body centre

    def render(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """HU (float32) and organ ids (uint8, :data:`ORGANS`) at points given in adult mm."""
        x, y, z = x - self.shift[0], y - self.shift[1], z - self.shift[2]
        x, y, z = (c + 6.0 * w(x, y, z) for c, w in zip((x, y, z), self.warp, strict=True))
        hu = np.full(x.shape, -1000.0, np.float32)
        organ = np.zeros(x.shape, np.uint8)
        texture = self.texture(x, y, z)
        body, inner, cavity = self._body(x, y, z, hu)
        self._organs(x, y, z, hu, organ, texture, (inner, cavity))
        self._vessels(x, y, z, hu, organ, inner)
        self._skeleton(x, y, z, hu, organ, body)
        return hu, organ

    def _place(self, name: str, centre: tuple[float, ...], semi: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
        offset, scale = self.jitter[name]
        return np.asarray(centre) + offset, np.asarray(semi) * scale

    def _rings(self, y: np.ndarray, inset: float) -> tuple[float, np.ndarray]:
        """Semi-axes of the body outline moved inwards by ``inset`` mm (thinner fat at the back)."""
        back = y > 0
        ay = np.where(back, 0.92 * self.ay, self.ay) - inset * np.where(back, 0.6, 1.0)
        return self.ax - inset, ay

    def _body(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, hu: np.ndarray) -> tuple[np.ndarray, ...]:
        masks = []
        for inset in (0.0, self.fat, self.fat + self.wall):
            ax, ay = self._rings(y, inset)
            masks.append((x / ax) ** 2 + (y / ay) ** 2 < 1)
        body, inner, cavity = masks
        hu[body] = -100.0
        hu[inner] = 50.0
        cx, cy, cz = x[cavity], y[cavity], z[cavity]
        bowel = self.bowel(cx, cy, cz) > 0.2
        gas = bowel & (self.gas(cx, cy, cz) > 1.6)
        hu[cavity] = np.where(gas, -950.0, np.where(bowel, 30.0, -90.0))
        return body, inner, cavity

    def _organs(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, hu: np.ndarray, organ: np.ndarray,
                texture: np.ndarray, regions: tuple[np.ndarray, np.ndarray]) -> None:  # fmt: skip
        inner, cavity = regions
        ys = self.ys

        def paint(mask: np.ndarray, value: float | np.ndarray, organ_id: int = 0) -> None:
            _paint(hu, organ, mask, value + 6.0 * texture if organ_id else value, organ_id)

        liver = _ellipsoid(x, y, z, *self._place("liver_r", (-55, -5, 60), (70, 75, 65))) < 1
        liver |= _ellipsoid(x, y, z, *self._place("liver_l", (25, -50, 65), (50, 28, 38))) < 1
        paint(cavity & liver, 60.0, LIVER)
        paint(cavity & (_ellipsoid(x, y, z, *self._place("spleen", (70, ys + 5, 50), (24, 45, 52)), 30) < 1),
              50.0, SPLEEN)  # fmt: skip
        centre, semi = self._place("stomach", (55, ys - 55, 45), (30, 32, 45))
        f = _ellipsoid(x, y, z, centre, semi, -30)
        content = np.where(y < centre[1] - 0.4 * semi[1], -950.0, 15.0)
        paint(cavity & (f < 1), np.where(f > 0.65, 45.0, content))
        paint(cavity & (_ellipsoid(x, y, z, *self._place("gallbladder", (-38, -50, 5), (14, 14, 28)), 20) < 1), 10.0)
        duodenum = np.array([(-8, -70, 12), (-35, -60, 5), (-45, -45, -15), (-40, -40, -40), (-15, -38, -50),
                             (10, -40, -48)]) + np.array([0.0, ys, 0])  # fmt: skip
        paint(cavity & _tube(x, y, z, duodenum, np.full(6, 9.0)), 25.0)
        psoas_grow = np.maximum(-z, 0)
        psoas = ((np.abs(x) - 30) / (10 + psoas_grow / 8)) ** 2 + ((y - ys) / (12 + psoas_grow / 10)) ** 2 < 1
        paint(inner & psoas & (z < 40), 50.0)
        for name, sign, organ_id, height in (("kidney_r", -1, KIDNEY_R, -25), ("kidney_l", 1, KIDNEY_L, -8)):
            centre, semi = self._place(name, (sign * 58, ys + 8, height), (25, 22, 52))
            f = _ellipsoid(x, y, z, centre, semi, sign * 25)
            paint(inner & (f < 1), np.where(f > 0.55, 120.0, 35.0), organ_id)
            sinus = _ellipsoid(x, y, z, centre + np.array([-sign * 14.0, -8, 0]), np.array([12.0, 10.0, 26.0])) < 1
            paint(inner & (f < 1) & sinus, -60.0)
        paint(cavity & _tube(x, y, z, self._pancreas_knots(), self._pancreas_radii()), 40.0, PANCREAS)

    def _pancreas_knots(self) -> np.ndarray:
        """Uncinate, head, neck, body, tail, tail tip (adult mm); veins are placed relative to these."""
        base = [(-24, -50, -30), (-22, -56, -14), (-4, -62, -2), (18, -56, 8), (40, -36, 20), (58, -26, 32)]
        knots: np.ndarray = np.array(base, float) + np.array([0.0, self.ys, 0]) + self.knots
        return knots

    def _pancreas_radii(self) -> np.ndarray:
        return np.array([11.0, 13.0, 8.0, 9.0, 9.0, 7.0]) * self.pancreas_scale

    def _vessels(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, hu: np.ndarray, organ: np.ndarray,
                 inner: np.ndarray) -> None:  # fmt: skip
        ys = self.ys
        knots = self._pancreas_knots()
        confluence = knots[2] + np.array([0.0, 16.0, 0.0])
        splenic = np.vstack([confluence, knots[3:] + np.array([[0.0, 12, 0], [0, 11, 0], [0, 12, 0]]),
                             knots[5] + np.array([8.0, 20, 8])])  # fmt: skip
        smv = confluence + np.array([[0.0, 0, 0], [-2, -4, -38], [-4, -9, -78]])
        portal = confluence + np.array([[0.0, 0, 0], [-16, 1, 17], [-36, 6, 32]])
        veins = (splenic, smv, portal)  # the splenic vein runs along the back of the pancreas
        for knots_v, radius in zip(veins, (5.0, 6.0, 7.0), strict=True):
            mask = inner & _tube(x, y, z, knots_v, np.full(len(knots_v), radius))
            hu[mask], organ[mask] = 160.0, 0
        aorta = inner & ((x - 8) ** 2 + (y - ys + 30) ** 2 < 11**2)
        ivc = inner & (((x + 22) / 13) ** 2 + ((y - ys + 27) / 10) ** 2 < 1)
        hu[aorta], organ[aorta] = 190.0, 0
        hu[ivc], organ[ivc] = 160.0, 0

    def _skeleton(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, hu: np.ndarray, organ: np.ndarray,
                  body: np.ndarray) -> None:  # fmt: skip
        ys, yc = self.ys, self.ys + 26  # vertebral body and spinal canal centres
        vertebra = (x / 20) ** 2 + ((y - ys) / 17) ** 2
        disc = np.mod(z, 30.0) < 8.0
        parts = (
            (((np.abs(x) - 28) / 20) ** 2 + ((y - yc - 10) / 16) ** 2 < 1, 50.0),  # paraspinal muscles
            (((x / 16) ** 2 + ((y - yc) / 14) ** 2 < 1) | ((x / 5) ** 2 + ((y - yc - 17) / 8) ** 2 < 1), 500.0),
            ((x / 9) ** 2 + ((y - yc) / 8) ** 2 < 1, 15.0),  # spinal canal
            (vertebra < 1, np.where(disc, 90.0, np.where(vertebra > 0.7, 700.0, 250.0))),
            (self._ribs(x, y, z), 600.0),
        )
        for mask, value in parts:
            _paint(hu, organ, mask & body, value)

    def _ribs(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Six ribs in the muscle wall, sloping 50 mm down from the spine to the costal cartilage."""
        ax, ay = self._rings(y, self.fat + self.wall / 2)
        rho = np.sqrt((x / ax) ** 2 + (y / ay) ** 2) + 1e-6
        radial = (rho - 1) * np.sqrt(x**2 + y**2) / rho
        phi = np.arctan2(np.abs(x), y)  # 0 at the spine, pi at the front
        ribs = np.zeros(x.shape, bool)
        for k in range(6):
            ribs |= radial**2 + (z - (150 - 30 * k) + 50 * phi / math.pi) ** 2 < 36
        result: np.ndarray = ribs & (phi > 0.4) & (phi < 2.3)
        return result
