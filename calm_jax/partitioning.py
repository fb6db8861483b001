"""Device mesh, logical axis rules and shardings (jit with in/out shardings is pjit).

Mesh axes are `data` (pure data parallelism), `fsdp` (data parallelism with parameters and
optimizer state sharded) and `tensor` (model parallelism over heads / MLP / vocabulary). The
logical axis names every parameter carries (see `calm_jax.models.layers`) are mapped to mesh axes
by `logical_axis_rules`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or None: replicated). Batch is split over data and fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("augment_embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("connections", None),
    ("lora_rank", None),
    ("mtp_heads", None),
)


@dataclasses.dataclass(frozen=True)
class PartitioningConfig:
    """Mesh shape over (data, fsdp, tensor); -1 takes the remaining devices (at most one -1).

    `num_devices` uses only the first N devices (None: all of them).
    """

    mesh_shape: tuple[int, int, int] = (-1, 1, 1)
    logical_axis_rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES
    num_devices: int | None = None

    def __post_init__(self):
        shape = tuple(int(x) for x in self.mesh_shape)
        if len(shape) != 3 or any(x == 0 or x < -1 for x in shape) or shape.count(-1) > 1:
            raise ValueError(f"partitioning.mesh_shape: expected three positive sizes for "
                             f"{MESH_AXES} with at most one -1, got {self.mesh_shape!r}")
        object.__setattr__(self, "mesh_shape", shape)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    known = math.prod(x for x in shape if x != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"partitioning.mesh_shape: {tuple(shape)} cannot fill "
                             f"{num_devices} devices ({num_devices} is not a multiple of {known})")
        shape = tuple(num_devices // known if x == -1 else x for x in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"partitioning.mesh_shape: expected sizes multiplying to the "
                         f"{num_devices} devices, got {tuple(shape)}")
    return tuple(shape)


def make_mesh(config: PartitioningConfig, devices: Sequence[Any] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if config.num_devices is not None:
        if not 0 < config.num_devices <= len(devices):
            raise ValueError(f"partitioning.num_devices: expected 1..{len(devices)}, "
                             f"got {config.num_devices}")
        devices = devices[:config.num_devices]
    shape = resolve_mesh_shape(config.mesh_shape, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


# The mesh of the innermost `mesh_context` (`with mesh:` leaves no public trace of it).
_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("calm_jax_mesh",
                                                                    default=None)


@contextlib.contextmanager
def mesh_context(mesh: Mesh) -> Iterator[Mesh]:
    """The context that makes `mesh` current for sharding constraints (and for
    `batch_shards`).

    `with mesh:` (deprecated in favour of `jax.set_mesh`, whose abstract mesh makes every jit
    input need a NamedSharding; moving to it is left for later) still works on jax 0.10-0.11.
    """
    token = _MESH.set(mesh)
    try:
        with mesh:
            yield mesh
    finally:
        _MESH.reset(token)


def batch_shards() -> int:
    """How many pieces a traced batch is split into: the sizes of the mesh axes that the
    "activation_batch" logical axis maps to under the current logical axis rules, in the
    current `mesh_context`; 1 outside one. For a model choosing between computations whose
    costs scale differently with the tokens each device holds."""
    mesh = _MESH.get()
    if mesh is None:
        return 1
    axes = nn.logical_to_mesh_axes(("activation_batch",))[0]
    axes = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def shardings_for(boxed_tree: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of (abstract) boxed values carrying logical axis names.

    Leaves without names (plain arrays, scalars) are replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data and fsdp."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_divisible(tree: Any, shardings: Any, what: str) -> None:
    """Raises ValueError if a sharded dimension does not divide by its mesh axes."""
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(tree),
                                      jax.tree.leaves(shardings)):
        spec = sharding.spec
        for dim, axes in zip(leaf.shape, spec):
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            size = math.prod(sharding.mesh.shape[a] for a in axes)
            if dim % size:
                name = jax.tree_util.keystr(path)
                raise ValueError(
                    f"{what}{name}: dimension {dim} must divide by mesh axes {axes} "
                    f"(size {size}); pad it (e.g. vocab_size to a multiple of 128) or change "
                    f"partitioning.mesh_shape")
