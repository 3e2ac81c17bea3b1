"""Tests of cytologia.detection (a package: its module names repeat those of other test folders)."""
