"""DEQ models following the model protocol: each exposes ``model.deq`` (a ``deqdiff.DEQ``) and
``model(x, **solver_overrides)``.

* monotone DEQs (Winston & Kolter 2020; Nguyen 2022 §2.3.2, §3.2): :mod:`.monotone`,
  :mod:`.monotone_conv`;
* convolutional DEQ of eq. 4.1 and its repeat-k counterpart: :mod:`.conv`;
* multiscale DEQ (Bai, Koltun & Kolter 2020): :mod:`.mdeq`;
* inverse-problem DEQ and its unrolled counterpart (Gilton, Ongie & Willett 2021): :mod:`.inverse`;
* sequence DEQ (DEQ-Transformer, Bai, Kolter & Koltun 2019) and its unrolled counterpart: :mod:`.transformer`.
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
from .inverse import Blur, GaussianBlur, Identity, InverseCell, InverseDEQ, InverseUnrolled
from .transformer import DEQTransformerLM, TransformerCell, UnrolledTransformerLM, unrolled_from_deq

__all__ = [
    "DEQTransformerLM",
    "TransformerCell",
    "UnrolledTransformerLM",
    "unrolled_from_deq",
    "Blur",
    "GaussianBlur",
    "Identity",
    "InverseCell",
    "InverseDEQ",
    "InverseUnrolled",
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
