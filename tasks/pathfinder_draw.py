"""Pathfinder images (Linsley et al. 2018; Long Range Arena), drawn with numpy.

What is drawn. An image of `image_size` x `image_size` grey pixels holding
two *target curves* of `contour_length` paddles each, up to `num_distractors`
*distractor curves* of `distractor_length` paddles each, and two disc
*markers*. Label 1: the markers sit on the two ends of one target curve;
label 0: one marker sits on an end of each target curve. Both classes always
hold both full-length target curves and distractors drawn the same way.

Units. Lengths are in pixels, angles in radians. A point is (x, y), x the
column and y the row; the image spans [0, image_size] on both axes, so pixel
(row i, column j) has its centre at (j + 0.5, i + 0.5).

Curves. A curve is a polyline of vertices v_0 .. v_n (n paddles) whose edges
all have length `paddle_length` + 2 `margin`. Paddle k is the middle of edge
k: the segment from v_k + margin u_k to v_{k+1} - margin u_k, u_k the edge's
unit direction, so dashes of `paddle_length` alternate with gaps of
2 `margin` centred on the inner vertices. A paddle's *body* is the set of
points within `paddle_thickness` / 2 of its segment; a marker's body is the
disc of radius `marker_radius` centred on a curve end, v_0 or v_n, so it
covers the first marker_radius - margin > 0 of the curve's end paddle.

Growing a curve (as in the original): a start vertex and a uniformly random
first direction, then one paddle at a time. The turning angle d between
consecutive edges has density proportional to cos(continuity d)^2 on
|d| < pi / (2 continuity) (continuity >= 1 is dimensionless: turns of at most
90 degrees at 1.0, 50 at 1.8), restricted to the directions whose paddle
keeps clear (below): d is drawn among 16 candidates stratified over that
range with one shared random offset, weighted by cos^2 times clear. At a
dead end (no candidate clear) the last 3 paddles are drawn again, at most
`max_retries` times; then the curve is dropped (the original drops it at the
first dead end).

Keeping clear. Bodies of different curves, and non-consecutive paddles of
one curve, are at least `margin` apart; a marker disc is at least `margin`
from every paddle but its own curve's end paddle and from the other marker
discs; every body stays `margin` inside the image. All four target-curve
ends are kept clear like marker discs whatever the label, so nothing comes
near an end that could carry a marker. A candidate paddle is checked at
points at most a grid cell apart against an occupancy grid (cells of
(paddle_thickness + margin) / 8) in which each placed body is stamped
widened by the clearance plus the lookup's worst error (paddles with
precomputed masks, binned by direction and sub-cell position and widened by
the binning error too), so the rule holds exactly; the price is that some
candidates are refused that keep clear by less than about a third more than
the clearance. Marker discs are checked exactly against every paddle.

One image. (1) The first target curve starts uniformly in the square
[2 s, image_size - 2 s]^2, s = `seed_distance` (as in the original). (2) The
second starts exactly s from the first's start (uniform among the clear
points of that circle), as in the original, where s sets how close together
the two target curves begin. A target curve that fails is started again
(`max_retries` times), then the whole image (`max_restarts` times, then
RuntimeError). (3) Each distractor starts uniformly over the image (one of
16 random start and direction pairs, uniformly among those with a clear
first paddle), with `max_retries` attempts, and is left out if it never fits
(as in the original), so a crowded image may hold fewer. (4) Only now does
the label matter: marker 0 sits on the start v_0 of a random target curve k,
marker 1 on the end v_n of curve k (label 1) or of the other curve (label 0),
as in the original (marking both starts would give label 0 away: they are
always s apart). The random stream up to that point does not depend on the
label, so one seed gives the same curves under both labels, and the classes
differ only in where the markers sit. The distance between the markers still
differs slightly by class (means 13.0 / 13.3 px for label 0 / 1 at 32x32
contour 14, 15.2 / 14.7 at contour 6, against a spread of ~6 px).

Rendering (anti-aliased). A pixel's value is the maximum over shapes of
clip(h + 0.5 - d, 0, 1), d the distance from the pixel centre to the shape's
core (paddle segment or marker centre) and h its half-width (thickness / 2 or
radius): a linear ramp one pixel wide that approximates the shape's coverage
of the pixel. Thin paddles are therefore dimmer than markers (peak 0.75 at
thickness 0.5; markers reach 1). Scaled by 255 and rounded to uint8.

Settings (`params_for`). 32 and 128 follow the references on LRA's runs:
32: paddle 2, thickness 0.5, margin 1, marker radius 1.5, continuity 1.0,
seed distance 7, 20 // distractor_length distractors; 128 (Path-X):
thickness 1.5, marker radius 3, seed distance 20, continuity 1.8,
35 // distractor_length distractors, and, not given there, paddle 5 (the
original's default) and margin 2.5 (keeping 32's dash to gap ratio). 64 takes
roughly the geometric mean of each length (continuity and the distractor
budget halfway), 256 extends the same ratios one more doubling (continuity
stays 1.8). distractor_length is contour_length // 3 (the original's integer
division).

Differences from the original (drewlinsley/pathfinder, snakes2.py) and why:
  * exact geometry and distance-based rendering instead of PIL drawing at 4x
    with Lanczos resizing and dilated-mask overlap tests: numpy only, fast,
    and the curves come back as geometry that defines the label;
  * curves of different owners keep a gap of `margin`, not the 2 `margin` of
    the original's nominal footprints (its overlap test on anti-aliased masks
    lets footprints overlap somewhat). At 32x32 a gap of 1 px is the least at
    which no pixel takes light from two curves; with 2 px, two 14-paddle
    targets leave room for only ~2.9 of the 5 distractors (measured);
  * the original grows the two targets paddle by paddle in turn; here the
    first is finished before the second starts (which curve carries marker 0
    is random, so neither class favours either);
  * dead ends back up 3 paddles before the curve is dropped (far fewer
    restarts, the same turning rule);
  * target-curve ends are kept clear (the original draws markers over
    whatever lies there), so a marker never touches another curve;
  * labels are exactly balanced; one contrast level; no single-paddle
    distractors (the original's wrapper turns them off too).

Speed (images/s through `examples`, 2-core VM, 2026-12-02; workers=1 /
workers=2): 32x32 contour 14: 203 / 346 (LRA's 200K images in ~10 min);
32x32 contour 6: 390 / 760; 128x128 contour 14: 141 / 278.

`examples` draws example i from its own default_rng([seed, split_index, i]),
so the output does not depend on the number of workers; workers > 1 run in a
'spawn' pool (never fork: the caller may hold jax threads). This module
imports only numpy and the standard library.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import multiprocessing
import numbers
import os
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import numpy as np

IMAGE_SIZES = (32, 64, 128, 256)
CONTOUR_LENGTHS = (6, 9, 14)

# Per image size: paddle_length, paddle_thickness, margin, marker_radius,
# continuity, seed_distance, distractor paddle budget (num_distractors =
# budget // distractor_length).
_SETTINGS = {
    32: (2.0, 0.5, 1.0, 1.5, 1.0, 7.0, 20),
    64: (3.0, 1.0, 1.5, 2.0, 1.4, 12.0, 27),
    128: (5.0, 1.5, 2.5, 3.0, 1.8, 20.0, 35),
    256: (8.0, 2.5, 4.0, 4.5, 1.8, 34.0, 46),
}
_TURNS = 16            # candidate turning angles per paddle
_FIRSTS = 16           # candidate (start, direction) pairs for a first paddle
_SEED_POINTS = 32      # candidate starts of the second target on its circle
_BACKTRACK = 3         # paddles taken back at a dead end
_CELLS_PER_CLEARANCE = 8  # grid cells per clearance (see _Scene)
_STAMP_ANGLES = 128    # direction bins of the precomputed paddle stamps
_STAMP_OFFSETS = 4     # bins per axis of a paddle start within its cell
_LABEL_STREAM = 0x1abe1  # last entropy word of the label permutation's rng
_CHUNK = 256           # most examples per job sent to a worker


@dataclasses.dataclass(frozen=True)
class Params:
  """Generator settings; lengths in pixels (see the module docstring).

  Attributes:
    image_size: image side in pixels.
    contour_length: paddles per target curve.
    paddle_length: length of a paddle (a dash), pixels.
    paddle_thickness: width of a paddle's body, pixels.
    margin: half the gap between consecutive paddles of a curve; also the
      least gap between bodies of different curves (or non-consecutive
      paddles of one curve) and between a body and the image border.
    marker_radius: radius of a marker disc, pixels; > margin, so that a
      marker touches its curve's end paddle.
    continuity: c >= 1; the turning angle d (radians) between consecutive
      edges has density proportional to cos(c * d)**2 on |d| < pi / (2 c).
    seed_distance: distance between the two target curves' start vertices,
      pixels; the first start also lies at least 2 * seed_distance from the
      image border.
    distractor_length: paddles per distractor curve.
    num_distractors: distractor curves attempted per image.
    max_retries: dead ends a curve may back out of, and attempts per curve.
    max_restarts: attempts per image at placing both target curves before
      RuntimeError.
  """
  image_size: int
  contour_length: int
  paddle_length: float
  paddle_thickness: float
  margin: float
  marker_radius: float
  continuity: float
  seed_distance: float
  distractor_length: int
  num_distractors: int
  max_retries: int = 10
  max_restarts: int = 100

  def __post_init__(self):
    for name, low in (('image_size', 8), ('contour_length', 3),
                      ('distractor_length', 1), ('num_distractors', 0),
                      ('max_retries', 1), ('max_restarts', 1)):
      value = getattr(self, name)
      if not _is_int(value) or value < low:
        raise ValueError(f'{name} must be an integer >= {low}, got {value!r}')
    for name in ('paddle_length', 'paddle_thickness', 'margin'):
      _check_number(name, getattr(self, name), 0.0, math.inf, '(0, inf)')
    _check_number('marker_radius', self.marker_radius, self.margin, math.inf,
                  f'(margin, inf) = ({self.margin}, inf)')
    _check_number('continuity', self.continuity, 1.0, math.inf,
                  '[1, inf) (turns of at most 90 degrees)', closed=True)
    _check_number(
        'seed_distance', self.seed_distance,
        2 * self.marker_radius + self.margin, self.image_size / 4,
        f'[2 marker_radius + margin, image_size / 4) = '
        f'[{2 * self.marker_radius + self.margin}, {self.image_size / 4})',
        closed=True)


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_number(name: str, value, low: float, high: float, valid: str,
                  closed: bool = False) -> None:
  """ValueError unless low < value < high (low <= value if closed)."""
  ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
        and (low <= value if closed else low < value) and value < high)
  if not ok:
    raise ValueError(f'{name} must be a number in {valid}, got {value!r}')


def params_for(image_size: int, contour_length: int) -> Params:
  """The settings for one of `IMAGE_SIZES` and `CONTOUR_LENGTHS`."""
  if image_size not in _SETTINGS:
    raise ValueError(
        f'image_size must be one of {IMAGE_SIZES}, got {image_size!r}')
  if contour_length not in CONTOUR_LENGTHS:
    raise ValueError(f'contour_length must be one of {CONTOUR_LENGTHS}, got '
                     f'{contour_length!r}')
  length, thickness, margin, radius, continuity, seed_distance, budget = (
      _SETTINGS[image_size])
  distractor_length = contour_length // 3
  return Params(
      image_size=image_size, contour_length=contour_length,
      paddle_length=length, paddle_thickness=thickness, margin=margin,
      marker_radius=radius, continuity=continuity,
      seed_distance=seed_distance, distractor_length=distractor_length,
      num_distractors=budget // distractor_length)


def _segment_distance(x, y, ax, ay, bx, by):
  """Distance from points (x, y) to segments a-b; arguments broadcast."""
  dx, dy = bx - ax, by - ay
  s = ((x - ax) * dx + (y - ay) * dy) / np.maximum(dx * dx + dy * dy, 1e-12)
  s = np.clip(s, 0.0, 1.0)
  return np.hypot(x - ax - s * dx, y - ay - s * dy)


@functools.lru_cache(maxsize=8)
def _paddle_stamps(length: float, reach: float) -> np.ndarray:
  """Paddle stamps, lengths in grid cells: masks[a, i, j] [w, w] (w odd).

  For every paddle of `length` whose direction lies in angle bin a (of
  _STAMP_ANGLES over [0, 2 pi)) and whose start lies in sub-cell bin (i, j)
  (row, column; _STAMP_OFFSETS per axis) of the window's centre cell, the
  mask marks every window cell whose centre is within `reach` of that
  paddle: it marks the cells within reach + error of the bin's middle
  paddle, error bounding how far any paddle of the bin lies from that one.
  """
  error = (2 * length * math.sin(math.pi / (2 * _STAMP_ANGLES))
           + math.sqrt(0.5) / _STAMP_OFFSETS)
  half = math.ceil(length + reach + error) + 1
  centres = np.arange(2 * half + 1) - half + 0.5   # centre cell: [0, 1)
  start = (np.arange(_STAMP_OFFSETS) + 0.5) / _STAMP_OFFSETS
  y0 = start[:, None, None, None]
  x0 = start[None, :, None, None]
  y, x = centres[:, None], centres
  masks = []
  for angle in (np.arange(_STAMP_ANGLES) + 0.5) * (2 * math.pi
                                                    / _STAMP_ANGLES):
    x1, y1 = x0 + length * math.cos(angle), y0 + length * math.sin(angle)
    masks.append(_segment_distance(x, y, x0, y0, x1, y1) <= reach + error)
  return np.array(masks)


class _Scene:
  """The curves of one image so far, and the grid that keeps new ones clear.

  `blocked` marks the grid cells where no new paddle's centre line may pass:
  cells near or beyond the border, and cells within the clearance (plus
  `slack`, the lookup's error) of a stamped body. The grid extends `pad`
  cells beyond the image so that every sample point and stamp has room. A
  curve's newest paddle is stamped only once the next one is placed, so no
  paddle is checked against its predecessor.
  """

  def __init__(self, p: Params):
    self.p = p
    self.step = p.paddle_length + 2 * p.margin
    half = p.paddle_thickness / 2
    # Least distance from a paddle's centre line to a foreign paddle's centre
    # line / to a marker centre; least distance between marker centres.
    self.clearance = p.paddle_thickness + p.margin
    self.disc_clearance = p.marker_radius + half + p.margin
    self.disc_spacing = 2 * p.marker_radius + p.margin
    self.cell = self.clearance / _CELLS_PER_CLEARANCE
    # A sample point is within cell * sqrt(1/2) of its cell's centre, and
    # every point of a paddle is within cell / 2 of a sample.
    self.slack = self.cell * (math.sqrt(0.5) + 0.5)
    self.masks = _paddle_stamps(p.paddle_length / self.cell,
                                (self.clearance + self.slack) / self.cell)
    self.half = self.masks.shape[-1] // 2
    self.pad = max(math.ceil((p.margin + p.paddle_length) / self.cell),
                   self.half) + 1
    self.n = math.ceil(p.image_size / self.cell) + 2 * self.pad
    self.centres = (np.arange(self.n) - self.pad + 0.5) * self.cell
    edge = (np.minimum(self.centres, p.image_size - self.centres)
            < half + p.margin + self.slack)
    self.blocked = edge[:, None] | edge[None, :]
    self.flat = self.blocked.ravel()   # a view: stamps show through
    samples = math.ceil(p.paddle_length / self.cell) + 1
    # Sample positions along a paddle from its edge's first vertex, in cells.
    self.along = (p.margin + np.linspace(0.0, p.paddle_length, samples)
                  ) / self.cell
    self.turn_spacing = math.pi / p.continuity / _TURNS
    self.turn_base = -math.pi / (2 * p.continuity) + (
        np.arange(_TURNS) * self.turn_spacing)
    capacity = 2 * p.contour_length + p.num_distractors * p.distractor_length
    self.segments = np.zeros((capacity, 4))     # x0, y0, x1, y1 per paddle
    self.count = 0
    self.discs: list[tuple[float, float]] = []  # reserved marker centres
    self.undo = []   # per stamp: its grid window and the cells it replaced

  def snapshot(self) -> tuple[int, int, int]:
    return len(self.undo), self.count, len(self.discs)

  def restore(self, snapshot: tuple[int, int, int]) -> None:
    stamps, self.count, discs = snapshot
    while len(self.undo) > stamps:
      window, old = self.undo.pop()
      self.blocked[window] = old
    del self.discs[discs:]

  def blocked_paddles(self, x, y, ux: np.ndarray, uy: np.ndarray
                      ) -> np.ndarray:
    """Whether the paddles of edges leaving (x, y) in directions (ux, uy)
    touch a blocked cell; x, y are numbers or columns like ux[:, None]."""
    col = (self.along * ux[:, None] + (x / self.cell + self.pad)
           ).astype(np.intp)
    row = (self.along * uy[:, None] + (y / self.cell + self.pad)
           ).astype(np.intp)
    return self.flat[row * self.n + col].any(axis=1)

  def stamp_paddle(self, x0: float, y0: float, x1: float, y1: float
                   ) -> None:
    """Blocks the cells within clearance + slack of paddle (x0, y0)-(x1, y1),
    and a few more (see _paddle_stamps)."""
    bins = _STAMP_ANGLES / (2 * math.pi)
    angle = int(math.atan2(y1 - y0, x1 - x0) % (2 * math.pi) * bins)
    x, y = x0 / self.cell, y0 / self.cell
    col, row = math.floor(x), math.floor(y)
    mask = self.masks[angle % _STAMP_ANGLES,
                      int((y - row) * _STAMP_OFFSETS),
                      int((x - col) * _STAMP_OFFSETS)]
    i0, j0 = row + self.pad - self.half, col + self.pad - self.half
    window = np.s_[i0:i0 + mask.shape[0], j0:j0 + mask.shape[1]]
    self.undo.append((window, self.blocked[window].copy()))
    self.blocked[window] |= mask

  def reserve_disc(self, x: float, y: float) -> None:
    """Reserves a marker disc at (x, y): blocks the cells within
    disc_clearance + slack of its centre."""
    self.discs.append((x, y))
    reach = self.disc_clearance + self.slack
    c, n, pad = self.cell, self.n, self.pad
    i0 = max(math.floor((y - reach) / c) + pad, 0)
    i1 = min(math.floor((y + reach) / c) + pad + 1, n)
    j0 = max(math.floor((x - reach) / c) + pad, 0)
    j1 = min(math.floor((x + reach) / c) + pad + 1, n)
    window = np.s_[i0:i1, j0:j1]
    self.undo.append((window, self.blocked[window].copy()))
    self.blocked[window] |= np.hypot(self.centres[j0:j1] - x,
                                     self.centres[i0:i1, None] - y) <= reach

  def disc_fits(self, x, y, skip: int) -> np.ndarray:
    """Whether marker discs centred at (x, y) keep clear of the border, of
    every paddle but number `skip` (-1: none) and of the reserved discs."""
    p = self.p
    x, y = np.asarray(x, float), np.asarray(y, float)
    border = p.marker_radius + p.margin
    ok = ((np.minimum(x, p.image_size - x) >= border)
          & (np.minimum(y, p.image_size - y) >= border))
    s = np.delete(self.segments[:self.count], skip, axis=0) if skip >= 0 else (
        self.segments[:self.count])
    if len(s):
      d = _segment_distance(x[..., None], y[..., None],
                            s[:, 0], s[:, 1], s[:, 2], s[:, 3])
      ok &= d.min(axis=-1) >= self.disc_clearance
    if self.discs:
      cx, cy = np.array(self.discs).T
      d = np.hypot(x[..., None] - cx, y[..., None] - cy)
      ok &= d.min(axis=-1) >= self.disc_spacing
    return ok

  def grow(self, rng: np.random.Generator, x: np.ndarray, y: np.ndarray,
           paddles: int, target: bool) -> np.ndarray | None:
    """Grows one curve; its vertices [paddles + 1, 2], or None.

    The curve starts at one of the candidate points (x, y), each given a
    random direction, chosen uniformly among those whose first paddle is
    clear. At a dead end the last _BACKTRACK paddles are drawn again; after
    max_retries dead ends the scene is left as it was and None returned. A
    target curve also reserves its end discs.
    """
    p = self.p
    first, before = self.count, self.snapshot()
    vertices: list[tuple[float, float]] = []
    heading = pending = None
    history = []   # per placed paddle: the state before it was placed
    backtracks = 0
    while len(history) < paddles:
      index = len(history)
      state = self.snapshot(), pending, heading, len(vertices)
      fits = True
      if target and index == 2:   # paddles 0-1 checked, later ones avoid it
        fits = bool(self.disc_fits(*vertices[0], skip=first))
        if fits:
          self.reserve_disc(*vertices[0])
      if index == 0:
        angles = rng.random(len(x)) * (2 * math.pi)
        weights = np.ones(len(x))
        vx, vy = x[:, None], y[:, None]
      else:
        turns = self.turn_base + rng.random() * self.turn_spacing
        angles = turns + heading
        weights = np.cos(turns * p.continuity) ** 2
        vx, vy = vertices[-1]
      ux, uy = np.cos(angles), np.sin(angles)
      weights[self.blocked_paddles(vx, vy, ux, uy)] = 0.0
      if target and index == paddles - 1:   # room for the end disc
        weights *= self.disc_fits(vx + self.step * ux, vy + self.step * uy,
                                  skip=-1)
      cumulative = np.cumsum(weights)
      total = float(cumulative[-1])
      if not (fits and total > 0):
        if index == 0 or backtracks == p.max_retries:
          self.restore(before)
          return None
        backtracks += 1
        for _ in range(min(index, _BACKTRACK)):
          state = history.pop()
        snapshot, pending, heading, placed = state
        self.restore(snapshot)
        del vertices[placed:]
        continue
      k = int(np.searchsorted(cumulative, rng.random() * total,
                              side='right'))
      if index == 0:
        vertices.append((float(x[k]), float(y[k])))
        vx, vy = vertices[0]
      heading = float(angles[k])
      dx, dy = math.cos(heading), math.sin(heading)
      segment = (vx + p.margin * dx, vy + p.margin * dy,
                 vx + (p.margin + p.paddle_length) * dx,
                 vy + (p.margin + p.paddle_length) * dy)
      if pending is not None:
        self.stamp_paddle(*pending)
      self.segments[self.count] = segment
      self.count += 1
      pending = segment
      vertices.append((vx + self.step * dx, vy + self.step * dy))
      history.append(state)
    self.stamp_paddle(*pending)
    if target:
      self.reserve_disc(*vertices[-1])
    return np.array(vertices)


def _targets(scene: _Scene, rng: np.random.Generator) -> list[np.ndarray]:
  """Both target curves, or RuntimeError after max_restarts attempts."""
  p = scene.p
  s = p.seed_distance
  empty = scene.snapshot()
  for _ in range(p.max_restarts):
    scene.restore(empty)
    first = None
    for _ in range(p.max_retries):
      x, y = s * 2 + rng.random(2) * (p.image_size - 4 * s)
      first = scene.grow(rng, np.full(_FIRSTS, x), np.full(_FIRSTS, y),
                         p.contour_length, target=True)
      if first is not None:
        break
    if first is None:
      continue
    x0, y0 = first[0]
    for _ in range(p.max_retries):
      angles = (np.arange(_SEED_POINTS) + rng.random()) * (
          2 * math.pi / _SEED_POINTS)
      x, y = x0 + s * np.cos(angles), y0 + s * np.sin(angles)
      fits = np.flatnonzero(scene.disc_fits(x, y, skip=-1))
      if not len(fits):
        break
      k = fits[rng.integers(len(fits))]
      second = scene.grow(rng, np.full(_FIRSTS, x[k]), np.full(_FIRSTS, y[k]),
                          p.contour_length, target=True)
      if second is not None:
        return [first, second]
  raise RuntimeError(
      f'could not place both target curves in {p.max_restarts} attempts: '
      f'{p} leaves too little room')


def _render(p: Params, segments: np.ndarray, half_widths: np.ndarray
            ) -> np.ndarray:
  """uint8 image of capsules (segments [N, 4], half widths [N])."""
  size = p.image_size
  x0, y0, x1, y1 = segments.T[:, :, None, None]
  half = half_widths[:, None, None]
  extent = np.maximum(np.abs(x1 - x0), np.abs(y1 - y0)) + 2 * half + 1
  width = math.ceil(float(extent.max())) + 1
  cols = np.floor((x0 + x1 - extent) / 2).astype(np.intp) + np.arange(width)
  rows = (np.floor((y0 + y1 - extent) / 2).astype(np.intp)
          + np.arange(width)[:, None])
  d = _segment_distance(cols + 0.5, rows + 0.5, x0, y0, x1, y1)
  value = np.clip(half + 0.5 - d, 0.0, 1.0)
  inside = (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size)
  flat = np.zeros(size * size)
  np.maximum.at(flat, (rows * size + cols)[inside], value[inside])
  return np.rint(flat.reshape(size, size) * 255).astype(np.uint8)


def draw(rng: np.random.Generator, params: Params, label: int
         ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """One image and its geometry.

  Returns:
    image: uint8 [image_size, image_size].
    geometry: 'markers' float32 [2, 2], the (x, y) marker centres;
      'marker_curve' int32 [2], the target curve (0 or 1) each marker ends;
      'curves' float32 [2, contour_length + 1, 2], the target curves'
      vertices (markers[0] is curves[marker_curve[0], 0], markers[1] is
      curves[marker_curve[1], -1]); 'distractors' float32
      [placed, distractor_length + 1, 2], the distractor curves' vertices.
  """
  if label not in (0, 1):
    raise ValueError(f'label must be 0 or 1, got {label!r}')
  p = params
  scene = _Scene(p)
  curves = _targets(scene, rng)
  distractors = []
  for index in range(p.num_distractors):
    for _ in range(p.max_retries):
      x, y = rng.random((2, _FIRSTS)) * p.image_size
      curve = scene.grow(rng, x, y, p.distractor_length, target=False)
      if curve is not None:
        distractors.append(curve)
        break
  start_curve = int(rng.integers(2))
  marker_curve = np.array(
      [start_curve, start_curve if label else 1 - start_curve], np.int32)
  markers = np.array([curves[marker_curve[0]][0], curves[marker_curve[1]][-1]])
  segments = np.concatenate(
      [scene.segments[:scene.count], np.concatenate([markers, markers], 1)])
  half_widths = np.full(len(segments), p.paddle_thickness / 2)
  half_widths[-2:] = p.marker_radius
  image = _render(p, segments, half_widths)
  return image, {
      'markers': markers.astype(np.float32),
      'marker_curve': marker_curve,
      'curves': np.array(curves, np.float32),
      'distractors': np.array(distractors, np.float32).reshape(
          len(distractors), p.distractor_length + 1, 2),
  }


def _draw_chunk(job) -> list[dict[str, Any]]:
  """Examples start, start + 1, ... for one chunk of labels."""
  seed, split_index, params, start, labels = job
  out = []
  for index, label in enumerate(labels, start):
    image, geometry = draw(
        np.random.default_rng([seed, split_index, index]), params, label)
    out.append({'image': image, 'label': np.int32(label),
                'markers': geometry['markers'],
                'marker_curve': geometry['marker_curve'],
                'curves': geometry['curves']})
  return out


def examples(seed: int, split_index: int, count: int, params: Params,
             workers: int = 0) -> Iterator[dict[str, Any]]:
  """`count` examples in order: dicts of 'image', 'label' (int32),
  'markers', 'marker_curve' and 'curves' (see `draw`).

  Labels are a permutation, seeded by (seed, split_index, count), of
  count // 2 ones and count - count // 2 zeros. Example i is drawn from
  default_rng([seed, split_index, i]), so the output is the same for any
  `workers`: 0 means os.cpu_count(), 1 draws in this process, more draw
  chunks of examples in a 'spawn' process pool, at most 2 chunks per worker
  ahead of the caller (memory stays bounded; a worker that dies raises
  BrokenProcessPool rather than hanging).
  """
  for name, value in (('seed', seed), ('split_index', split_index),
                      ('count', count), ('workers', workers)):
    if not _is_int(value) or value < 0:
      raise ValueError(f'{name} must be an integer >= 0, got {value!r}')
  labels = np.random.default_rng(
      [seed, split_index, count, _LABEL_STREAM]).permutation(
          np.arange(count) % 2).tolist()
  workers = workers or os.cpu_count() or 1
  chunk = max(1, min(_CHUNK, math.ceil(count / (4 * workers))))
  jobs = ((seed, split_index, params, start, labels[start:start + chunk])
          for start in range(0, count, chunk))
  if workers == 1 or count <= chunk:
    for job in jobs:
      yield from _draw_chunk(job)
    return
  context = multiprocessing.get_context('spawn')
  with futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    running = collections.deque()
    for job in jobs:
      running.append(pool.submit(_draw_chunk, job))
      if len(running) > 2 * workers:
        yield from running.popleft().result()
    while running:
      yield from running.popleft().result()
