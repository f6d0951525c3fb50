"""Checkpoints of a run: train state, data iterator position and resolved config, via
orbax's CheckpointManager (`args=` API).

Saves are asynchronous and atomic: orbax writes into a temporary directory and renames it
when complete, so a crash mid-save leaves the previous checkpoint usable. Just before the
rename, the sha256 of every file goes into the checkpoint's CHECKSUMS file, and a restore
checks them first: a checkpoint with a changed, truncated, missing or extra file (a lost
data iterator, a flipped bit) is unreadable, never restored as healthy. orbax 0.12.8
verifies no content itself (zarr3's crc32c covers only the shard index). Resuming skips
unreadable checkpoints for the newest readable one and moves the skipped ones aside, so a
run never gets stuck on a state it cannot resume from; it changes nothing when none is
readable.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import time

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

EVAL_METRIC = "eval/loss"
CHECKSUMS = "CHECKSUMS"
# orbax's own records, which it rewrites while committing, after the checksums are taken
UNSUMMED = (CHECKSUMS, "_CHECKPOINT_METADATA", "commit_success.txt")


class Unreadable(RuntimeError):
    """A checkpoint that fails its checksums or cannot be restored; the message says why."""


class SaveFailed(OSError):
    """A checkpoint could not be written; the ones before it are intact."""


class NoReadableCheckpoint(OSError):
    """Every checkpoint of a run is unreadable: resuming from none would silently start over."""


def last_words(e: BaseException) -> str:
    """The first line of an exception's message, short: orbax's run to hundreds of characters."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def _files(step_dir: str) -> list[str]:
    """The files of a checkpoint that its checksums cover, relative to it."""
    found = [os.path.relpath(os.path.join(root, name), step_dir)
             for root, _, names in os.walk(step_dir) for name in names]
    return sorted(path for path in found if path not in UNSUMMED)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_checksums(step_dir: str) -> None:
    sums = {path: _sha256(os.path.join(step_dir, path)) for path in _files(step_dir)}
    with open(os.path.join(step_dir, CHECKSUMS), "w") as f:
        json.dump(sums, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


class _ChecksummedRename(ocp.path.atomicity.AtomicRenameTemporaryPath):
    """orbax's atomic rename of a step's temporary directory, with its checksums written
    into it first, in orbax's commit thread: a committed checkpoint always has them."""

    async def finalize(self):
        if self.get_final().name.isdigit():  # a step's directory, not one of its items'
            await asyncio.to_thread(_write_checksums, os.fspath(self.get()))
        await super().finalize()


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, keep_best: bool = False):
        """Keeps the newest `keep` checkpoints and, with `keep_best`, also the one with the
        lowest eval loss. Eval metrics are saved with each checkpoint (orbax's `best_fn`), so
        the best one is still known after a restart."""
        self.directory = os.path.abspath(directory)
        policy = policies.LatestN(n=keep)
        if keep_best:
            best = policies.BestN(get_metric_fn=lambda m: m[EVAL_METRIC], reverse=True, n=1,
                                  keep_checkpoints_without_metrics=False)
            policy = policies.AnyPreservationPolicy([policy, best])
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                create=True, preservation_policy=policy, temporary_path_class=_ChecksummedRename,
                best_fn=lambda m: m[EVAL_METRIC], best_mode="min"))
        self._in_flight = None  # the step whose save may still be committing
        self._verified = {}  # step -> None (readable) or why it is not

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iterator, config: dict, metrics: dict | None = None) -> None:
        """`metrics` with an eval loss make the checkpoint a candidate for `keep_best`;
        without a `data_iterator` (imported weights) a resumed run starts its data afresh."""
        self.finish()  # orbax would wait for the previous save here too
        self._verified.pop(step, None)  # a step saved again, after its first save was moved aside
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        with self._saving(step):
            if self.manager.save(step, metrics=metrics if metrics and EVAL_METRIC in metrics else None,
                                 args=ocp.args.Composite(**items)):
                self._in_flight = step

    @contextlib.contextmanager
    def _saving(self, step: int):
        """Any failure to write a checkpoint (a full disk) as one OSError that says what is kept."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - orbax raises ValueError for tensorstore's errors
            code = re.search(r"os_error_code='(\d+)'", str(e))
            reason = os.strerror(int(code.group(1))) if code else last_words(e)
            raise SaveFailed(f"cannot save the checkpoint at step {step} in {self.directory} "
                             f"({reason}); the checkpoints saved before it are kept") from e

    def finish(self) -> None:
        """Waits for the save in flight to commit."""
        step, self._in_flight = self._in_flight, None
        if step is not None:
            with self._saving(step):
                self.manager.wait_until_finished()

    def verify(self, step: int) -> None:
        """Raises Unreadable unless every file of `step` is there with its saved checksum."""
        if step not in self._verified:
            self._verified[step] = self._check(step)
        if self._verified[step] is not None:
            raise Unreadable(self._verified[step])

    def _check(self, step: int) -> str | None:
        step_dir = os.path.join(self.directory, str(step))
        try:
            with open(os.path.join(step_dir, CHECKSUMS)) as f:
                sums = json.load(f)
        except (OSError, ValueError):
            return f"{CHECKSUMS} is missing or damaged"
        files = _files(step_dir)
        missing, extra = sorted(sums.keys() - set(files)), sorted(set(files) - sums.keys())
        if missing:
            return f"{missing[0]} is missing"
        if extra:
            return f"{extra[0]} was not saved with it"
        for path in files:
            if _sha256(os.path.join(step_dir, path)) != sums[path]:
                return f"{path} does not match its checksum"
        return None

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores `step` into the structure of `abstract_state` (arrays or ShapeDtypeStructs)
        and, when given and saved, moves `data_iterator` to where it was; returns the state.
        Raises Unreadable when the checkpoint fails its checksums or cannot be restored."""
        self.verify(step)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data_iterator is not None and os.path.isdir(os.path.join(self.directory, str(step), "data")):
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items)).state
        except Exception as e:  # noqa: BLE001 - any failure to read means "not usable"
            raise Unreadable(last_words(e)) from e

    def restore_latest_valid(self, abstract_state, data_iterator=None, move_aside: bool = True):
        """Restores the newest readable checkpoint. Returns (state, step, [(unreadable step,
        reason, where it was moved or None)]): (None, None, []) when there is no checkpoint.
        With `move_aside`, the newer unreadable ones are moved out of the way once a readable
        one is restored; when none is readable, raises NoReadableCheckpoint and moves nothing."""
        unreadable = []
        for step in reversed(self.all_steps()):
            try:
                state = self.restore(step, abstract_state, data_iterator)
            except Unreadable as e:
                unreadable.append((step, str(e)))
                continue
            return state, step, [(bad, reason, self._move_aside(bad) if move_aside else None)
                                 for bad, reason in unreadable]
        if unreadable:
            raise NoReadableCheckpoint(
                f"no checkpoint in {self.directory} is readable ("
                + "; ".join(f"step {bad}: {reason}" for bad, reason in unreadable)
                + "); nothing was changed")
        return None, None, []

    def restore_config(self, step: int) -> dict:
        self.verify(step)
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def _move_aside(self, step: int) -> str:
        target = os.path.join(os.path.dirname(self.directory), "checkpoints.unreadable",
                              f"{step}-{int(time.time())}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target

    def close(self) -> None:
        """Waits for the last save to commit (SaveFailed if it could not) and stops orbax."""
        try:
            self.finish()
        except SaveFailed:
            with contextlib.suppress(Exception):  # orbax raises the same failure again
                self.manager.close()
            raise
        self.manager.close()
