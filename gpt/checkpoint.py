"""Checkpoints of a run: train state, data iterator position and resolved config, via
orbax's CheckpointManager (`args=` API).

Saves are asynchronous and atomic: orbax writes into a temporary directory and renames it
when complete, so a crash mid-save leaves the previous checkpoint usable. A checkpoint
that cannot be read (a truncated or deleted file) is moved aside and the next newest is
used, so a run never gets stuck on a state it cannot resume from."""
from __future__ import annotations

import os
import time

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

EVAL_METRIC = "eval/loss"


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, keep_best: bool = False):
        """Keeps the newest `keep` checkpoints and, with `keep_best`, also the one with the
        lowest eval loss."""
        self.directory = os.path.abspath(directory)
        policy = policies.LatestN(n=keep)
        if keep_best:
            best = policies.BestN(get_metric_fn=lambda m: m[EVAL_METRIC], reverse=True, n=1,
                                  keep_checkpoints_without_metrics=False)
            policy = policies.AnyPreservationPolicy([policy, best])
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(create=True, preservation_policy=policy))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iterator, config: dict, metrics: dict | None = None) -> None:
        """`metrics` with an eval loss make the checkpoint a candidate for `keep_best`;
        without a `data_iterator` (imported weights) a resumed run starts its data afresh."""
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, metrics=metrics if metrics and EVAL_METRIC in metrics else None,
                          args=ocp.args.Composite(**items))

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores `step` into the structure of `abstract_state` (arrays or ShapeDtypeStructs)
        and, when given, moves `data_iterator` to where it was; returns the state."""
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data_iterator is not None and os.path.isdir(os.path.join(self.directory, str(step), "data")):
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items)).state

    def restore_latest_valid(self, abstract_state, data_iterator=None):
        """Restores the newest readable checkpoint. Returns (state or None, step or None,
        [(unreadable step, reason, where it was moved)])."""
        unreadable = []
        for step in reversed(self.all_steps()):
            try:
                return self.restore(step, abstract_state, data_iterator), step, unreadable
            except Exception as e:  # noqa: BLE001 - any failure to read means "not usable"
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
                unreadable.append((step, reason, self._move_aside(step)))
        return None, None, unreadable

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def _move_aside(self, step: int) -> str:
        target = os.path.join(os.path.dirname(self.directory), "checkpoints.unreadable",
                              f"{step}-{int(time.time())}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
