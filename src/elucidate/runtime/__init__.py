"""What every part shares at run time: counter-based random draws from (seed, step), torch.distributed
(set-up, reductions, sharded sampling), the arithmetic precision, and atomic file writes.

May import: errors.
"""
