"""sparkme: SparK masked-image-modeling pretraining for ConvNets with true sparse convolution.

MinkowskiEngine has no installable wheel on PyPI: ``sparkme-install-minkowski`` (or ``python
tools/install_minkowski.py`` in a checkout) builds, caches and installs it for the torch in the current environment
(the README's commands run it for you). The hydra configs live in the top-level ``conf/``; ``sparkme/conf`` links to
it, so wheels and non-editable installs carry them as package data.
"""

from pathlib import Path

from setuptools import find_namespace_packages, find_packages, setup

HERE = Path(__file__).parent

setup(
    name="sparkme",
    version="0.1.0",
    license="MIT",
    description="SparK pretraining for ConvNets with true sparse convolution (MinkowskiEngine, pure-torch, masked)",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # sparkme/conf (a link to conf/) and its group folders hold only YAML: declared as data packages, so setuptools
    # neither skips them nor warns that each "would be ignored"
    packages=find_packages(include=["sparkme", "sparkme.*"], exclude=["sparkme.conf", "sparkme.conf.*"])
    + find_namespace_packages(include=["sparkme.conf", "sparkme.conf.*"]),
    include_package_data=True,
    package_data={"sparkme.conf": ["*.yaml", "**/*.yaml"]},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "timm>=1.0.9",
        "numpy>=1.24",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "wandb>=0.17",
        "scikit-image>=0.22",
        "pillow>=10",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        "slurm": ["hydra-submitit-launcher>=1.2"],
        "shards": ["webdataset>=0.2.100"],
        # 3-D encoders. dynamic-network-architectures 0.4.3+ pins timm<1.0.23, which would downgrade the 2-D models'
        # timm for everyone: 0.4.1-0.4.2 hold the same ResidualEncoderUNet without that pin.
        "volumes": ["dynamic-network-architectures>=0.4.1,<0.4.3", "monai>=1.3", "nibabel>=5"],
        "dev": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.6", "hydra-submitit-launcher>=1.2", "scikit-learn>=1.3",
                "webdataset>=0.2.100", "dynamic-network-architectures>=0.4.1,<0.4.3", "monai>=1.3", "nibabel>=5",
                # nnU-Net's own loader checks format=nnunet; with DNA < 0.4.3 pip picks nnunetv2 2.7 (timm unpinned)
                "nnunetv2>=2.5",
                # U-Nets on the exported encoders (format=smp; tests/test_segmentation_smp.py)
                "segmentation-models-pytorch>=0.6",
                "mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
    },
    entry_points={
        "console_scripts": [
            "sparkme-pretrain=sparkme.cli:main",
            "sparkme-export=sparkme.export:main",
            "sparkme-probe=sparkme.evaluation.cli:main",
            "sparkme-bench=sparkme.bench:main",
            "sparkme-finetune=sparkme.finetune.cli:main",
            "sparkme-shards=sparkme.data.shards.cli:main",
            "sparkme-install-minkowski=sparkme.install.minkowski:cli",
        ]
    },
)
