"""Samplers: what the monitor draws images from, with reproducible per-sample seeds.

A sampler turns *global sample indices* (0 .. budget-1 of one evaluation) into images. Each index
gets its own ``torch.Generator`` seeded from ``(seed, index)``, so the same seed gives the same
images whatever the batch size or the number of processes (each process draws a slice of the
indices). Three kinds, all made by :func:`as_sampler`:

- :class:`PipelineSampler` -- any diffusers ``DiffusionPipeline`` that generates unconditionally
  (DDPM, DDIM, ...), called as
  ``pipeline(batch_size=B, generator=[one generator per image], num_inference_steps=...,
  output_type="pt")``; optional EMA weights (diffusers ``EMAModel``: store / copy_to / restore).
  The generators live on the pipeline's device (no host-to-device copies of the noise, and no
  diffusers warning per batch); images are therefore reproducible per device type.
  Pipelines that know better provide ``as_irs_sampler(**options)`` (e.g. ``diadm.DiADMPipeline``,
  whose conditions are fixed per global sample index too).
- :class:`CallableSampler` -- a plain callable ``fn(batch_size, generator) -> images`` with a
  declared value range; ``generator`` is one ``torch.Generator`` per call, or (with
  ``per_sample_generators=True``) a list with one per image, the diffusers convention.
- a :class:`Sampler` subclass overriding :meth:`Sampler.generate` (full control: it receives the
  global indices too).

While sampling, every sampler leaves the training state exactly as it was
(:func:`preserved_training_state`): the modules' train/eval flags and the global RNG streams
(torch CPU and CUDA, numpy, python ``random``). Images come back as float NCHW in the sampler's
``value_range``.
"""

from __future__ import annotations

import contextlib
import random
from typing import Callable, Sequence

import numpy as np
import torch

from irs_callbacks.validation import check_value_range

__all__ = [
    "Sampler",
    "PipelineSampler",
    "CallableSampler",
    "preserved_rng",
    "seeded_rng",
    "as_sampler",
    "sample_generators",
    "sample_seed",
    "preserved_training_state",
    "to_image_tensor",
]


def sample_seed(seed: int, index: int) -> int:
    """The 63-bit seed of global sample ``index`` in an evaluation with ``seed``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32, int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def sample_generators(indices: Sequence[int], seed: int, device="cpu") -> list[torch.Generator]:
    """One ``torch.Generator`` per global sample index, seeded with :func:`sample_seed`."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, i)) for i in indices]


@contextlib.contextmanager
def preserved_rng():
    """Run a block without touching the caller's random streams: afterwards the global RNG states
    (torch CPU, CUDA if initialised, numpy, python ``random``) are exactly what they were, however
    much the block drew from them (DataLoaders draw a base seed, transforms flip coins)."""
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def seeded_rng(seed: int = 0):
    """:func:`preserved_rng` with every global stream seeded from ``seed`` inside the block, so that
    random data augmentation reads the same way each time (a stable reference-bank cache key)."""
    with preserved_rng():
        torch.manual_seed(seed)  # also seeds CUDA
        np.random.seed(seed)
        random.seed(seed)
        yield


@contextlib.contextmanager
def preserved_training_state(modules: Sequence[torch.nn.Module] = ()):
    """Put ``modules`` in eval mode and run under ``torch.no_grad`` and :func:`preserved_rng`;
    afterwards every submodule's train/eval flag is restored exactly."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        with preserved_rng():
            for module in modules:
                module.eval()
            with torch.no_grad():
                yield
    finally:
        for m, training in flags:
            m.training = training


def to_image_tensor(images) -> torch.Tensor:
    """Pipeline / callable output -> float NCHW tensor (accepts ``.images`` outputs, tuples,
    NCHW or NHWC tensors / arrays, lists of PIL images, uint8)."""
    if hasattr(images, "images"):
        images = images.images
    elif isinstance(images, tuple):
        images = images[0]
    if isinstance(images, list) and images and not isinstance(images[0], (torch.Tensor, np.ndarray)):
        images = np.stack([np.asarray(im) for im in images])  # PIL
        if images.ndim == 3:
            images = images[..., None]
        images = images.transpose(0, 3, 1, 2)
    elif isinstance(images, list):
        images = torch.stack([torch.as_tensor(np.asarray(im)) if isinstance(im, np.ndarray) else im for im in images])
    elif isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        images = images.transpose(0, 3, 1, 2)  # NHWC (diffusers output_type="np")
    tensor = torch.as_tensor(images)
    if tensor.ndim == 3:
        tensor = tensor[:, None]
    if tensor.ndim != 4:
        raise ValueError(f"sampler output must be a batch of images (N, C, H, W), got shape {tuple(tensor.shape)}")
    if tensor.shape[1] == 4:
        tensor = tensor[:, :3]
    return tensor.float() if tensor.dtype != torch.uint8 else tensor


class Sampler:
    """Base class: draws the images of given global sample indices.

    Subclasses override :meth:`generate`; :meth:`modules` lists the modules put in eval mode while
    sampling; :meth:`context` may swap weights (EMA) around a whole evaluation.
    """

    value_range: tuple[float, float] = (0.0, 1.0)

    def generate(self, indices: list[int], generators: list[torch.Generator]) -> torch.Tensor:
        """Images for ``indices`` (one generator each), NCHW in ``value_range`` (or uint8)."""
        raise NotImplementedError

    def modules(self) -> list[torch.nn.Module]:
        return []

    @contextlib.contextmanager
    def context(self):
        yield

    @property
    def generator_device(self) -> str:
        return "cpu"

    def sample(self, indices: Sequence[int], seed: int) -> torch.Tensor:
        """Images of global sample ``indices`` for an evaluation with ``seed`` (inside
        :func:`preserved_training_state` and :meth:`context`, which the monitor opens once per
        evaluation)."""
        indices = [int(i) for i in indices]
        images = to_image_tensor(self.generate(indices, sample_generators(indices, seed, self.generator_device)))
        if images.shape[0] != len(indices):
            raise ValueError(f"sampler returned {images.shape[0]} images for a batch of {len(indices)}")
        return images


class CallableSampler(Sampler):
    """Wraps ``fn(batch_size, generator) -> images`` (NCHW or NHWC, tensor or array).

    Args:
        fn: the callable.
        value_range: the range of its float output, e.g. ``(0, 1)`` or ``(-1, 1)``.
        per_sample_generators: pass a list of generators (one per image, seeded per global
            index: results independent of batch size and process count) instead of one
            generator per call (seeded from the first index of the call).
        model: module(s) to put in eval mode while sampling (restored afterwards).
    """

    def __init__(self, fn: Callable, value_range=(0.0, 1.0), *, per_sample_generators: bool = False, model=None):
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(batch_size, generator) -> images, got {type(fn).__name__}")
        self.fn = fn
        self.value_range = check_value_range(value_range)
        self.per_sample_generators = per_sample_generators
        self._modules = [model] if isinstance(model, torch.nn.Module) else list(model or [])

    def generate(self, indices, generators):
        return self.fn(len(indices), generators if self.per_sample_generators else generators[0])

    def modules(self):
        return self._modules


class PipelineSampler(Sampler):
    """Samples an unconditional diffusers pipeline (DDPM, DDIM, ..., ``diadm.DiADMPipeline``).

    Args:
        pipeline: the pipeline; it must accept ``batch_size``, ``generator`` (a list, one per
            image), ``output_type`` and (if given) ``num_inference_steps``.
        num_inference_steps: override of the pipeline's default, to keep monitoring cheap.
        ema: an EMA holder with ``store(params)``, ``copy_to(params)``, ``restore(params)`` (e.g.
            ``diffusers.training_utils.EMAModel``): its weights are used while sampling and the
            training weights restored afterwards.
        ema_parameters: the parameters the EMA shadows (default: ``pipeline.unet.parameters()``).
        output_type: passed to the pipeline (``"pt"``: NCHW in [0, 1]).
        value_range: range of the pipeline's output (diffusers: (0, 1)).
        **call_kwargs: further keyword arguments for every pipeline call (e.g. ``eta=0.0``).
    """

    def __init__(self, pipeline, *, num_inference_steps: int | None = None, ema=None, ema_parameters=None,
                 output_type: str = "pt", value_range=(0.0, 1.0), **call_kwargs):
        if not callable(pipeline):
            raise TypeError(f"pipeline must be a callable diffusers pipeline, got {type(pipeline).__name__}")
        if num_inference_steps is not None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if ema is not None and not all(hasattr(ema, m) for m in ("store", "copy_to", "restore")):
            raise TypeError("ema must have store(params), copy_to(params) and restore(params) (diffusers EMAModel)")
        self.pipeline = pipeline
        self.num_inference_steps = num_inference_steps
        self.ema, self._ema_parameters = ema, ema_parameters
        self.output_type = output_type
        self.value_range = check_value_range(value_range)
        self.call_kwargs = call_kwargs
        self._quiet = None

    def modules(self):
        components = getattr(self.pipeline, "components", None) or {}
        return [m for m in components.values() if isinstance(m, torch.nn.Module)]

    def _ema_params(self):
        if self._ema_parameters is not None:
            params = self._ema_parameters() if callable(self._ema_parameters) else self._ema_parameters
            return list(params)
        return list(self.pipeline.unet.parameters())

    @property
    def generator_device(self) -> str:
        """The pipeline's device: noise is drawn where the model runs."""
        return str(getattr(self.pipeline, "device", "cpu"))

    def _quiet_pipeline(self):
        """The pipeline with its progress bar off, built once from the pipeline's public
        ``components`` (same modules, so training updates and EMA swaps are seen); the user's own
        pipeline object and its progress-bar settings are never touched. Falls back to the
        pipeline itself when its class cannot be rebuilt from its components."""
        if self._quiet is None:
            self._quiet = self.pipeline
            components = getattr(self.pipeline, "components", None)
            if components:
                try:
                    quiet = type(self.pipeline)(**components)
                    quiet.set_progress_bar_config(disable=True)
                    self._quiet = quiet
                except Exception:  # noqa: BLE001 - an unusual pipeline: keep it as it is
                    pass
        return self._quiet

    @contextlib.contextmanager
    def context(self):
        params = self._ema_params() if self.ema is not None else None
        if params is not None:
            self.ema.store(params)
            self.ema.copy_to(params)
        try:
            yield
        finally:
            if params is not None:
                self.ema.restore(params)

    def generate(self, indices, generators):
        kwargs = dict(self.call_kwargs)
        if self.num_inference_steps is not None:
            kwargs["num_inference_steps"] = self.num_inference_steps
        return self._quiet_pipeline()(batch_size=len(indices), generator=generators, output_type=self.output_type,
                                      **kwargs)


def _is_pipeline(obj) -> bool:
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(obj, DiffusionPipeline)


def as_sampler(obj, *, value_range=None, **options) -> Sampler:
    """A :class:`Sampler` for ``obj``:

    - a :class:`Sampler` is returned as is;
    - an object with a method ``as_irs_sampler(**options)`` (the sampler protocol: a pipeline that
      knows best how it should be sampled, e.g. ``diadm.DiADMPipeline``) gives that method's
      result, which must be a :class:`Sampler`;
    - a diffusers pipeline becomes a :class:`PipelineSampler` (``options``: its keyword arguments,
      e.g. ``num_inference_steps``, ``ema``);
    - a callable ``fn(batch_size, generator)`` becomes a :class:`CallableSampler` (``value_range``
      default (0, 1)).
    """
    if isinstance(obj, Sampler):
        if options or value_range is not None:
            raise ValueError("options cannot be applied to a ready Sampler; configure it when you build it")
        return obj
    if callable(getattr(obj, "as_irs_sampler", None)):
        sampler = obj.as_irs_sampler(**({"value_range": value_range} if value_range else {}), **options)
        if not isinstance(sampler, Sampler):
            raise TypeError(f"{type(obj).__name__}.as_irs_sampler() must return an irs_callbacks.samplers.Sampler, "
                            f"got {type(sampler).__name__}")
        return sampler
    if _is_pipeline(obj):
        return PipelineSampler(obj, value_range=value_range or (0.0, 1.0), **options)
    if callable(obj):
        if "ema" in options or "num_inference_steps" in options:
            raise ValueError("ema and num_inference_steps apply to diffusers pipelines only; "
                             "a plain callable manages its own weights and steps")
        return CallableSampler(obj, value_range or (0.0, 1.0), **options)
    raise TypeError(
        "sampler must be a diffusers DiffusionPipeline, a callable fn(batch_size, generator) -> images, "
        f"or an irs_callbacks.samplers.Sampler, got {type(obj).__name__}"
    )
