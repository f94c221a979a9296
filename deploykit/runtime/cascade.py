"""The cascade: chains stage runners, applies the exit thresholds, and compacts the batch between stages.

After each stage the exit step (:mod:`deploykit.runtime.exit_step`, shared with serve-ray and the Triton model)
writes the results of the rows whose exit score reaches that stage's threshold at their original positions; only
the survivors' state goes on to the next stage (a gather on the survivors' indices, done by the runner so GPU
tensors stay on the device). Only the ``[B]`` score vector is brought to the host to decide.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deploykit.backends import Runner, create_runner
from deploykit.errors import BackendError, DataError
from deploykit.kinds import is_cascade
from deploykit.manifest import Manifest
from deploykit.runtime.exit_step import ExitState, softmax  # noqa: F401  (softmax: re-exported)


@dataclass
class CascadeResult:
    """Per-row results of one cascade run, in input order."""

    logits: np.ndarray
    probs: np.ndarray
    exit_stage: np.ndarray
    score: np.ndarray
    stage_batch_sizes: list[int] = field(default_factory=list)

    @property
    def labels_idx(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


class Cascade:
    """Runs an exported multi-exit model stage by stage."""

    def __init__(self, manifest: Manifest, runners: list[Runner]):
        if len(runners) != manifest.num_stages:
            raise ValueError(f"{len(runners)} runners for {manifest.num_stages} stages")
        self.manifest = manifest
        self.runners = runners
        self._input_shape = [int(v) for v in manifest.input_spec.shape[1:]]

    @classmethod
    def from_dir(cls, engine_dir: str | os.PathLike, backend: str = "ort-cpu", threads: int | None = None,
                 **runner_kwargs: Any) -> Cascade:
        """Load the manifest and one runner per stage; checks that the graphs match the manifest."""
        manifest = Manifest.load(engine_dir)
        if not is_cascade(manifest):
            from deploykit.errors import ManifestError

            raise ManifestError(f"{engine_dir} holds a {manifest.task!r} model, not a classification cascade")
        manifest.check_files()
        kwargs = dict(runner_kwargs)
        if threads is not None:
            kwargs["threads"] = threads
        runners = [create_runner(manifest.path_of(s.file), backend, **kwargs) for s in manifest.stages]
        cascade = cls(manifest, runners)
        try:
            cascade.check_graphs()
        except BaseException:
            cascade.close()
            raise
        return cascade

    def check_graphs(self) -> None:
        """Each graph's input/output names must be the ones the manifest promises."""
        from deploykit.errors import ManifestError

        for spec, runner in zip(self.manifest.stages, self.runners):
            want_in = [t.name for t in spec.inputs]
            want_out = [t.name for t in spec.outputs] + [spec.exit_logits, spec.exit_score]
            if list(runner.input_names) != want_in or sorted(runner.output_names) != sorted(want_out):
                raise ManifestError(
                    f"graph {spec.file} has inputs {runner.input_names} and outputs {runner.output_names}, but the "
                    f"manifest says {want_in} -> {want_out}; the manifest and graphs don't belong together — re-export"
                )
        self.check_classes()

    def check_classes(self) -> None:
        """One row of zeros through every stage: each exit must have as many classes as the manifest has labels."""
        from deploykit.errors import ManifestError

        feeds: dict[str, Any] = {self.manifest.input_spec.name: np.zeros([1, *self._input_shape], np.float32)}
        for spec, runner in zip(self.manifest.stages, self.runners):
            res = runner.run(feeds)
            width = runner.to_host(res[spec.exit_logits]).shape[-1]
            if width != self.manifest.num_classes:
                raise ManifestError(f"graph {spec.file} has {width} classes but the manifest lists "
                                    f"{self.manifest.num_classes} labels; fix the labels or re-export the model")
            feeds = {t.name: res[t.name] for t in spec.outputs}

    # ---- input checks --------------------------------------------------------------------------------------
    def validate_input(self, x: Any) -> np.ndarray:
        """Check shape, dtype and values; say what was expected."""
        want = "float32 [batch, " + ", ".join(str(v) for v in self._input_shape) + "]"
        if not isinstance(x, np.ndarray):
            raise DataError(f"input must be a numpy array {want}, got {type(x).__name__}")
        if x.dtype != np.float32:
            raise DataError(f"input has dtype {x.dtype}, expected {want}; convert with x.astype(np.float32)")
        if x.ndim != 1 + len(self._input_shape) or list(x.shape[1:]) != self._input_shape:
            raise DataError(f"input has shape {list(x.shape)}, expected {want} (preprocess images per the manifest)")
        if x.shape[0] == 0:
            raise DataError("input batch is empty")
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
            raise DataError(f"input has NaN or infinite values in {bad} row(s); fix the preprocessing")
        return np.ascontiguousarray(x)

    def resolve_thresholds(self, thresholds: list[float | None] | None) -> list[float | None]:
        thr = self.manifest.thresholds() if thresholds is None else list(thresholds)
        if len(thr) < self.manifest.num_stages:
            thr += [None] * (self.manifest.num_stages - len(thr))
        if len(thr) > self.manifest.num_stages:
            raise DataError(f"{len(thr)} thresholds given for {self.manifest.num_stages} stages")
        for t in thr:
            if t is not None and not (isinstance(t, int | float) and np.isfinite(t)):
                raise DataError(f"thresholds must be finite numbers or null, got {t!r}")
        return thr

    # ---- inference ----------------------------------------------------------------------------------------
    def run(self, x: np.ndarray, thresholds: list[float | None] | None = None) -> CascadeResult:
        """Run the cascade with batch compaction; each row's result says where it exited."""
        x = self.validate_input(x)
        thr = self.resolve_thresholds(thresholds)
        last = self.manifest.num_stages - 1
        state = ExitState(x.shape[0], self.manifest.num_classes)
        feeds: dict[str, Any] = {self.manifest.input_spec.name: x}
        sizes: list[int] = []
        for k, (spec, runner) in enumerate(zip(self.manifest.stages, self.runners)):
            sizes.append(len(state.rows))
            res = runner.run(feeds)
            logits = res[spec.exit_logits]

            def exiting(where: np.ndarray, all_exit: bool, r: Runner = runner, lg: Any = logits) -> np.ndarray:
                return r.to_host(lg if all_exit else r.take(lg, where))

            running = len(state.rows)
            keep = state.step(k, runner.to_host(res[spec.exit_score]), thr[k], k == last, exiting)
            if keep is None:
                break
            names = [t.name for t in spec.outputs]
            feeds = ({nm: res[nm] for nm in names} if len(keep) == running
                     else {nm: runner.take(res[nm], keep) for nm in names})
        _check_finite(state.logits, state.score, state.exit_stage, self.manifest)
        return CascadeResult(state.logits, state.probs(), state.exit_stage, state.score, sizes)

    def run_all_exits(self, x: np.ndarray, batch_size: int = 64) -> list[dict[str, np.ndarray]]:
        """Every exit's logits and score for every row (no exits taken); for calibration and analysis."""
        x = self.validate_input(x)
        outs: list[dict[str, list[np.ndarray]]] = [{"logits": [], "score": []} for _ in self.runners]
        for lo in range(0, len(x), batch_size):
            feeds: dict[str, Any] = {self.manifest.input_spec.name: x[lo:lo + batch_size]}
            for k, (spec, runner) in enumerate(zip(self.manifest.stages, self.runners)):
                res = runner.run(feeds)
                outs[k]["logits"].append(runner.to_host(res[spec.exit_logits]))
                outs[k]["score"].append(runner.to_host(res[spec.exit_score]))
                feeds = {t.name: res[t.name] for t in spec.outputs}
        res = [{key: np.concatenate(v) for key, v in o.items()} for o in outs]
        for k, o in enumerate(res):
            _check_finite(o["logits"], o["score"], np.full(len(o["score"]), k), self.manifest)
        return res

    def close(self) -> None:
        for r in self.runners:
            r.close()

    def __enter__(self) -> Cascade:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_finite(logits: np.ndarray, score: np.ndarray, exit_stage: np.ndarray, manifest: Manifest) -> None:
    """Refuse non-finite outputs: a NaN must never reach a client, a threshold search or a JSON body as a number."""
    bad = ~(np.isfinite(logits).all(axis=1) & np.isfinite(score))
    if bad.any():
        stages = sorted({int(s) for s in exit_stage[bad]})
        files = ", ".join(manifest.stages[s].file for s in stages)
        raise BackendError(f"the engine produced NaN or infinite outputs for {int(bad.sum())} row(s) at stage(s) "
                           f"{stages} ({files}); the graph or its weights are broken — re-export the model")


def stage_costs(manifest: Manifest) -> tuple[np.ndarray, float]:
    """Cumulative FLOPs to reach and evaluate each exit, and the monolithic model's FLOPs."""
    per = np.asarray([s.flops + s.exit_flops for s in manifest.stages], dtype=np.float64)
    full = float(manifest.monolithic.flops) if manifest.monolithic else float(sum(s.flops for s in manifest.stages))
    return np.cumsum(per), full


def expected_flops_ratio(manifest: Manifest, exit_fractions: np.ndarray) -> float:
    """``E[C] / C_full`` for a distribution of exits over stages."""
    cum, full = stage_costs(manifest)
    return float(np.dot(np.asarray(exit_fractions, dtype=np.float64), cum) / full)
