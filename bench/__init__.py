"""zmqrun bench suite: every figure measured side by side in one run.

Run ``python -m bench`` (full) or ``python -m bench --quick`` (bounded, < 1 min).
"""
