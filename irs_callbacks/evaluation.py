"""One IRS evaluation: draw samples batch by batch, retrieve, count, decide (IRS paper, appendix 6).

:class:`EvaluationEngine` is the monitor's engine with nothing else attached: no files, no
trackers, no Accelerate. Given a prepared reference (training features on the device, the
extractor) and the processes of the run, :meth:`EvaluationEngine.run` draws up to ``budget``
samples in rounds of ``batch_size``; each sample's nearest training image is found and the set of
retrieved training images ("learned") grows; after each round a
:class:`~irs_callbacks.stats.SequentialRejectionTest` may end the evaluation early. The result
(:class:`EvaluationResult`) holds the verdict, IRS_alpha, IRS_inf with its interval and the
adjusted score IRS_inf / IRS_inf(real).

Processes (:class:`Processes`): one round of ``batch_size`` samples is split over the processes
(sample ``i`` is always seeded from ``(seed, i)``), the retrieved indices are gathered every round
so that every rank updates an identical learned set, and every rank takes the same decision. The
same seed gives the same result with any number of processes. A failure on any rank (sampler,
extractor) is raised on every rank, so no rank waits forever in a collective call.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from irs_callbacks.history import EvaluationRecord
from irs_callbacks.retrieval import LearnedSet, ShardedFeatureBank
from irs_callbacks.samplers import Sampler, preserved_training_state, sample_seed
from irs_callbacks.stats import IRSEstimate, SequentialRejectionTest, irs_infinity

__all__ = ["EvaluationEngine", "EvaluationResult", "EvaluationError", "EvaluationSettings", "PreparedReference",
           "Processes", "SingleProcess", "default_budget"]

_PAD = -2  # gather padding (a rank with fewer samples in a round); -1 = invalid sample


class EvaluationError(RuntimeError):
    """An evaluation failed (on any process); raised identically on every process."""


def default_budget(n_train: int) -> int:
    """Default samples per evaluation: 10% of the training set (alpha = 0.1, where the paper's
    estimates become confident, appendix 6), at least 1,000 and at most 10,000, never more than
    n_train."""
    return int(min(n_train, max(1000, min(10_000, math.ceil(0.1 * n_train)))))


class Processes(Protocol):
    """The processes of a run, as the engine needs them (Accelerate's and Lightning's adapters
    provide one): ``rank``, ``world``, ``is_main``, ``device``; ``gather(tensor)`` concatenates
    equal-shaped tensors of all ranks along dim 0 in rank order; ``any(flag)`` is True on every rank
    if it is True on one. Both are collective: every rank calls them in the same order."""

    rank: int
    world: int
    is_main: bool
    device: torch.device

    def gather(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def any(self, flag: bool) -> bool: ...


class SingleProcess:
    """:class:`Processes` of a run without torch.distributed."""

    rank, world, is_main = 0, 1, True

    def __init__(self, device=None):
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def any(self, flag: bool) -> bool:
        return bool(flag)


@dataclass
class PreparedReference:
    """What an evaluation compares against: the :class:`~irs_callbacks.reference.ReferenceBank`
    (training features, real-data measurement), its search structure on the device (``search(q)
    -> (indices, distances)``, a FeatureBank or a collective sharded bank), the extractor, and
    ``training_images(rows) -> uint8 NCHW`` for galleries (None when the data cannot be indexed)."""

    bank: object
    search: object
    extractor: Callable
    training_images: Callable | None = None
    description: str = ""


@dataclass(frozen=True)
class EvaluationSettings:
    """How evaluations draw and decide (the monitor's arguments of the same names)."""

    num_samples: int | None = None  # None: default_budget(n_train)
    batch_size: int = 64
    target_irs: float = 0.8
    alpha_e: float = 0.05
    pass_alpha: float | None = None  # early pass (SequentialRejectionTest); None: off
    adjust: bool = True  # target relative to real data, and the adjusted score
    seed: int = 0
    fixed_noise: bool = True  # the same noise at every evaluation
    keep_samples: int = 36  # generated images kept for the TensorBoard grid (main process)

    def budget(self, n_train: int) -> int:
        return self.num_samples if self.num_samples is not None else default_budget(n_train)


@dataclass
class EvaluationResult:
    """One evaluation. Fractions are of ``n_train``; ``estimate`` is IRS_inf with its interval
    from every valid sample (``None`` if none was drawn), what the verdict is about; ``adjusted``
    = ``matched`` / ``real``: the samples' and real data's IRS_inf at one sampling rate (``matching``
    says how; ``None`` without a real reference); ``hits`` the samples per training image;
    ``samples`` a few generated images in [0, 1] (main process) for display."""

    step: int | None
    verdict: str
    rule: str | None
    samples_used: int
    budget: int
    n_learned: int
    n_invalid: int
    n_train: int
    k_min: int
    k_final: int
    target_irs: float
    alpha_e: float
    estimate: IRSEstimate | None
    adjusted: float | None
    real: IRSEstimate | None
    seed: int
    target_s: float
    matched: IRSEstimate | None = None  # the samples at the real reference's alpha (adjusted's numerator)
    matching: str | None = None  # how both sides were brought to one alpha (RetrievalScore.matching_text)
    curve: list = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    hits: torch.Tensor | None = field(default=None, repr=False)
    samples: torch.Tensor | None = field(default=None, repr=False)

    @property
    def irs_alpha(self) -> float:
        return self.n_learned / self.n_train

    @property
    def stopped_early(self) -> bool:
        return self.samples_used < self.budget

    @property
    def score(self) -> float | None:
        """What checkpoints are ranked by: the adjusted IRS, else IRS_inf."""
        if self.adjusted is not None:
            return self.adjusted
        return None if self.estimate is None else self.estimate.estimate

    def as_record(self) -> EvaluationRecord:
        """The history record (:class:`~irs_callbacks.history.EvaluationRecord`)."""
        est, real, matched = self.estimate, self.real, self.matched
        scale = real.estimate if (real is not None and matched is not None and real.estimate > 0) else None
        return EvaluationRecord(
            step=self.step, verdict=self.verdict, rule=self.rule, stopped_early=self.stopped_early,
            budget=self.budget, samples_used=self.samples_used, n_learned=self.n_learned,
            n_invalid=self.n_invalid, n_train=self.n_train, k_min=self.k_min, k_final=self.k_final,
            target_irs=self.target_irs,
            target_s=self.target_s, alpha_e=self.alpha_e, irs_alpha=self.irs_alpha,
            estimate=None if est is None else est.estimate, lower=None if est is None else est.lower,
            upper=None if est is None else est.upper, adjusted=self.adjusted,
            adjusted_lower=None if scale is None else matched.lower / scale,
            adjusted_upper=None if scale is None else matched.upper / scale,
            real_irs=None if real is None else real.estimate, score=self.score,
            real_n_samples=None if real is None else real.n_samples, real_matching=self.matching,
            seed=self.seed, timing=dict(self.timing), curve=[list(p) for p in self.curve])


class EvaluationEngine:
    """Runs evaluations against one prepared reference (see the module docstring).

    Args:
        reference: the :class:`PreparedReference`.
        processes: the run's :class:`Processes` (default: a single process on the search's device).
        settings: :class:`EvaluationSettings`.
    """

    def __init__(self, reference: PreparedReference, processes: Processes | None = None,
                 settings: EvaluationSettings = EvaluationSettings()):
        self.reference = reference
        self.processes = processes if processes is not None else SingleProcess(_device_of(reference.search))
        self.settings = settings
        self._test_cache = None

    @property
    def device(self) -> torch.device:
        return _device_of(self.reference.search)

    def rejection_test(self) -> SequentialRejectionTest:
        """The decision rule of the configured budget (thresholds computed once and cached, on the
        adjusted scale when the bank has a real-data measurement taken at the budget's sampling
        rate: ``bank.real_at(budget)``)."""
        bank, s = self.reference.bank, self.settings
        budget = s.budget(bank.n_train)
        real = bank.real_at(budget) if s.adjust else None
        real_irs = real.estimate if real is not None else None
        key = (bank.n_train, s.target_irs, budget, s.alpha_e, real_irs, s.pass_alpha)
        if self._test_cache is None or self._test_cache[0] != key:
            self._test_cache = (key, SequentialRejectionTest(bank.n_train, s.target_irs, budget, s.alpha_e,
                                                             real_irs=real_irs, pass_alpha=s.pass_alpha))
        return self._test_cache[1]

    def warm_up(self) -> None:
        """Pay one-time costs now (thresholds, the real reference at the first rounds' sample
        counts, first-call BLAS/cuBLAS costs of the search) rather than in the first evaluation."""
        test, s = self.rejection_test(), self.settings
        if s.adjust:
            for n in range(s.batch_size, min(test.budget, 8 * s.batch_size) + 1, s.batch_size):
                self.reference.bank.real_at(n)
        search = self.reference.search
        local = search.local if isinstance(search, ShardedFeatureBank) else search  # no collective call here
        local.search(local.features[: s.batch_size])

    def run(self, sampler: Sampler, step: int | None = None) -> EvaluationResult:
        """One evaluation of ``sampler`` (a :class:`~irs_callbacks.samplers.Sampler`). Raises
        :class:`EvaluationError` (on every rank) when sampling or feature extraction fails on any."""
        s, procs, device = self.settings, self.processes, self.device
        bank, search, extractor = self.reference.bank, self.reference.search, self.reference.extractor
        collective = isinstance(search, ShardedFeatureBank)  # every rank must call its search every round
        t_start = time.perf_counter()
        n_train = bank.n_train
        test = self.rejection_test()
        budget = test.budget
        learned = LearnedSet(n_train, device=device)
        seed = s.seed if (s.fixed_noise or step is None) else sample_seed(s.seed, step) & 0x7FFFFFFF
        t_sampling = t_features = t_retrieval = 0.0
        curve, kept, decision, retrieved = [], None, None, []
        sync = device.type == "cuda"
        with preserved_training_state(sampler.modules()), sampler.context():
            for start in range(0, budget, s.batch_size):
                stop = min(start + s.batch_size, budget)
                chunk = -(-(stop - start) // procs.world)
                mine = list(range(start + procs.rank * chunk, min(start + (procs.rank + 1) * chunk, stop)))
                local = torch.full((chunk + 1,), _PAD, dtype=torch.long, device=device)
                error, features, invalid = None, None, None
                try:
                    if mine:
                        t0 = time.perf_counter()
                        images = sampler.sample(mine, seed)
                        if sync:
                            torch.cuda.synchronize(device)
                        t1 = time.perf_counter()
                        images = images.to(device)
                        invalid = ~torch.isfinite(images.float()).flatten(1).all(dim=1)
                        features = extractor(images, value_range=sampler.value_range)
                        if sync:
                            torch.cuda.synchronize(device)
                        t_sampling, t_features = t_sampling + t1 - t0, t_features + time.perf_counter() - t1
                        if kept is None and procs.is_main and s.keep_samples:
                            kept = _unit(images[: s.keep_samples], sampler.value_range).cpu()
                except Exception as exc:  # reported on every rank below
                    error = exc
                t_retrieval -= time.perf_counter()
                if collective:  # every rank must reach the collective search, or none
                    _raise_if_failed(procs, error, step)
                    features = features if features is not None else torch.empty(0, bank.dim, device=device)
                if error is None and (features is not None or collective):
                    try:
                        index, _ = search.search(features)
                        if index.numel():
                            index = index.to(device=device, dtype=torch.long)
                            index[invalid.to(index.device)] = -1
                            local[: len(mine)] = index
                    except Exception as exc:
                        if collective:
                            raise EvaluationError(f"sharded retrieval failed at step {step}: {exc!r}") from exc
                        error = exc
                if error is not None:
                    local[-1] = 1
                gathered = procs.gather(local).view(procs.world, chunk + 1)
                if bool((gathered[:, -1] != _PAD).any()):
                    failed = [r for r in range(procs.world) if int(gathered[r, -1]) != _PAD]
                    message = f"sampling/feature extraction failed on process(es) {failed} at step {step}"
                    if error is not None:
                        raise EvaluationError(f"{message}: {error!r}") from error
                    raise EvaluationError(message)
                indices = gathered[:, :-1].reshape(-1)
                indices = indices[indices != _PAD]  # in global sample order
                retrieved.append(indices)
                learned.update(indices)
                curve.append((int(learned.n_samples), int(learned.n_learned)))
                decision = test.decide(learned.n_samples, learned.n_learned)
                t_retrieval += time.perf_counter()
                if decision.verdict != "continue":
                    break

        n_drawn, n_learned, n_invalid = int(learned.n_samples), int(learned.n_learned), int(learned.n_invalid)
        estimate = irs_infinity(n_learned, n_drawn - n_invalid, n_train, s.alpha_e) if n_learned >= 1 else None
        matched = real = adjusted = matching = None
        if s.adjust and bank.real is not None:  # both sides at one sampling rate (ReferenceBank.score_indices)
            score = bank.score_indices(torch.cat(retrieved), alpha_e=s.alpha_e)
            matched, real, adjusted, matching = score.synthetic_matched, score.real, score.adjusted, score.matching_text
        t_end = time.perf_counter()
        return EvaluationResult(
            step=step, verdict=decision.verdict, rule=decision.rule, samples_used=n_drawn, budget=budget,
            n_learned=n_learned, n_invalid=n_invalid, n_train=n_train, k_min=int(test.k_min), k_final=int(test.k_final),
            target_irs=s.target_irs, alpha_e=s.alpha_e, estimate=estimate, adjusted=adjusted, real=real,
            seed=int(seed), target_s=float(test.s_d), matched=matched, matching=matching, curve=curve,
            hits=learned.hits.detach().cpu(), samples=kept,
            timing={"sampling": t_sampling, "features": t_features, "retrieval": t_retrieval,
                    "monitor": t_end - t_start - t_sampling - t_features, "total": t_end - t_start})


def _raise_if_failed(procs: Processes, error, step) -> None:
    if procs.any(error is not None):
        message = f"sampling/feature extraction failed at step {step}"
        if error is not None:
            raise EvaluationError(f"{message}: {error!r}") from error
        raise EvaluationError(f"{message} on another process")


def _device_of(search) -> torch.device:
    return torch.device(getattr(search, "device", "cpu"))


def _unit(images: torch.Tensor, value_range) -> torch.Tensor:
    """Images for display: [0, 1] float, NaN/Inf and out-of-range values clamped."""
    from irs_callbacks.features import to_unit_range

    return torch.nan_to_num(to_unit_range(images, value_range), nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
