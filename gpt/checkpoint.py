"""Checkpoints of a run: train state, data iterator position and resolved config, via
orbax's CheckpointManager (`args=` API). A save is atomic: orbax writes into a temporary
directory and renames it when complete, so a crash mid-save leaves the previous one usable."""
from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, config: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(config),
        ))

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores `step` into the structure of `abstract_state` (arrays or ShapeDtypeStructs)
        and, when given, moves `data_iterator` to where it was; returns the state."""
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items)).state

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
