# Shim for nnU-Net's trainer discovery (see nnunet_plugins/_autoregister.py). nnU-Net imports this
# file as a top-level module and looks up the requested class name on it; every trainer of the
# package is re-exported here under its own name, imported by absolute module path so that the
# class objects are the package's own.
from nnunet_plugins.trainers import *  # noqa: F401,F403
