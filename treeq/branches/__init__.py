"""Full-precision branches beside quantized linears: low-rank (SVDQuant-style) and the General Monarch Branch.

A branch is any nn.Module with `forward(x)` on the layer's unquantized (transformed) input and
`dense()` returning the (out_features, in_features) matrix it applies; QuantLinear.attach_branch
subtracts dense() from the weight so the quantized path holds the residual.
"""
from .lowrank import LowRankBranch
from .monarch import MonarchBranch, monarch_shape

# name -> branch class: `from_weight(weight, **options)` initialises one from a weight, the
# constructor `(in_features, out_features, **describe())` builds an empty one for loading.
BRANCHES = {"lowrank": LowRankBranch, "monarch": MonarchBranch}
