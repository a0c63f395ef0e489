"""The fla boundary: model families, fla model building, and the CPU kernel seam."""
