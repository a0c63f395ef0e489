"""Key reduction: the methods and their settings (methods), where the key channels of a layer live
(channels), calibration, each method's selection, surgery, one pruning (prune), strong RRQR
(rrqr), and the per-model sweep over ratios with LoRA recovery and evaluation (sweep)."""
