"""The fla boundary: everything keyred knows about fla, and the one place that changes it.

`families` (model families, sizes, key/value arithmetic) and `sites` (every fla name keyred
replaces) are cheap to import; `patching` makes every replacement; `backend` is the CPU seam,
`torch_ops` fla's delta-rule op signatures over keyred's torch kernels, `models` fla's classes
by family and model building (importing it imports fla and installs the seam).
"""
