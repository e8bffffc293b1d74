"""Packaging for nnunet-plugins.

Besides the package itself, the wheel carries one file at the top of site-packages,
``nnunet_plugins_autoregister.pth``. Python runs the ``import`` line of every ``.pth`` file at
interpreter start-up, and ours adds the package's trainer shim folder to nnU-Net's
``nnUNet_extTrainer`` search path (``nnunet_plugins/_autoregister.py``, which imports nothing
heavy). That is what lets ``nnUNetv2_train ... -tr CoTrTrainer`` and ``nnUNetv2_predict`` find our
trainers with no manual step after ``pip install``.
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH_NAME = "nnunet_plugins_autoregister.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_pth(build_py):
    """build_py that also places the auto-registration .pth file at the wheel's root."""

    def run(self):
        super().run()
        self.copy_file(os.path.join(HERE, "nnunet_plugins", "_pth", PTH_NAME),
                       os.path.join(self.build_lib, PTH_NAME), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]


def read_version():
    with open(os.path.join(HERE, "nnunet_plugins", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"\'')
    raise RuntimeError("no __version__ in nnunet_plugins/__init__.py")


setup(
    name="nnunet-plugins",
    version=read_version(),
    description="Research segmentation methods (CoTr, DoDNet, TransDoDNet, UniSeg, BA-Net, LeFeD, VerSemi, "
                "MedSeqFT) and challenge tooling as plugins for nnU-Net v2",
    packages=find_packages(include=["nnunet_plugins", "nnunet_plugins.*"]),
    package_data={"nnunet_plugins": ["nnunet_ext_trainers/*.py", "_pth/*.pth"]},
    python_requires=">=3.10",
    install_requires=[
        # the nnU-Net range this package is tested against (trainer discovery, plans layout and the
        # predictor API are version-specific)
        "nnunetv2>=2.8.1,<2.9",
        "torch>=2.1",
        "dynamic-network-architectures>=0.4.1,<0.5",
        "batchgeneratorsv2>=0.3",
        "acvl-utils>=0.2",
        "SimpleITK>=2.2",
        "numpy",
        "scipy",
    ],
    # test-only references: surface-distance (DeepMind's surface Dice, baseline of the equality tests and of
    # benchmarks/bench_surface_distance.py) and medpy (Dice/Jaccard/HD95/ASD as the semi-supervised papers report)
    extras_require={"test": ["pytest>=7", "surface-distance>=0.1", "medpy"]},
    entry_points={"console_scripts": ["nnunet-plugins = nnunet_plugins.cli:main"]},
    cmdclass={"build_py": build_py_with_pth},
)
