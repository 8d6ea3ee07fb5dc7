"""``bnff.tiling``: seed 003's pointwise-convolution tiling (``bnff tile``).

``gemm``: a 1x1 convolution as a tiled GEMM against an on-chip buffer, tile-visiting orders
(row, column, Scan), exact DRAM counts by replay and the tile-size search; ``layers``: the
pointwise layers of a zoo model as GEMMs.
"""
