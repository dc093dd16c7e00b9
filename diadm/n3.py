"""N3 rejection sampler (detailed-balance paper, Sec. 3.1, Algorithm 1).

Generated samples are identified by their seeds. Each sample's nearest training image (cosine
similarity in a feature space) defines a region around that training image; for every training
image we keep the seed of the sample that is its *closest* match among the samples whose nearest
training image it is. Those seeds are accepted, everything else rejected: the accepted samples
cover the training set one per region, which corrects the sampler's bias toward some training
images (the paper: FID 1.80 -> 1.52 on CIFAR-10 with DINO features).

Memory is O(N_train): the best seed and its similarity per training image. A run over a seed range
can be interrupted and resumed (``state_dict`` / ``save`` / ``load``) with the same result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from irs_callbacks.features import DEFAULT_EXTRACTOR, get_extractor
from irs_callbacks.files import write_atomic
from irs_callbacks.retrieval import FeatureBank
from irs_callbacks.samplers import CallableSampler, Sampler, as_sampler, preserved_training_state, to_image_tensor

__all__ = ["N3RejectionSampler", "N3Result"]

_NO_SEED = -1


def _seeded_sampler(obj, value_range) -> Sampler:
    """A Sampler whose every image is drawn from its own seed: plain callables receive a list of
    generators, one per image (the diffusers convention), so an image depends on its seed alone."""
    if isinstance(obj, Sampler) or not callable(obj) or hasattr(obj, "components"):
        return as_sampler(obj, value_range=value_range)
    return CallableSampler(obj, value_range or (0.0, 1.0), per_sample_generators=True)


def _seed_fingerprint(seeds: Sequence[int]) -> str:
    """Identity of a seed sequence (a resumed run must walk the same one)."""
    seeds = torch.as_tensor(list(seeds) if not isinstance(seeds, torch.Tensor) else seeds, dtype=torch.int64)
    return hashlib.sha256(seeds.numpy().tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class N3Result:
    """Outcome of a run: ``accepted_seeds`` (sorted, one per covered training image),
    ``best_seed`` / ``best_similarity`` per training image (-1 / -inf where none), the number of
    samples seen and of invalid (non-finite) samples."""

    accepted_seeds: torch.Tensor
    best_seed: torch.Tensor
    best_similarity: torch.Tensor
    samples_seen: int
    n_invalid: int

    @property
    def acceptance_rate(self) -> float:
        return len(self.accepted_seeds) / max(self.samples_seen, 1)

    @property
    def covered(self) -> int:
        """Training images that received an accepted sample."""
        return len(self.accepted_seeds)


class N3RejectionSampler:
    """Keeps, per training image, the best-matching seed among the samples it is nearest to.

    Args:
        train_features: [N, d] features of the training images (any scale: normalised here).
        extractor: feature extractor for generated images: a registry name, a
            ``FeatureExtractor``, or any module / callable (see ``irs_callbacks.features``); use
            the one ``train_features`` came from.
        device: where the training features and the per-image state live.
        backend: retrieval backend (``"auto"``, ``"torch"``, ``"faiss"``).
    """

    def __init__(self, train_features, *, extractor=DEFAULT_EXTRACTOR, device=None, backend: str = "auto", **extractor_options):
        features = torch.as_tensor(train_features, dtype=torch.float32)
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"train_features must be a non-empty [N, d] array, got shape {tuple(features.shape)}")
        self.bank = FeatureBank(features, distance="cosine", device=device, backend=backend)
        self.extractor = get_extractor(extractor, device=self.bank.device, **extractor_options)
        n_train = self.bank.n_train
        self.best_seed = torch.full((n_train,), _NO_SEED, dtype=torch.int64)
        self.best_similarity = torch.full((n_train,), -torch.inf, dtype=torch.float64)
        self.position = 0  # seeds of the current sequence already processed
        self.n_invalid = 0
        self.seed_fingerprint: str | None = None

    # ------------------------------------------------------------------ the algorithm

    def update(self, seeds: torch.Tensor, features: torch.Tensor) -> int:
        """Fold one batch (its seeds and the features of its images) into the state.

        Returns the number of training images whose best seed changed. Ties keep the earlier
        best (strict improvement, as in Algorithm 1) and, within a batch, the lowest seed.
        """
        seeds = torch.as_tensor(seeds, dtype=torch.int64).cpu()
        nearest, distance = self.bank.search(features)
        nearest, similarity = nearest.cpu(), (1.0 - distance.double()).cpu()
        valid = nearest >= 0
        self.n_invalid += int((~valid).sum())
        nearest, similarity, seeds = nearest[valid], similarity[valid], seeds[valid]
        if nearest.numel() == 0:
            return 0
        n_train = self.best_seed.numel()
        batch_best = torch.full((n_train,), -torch.inf, dtype=torch.float64)
        batch_best.scatter_reduce_(0, nearest, similarity, reduce="amax")
        is_best = similarity == batch_best[nearest]
        batch_seed = torch.full((n_train,), torch.iinfo(torch.int64).max, dtype=torch.int64)
        batch_seed.scatter_reduce_(0, nearest[is_best], seeds[is_best], reduce="amin")
        better = batch_best > self.best_similarity
        self.best_similarity = torch.where(better, batch_best, self.best_similarity)
        self.best_seed = torch.where(better, batch_seed, self.best_seed)
        return int(better.sum())

    def run(self, sampler, seeds: Sequence[int], *, batch_size: int = 64, value_range=None, checkpoint=None,
            progress: bool = True) -> N3Result:
        """Stream ``seeds`` through ``sampler`` batch by batch and return the accepted seeds.

        ``sampler``: a diffusers pipeline, a callable ``(batch_size, generators) -> images`` that
        receives one ``torch.Generator`` per image, or an ``irs_callbacks.samplers.Sampler``; each
        seed seeds its own image's generator, so an image depends on its seed alone. With ``checkpoint`` (a path) the state is saved
        after every batch; calling ``run`` again with the same seeds after :meth:`load` continues
        where the previous run stopped and gives the same accepted set.
        """
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("seeds must be a non-empty sequence of integers")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        fingerprint = _seed_fingerprint(seeds)
        if self.seed_fingerprint not in (None, fingerprint):
            raise ValueError("seeds differ from the sequence this state was built on; use a fresh N3RejectionSampler")
        self.seed_fingerprint = fingerprint
        sampler = _seeded_sampler(sampler, value_range)

        from tqdm.auto import tqdm

        bar = tqdm(total=len(seeds), initial=self.position, desc="N3 rejection", unit="img", disable=not progress)
        with preserved_training_state(sampler.modules()), sampler.context():
            while self.position < len(seeds):
                batch = seeds[self.position : self.position + batch_size]
                images = self._generate(sampler, batch)
                self.update(torch.tensor(batch), self.extractor(images, value_range=sampler.value_range))
                self.position += len(batch)
                bar.update(len(batch))
                if checkpoint is not None:
                    self.save(checkpoint)
        bar.close()
        return self.result()

    def _generate(self, sampler, seeds: list[int]) -> torch.Tensor:
        generators = [torch.Generator(device=sampler.generator_device).manual_seed(s) for s in seeds]
        images = to_image_tensor(sampler.generate(seeds, generators))
        if images.shape[0] != len(seeds):
            raise ValueError(f"sampler returned {images.shape[0]} images for {len(seeds)} seeds")
        return images.to(self.bank.device)

    def regenerate(self, sampler, seeds=None, *, batch_size: int = 64, value_range=None) -> torch.Tensor:
        """The images of ``seeds`` (default: the accepted seeds), as the sampler draws them."""
        seeds = self.result().accepted_seeds.tolist() if seeds is None else [int(s) for s in seeds]
        sampler = _seeded_sampler(sampler, value_range)
        with preserved_training_state(sampler.modules()), sampler.context():
            parts = [self._generate(sampler, seeds[i : i + batch_size]).cpu() for i in range(0, len(seeds), batch_size)]
        return torch.cat(parts) if parts else torch.empty(0)

    def result(self) -> N3Result:
        accepted = self.best_seed[self.best_seed != _NO_SEED].sort().values
        return N3Result(accepted, self.best_seed.clone(), self.best_similarity.clone(), self.position, self.n_invalid)

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        return {
            "best_seed": self.best_seed.clone(),
            "best_similarity": self.best_similarity.clone(),
            "position": self.position,
            "n_invalid": self.n_invalid,
            "seed_fingerprint": self.seed_fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["best_seed"].shape != self.best_seed.shape:
            raise ValueError(
                f"state is for {state['best_seed'].numel()} training images, this sampler has {self.best_seed.numel()}"
            )
        self.best_seed = state["best_seed"].to(torch.int64).clone()
        self.best_similarity = state["best_similarity"].to(torch.float64).clone()
        self.position, self.n_invalid = int(state["position"]), int(state["n_invalid"])
        self.seed_fingerprint = state["seed_fingerprint"]

    def save(self, path) -> None:
        """Write the state to one ``.safetensors`` file (tensors, with the counters as JSON metadata),
        replaced atomically: a crash leaves the previous state or the new one, never a mix."""
        from safetensors.torch import save_file

        state = self.state_dict()
        tensors = {key: state.pop(key) for key in ("best_seed", "best_similarity")}
        metadata = {"n3_state": json.dumps(state)}
        write_atomic(Path(path).with_suffix(".safetensors"),
                     lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def load(self, path) -> "N3RejectionSampler":
        """Restore a state written by :meth:`save` (no pickle involved)."""
        from safetensors import safe_open

        file = Path(path).with_suffix(".safetensors")
        with safe_open(str(file), framework="pt") as handle:
            counters = json.loads((handle.metadata() or {})["n3_state"])
            tensors = {key: handle.get_tensor(key) for key in ("best_seed", "best_similarity")}
        self.load_state_dict({**tensors, **counters})
        return self
