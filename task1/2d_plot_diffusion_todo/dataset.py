"""The course's 2D toy data sets, normalised as the course does (global mean and std, scale 2)."""
import numpy as np
import torch
from sklearn import datasets
from torch.utils.data import DataLoader, Dataset

DATASETS = ("swiss_roll", "scurve", "moon", "circle", "checkerboard", "gaussian_centered", "gaussian_shift")


def normalize(ds: np.ndarray, scaling_factor: float = 2.0) -> np.ndarray:
    """Centre by the mean and divide by the std over all coordinates (one scalar each), then scale."""
    return (ds - ds.mean()) / ds.std() * scaling_factor


def sample_checkerboard(n: int) -> np.ndarray:
    """About 1.5n points uniform on half the squares of a 4x4 checkerboard on [-2pi, 2pi]^2."""
    half_width = 2 * np.pi
    candidates = np.random.uniform(-half_width, half_width, size=(3 * n, 2))
    on_kept_square = np.sin(candidates[:, 0]) * np.sin(candidates[:, 1]) < 0
    return candidates[on_kept_square]


def load_twodim(num_samples: int, dataset: str, dimension: int = 2) -> torch.Tensor:
    """num_samples points of a 2D data set -> [num_samples, 2] float32 (uses numpy's global RNG)."""
    if dataset == "gaussian_centered":
        sample = np.random.normal(size=(num_samples, dimension))
    elif dataset == "gaussian_shift":
        sample = np.random.normal(size=(num_samples, dimension)) + 1.5
    elif dataset == "circle":
        points, _ = datasets.make_circles(n_samples=num_samples, noise=0.0, factor=0.5)
        sample = points * 4
    elif dataset == "scurve":
        points, _ = datasets.make_s_curve(n_samples=num_samples, noise=0.0)
        sample = normalize(points[:, [0, 2]])
    elif dataset == "moon":
        points, _ = datasets.make_moons(n_samples=num_samples, noise=0.0)
        sample = normalize(points)
    elif dataset == "swiss_roll":
        # The roll's (x, z) coordinates: a planar spiral r = t at angle t, t in [1.5pi, 4.5pi].
        points, _ = datasets.make_swiss_roll(n_samples=num_samples, noise=0.0, hole=True)
        sample = normalize(points[:, [0, 2]])
    elif dataset == "checkerboard":
        sample = normalize(sample_checkerboard(num_samples))[:num_samples]
    else:
        raise ValueError(f"unknown 2D data set {dataset!r}; choose from {', '.join(DATASETS)}")
    return torch.from_numpy(sample).float()


class TwoDimDataClass(Dataset):
    def __init__(self, dataset_type: str, N: int, batch_size: int, dimension: int = 2):
        self.X = load_twodim(N, dataset_type, dimension=dimension)
        self.name = dataset_type
        self.batch_size = batch_size
        self.dimension = dimension

    def __len__(self):
        return self.X.shape[0]

    def __getitem__(self, idx):
        return self.X[idx]

    def get_dataloader(self, shuffle: bool = True) -> DataLoader:
        return DataLoader(self, batch_size=self.batch_size, shuffle=shuffle)


def get_data_iterator(iterable):
    """Cycle through a DataLoader forever."""
    while True:
        yield from iterable
