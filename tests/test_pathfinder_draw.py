"""The numpy Pathfinder generator: geometry, labels, balance, determinism."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from tasks import pathfinder_draw as pd

P32 = pd.params_for(32, 14)
TOL = 1e-3   # vertices come back as float32


def _paddles(vertices: np.ndarray, p: pd.Params) -> np.ndarray:
  """Paddle segments [n, 4] (x0, y0, x1, y1) of a curve's vertices [n+1, 2]."""
  a, b = vertices[:-1].astype(float), vertices[1:].astype(float)
  u = (b - a) / np.linalg.norm(b - a, axis=-1, keepdims=True)
  return np.concatenate([a + p.margin * u, b - p.margin * u], axis=-1)


def _point_segment(q, a, b):
  """Distance from points q to segments a-b ([..., 2], broadcast)."""
  d = b - a
  s = np.clip(((q - a) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-12),
              0, 1)
  return np.linalg.norm(q - a - s[..., None] * d, axis=-1)


def _cross(o, p, q):
  return ((p[..., 0] - o[..., 0]) * (q[..., 1] - o[..., 1])
          - (p[..., 1] - o[..., 1]) * (q[..., 0] - o[..., 0]))


def _segment_gaps(s: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Exact distances [N, M] between segments s [N, 4] and t [M, 4]."""
  a, b = s[:, None, :2], s[:, None, 2:]
  c, d = t[None, :, :2], t[None, :, 2:]
  gap = np.minimum.reduce([_point_segment(a, c, d), _point_segment(b, c, d),
                           _point_segment(c, a, b), _point_segment(d, a, b)])
  crossing = ((_cross(a, b, c) * _cross(a, b, d) < 0)
              & (_cross(c, d, a) * _cross(c, d, b) < 0))
  return np.where(crossing, 0.0, gap)


def _check(p: pd.Params, label: int, image: np.ndarray, geometry) -> None:
  """Every property the geometry must have, read from the geometry alone."""
  size, n = p.image_size, p.contour_length
  curves, markers = geometry['curves'], geometry['markers']
  marker_curve = geometry['marker_curve']
  assert image.shape == (size, size) and image.dtype == np.uint8
  assert curves.shape == (2, n + 1, 2) and curves.dtype == np.float32
  assert markers.shape == (2, 2) and markers.dtype == np.float32
  assert marker_curve.dtype == np.int32 and set(marker_curve) <= {0, 1}

  # Markers sit on ends of the curves they name; the label follows.
  ends = []
  for marker, curve in zip(markers, marker_curve):
    at = [e for e in (0, n) if np.allclose(marker, curves[curve, e], atol=TOL)]
    assert len(at) == 1, (marker, curves[curve, [0, -1]])
    ends.append(at[0])
  assert label == int(marker_curve[0] == marker_curve[1])
  if label:
    assert sorted(ends) == [0, n]   # the two different ends of one curve

  # Marker centres are lit (full white: the ramp starts at radius - 0.5).
  for x, y in markers:
    assert image[int(y), int(x)] == 255

  distractors = geometry['distractors']
  all_curves = list(curves) + list(distractors)
  step = p.paddle_length + 2 * p.margin
  segments, owner, index = [], [], []
  for c, vertices in enumerate(all_curves):
    edges = np.diff(vertices.astype(float), axis=0)
    np.testing.assert_allclose(np.linalg.norm(edges, axis=-1), step,
                               atol=TOL)
    turns = np.arctan2(edges[1:, 1], edges[1:, 0]) - np.arctan2(
        edges[:-1, 1], edges[:-1, 0])
    turns = (turns + np.pi) % (2 * np.pi) - np.pi
    assert np.all(np.abs(turns) <= np.pi / (2 * p.continuity) + TOL)
    paddles = _paddles(vertices, p)
    segments.append(paddles)
    owner += [c] * len(paddles)
    index += list(range(len(paddles)))
    # Paddle midpoints (= edge midpoints) are lit.
    mid = (vertices[:-1] + vertices[1:]) / 2
    assert np.all(image[mid[:, 1].astype(int), mid[:, 0].astype(int)] > 0)
  segments = np.concatenate(segments)
  owner, index = np.array(owner), np.array(index)

  # Inside the image: paddle bodies keep `margin` from the border.
  inner = p.paddle_thickness / 2 + p.margin
  assert segments.min() >= inner - TOL
  assert segments.max() <= size - inner + TOL

  # Clear of each other: gap >= margin between bodies of different curves
  # and of non-consecutive paddles of one curve; consecutive ones are dashed.
  gaps = _segment_gaps(segments, segments) - p.paddle_thickness
  same = owner[:, None] == owner[None, :]
  apart = np.abs(index[:, None] - index[None, :])
  assert np.all(gaps[~same] >= p.margin - TOL)
  assert np.all(gaps[same & (apart >= 2)] >= p.margin - TOL)
  assert np.all(gaps[same & (apart == 1)] > 0)

  # All four target ends are clear like marker discs.
  ends = np.array([curves[0, 0], curves[0, -1], curves[1, 0], curves[1, -1]],
                  float)
  r = p.marker_radius
  assert ends.min() >= r + p.margin - TOL
  assert ends.max() <= size - r - p.margin + TOL
  spacing = np.linalg.norm(ends[:, None] - ends[None, :], axis=-1)
  assert np.all(spacing[~np.eye(4, dtype=bool)] >= 2 * r + p.margin - TOL)
  end_paddle = [(0, 0), (0, n - 1), (1, 0), (1, n - 1)]
  for (x, y), (c, k) in zip(ends, end_paddle):
    d = _point_segment(np.array([x, y]), segments[:, :2], segments[:, 2:])
    others = ~((owner == c) & (index == k))
    assert np.all(d[others] >= r + p.paddle_thickness / 2 + p.margin - TOL)


@pytest.fixture(scope='module')
def drawn32():
  """300 images at 32x32, contour 14, alternating labels."""
  out = []
  for i in range(300):
    image, geometry = pd.draw(np.random.default_rng([5, i]), P32, i % 2)
    out.append((i % 2, image, geometry))
  return out


def test_geometry_32(drawn32):
  for label, image, geometry in drawn32:
    _check(P32, label, image, geometry)


def test_distractors_mostly_placed(drawn32):
  placed = np.mean([len(g['distractors']) for _, _, g in drawn32])
  assert placed >= 0.9 * P32.num_distractors


@pytest.mark.parametrize('size,contour', [(32, 6), (64, 9), (128, 14),
                                          (256, 6)])
def test_geometry_other_settings(size, contour):
  p = pd.params_for(size, contour)
  for i in range(4 if size < 128 else 2):
    image, geometry = pd.draw(np.random.default_rng(i), p, i % 2)
    _check(p, i % 2, image, geometry)


def test_label_only_moves_markers():
  images, geometries = [], []
  for label in (0, 1):
    image, geometry = pd.draw(np.random.default_rng(3), P32, label)
    images.append(image.astype(int))
    geometries.append(geometry)
  np.testing.assert_array_equal(geometries[0]['curves'],
                                geometries[1]['curves'])
  np.testing.assert_array_equal(geometries[0]['distractors'],
                                geometries[1]['distractors'])
  # Pixels differ only within a marker's reach of a marked end.
  rows, cols = np.nonzero(images[0] != images[1])
  centres = np.concatenate([g['markers'] for g in geometries])
  d = np.hypot(cols[:, None] + 0.5 - centres[:, 0],
               rows[:, None] + 0.5 - centres[:, 1])
  assert np.all(d.min(axis=1) < P32.marker_radius + 0.5)


def test_classes_balanced_and_alike():
  count = 400
  batch = list(pd.examples(11, 0, count, P32, workers=1))
  labels = np.array([e['label'] for e in batch])
  assert labels.dtype == np.int32 and labels.sum() == count // 2
  stats = {}
  for name, value in (
      ('mean intensity', [e['image'].mean() for e in batch]),
      ('lit pixels', [(e['image'] > 0).sum() for e in batch]),
      ('marker distance', [np.hypot(*(e['markers'][0] - e['markers'][1]))
                           for e in batch])):
    value = np.array(value, float)
    per_class = [value[labels == c] for c in (0, 1)]
    means = [v.mean() for v in per_class]
    errors = [v.std(ddof=1) / math.sqrt(len(v)) for v in per_class]
    stats[name] = means, errors
    print(f'32x32 contour 14, {count} examples, {name}: label 0 '
          f'{means[0]:.2f} +- {errors[0]:.2f}, label 1 '
          f'{means[1]:.2f} +- {errors[1]:.2f}')
  for name in ('mean intensity', 'lit pixels'):
    (m0, m1), (e0, e1) = stats[name]
    assert abs(m0 - m1) < 4 * math.hypot(e0, e1), name


def test_labels_balanced_for_odd_counts():
  labels = [e['label'] for e in pd.examples(2, 1, 7, pd.params_for(32, 6),
                                            workers=1)]
  assert sorted(labels) == [0, 0, 0, 0, 1, 1, 1]


def test_deterministic_and_independent_of_workers():
  p = pd.params_for(32, 6)

  def run(seed, workers, split_index=0):
    return list(pd.examples(seed, split_index, 24, p, workers=workers))

  one, again, two = run(4, 1), run(4, 1), run(4, 2)
  assert [sorted(e) for e in one] == [
      ['curves', 'image', 'label', 'marker_curve', 'markers']] * 24
  for a, b, c in zip(one, again, two):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
      np.testing.assert_array_equal(a[key], c[key])
  for other in (run(5, 1), run(4, 1, split_index=1)):
    assert not all(np.array_equal(a['image'], b['image'])
                   for a, b in zip(one, other))


def test_anti_aliased(drawn32):
  image = drawn32[0][1]
  grey = (image > 0) & (image < 255)
  assert grey.sum() > 0.5 * (image > 0).sum()
  assert len(np.unique(image)) > 20


@pytest.mark.parametrize('field,value', [
    ('continuity', 0.9), ('marker_radius', 1.0), ('seed_distance', 9.0),
    ('paddle_length', 0.0), ('margin', -1.0), ('contour_length', 2),
    ('num_distractors', -1), ('image_size', 32.0)])
def test_invalid_params_name_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(P32, **{field: value})


@pytest.mark.parametrize('size,contour', [(48, 14), (32, 7)])
def test_params_for_rejects_unknown_settings(size, contour):
  field = 'image_size' if size == 48 else 'contour_length'
  with pytest.raises(ValueError, match=field):
    pd.params_for(size, contour)


def test_params_for_settings():
  assert pd.params_for(32, 14) == pd.Params(
      image_size=32, contour_length=14, paddle_length=2.0,
      paddle_thickness=0.5, margin=1.0, marker_radius=1.5, continuity=1.0,
      seed_distance=7.0, distractor_length=4, num_distractors=5)
  path_x = pd.params_for(128, 14)
  assert (path_x.paddle_thickness, path_x.marker_radius, path_x.continuity,
          path_x.seed_distance, path_x.num_distractors) == (1.5, 3.0, 1.8,
                                                             20.0, 8)
  for size in pd.IMAGE_SIZES:
    for contour in pd.CONTOUR_LENGTHS:
      assert pd.params_for(size, contour).distractor_length == contour // 3


def test_bad_label_and_counts():
  with pytest.raises(ValueError, match='label'):
    pd.draw(np.random.default_rng(0), P32, 2)
  with pytest.raises(ValueError, match='count'):
    list(pd.examples(0, 0, -1, P32))


def test_impossible_settings_stop():
  cramped = dataclasses.replace(P32, contour_length=60, max_retries=2,
                                max_restarts=2)
  with pytest.raises(RuntimeError, match='too little room'):
    pd.draw(np.random.default_rng(0), cramped, 1)
