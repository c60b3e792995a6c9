"""Load tests: scripts that print ratios against a baseline measured in the same run.

Figures and how to run each: docs/performance.md.
"""
