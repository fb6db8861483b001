"""Mesh shapes, logical-axis shardings and divisibility checks on the 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest
from jax.sharding import PartitionSpec as P

from calm_jax import partitioning as part


def test_minus_one_takes_the_remaining_devices():
    assert part.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
    assert part.resolve_mesh_shape((1, -1, 2), 8) == (1, 4, 2)
    assert part.resolve_mesh_shape((2, 2, 2), 8) == (2, 2, 2)


@pytest.mark.parametrize("shape, message", [
    ((3, -1, 1), r"\(3, -1, 1\) cannot fill 8 devices \(8 is not a multiple of 3\)"),
    ((2, 2, 1), r"expected sizes multiplying to the 8 devices, got \(2, 2, 1\)"),
])
def test_mesh_shapes_that_do_not_fit_the_devices(shape, message):
    with pytest.raises(ValueError, match=message):
        part.resolve_mesh_shape(shape, 8)


@pytest.mark.parametrize("shape", [(0, 1, 1), (-1, -1, 1), (2, 2), (-2, 1, 1)])
def test_bad_mesh_shapes_are_refused_by_the_config(shape):
    with pytest.raises(ValueError, match=r"partitioning.mesh_shape: expected three positive "
                                         r"sizes for \('data', 'fsdp', 'tensor'\) with at most "
                                         r"one -1, got"):
        part.PartitioningConfig(mesh_shape=shape)


def test_mesh_from_config_uses_the_first_devices():
    mesh = part.make_mesh(part.PartitioningConfig(mesh_shape=[1, -1, 2]))  # a list, as gin gives
    assert mesh.axis_names == part.MESH_AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    small = part.make_mesh(part.PartitioningConfig(mesh_shape=(-1, 1, 1), num_devices=2))
    assert list(small.devices.flat) == jax.devices()[:2]
    assert part.data_parallel_size(small) == 2
    with pytest.raises(ValueError, match=r"partitioning.num_devices: expected 1..8, got 9"):
        part.make_mesh(part.PartitioningConfig(num_devices=9))


class _Block(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(), ("embed", "mlp")), (x.shape[-1], self.features))
        scale = self.param("scale", nn.with_logical_partitioning(
            nn.initializers.ones, ("norm",)), (self.features,))
        return x @ kernel * scale


def _abstract(features=8, embed=4):
    return jax.eval_shape(_Block(features).init, jax.random.key(0), jnp.ones((1, embed)))


def test_logical_axes_map_to_mesh_axes_by_the_rules():
    mesh = part.make_mesh(part.PartitioningConfig(mesh_shape=(2, 2, 2)))
    shardings = part.shardings_for(_abstract(), mesh, part.DEFAULT_RULES)["params"]
    assert shardings["kernel"].spec == P("fsdp", "tensor")
    assert shardings["scale"].spec == P(None)
    # Other rules, the same tree: the MLP axis replicated, the embedding over tensor.
    rules = [("embed", "tensor"), ("mlp", None), ("norm", None)]
    assert part.shardings_for(_abstract(), mesh, rules)["params"]["kernel"].spec == \
        P("tensor", None)


def test_initialised_parameters_land_split_on_their_mesh_axes():
    mesh = part.make_mesh(part.PartitioningConfig(mesh_shape=(2, 2, 2)))
    abstract = _abstract(features=8, embed=4)
    shardings = part.shardings_for(abstract, mesh, part.DEFAULT_RULES)
    init = jax.jit(_Block(8).init, out_shardings=shardings)
    kernel = nn.unbox(init(jax.random.key(0), jnp.ones((1, 4))))["params"]["kernel"]
    # [embed 4, mlp 8] over fsdp 2 x tensor 2: each device holds a [2, 4] block.
    assert {s.data.shape for s in kernel.addressable_shards} == {(2, 4)}


def test_batches_split_over_data_and_fsdp():
    mesh = part.make_mesh(part.PartitioningConfig(mesh_shape=(2, 2, 2)))
    batch = jax.device_put(np.arange(16 * 3).reshape(16, 3), part.batch_sharding(mesh))
    assert part.data_parallel_size(mesh) == 4
    assert {s.data.shape for s in batch.addressable_shards} == {(4, 3)}
    replicated = jax.device_put(np.ones(5), part.replicated(mesh))
    assert {s.data.shape for s in replicated.addressable_shards} == {(5,)}


def test_batch_shards_follow_the_current_mesh_and_rules():
    mesh = part.make_mesh(part.PartitioningConfig(mesh_shape=(2, 2, 2)))
    assert part.batch_shards() == 1  # no mesh context
    with part.mesh_context(mesh):
        with nn.logical_axis_rules(list(part.DEFAULT_RULES)):
            assert part.batch_shards() == 4  # data x fsdp
            assert jax.jit(lambda x: x * part.batch_shards())(1) == 4  # at trace time too
        with nn.logical_axis_rules([("activation_batch", "data")]):
            assert part.batch_shards() == 2
        with nn.logical_axis_rules([("activation_batch", None)]):
            assert part.batch_shards() == 1
    assert part.batch_shards() == 1  # the context is left


def test_a_dimension_that_does_not_divide_its_mesh_axes_names_the_parameter():
    mesh = part.make_mesh(part.PartitioningConfig(mesh_shape=(1, 4, 2)))
    abstract = _abstract(features=6, embed=4)  # mlp 6 divides tensor 2, embed 4 fsdp 4
    shardings = part.shardings_for(abstract, mesh, part.DEFAULT_RULES)
    part.check_divisible(nn.unbox(abstract), shardings, "model")
    odd = _abstract(features=6, embed=6)  # embed 6 over fsdp 4
    shardings = part.shardings_for(odd, mesh, part.DEFAULT_RULES)
    with pytest.raises(ValueError, match=r"model\['params'\]\['kernel'\]: dimension 6 must "
                                         r"divide by mesh axes \('fsdp',\) \(size 4\); pad it"):
        part.check_divisible(nn.unbox(odd), shardings, "model")
