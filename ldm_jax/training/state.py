"""The train state and its shape-first, directly sharded initialisation.

`TrainState` holds everything a resumed run needs: `step` (train steps done), `params`, `ema_params` (None
when EMA is off), `opt_state`, `model_state` (variables the model updates that are not trained, such as the
autoencoder discriminator's BatchNorm statistics; None when there are none), and `rng`, the run's base PRNG
key stored as raw key data (uint32) so that it checkpoints like any array. The train step derives its
randomness as `fold_in(key, step)`; the base key never changes. Both stages use this one state.

A train step is one or more optimiser updates (`update_params`: the LDM does one; the autoencoder updates its
generator, then its discriminator, each a part of a `optim.partitioned` optimiser), then `next_step` (step + 1
and the EMA update). `apply_gradients` is the two for the one-update case.

Initialisation never builds a full host copy: `jax.eval_shape(init)` gives the shapes, the sharding rules
(`ldm_jax.parallel`) turn them into shardings, and `jax.jit(init, out_shardings=...)` creates every array
directly on its devices. Optimiser-state leaves shaped like a parameter (Adam's mu and nu, ...) are sharded
like that parameter; other optimiser leaves (counters) are replicated. A resumed run builds only the shapes
and shardings (`init_train_state(abstract=True)`), the target its checkpoint is restored into: no init is
compiled or run.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax import parallel
from ldm_jax.training.ema import ema_update


class TrainState(struct.PyTreeNode):
    """step: int32 scalar; params / ema_params: pytrees (ema None when off); opt_state: optax state;
    model_state: untrained model variables (None when none); rng: uint32 key data of the run's base key.
    `tx` and `ema_decay` are static (not checkpointed)."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: optax.OptState
    model_state: Any
    rng: jax.Array
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    ema_decay: float | None = struct.field(pytree_node=False)

    @property
    def key(self) -> jax.Array:
        """The base PRNG key (a typed key array) wrapping `rng`."""
        return jax.random.wrap_key_data(self.rng)

    def update_params(self, grads: Any) -> TrainState:
        """One optimiser update with `grads` (a pytree like params; with a `optim.partitioned` optimiser, like
        some of its parts); step and EMA unchanged."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(params=optax.apply_updates(self.params, updates), opt_state=opt_state)

    def next_step(self) -> TrainState:
        """Ends a train step: step + 1, then the EMA update towards the current params (when EMA is on)."""
        step = self.step + 1
        ema = self.ema_params
        if self.ema_decay is not None:
            ema = ema_update(ema, self.params, decay=self.ema_decay, num_updates=step)
        return self.replace(step=step, ema_params=ema)

    def apply_gradients(self, grads: Any) -> TrainState:
        """A whole one-update train step: `update_params(grads)`, then `next_step()`."""
        return self.update_params(grads).next_step()


def create_train_state(init_params: Callable[[jax.Array], Any], *, tx: optax.GradientTransformation,
                       key: jax.Array, ema_decay: float | None, with_model_state: bool = False) -> TrainState:
    """A fresh state (traceable): `key` is split into the init key (given to `init_params`) and the run's base key.

    `init_params(key) -> params pytree`, or `(params, model_state)` with `with_model_state`; the EMA starts as
    a copy of the parameters.
    """
    init_key, run_key = jax.random.split(key)
    params, model_state = init_params(init_key) if with_model_state else (init_params(init_key), None)
    ema = None if ema_decay is None else jax.tree.map(lambda p: p.copy(), params)
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, ema_params=ema,
                      opt_state=tx.init(params), model_state=model_state, rng=jax.random.key_data(run_key), tx=tx,
                      ema_decay=ema_decay)


def state_shardings(abstract_state: TrainState, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> TrainState:
    """NamedShardings for every leaf of a (possibly abstract) TrainState under the parameter `rules`
    (model_state, small statistics, is replicated)."""
    specs = parallel.param_specs(abstract_state.params, rules, mesh)
    by_name = {}
    for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(abstract_state.params),
                                  jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        by_name[parallel.path_str(path)] = (tuple(leaf.shape), spec)
    names = sorted(by_name, key=len, reverse=True)  # longest suffix match first

    def opt_spec(path, leaf):
        name = parallel.path_str(path)
        for pname in names:
            if (name == pname or name.endswith("/" + pname)) and by_name[pname][0] == tuple(leaf.shape):
                return by_name[pname][1]
        return P()

    to_sharding = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    param_sh = jax.tree.map(to_sharding, specs, is_leaf=is_spec)
    opt_sh = jax.tree.map(to_sharding, jax.tree_util.tree_map_with_path(opt_spec, abstract_state.opt_state),
                          is_leaf=is_spec)
    rep = parallel.replicated(mesh)
    return abstract_state.replace(step=rep, params=param_sh,
                                  ema_params=None if abstract_state.ema_params is None else param_sh,
                                  opt_state=opt_sh, rng=rep,
                                  model_state=jax.tree.map(lambda _: rep, abstract_state.model_state))


def init_train_state(init_params: Callable[[jax.Array], Any], *, tx: optax.GradientTransformation, key: jax.Array,
                     ema_decay: float | None, mesh: Mesh, rules: Sequence[tuple[str, Any]],
                     with_model_state: bool = False, abstract: bool = False) -> TrainState:
    """Shape-first sharded init: eval_shape -> `state_shardings` -> jit(create, out_shardings).

    Every array is created directly with its sharding on `mesh`; see `create_train_state` for the arguments.
    `abstract=True`: only the shapes, dtypes and shardings (`sharded_shapes`), the target a checkpoint is
    restored into; nothing is compiled, run or allocated.
    """
    def create(key_data):
        key = jax.random.wrap_key_data(key_data)
        return create_train_state(init_params, tx=tx, key=key, ema_decay=ema_decay, with_model_state=with_model_state)

    # The key goes in as host key data, which every process holds: a valid input on any mesh.
    key_data = np.asarray(jax.random.key_data(key))
    shapes = jax.eval_shape(create, key_data)
    shardings = state_shardings(shapes, mesh, rules)
    if abstract:
        return sharded_shapes(shapes, shardings)
    return jax.jit(create, in_shardings=parallel.replicated(mesh), out_shardings=shardings)(key_data)


def sharded_shapes(shapes: TrainState, shardings: TrainState) -> TrainState:
    """The ShapeDtypeStructs of `shapes` (`jax.eval_shape` of an init) given `shardings` (`state_shardings`)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def is_abstract(state: TrainState) -> bool:
    """Whether `state` holds ShapeDtypeStructs (a restore target) rather than arrays."""
    return any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(state))


def abstract_state(state: TrainState) -> TrainState:
    """ShapeDtypeStructs (with shardings) of a state: the target a checkpoint is restored into."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def shardings_of(state: TrainState) -> TrainState:
    """The shardings of a live state's arrays (as the train step's in/out shardings)."""
    return jax.tree.map(lambda a: a.sharding, state)
