"""DiADMSampler: how the IRS monitor (and N3) sample a :class:`~diadm.pipeline.DiADMPipeline`.

The monitor identifies every sample by its global index in an evaluation; for DiADM the condition
must be fixed by that index too, so that 1 or 2 processes, any batch size and a resumed run all draw
the same (condition, noise) pairs. Sample ``i`` is conditioned on training instance
``perm_r[i mod N]`` with ``r = i // N`` and ``perm_r`` a permutation of the N bank rows seeded by
``(condition_seed, r)``: every training instance once per N samples (the pipeline's "cycle"
strategy), reproducibly, without touching the pipeline's own cycle state.

The pipeline hands this sampler to ``irs_callbacks.samplers.as_sampler`` through the sampler
protocol (``DiADMPipeline.as_irs_sampler``); ``irs_callbacks`` never imports ``diadm``.
"""

from __future__ import annotations

import numpy as np
import torch

from irs_callbacks.samplers import PipelineSampler

__all__ = ["DiADMSampler"]


class DiADMSampler(PipelineSampler):
    """Samples a ``DiADMPipeline`` with the condition of each sample fixed by its global index.

    Args:
        pipeline: the ``DiADMPipeline``.
        condition_seed: seeds the permutations of the bank (default 0).
        **options: :class:`~irs_callbacks.samplers.PipelineSampler` options (``num_inference_steps``,
            ``ema``, ...) and pipeline call arguments (e.g. ``guidance_scale``).
    """

    def __init__(self, pipeline, *, condition_seed: int = 0, **options):
        super().__init__(pipeline, **options)
        self.condition_seed = int(condition_seed)
        self._permutations: dict[int, torch.Tensor] = {}

    def condition_indices(self, indices) -> torch.Tensor:
        """Bank rows conditioning the samples with global ``indices`` (int64 [B])."""
        n = int(self.pipeline.feature_bank.n_train)
        rows = []
        for i in indices:
            r = int(i) // n
            if r not in self._permutations:
                seeds = np.random.SeedSequence([self.condition_seed & 0xFFFFFFFF, self.condition_seed >> 32, r, 0xD1AD])
                generator = torch.Generator().manual_seed(int(seeds.generate_state(1, np.uint32)[0]))
                self._permutations[r] = torch.randperm(n, generator=generator)
                if len(self._permutations) > 64:  # a long N3 seed range: keep the memory bounded
                    self._permutations.pop(next(iter(self._permutations)))
            rows.append(int(self._permutations[r][int(i) % n]))
        return torch.tensor(rows, dtype=torch.long)

    def generate(self, indices, generators):
        kwargs = dict(self.call_kwargs)
        if self.num_inference_steps is not None:
            kwargs["num_inference_steps"] = self.num_inference_steps
        conditions = self.pipeline.feature_bank(self.condition_indices(indices))
        return self._quiet_pipeline()(batch_size=len(indices), conditions=conditions, generator=generators,
                                      output_type=self.output_type, **kwargs)
