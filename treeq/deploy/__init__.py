"""Deployment: bit-packing, integer linears and their GEMM back-ends, folding transforms, export."""
