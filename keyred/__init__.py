"""keyred: state reduction and state tracking in linear attention.

Importing the package is cheap (no torch, no fla); stages import what they need.
"""

__version__ = "0.1.0"
