"""A ``deqdiff.DEQ`` layer inside an ordinary PyTorch classifier, trained on scikit-learn digits.

The model is ``stem → DEQ → head``: the stem embeds the 8×8 image, the DEQ layer returns the
equilibrium z* = tanh(W z* + x) of its cell (Bai, Kolter & Koltun 2019, "Deep Equilibrium
Models": the limit of an infinitely deep weight-tied network), the head classifies z*.
The gradient w.r.t. every parameter is an implicit solve with (I − ∂f/∂z) at z*, never a
backward pass through the solver's iterations. ``deq.last_info`` holds the solver statistics.

Run:  python examples/deq_layer.py            (8 epochs, about half a minute on a CPU)
      python examples/deq_layer.py --quick    (a smoke run in seconds)
"""
import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

import deqdiff

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="tiny sizes: finishes in a few seconds")
args = parser.parse_args()
torch.manual_seed(0)
width, epochs, n_train = (32, 1, 256) if args.quick else (64, 8, 1500)


class Cell(nn.Module):
    """f(z, x) = tanh(W z + x): the layer's map; its fixed point is the layer's output."""

    def __init__(self, width):
        super().__init__()
        self.W = nn.Linear(width, width, bias=False)
        nn.init.orthogonal_(self.W.weight, gain=0.5)  # ‖W‖₂ = 0.5: a contraction at the start

    def forward(self, z, x):
        return torch.tanh(self.W(z) + x)


# spectral norm keeps ‖W‖₂ ≤ 0.8 during training (one power-iteration step per solve), so
# the cell stays a contraction (tanh is 1-Lipschitz) and every solve converges
cell = deqdiff.layers.apply_spectral_norm(Cell(width), coeff=0.8)
deq = deqdiff.DEQ(cell, tol=1e-4, max_iter=100)  # any fixed_point option goes here
model = nn.Sequential(nn.Flatten(), nn.Linear(64, width), deq, nn.Linear(width, 10))

# scikit-learn's digits (1797 images of 8×8 pixels, shipped with the package: no download)
data = load_digits()
X = torch.tensor(data.data, dtype=torch.float32) / 16.0
y = torch.tensor(data.target)
perm = torch.randperm(len(X))
train, test = perm[:n_train], perm[1500:]

opt = torch.optim.Adam(model.parameters(), lr=3e-3)
for epoch in range(epochs):
    for idx in train[torch.randperm(len(train))].split(64):
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()  # dL/dθ by one implicit (adjoint) solve per batch
        opt.step()
    print(f"epoch {epoch + 1}: last batch loss {loss.item():.3f}")

# the statistics of the last training batch: one forward solve, one derivative solve
info = deq.last_info
print("forward:   ", info.forward.summary())
print("derivative:", info.derivatives[0].summary())

model.eval()
with torch.no_grad():
    accuracy = (model(X[test]).argmax(1) == y[test]).float().mean().item()
info = deq.last_info
print(f"test accuracy {100 * accuracy:.1f} % on {len(test)} held-out digits")
print(f"test solve: mean {info.forward.iterations.float().mean():.1f} iterations per sample, "
      f"max relative residual {info.forward.rel_residual.max():.1e}, all converged: {info.forward.all_converged}")
