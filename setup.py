"""Install: pip install torch==2.14.1 torchvision==0.29.1 && pip install -e ".[test]"

torch is pinned in the README rather than here: the wheel that matches the machine's CUDA (or
CANN) stack is the user's choice, and any torch >= 2.4 works.
"""
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


def jpeg_extension() -> Extension:
    """ROI JPEG decode against the system's libjpeg-turbo (Debian: libjpeg62-turbo-dev).

    From Python 3.11 on it is built for the stable ABI (the buffer protocol joined it in 3.11):
    one `_jpeg.abi3.so` then imports on every later Python, a GPU machine's 3.12 included.
    """
    abi3 = sys.version_info >= (3, 11)
    return Extension("kernels._jpeg", sources=["kernels/_jpeg.c"], extra_compile_args=["-O3"],
                     libraries=["jpeg"], py_limited_api=abi3,
                     define_macros=[("Py_LIMITED_API", "0x030B0000")] if abi3 else [])


def resize_extension() -> Extension:
    """Crop-resize-flip with AVX2 / AVX-512 paths picked at run time (kernels/_resize.c).

    No -march flag: the SIMD functions carry their own target attributes, so one build runs on
    every x86-64 machine (and elsewhere with the portable path). Stable ABI as for _jpeg.
    """
    abi3 = sys.version_info >= (3, 11)
    return Extension("kernels._resize", sources=["kernels/_resize.c"], extra_compile_args=["-O3"],
                     py_limited_api=abi3, define_macros=[("Py_LIMITED_API", "0x030B0000")] if abi3 else [])


class OptionalBuildExt(build_ext):
    """The extensions are fast paths, not requirements: without libjpeg-turbo's headers the
    install still succeeds and the loader falls back to Pillow (it says so once); without
    kernels._resize the numba resize runs."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any build failure means "no fast path"
            print(f"warning: kernels._jpeg not built ({e}); install libjpeg-turbo headers "
                  f"(Debian: libjpeg62-turbo-dev) for the ROI decode fast path", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"warning: {ext.name} not built ({e})", file=sys.stderr)


setup(
    name="resnet-shards",
    version="0.1.0",
    description="Data-pipeline-first ResNet training on ImageNet and CIFAR shards",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["convert", "pipeline", "train", "kernels", "benchmarks"]),
    ext_modules=[jpeg_extension(), resize_extension()],
    cmdclass={"build_ext": OptionalBuildExt},
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
        "test": ["pytest>=7", "pytest-xdist>=3.5", "matplotlib>=3.7", "scikit-image>=0.19", "atheris>=2.3; sys_platform == 'linux'",
                 "pyarrow>=12", "s3fs>=2024.2", "moto[server]>=5.0",  # S3 tests: moto's server on loopback
                 "tensorboard"],
        "bench": ["matplotlib>=3.7", "scikit-image>=0.19"],  # photos for benchmarks.photos
        "parquet": ["pyarrow>=12"],  # convert.parquet_to_shards: the Hugging Face hub's parquet files
        "dali": ["nvidia-dali-cuda130"],
        "s3": ["s3fs>=2024.2"],    # shards and conversions in s3:// buckets (and S3-compatible stores)
        "gcs": ["gcsfs>=2024.2"],  # gs:// buckets
        "npu": ["torch_npu"],
        "tensorboard": ["tensorboard"],  # train.run --tensorboard
        # pillow-simd must replace Pillow, not sit beside it, and builds from source with AVX2:
        #   pip uninstall -y pillow && CC="cc -mavx2" pip install --no-binary :all: pillow-simd
        # (README, "Faster CPU decode"). This extra installs nothing so it cannot break PIL.
        "simd": [],
    },
    entry_points={
        "console_scripts": [
            "imagenet-to-shards=convert.imagenet_to_shards:main",
            "cifar-to-shards=convert.cifar_to_shards:main",
            "parquet-to-shards=convert.parquet_to_shards:main",
            "synthetic-imagenet=convert.synthetic:main",
            "resnet-train=train.run:main",
            "resnet-train-plot=train.plot:main",
        ],
    },
)
