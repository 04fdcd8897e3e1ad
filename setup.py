"""flaxlab: readable, tested, fast JAX/Flax models and training runs.

Install for running experiments:        pip install -e .
Install for the test suite:             pip install -e ".[test]"
Add TensorFlow Datasets sources:        pip install -e ".[tfds]"
Hugging Face / PyTorch interop:         pip install -e ".[interop]"
Searches and embedding pictures:        pip install -e ".[research]"
"""
from setuptools import find_packages, setup

setup(
    name="flaxlab",
    version="0.1.0",
    description="JAX/Flax research codebase: transformers, vision, recurrent, "
    "generative models, compression and ablations.",
    python_requires=">=3.11",
    packages=find_packages(include=["configs", "configs.*", "models", "models.*",
                                    "train", "train.*"]),
    install_requires=[
        # Lower bounds: the oldest versions the test suite and the benchmarks have been
        # run with.
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.4",
        "absl-py>=2.1",
        "ml-collections>=1.0",
        "numpy>=1.26",
        "matplotlib>=3.8",      # loss curves, sweep plots
        "tensorboardX>=2.6",    # TensorBoard event files without TensorFlow
        "sacrebleu>=2.4",       # BLEU for sequence-to-sequence tasks
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "chex>=0.1.87"],
        "tfds": ["tensorflow-datasets>=4.9.7"],  # no TensorFlow needed
        # Pretrained weights in and out (train/convert.py, train/interop/). torch only to
        # build reference models in the tests and read pickles; <=2.13.0 keeps pip on the
        # CPU build (the newest release pulls a several-GB CUDA build).
        "interop": ["torch>=2.11,<=2.13.0", "transformers>=5,<6", "safetensors>=0.4",
                    "tokenizers>=0.20"],
        # The research workflow: Bayesian / random hyper-parameter search (train/search.py:
        # Optuna's samplers and pruners, its study stored in the sweep's workdir) and
        # t-SNE of embeddings (scikit-learn).
        "research": ["optuna>=4", "scikit-learn>=1.4"],
    },
)
