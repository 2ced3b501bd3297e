"""attrib_jax: data attribution for text-to-image diffusion models in JAX/Flax."""
import setuptools

setuptools.setup(
    name="attrib_jax",
    version="0.1.0",
    description=("Which training images made this generated image? Attribution by "
                 "unlearning, counterfactual evaluation and FastGDA in JAX/Flax."),
    license="Apache-2.0",
    packages=setuptools.find_packages(include=["attrib_jax", "attrib_jax.*"]),
    python_requires=">=3.11,<3.14",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "tensorflow-datasets",
        "importlib_resources",  # imported by tensorflow-datasets, not declared by it
        "array-record",         # TFDS's array_record reader: the one format readable without TF
        "etils",                # TFDS's path type (epath), used directly by the COCO builder
        "scann",                # FastGDA's nearest-neighbour index (attrib_jax/distill/index.py)
        "absl-py",
        "ml-collections",
        "safetensors",
        "numpy",
        "scipy",                # LDS's ranks, the detector's connected components, TRAK's Cholesky
        "pillow",
        "matplotlib",  # the evaluation's plots (Agg backend, no display)
        "regex",  # the CLIP tokenizer's pre-tokenisation pattern needs \p{L} classes
    ],
    extras_require={
        # torch is the CPU wheel that lies on disk here; any other spec pulls a CUDA build.
        # diffusers and transformers (PyTorch) are the numerical references of the parity tests
        # and benchmarks; the package itself only reads their file formats.
        "test": ["pytest", "torch==2.13.0", "transformers", "diffusers"],
    },
)
