"""nnunet-plugins: research segmentation methods and challenge tooling as plugins for nnU-Net v2.

Importing this package is cheap (no torch, no nnU-Net); the methods live in the sub-packages
``architectures``, ``trainers`` and ``planners``, and ``nnunet_plugins.registry`` lists them.
"""
__version__ = "0.1.0"
