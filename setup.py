"""DD-UGM for Gadgetron: dual-domain score-based reconstruction of undersampled cine MRI."""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# gadgets/guard.py: a one-line .pth in site-packages registers an import hook so that, when
# Gadgetron runs `python -m gadgetron PORT gadgets.external reconstruct`, our checked readers
# read the stream from its first byte (the gadgetron package's own start-up reads spin forever
# on a vanished peer). Written by build_py for regular installs and added to editable wheels.
GUARD_PTH = "ddugm_gadgetron_guard.pth"
GUARD_LINE = "import sys; exec('try:\\n import gadgets.guard as g\\n g.install()\\nexcept Exception:\\n pass')\n"


class BuildPyWithGuard(build_py):
    def run(self):
        super().run()
        os.makedirs(self.build_lib, exist_ok=True)
        with open(os.path.join(self.build_lib, GUARD_PTH), "w", encoding="utf-8") as f:
            f.write(GUARD_LINE)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, GUARD_PTH)]


cmdclass = {"build_py": BuildPyWithGuard}
try:  # editable installs (pip install -e .) build a wheel of their own
    from setuptools.command.editable_wheel import editable_wheel

    class _GuardStrategy:
        def __init__(self, inner):
            self.inner = inner

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def __call__(self, wheel, files, mapping):
            self.inner(wheel, files, mapping)
            wheel.writestr(GUARD_PTH, GUARD_LINE.encode("utf-8"))

    class EditableWheelWithGuard(editable_wheel):
        def _select_strategy(self, *args, **kwargs):
            return _GuardStrategy(super()._select_strategy(*args, **kwargs))

    cmdclass["editable_wheel"] = EditableWheelWithGuard
except ImportError:  # pragma: no cover - old setuptools: regular installs still get the guard
    pass

setup(
    name="ddugm-gadgetron",
    version="0.1.0",
    description="DD-UGM (dual-domain universal generative model) cine MRI reconstruction for Gadgetron",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["ddugm_core", "ddugm_core.*", "gadgets", "gadgets.*"]),
    package_data={"ddugm_core": ["weights/*.safetensors", "weights/*.json", "weights/*.md", "weights/*.csv"]},
    include_package_data=True,
    # torch is deliberately unpinned above a floor: a CPU wheel already installed satisfies it,
    # and on a GPU host the CUDA wheel the user installed is kept.
    install_requires=[
        "torch>=2.1",
        "numpy>=1.23",
        "scipy>=1.9",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pillow>=9.0",
        "gadgetron>=1.4.1",
        "ismrmrd>=1.14",
        "h5py>=3",
        "mrd-python>=2.1",
    ],
    extras_require={
        "test": ["pytest>=7"],
        "dev": ["pytest>=7", "ruff"],
    },
    data_files=[("share/ddugm/config", ["config/recon.yaml", "config/ddugm_cine_execute.xml",
                                          "config/ddugm_cine_connect.xml", "config/ddugm_cine_acquisitions.xml"])],
    entry_points={"console_scripts": ["ddugm=gadgets.cli:main"]},
    cmdclass=cmdclass,
)
