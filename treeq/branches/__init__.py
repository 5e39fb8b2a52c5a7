"""Full-precision branches beside quantized linears (low-rank now, General Monarch Branch next).

A branch is any nn.Module with `forward(x)` on the layer's unquantized (transformed) input and
`dense()` returning the (out_features, in_features) matrix it applies; QuantLinear.attach_branch
subtracts dense() from the weight so the quantized path holds the residual.
"""
