"""Draw images/qs.png, the picture of q(x_t) that the course's ddpm_tutorial.ipynb displays
("You should be able to see the distributions as below", it opens ../assets/images/qs.png).

    cd task1/2d_plot_diffusion_todo && PYTHONPATH=. python ../assets/make_qs.py

It is this folder's own forward process: 500 Swiss-roll points noised to t = 0, 50, ..., 450 by
DiffusionModule.q_sample with the course's schedule (T = 1000, linear betas 1e-4..0.02).
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from dataset import TwoDimDataClass  # noqa: E402
from ddpm import BaseScheduler, DiffusionModule  # noqa: E402
from network import SimpleNet  # noqa: E402

NUM_POINTS = 500

torch.manual_seed(0)
target = TwoDimDataClass(dataset_type="swiss_roll", N=NUM_POINTS, batch_size=NUM_POINTS)[:NUM_POINTS]
ddpm = DiffusionModule(SimpleNet(2, 2, [128, 128, 128], 1000), BaseScheduler(1000))

fig, axs = plt.subplots(1, 10, figsize=(28, 3))
for ax, t in zip(axs, range(0, 500, 50)):
    x_t = ddpm.q_sample(target, torch.full((NUM_POINTS,), t))
    ax.scatter(x_t[:, 0], x_t[:, 1], color="white", edgecolor="gray", s=5)
    ax.set_axis_off()
    ax.set_title(f"$q(\\mathbf{{x}}_{{{t}}})$")
out = Path(__file__).resolve().parent / "images" / "qs.png"
fig.savefig(out, dpi=60, bbox_inches="tight")
print(f"wrote {out.name}")
