"""Load tests: scripts that print ratios against a baseline run in the same run (docs/performance.md)."""
