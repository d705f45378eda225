"""Chamfer distance between two point sets, with KD-trees: O(N log N) time, O(N) memory."""
import numpy as np
import torch
from scipy.spatial import cKDTree


def _as_points(points, name: str) -> np.ndarray:
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().numpy()
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] point set, got shape {points.shape}")
    return points


def chamfer_distance(S1, S2) -> np.float64:
    """CD(S1, S2) = sum_{x in S1} min_{y in S2} ||x - y||^2 + sum_{y in S2} min_{x in S1} ||x - y||^2.

    S1: [N, D] and S2: [M, D], torch tensors (any device) or arrays. Nearest neighbours come from
    a KD-tree over each set, so 100k x 100k points take seconds and never build an N x M matrix.
    Returns a numpy float64 (a subclass of float), as the course's does: its notebook calls .item().
    """
    s1, s2 = _as_points(S1, "S1"), _as_points(S2, "S2")
    if s1.shape[1] != s2.shape[1]:
        raise ValueError(f"S1 and S2 must have the same dimension, got {s1.shape[1]} and {s2.shape[1]}")
    dist_s1_to_s2, _ = cKDTree(s2).query(s1, workers=-1)
    dist_s2_to_s1, _ = cKDTree(s1).query(s2, workers=-1)
    return np.square(dist_s1_to_s2).sum() + np.square(dist_s2_to_s1).sum()
