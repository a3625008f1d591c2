"""DEQ models following the model protocol: each exposes ``model.deq`` (a ``deqdiff.DEQ``) and
``model(x, **solver_overrides)``.

* monotone DEQs (Winston & Kolter 2020; Nguyen 2022 §2.3.2, §3.2): :mod:`.monotone`,
  :mod:`.monotone_conv`;
* convolutional DEQ of eq. 4.1 and its repeat-k counterpart: :mod:`.conv`;
* multiscale DEQ (Bai, Koltun & Kolter 2020): :mod:`.mdeq`.
"""

from .monotone import (
    MonotoneDEQ,
    MonotoneLinear,
    fb_alpha_bound,
    fb_contraction_factor,
    lipschitz_bound,
    state_norm_bound,
)
from .monotone_conv import MonotoneConv, MonotoneConvDEQ, FourierMonotone

from .conv import ConvCell, ConvDEQ, ConvRepeat, WeightTied, repeat_from_deq, repeat_k
from .fno import FNODEQ, FNOExplicit, FourierCell, SpectralConv2d
from .mdeq import MDEQ, MDEQCell, WeightNormConv2d, mdeq_cifar10, mdeq_digits

__all__ = [
    "ConvCell",
    "ConvDEQ",
    "ConvRepeat",
    "FNODEQ",
    "FNOExplicit",
    "FourierCell",
    "SpectralConv2d",
    "MDEQ",
    "MDEQCell",
    "WeightNormConv2d",
    "mdeq_cifar10",
    "mdeq_digits",
    "WeightTied",
    "repeat_from_deq",
    "repeat_k",
    "MonotoneDEQ",
    "MonotoneLinear",
    "MonotoneConv",
    "MonotoneConvDEQ",
    "FourierMonotone",
    "fb_alpha_bound",
    "fb_contraction_factor",
    "lipschitz_bound",
    "state_norm_bound",
]
