"""Training-side pieces shared by the trainers: losses, boundary targets, binary channels, samplers, splits.

(This file makes ``training`` a regular package: setup.py's ``find_packages`` skips folders without one, so
the installed wheel would lack these modules.)
"""
