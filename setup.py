"""Install: pip install torch==2.14.1 torchvision==0.29.1 && pip install -e ".[test]"

torch is pinned in the README rather than here: the wheel that matches the machine's CUDA (or
CANN) stack is the user's choice, and any torch >= 2.4 works.
"""
from setuptools import find_packages, setup

setup(
    name="resnet-shards",
    version="0.1.0",
    description="Data-pipeline-first ResNet training on ImageNet and CIFAR shards",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["convert", "pipeline", "train", "kernels", "benchmarks"]),
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "webdataset>=0.2.86",
        "numpy>=1.24",
        "Pillow>=10.0",
        "numba>=0.59",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=7"],
        "bench": ["matplotlib>=3.7"],
        "dali": ["nvidia-dali-cuda130"],
        "npu": ["torch_npu"],
        # pillow-simd must replace Pillow, not sit beside it, and builds from source with AVX2:
        #   pip uninstall -y pillow && CC="cc -mavx2" pip install --no-binary :all: pillow-simd
        # (README, "Faster CPU decode"). This extra installs nothing so it cannot break PIL.
        "simd": [],
    },
    entry_points={
        "console_scripts": [
            "imagenet-to-shards=convert.imagenet_to_shards:main",
            "cifar-to-shards=convert.cifar_to_shards:main",
            "synthetic-imagenet=convert.synthetic:main",
        ],
    },
)
