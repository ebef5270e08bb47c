"""moe_dispatch: pluggable Mixture-of-Experts token dispatch kernels for PyTorch.

The optional CUDA extension in csrc/ is built only when MOE_DISPATCH_BUILD_CUDA=1, a CUDA torch
and nvcc are present; everything imports and runs without it.
"""
import os

from setuptools import find_packages, setup

# The models follow transformers' KV-cache and mask conventions of 5.17+ (Cache.get_mask_sizes(
# query_length, layer_idx), no cache_position); 5.24 renamed past_key_values to cache, and both
# work. CI runs the suite on the newest release pip resolves and the model tests on this bound.
# No upper bound: no newer release is known broken.
TRANSFORMERS_LOWER_BOUND = "5.17.0"
TRANSFORMERS = f"transformers>={TRANSFORMERS_LOWER_BOUND}"

ext_modules, cmdclass = [], {}
if os.environ.get("MOE_DISPATCH_BUILD_CUDA") == "1":
    import glob

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if sources:
        # Architectures: TORCH_CUDA_ARCH_LIST, else those of the visible GPUs (torch's default).
        ext_modules = [CUDAExtension("moe_dispatch._C", sources,
                                     extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr"]})]
        cmdclass = {"build_ext": BuildExtension}

setup(
    name="moe_dispatch",
    version="0.1.0",
    description="Pluggable Mixture-of-Experts token-dispatch kernels for PyTorch",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["moe_dispatch", "moe_dispatch.*"]),
    # torch>=2.11: the device image has 2.11, CI 2.13. numpy for the benchmark tables.
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "pytest-timeout", "hypothesis", TRANSFORMERS,
                 "safetensors", "triton"],
        "te": ["transformer-engine[pytorch]"],
        "models": [TRANSFORMERS, "safetensors"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["moe-dispatch-bench=moe_dispatch.bench.runner:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
