"""Regenerating the papers' tables and figures: an experiment is a data file under ``configs/paper/``
(the grid at each scale, the paper's reported values with their source, the agreement rule per value),
run through the same grid runner as ``leakbench run``, and rendered as a table of the paper's value
beside ours (``leakbench paper list | run | report``)."""
