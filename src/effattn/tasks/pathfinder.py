"""Pathfinder (Linsley et al. 2018; LRA's long-range spatial task), drawn procedurally.

A ``size x size`` image holds two long target contours and short distractor contours, all
made of dashed segments with smoothly turning direction, and two circular markers.
Label 1: both markers sit on the two ends of the same contour; label 0: one marker on an
end of each target contour.  Both classes draw the same strokes, so only connectivity
tells them apart.  Difficulty grows with ``contour_length`` (dashes per target contour).
The image is flattened row-major into a ``size*size`` sequence of pixel tokens 0..255.
Labels alternate with the example index, so every split is balanced.
"""

from __future__ import annotations

import math

import numpy as np

from effattn.tasks.base import Example, Task

INK = 255


def draw_segment(img: np.ndarray, p0, p1, value: int = INK) -> None:
    """Rasterize the segment ``p0 -> p1`` (``(row, col)`` floats) into ``img`` in place."""
    n = max(2, int(math.ceil(2 * math.hypot(p1[0] - p0[0], p1[1] - p0[1]))) + 1)
    t = np.linspace(0.0, 1.0, n)
    r = np.rint(p0[0] + t * (p1[0] - p0[0])).astype(int)
    c = np.rint(p0[1] + t * (p1[1] - p0[1])).astype(int)
    ok = (r >= 0) & (r < img.shape[0]) & (c >= 0) & (c < img.shape[1])
    img[r[ok], c[ok]] = value


def draw_disk(img: np.ndarray, center, radius: float, value: int = INK) -> None:
    """Fill the disk of ``radius`` around ``center`` (``(row, col)``) in place."""
    rr, cc = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    img[(rr - center[0]) ** 2 + (cc - center[1]) ** 2 <= radius ** 2] = value


def random_contour(rng: np.random.Generator, size: int, n_dashes: int, *, dash: float = 2.0,
                   gap: float = 1.5, max_turn: float = math.pi / 5, margin: float = 2.0):
    """A dashed contour inside the image: list of ``(p0, p1)`` dashes, or None if it got stuck.

    Each dash turns by at most ``max_turn`` from the previous one; near the border the turn
    may grow (up to 4x) to keep the contour inside, as a smooth curve bends away from a wall.
    """
    lo, hi = margin, size - 1 - margin
    pos = rng.uniform(lo, hi, size=2)
    ang = rng.uniform(0, 2 * math.pi)
    dashes = []
    for _ in range(n_dashes):
        for widen in (0, 1, 1, 2, 2, 3, 3, 4, 4):
            a = ang + (rng.uniform(-max_turn, max_turn) * max(widen, 1) if dashes else 0.0)
            d = np.array([math.sin(a), math.cos(a)])
            end = pos + dash * d
            nxt = end + gap * d
            if lo <= min(end.min(), nxt.min()) and max(end.max(), nxt.max()) <= hi:
                break
        else:
            return None
        dashes.append((pos.copy(), end))
        pos, ang = nxt, a
    return dashes


class Pathfinder(Task):
    """Pathfinder images ``[size, size]`` as token sequences ``[size*size]``; 2 classes."""

    name = "pathfinder"
    kind = "classify"
    num_classes = 2
    vocab_size = 256

    def __init__(self, seed: int = 0, *, size: int = 32, contour_length: int = 6,
                 distractors: int = 4, marker_radius: float = 1.5):
        super().__init__(seed)
        for name, v in (("size", size), ("contour_length", contour_length)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if size < 12:
            raise ValueError(f"size: expected >= 12 pixels, got {size}")
        if isinstance(distractors, bool) or not isinstance(distractors, int) or distractors < 0:
            raise ValueError(f"distractors: expected a non-negative int, got {distractors!r}")
        self.size, self.contour_length, self.distractors = size, contour_length, distractors
        self.marker_radius = float(marker_radius)
        self.max_len = size * size

    def options(self) -> dict:
        return {"size": self.size, "contour_length": self.contour_length,
                "distractors": self.distractors, "marker_radius": self.marker_radius}

    def _contour(self, rng, n_dashes):
        for _ in range(1000):
            c = random_contour(rng, self.size, n_dashes)
            if c is not None:
                return c
        raise RuntimeError(f"pathfinder: cannot fit a contour of {n_dashes} dashes in {self.size} px")

    def render(self, rng: np.random.Generator, label: int) -> np.ndarray:
        """One image ``uint8 [size, size]`` with the given label."""
        while True:
            a = self._contour(rng, self.contour_length)
            b = self._contour(rng, self.contour_length)
            a_ends = (a[0][0], a[-1][1])
            b_ends = (b[0][0], b[-1][1])
            markers = a_ends if label == 1 else (a_ends[int(rng.integers(2))], b_ends[int(rng.integers(2))])
            # the markers must be told apart, and a negative's markers must not touch the other contour's ends
            if np.linalg.norm(markers[0] - markers[1]) < 4 * self.marker_radius:
                continue
            if label == 1 and min(np.linalg.norm(e - m) for e in b_ends for m in markers) < 3:
                continue
            break
        img = np.zeros((self.size, self.size), dtype=np.uint8)
        short = max(1, self.contour_length // 3)
        for contour in [a, b] + [self._contour(rng, short) for _ in range(self.distractors)]:
            for p0, p1 in contour:
                draw_segment(img, p0, p1)
        for m in markers:
            draw_disk(img, m, self.marker_radius)
        return img

    def generate(self, rng: np.random.Generator, index: int) -> Example:
        label = index % 2
        return Example(self.render(rng, label).reshape(-1).astype(np.int64), label)
