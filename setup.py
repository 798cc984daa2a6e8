"""DD-UGM for Gadgetron: dual-domain score-based reconstruction of undersampled cine MRI."""
from setuptools import find_packages, setup

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
    ],
    extras_require={
        "test": ["pytest>=7"],
        "dev": ["pytest>=7", "ruff"],
    },
    data_files=[("share/ddugm/config", ["config/recon.yaml", "config/ddugm_cine_execute.xml",
                                          "config/ddugm_cine_connect.xml", "config/ddugm_cine_acquisitions.xml"])],
    entry_points={"console_scripts": ["ddugm=gadgets.cli:main"]},
)
