"""Feature extractors for image retrieval (IRS paper, Sec. 3.2 and 4.1, appendices 9 and 11).

A :class:`FeatureExtractor` maps a batch of images to one feature vector per image. It owns the
whole preprocessing, so callers pass images as they have them:

- NCHW ``uint8`` in [0, 255], or floating point in ``value_range`` ((0, 1) or (-1, 1));
- 1 (grey, repeated to RGB) or 3 channels, any height and width (antialiased bicubic resize to
  the extractor's ``input_size``, then the network's own mean/std normalisation);
- images containing NaN/Inf give feature rows of NaN (never an error), so retrieval can count them
  as invalid samples.

Built-in extractors (``list_extractors()``), all built with timm:

========================  ===========================================  =======  ===========
name                      network / weights                            dim      input size
========================  ===========================================  =======  ===========
``random-inception``      Inception v3, random init (fixed seed)       2048     299
``inception-v3``          Inception v3, timm ``inception_v3.tf_in1k``  2048     299
``swav-resnet50``         ResNet-50, SwAV 800 ep (official FB URL)     2048     224
``dinov2-vitb14``         timm ``vit_base_patch14_dinov2.lvd142m``     768      224
``clip-vitb16``           timm ``vit_base_patch16_clip_224.openai``    512      224
``convnext-base``         timm ``convnext_base.fb_in22k_ft_in1k``      1024     224
``mae-vitb16``            timm ``vit_base_patch16_224.mae``            768      224
========================  ===========================================  =======  ===========

The library default is ``random-inception``: it needs no download (works offline), is bit-for-bit
reproducible from its seed, and had the smallest measurement gap on real data of all extractors
in the paper (Table 6, "Random"). Its weights are drawn from a private generator state, so
building it never touches the caller's global RNG.

Calibration of ``random-inception``: with untrained batch norms (running mean 0, variance 1) the
network is a chain of bias-free convolutions, linear normalisations, ReLUs and pools, so it is
positively homogeneous in its normalised input and every layer multiplies the scale by about
the same gain: raw features have norms around 1e8. The extractor multiplies them by one power of
two, ``2 ** scale_log2``, chosen at construction so that on a fixed synthetic input (8 images of
1/f "pink" noise at the input size, drawn from ``torch.Generator().manual_seed(0)``, see
:func:`pink_noise`) the features' root-mean-square per dimension is 1 to within a factor
``sqrt(2)``. Multiplying by a power of two is exact in binary floating point, so nearest
neighbours, ties and cosine similarities are bit for bit those of the uncalibrated network (the
paper's "Random" extractor); only the scale changes, to one on which FID, KID and Vendi are
meaningful numbers. ``scale_log2`` is part of the extractor's ``identity["calibration"]``, so
reference banks built before the calibration are refused (and rebuilt by caches).

Input values: float images must lie in their declared ``value_range``; values beyond it by more
than :data:`VALUE_RANGE_TOLERANCE` of its width are an error (a one-line message naming the
range, the observed minimum and maximum and the likely fix, e.g. floats in 0..255 under the
default (0, 1)); smaller overshoots (unclamped sampler output, rounding) are clipped into the
range. NaN/Inf values are never an error: such images give NaN feature rows (invalid samples).
``uint8`` images are 0..255 and ``uint16`` images (16-bit PNGs, uint16 arrays) are 0..65535.

Offline: pretrained weights already in the local Hugging Face (or torch hub) cache are loaded
from it without any network access; otherwise ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``)
fails at once, and without it one quick reachability check of the download host (a few seconds
at most, through the configured proxy if any) precedes the download, so that an offline machine
gets :class:`WeightsUnavailableError` (naming ``weights=PATH`` / ``--weights``) in seconds
instead of a minute of retries. The paper's own IRS default is SwAV; the
FID/DiADM feature is Inception v3 (``inception-v3`` uses timm's TF-ported ImageNet weights, not the
bit-exact pytorch-fid network; pass that network as a custom extractor if you need it).

Any ``torch.nn.Module`` or callable mapping float images in [0, 1] (NCHW, RGB, at ``input_size``
when given, otherwise at the size they come in) to ``[B, d]`` features is accepted in place of a
name, e.g. the re-identification networks of the paper's appendix 11.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import sys
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from irs_callbacks.validation import check_value_range

__all__ = [
    "DEFAULT_EXTRACTOR",
    "FeatureExtractor",
    "WeightsUnavailableError",
    "ValueRangeError",
    "get_extractor",
    "register_extractor",
    "list_extractors",
    "extract_features",
    "load_state_dict_file",
    "to_unit_range",
    "pink_noise",
    "VALUE_RANGE_TOLERANCE",
]

DEFAULT_EXTRACTOR = "random-inception"
RANDOM_INIT_SEED = 0
SWAV_URL = "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".pth.tar")
#: float images may exceed their value_range by this fraction of its width (clipped); more is an error
VALUE_RANGE_TOLERANCE = 0.1
CALIBRATION_IMAGES, CALIBRATION_SEED = 8, 0
HUB_PROBE_TIMEOUT_S = 3.0


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could neither be downloaded nor found locally."""


class ValueRangeError(ValueError):
    """Float images with values outside their declared ``value_range`` (beyond the tolerance).

    ``value_range`` is the declared (low, high), ``observed`` the (min, max) of the finite
    values, ``suggested`` a range that would hold them (e.g. (0, 255)) or None."""

    def __init__(self, message: str, value_range, observed, suggested=None):
        super().__init__(message)
        self.value_range, self.observed, self.suggested = tuple(value_range), tuple(observed), suggested


# --------------------------------------------------------------------------- the extractor


class FeatureExtractor(nn.Module):
    """Images -> features ``[B, dim]`` float32 (see the module docstring for accepted inputs).

    Attributes: ``name``, ``dim``, ``input_size`` ((H, W) or None = keep the input size),
    ``output_scale`` (the network's output is multiplied by it; ``random-inception``: its
    calibration ``2 ** scale_log2``), ``identity`` (JSON-able dict naming network, weights,
    calibration and preprocessing; stored in reference bank metadata so that a cache is only
    reused with the very same features).
    """

    def __init__(
        self,
        model: nn.Module | Callable,
        *,
        name: str,
        input_size: int | tuple[int, int] | None,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        identity: dict | None = None,
        dim: int | None = None,
        autocast: bool = True,
        channels_last: bool = False,
        output_scale: float = 1.0,
    ):
        super().__init__()
        self.model = model if isinstance(model, nn.Module) else _CallableModule(model)
        self.model.eval()
        self.name = name
        self.input_size = None if input_size is None else _size_pair(input_size, "input_size")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.autocast = bool(autocast)
        self.channels_last = bool(channels_last)  # faster convolutions on CPU
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._dim = dim
        self.output_scale = float(output_scale)  # features = network output * output_scale
        if not (math.isfinite(self.output_scale) and self.output_scale > 0):
            raise ValueError(f"output_scale must be a positive finite number, got {output_scale!r}")
        identity = dict(identity or {})
        if self.output_scale != 1.0 and "calibration" not in identity:
            identity["output_scale"] = self.output_scale
        self.identity = {
            "name": name,
            **identity,
            "input_size": None if self.input_size is None else list(self.input_size),
            "preprocessing": {
                "resize": "bicubic, antialias, clamp [0, 1]",
                "mean": [round(float(m), 8) for m in mean],
                "std": [round(float(s), 8) for s in std],
            },
        }

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return self.mean.device

    @property
    def dim(self) -> int:
        """Feature dimension (probed once with a blank image when the network does not say)."""
        if self._dim is None:
            size = self.input_size or (224, 224)
            self._dim = int(self(torch.zeros(1, 3, *size, device=self.device)).shape[1])
        return self._dim

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_size={self.input_size}"

    def preprocess(self, images: torch.Tensor, value_range=(0, 1)) -> torch.Tensor:
        """Validated images -> float32 RGB in [0, 1] at ``input_size`` (not yet normalised)."""
        x = to_unit_range(images, value_range)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0.0, 1.0)  # bicubic overshoot; NaN stays NaN
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor, value_range=(0, 1)) -> torch.Tensor:
        out_device = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
        x = self.preprocess(images.to(self.device) if isinstance(images, torch.Tensor) else images, value_range)
        # non-finite input pixels (checked before the resize, whose clamp would hide +-Inf) or outputs
        invalid = ~torch.isfinite(x).flatten(1).all(dim=1)
        if images.is_floating_point():
            invalid |= ~torch.isfinite(images).flatten(1).all(dim=1).to(invalid.device)
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        use_autocast = self.autocast and x.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_autocast):
            features = self.model(x)
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != x.shape[0]:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"extractor {self.name!r} must return features of shape [B, d], got {shape}")
        features = features.float()
        if self.output_scale != 1.0:
            features = features * self.output_scale
        if invalid.any():  # an invalid image never yields a usable feature
            features = features.clone()
            features[invalid] = float("nan")
        return features.to(out_device)


class _CallableModule(nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _size_pair(size, name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair):
        raise ValueError(f"{name} must be a positive int or a pair (height, width), got {size!r}")
    return pair


def to_unit_range(images, value_range=(0, 1)) -> torch.Tensor:
    """NCHW ``uint8`` [0, 255], ``uint16`` [0, 65535] or float in ``value_range`` -> float32 in [0, 1].

    Checks the layout and the values: finite float values beyond ``value_range`` by more than
    :data:`VALUE_RANGE_TOLERANCE` of its width raise a ValueError naming the range, the observed
    minimum and maximum and the likely fix; smaller overshoots are clipped. NaN/Inf pass
    through unchanged (they mark invalid images, never an error).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape [B, C, H, W], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape [B, C, H, W] (NCHW), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B = 0)")
    if images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must have 1 or 3 channels in dim 1 (NCHW), got shape {tuple(images.shape)}; "
            "channels-last arrays need .permute(0, 3, 1, 2)"
        )
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if images.dtype == torch.uint16:
        return images.float() / 65535.0
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 in [0, 255], uint16 in [0, 65535] or floating point, "
                        f"got dtype {images.dtype}")
    low, high = check_value_range(value_range)
    x = images.float().sub(low).div_(high - low)  # a new tensor even when images is float32
    lowest, highest = torch.stack(torch.aminmax(x)).tolist()  # one pass, one device->host sync
    finite = None
    if not (math.isfinite(lowest) and math.isfinite(highest)):  # NaN/Inf present: the finite values' extremes
        finite = torch.isfinite(x)
        extremes = torch.stack((torch.where(finite, x, torch.inf).amin(), torch.where(finite, x, -torch.inf).amax()))
        lowest, highest = extremes.tolist()  # +-inf when no value is finite
    if lowest < -VALUE_RANGE_TOLERANCE or highest > 1.0 + VALUE_RANGE_TOLERANCE:
        raise _range_error(low, high, lowest * (high - low) + low, highest * (high - low) + low)
    if lowest < 0.0 or highest > 1.0:  # within the tolerance: clip, keeping NaN/Inf as they are
        x = x.clamp_(0.0, 1.0) if finite is None else torch.where(finite, x.clamp(0.0, 1.0), x)
    return x


def _range_error(low: float, high: float, lowest: float, highest: float) -> ValueRangeError:
    """One line: the declared range, what was seen, and the likely fix."""
    seen = f"images have values in [{lowest:.4g}, {highest:.4g}], outside value_range=({low:g}, {high:g})"
    if lowest >= low - VALUE_RANGE_TOLERANCE * (high - low) and 1.5 * high < highest <= 255 * 1.01 and low >= 0:
        suggested, fix = (0.0, 255.0), "floats in 0..255: divide by 255 or pass value_range=(0, 255)"
    elif (low, high) == (0.0, 1.0) and -1.01 <= lowest < 0 and highest <= 1.01:
        suggested = (-1.0, 1.0)
        fix = "floats in -1..1 (the diffusers convention): pass value_range=(-1, 1) or map them with x / 2 + 0.5"
    else:
        suggested = (float(math.floor(lowest)), float(math.ceil(highest)))
        fix = f"pass the range the images are in (value_range=({suggested[0]:g}, {suggested[1]:g})?) or clamp them"
    message = f"{seen} (tolerance {VALUE_RANGE_TOLERANCE:.0%} of its width): {fix}"
    return ValueRangeError(message, (low, high), (lowest, highest), suggested)


# --------------------------------------------------------------------------- weights


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """Read a weights file safely: safetensors, or ``torch.load(weights_only=True)`` (never unpickles
    arbitrary objects). Unwraps ``{"state_dict": ...}``/``{"model": ...}`` containers."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle with arbitrary objects, corrupt file, ...
            raise ValueError(
                f"cannot read weights file {path!r} as a plain state dict (weights_only=True): {error}"
            ) from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path!r} does not hold a state dict of tensors")
    return dict(state)


def file_sha256(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def module_sha256(module: nn.Module) -> str:
    """Fingerprint of a module's parameters and buffers (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _strip_module_prefix(state: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in state.items()}


def swav_to_timm(state: dict) -> dict:
    """SwAV checkpoint keys -> timm ``resnet50``: strip DistributedDataParallel's ``module.``
    and drop the SwAV heads (``projection_head.*``, ``prototypes.*``)."""
    state = _strip_module_prefix(state)
    return {k: v for k, v in state.items() if not k.startswith(("projection_head.", "prototypes."))}


def _load_into(model: nn.Module, state: dict, *, source: str, extractor: str) -> None:
    """Load ``state`` strictly, except for classifier weights the feature model does not have."""
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:  # timm's converter for official (non-timm) checkpoint layouts
        state = filter_fn(state, model)
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    prefixes = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier or ()))
    state = {k: v for k, v in state.items() if k in own or not k.startswith(prefixes)}
    mismatched = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        def few(keys):
            return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")

        problems = [f"{label}: {few(keys)}" for label, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched)) if keys]
        raise ValueError(f"weights {source} do not fit extractor {extractor!r}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _unavailable(name: str, where: str, error: BaseException) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"pretrained weights for extractor {name!r} are not available ({type(error).__name__}: {error}). "
        f"Either connect to the internet so they can be downloaded ({where}), or download them "
        f"yourself and pass weights=PATH (CLI: --weights PATH; a {'/'.join(WEIGHT_SUFFIXES[:3])} file). "
        f"The offline default extractor {DEFAULT_EXTRACTOR!r} needs no weights."
    )


def download_state_dict(url: str) -> dict:
    """Download (or read from the torch hub cache) a plain state dict from ``url``."""
    return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, weights_only=True)


def _truthy(value) -> bool:
    return str(value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` asks for offline use (read now)."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def _endpoint_reachable(url: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """One quick check that a TCP connection to ``url``'s host (or to the configured HTTPS proxy)
    can be opened within ``timeout`` seconds, name resolution included. (reachable, reason)."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host or ""):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname, proxy_parts.port or 8080
    outcome = []

    def attempt():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append("")
        except OSError as error:
            outcome.append(f"{type(error).__name__}: {error}")

    worker = threading.Thread(target=attempt, daemon=True)  # name resolution has no timeout of its own
    worker.start()
    worker.join(timeout)
    if not outcome:
        return False, f"no connection to {host}:{port} within {timeout:g} s"
    return (True, "") if outcome[0] == "" else (False, f"cannot connect to {host}:{port} ({outcome[0]})")


def _cached_hub_weights(timm_name: str) -> str | None:
    """Path of the weights of timm model ``timm_name`` in the local Hugging Face cache, or None."""
    import timm

    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cfg = timm.models.get_pretrained_cfg(timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    if hub_id.endswith("/"):  # timm's shorthand "timm/" means "timm/<model name>"
        hub_id = hub_id + timm_name
    names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else ["model.safetensors",
                                                                                 "pytorch_model.bin"]
    for filename in names:
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _torch_hub_cached(url: str) -> bool:
    name = os.path.basename(urllib.parse.urlsplit(url).path)
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", name))


def _check_online(name: str, where: str, url: str) -> None:
    """Raise :class:`WeightsUnavailableError` at once when offline use is asked for, or after one
    quick failed attempt to reach ``url``'s host."""
    if hub_offline():
        raise _unavailable(name, where, OSError("offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set) "
                                                "and the weights are not in the local cache"))
    reachable, reason = _endpoint_reachable(url)
    if not reachable:
        raise _unavailable(name, where, OSError(reason))


# --------------------------------------------------------------------------- calibration


def pink_noise(count: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """``count`` RGB images ``[count, 3, H, W]`` of 1/f ("pink") noise in [0, 1], the classical
    surrogate for natural-image statistics: per image and channel, complex Gaussian Fourier
    coefficients divided by the spatial frequency |f| (zero mean), an inverse real FFT, then the
    image min-max scaled to [0, 1]. Deterministic given ``generator`` (CPU)."""
    h, w = size
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    radius = torch.sqrt(fx ** 2 + fy ** 2)
    radius[0, 0] = math.inf  # no DC term
    shape = (count, 3, h, w // 2 + 1)
    spectrum = torch.complex(torch.randn(shape, generator=generator, dtype=torch.float64),
                             torch.randn(shape, generator=generator, dtype=torch.float64)) / radius
    x = torch.fft.irfft2(spectrum, s=(h, w))
    x = x - x.amin(dim=(1, 2, 3), keepdim=True)
    return (x / x.amax(dim=(1, 2, 3), keepdim=True)).float()


_SCALE_CACHE: dict[tuple, int] = {}


def calibration_scale_log2(model: nn.Module, size: tuple[int, int], mean, std, *, key=None) -> int:
    """``-round(log2(RMS))`` of the features ``model`` gives the :func:`pink_noise` calibration
    input (``CALIBRATION_IMAGES`` images, seed ``CALIBRATION_SEED``, normalised with ``mean``/``std``),
    RMS over images and feature dimensions; computed on the CPU in float32, cached per ``key``."""
    if key is not None and key in _SCALE_CACHE:
        return _SCALE_CACHE[key]
    images = pink_noise(CALIBRATION_IMAGES, size, torch.Generator().manual_seed(CALIBRATION_SEED))
    x = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model.eval()(x.float()).double()
    rms = float(out.square().mean().sqrt())
    if not (math.isfinite(rms) and rms > 0):
        raise RuntimeError(f"calibration of the random extractor failed: feature RMS {rms} on the calibration input")
    scale_log2 = -round(math.log2(rms))
    if key is not None:
        _SCALE_CACHE[key] = scale_log2
    return scale_log2


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TimmSpec:
    """How to build one built-in extractor with timm."""

    architecture: str
    pretrained_tag: str | None  # timm tag of the pretrained weights; None = no timm weights
    input_size: int
    mean: tuple
    std: tuple
    url: str | None = None  # official weights outside timm (downloaded by us)
    remap: Callable[[dict], dict] = _strip_module_prefix
    min_input_size: int = 32
    multiple_of: int = 1  # ViT patch size
    vit: bool = False  # pass img_size to timm
    keep_head: bool = False  # keep timm's head (CLIP's image projection)
    random_init: bool = False  # never pretrained (random-inception)
    calibrate: bool = False  # multiply the output by 2**scale_log2 (module docstring: calibration)
    autocast: bool = True  # float16 autocast on CUDA by default
    kwargs: dict = field(default_factory=dict)

    @property
    def timm_name(self) -> str:
        return f"{self.architecture}.{self.pretrained_tag}" if self.pretrained_tag else self.architecture


BUILTIN_SPECS: dict[str, TimmSpec] = {
    # random init: activations grow to ~1e8 through the un-trained BatchNorms, beyond float16 range;
    # the output is calibrated by a power of two (module docstring)
    "random-inception": TimmSpec("inception_v3", None, 299, (0.5,) * 3, (0.5,) * 3, min_input_size=75,
                                 random_init=True, autocast=False, calibrate=True),
    "inception-v3": TimmSpec("inception_v3", "tf_in1k", 299, (0.5,) * 3, (0.5,) * 3, min_input_size=75),
    "swav-resnet50": TimmSpec("resnet50", None, 224, IMAGENET_MEAN, IMAGENET_STD, url=SWAV_URL, remap=swav_to_timm),
    "dinov2-vitb14": TimmSpec("vit_base_patch14_dinov2", "lvd142m", 224, IMAGENET_MEAN, IMAGENET_STD,
                              multiple_of=14, vit=True, min_input_size=14),
    "clip-vitb16": TimmSpec("vit_base_patch16_clip_224", "openai", 224, (0.48145466, 0.4578275, 0.40821073),
                            (0.26862954, 0.26130258, 0.27577711), multiple_of=16, vit=True, keep_head=True,
                            kwargs={"num_classes": 512},  # keep the image projection (CLIP embedding)
                            min_input_size=16),
    "convnext-base": TimmSpec("convnext_base", "fb_in22k_ft_in1k", 224, IMAGENET_MEAN, IMAGENET_STD),
    "mae-vitb16": TimmSpec("vit_base_patch16_224", "mae", 224, IMAGENET_MEAN, IMAGENET_STD,
                           multiple_of=16, vit=True, min_input_size=16),
}
ALIASES = {
    "random": "random-inception", "inception": "inception-v3", "swav": "swav-resnet50",
    "dinov2": "dinov2-vitb14", "clip": "clip-vitb16", "convnext": "convnext-base", "mae": "mae-vitb16",
}
_REGISTRY: dict[str, Callable[..., FeatureExtractor]] = {}


def register_extractor(name: str, factory: Callable[..., FeatureExtractor], *, overwrite: bool = False) -> None:
    """Register ``factory(*, weights=None, device=None, **options) -> FeatureExtractor`` as ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"extractor name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    if (name in _REGISTRY or name in ALIASES) and not overwrite:
        raise ValueError(f"extractor {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def list_extractors() -> list[str]:
    """Names accepted by :func:`get_extractor` (aliases not included)."""
    return sorted(_REGISTRY)


def _timm_factory(name: str, spec: TimmSpec):
    def factory(*, weights=None, device=None, input_size=None, pretrained=True, seed=RANDOM_INIT_SEED,
                autocast=None) -> FeatureExtractor:
        import timm

        size = _size_pair(spec.input_size if input_size is None else input_size, "input_size")
        if min(size) < spec.min_input_size or any(s % spec.multiple_of for s in size):
            rule = f">= {spec.min_input_size}" + (f" and a multiple of {spec.multiple_of}" if spec.multiple_of > 1 else "")
            raise ValueError(f"input_size for extractor {name!r} must be {rule} pixels, got {input_size!r}")
        kwargs = dict(spec.kwargs)
        if not spec.keep_head:
            kwargs["num_classes"] = 0
        if spec.vit:
            kwargs["img_size"] = size
        if spec.random_init and weights is not None:
            raise ValueError(f"extractor {name!r} is randomly initialised and takes no weights (got weights={weights!r})")
        use_random = spec.random_init or (not pretrained and weights is None)

        if use_random:
            with torch.random.fork_rng(devices=[]):  # never disturbs the caller's RNG
                torch.manual_seed(seed)
                model = timm.create_model(spec.architecture, pretrained=False, **kwargs)
            weights_id = {"weights": f"random-init(seed={int(seed)})", "weights_sha256": module_sha256(model)}
        elif weights is not None:
            path = os.fspath(weights)
            model = timm.create_model(spec.architecture, pretrained=False, **kwargs)
            _load_into(model, spec.remap(load_state_dict_file(path)), source=f"file {path!r}", extractor=name)
            weights_id = {"weights": f"file:{os.path.basename(path)}", "weights_sha256": file_sha256(path)}
        elif spec.url is not None:
            if not _torch_hub_cached(spec.url):
                _check_online(name, f"from {spec.url}", spec.url)
            model = timm.create_model(spec.architecture, pretrained=False, **kwargs)
            try:
                state = download_state_dict(spec.url)
            except Exception as error:
                raise _unavailable(name, f"from {spec.url}", error) from error
            _load_into(model, spec.remap(state), source=f"from {spec.url}", extractor=name)
            weights_id = {"weights": spec.url}
        else:
            where = f"timm.create_model({spec.timm_name!r}, pretrained=True), Hugging Face hub timm/{spec.timm_name}"
            cached = _cached_hub_weights(spec.timm_name)
            if cached is None:
                _check_online(name, where, _hub_endpoint())
            overlay = {} if cached is None else {"pretrained_cfg_overlay": {"file": cached}}  # no network
            try:
                model = timm.create_model(spec.timm_name, pretrained=True, **overlay, **kwargs)
            except Exception as error:
                raise _unavailable(name, where, error) from error
            weights_id = {"weights": f"timm:{spec.timm_name}"}
        output_scale, calibration = 1.0, {}
        if spec.calibrate:
            scale_log2 = calibration_scale_log2(model, size, spec.mean, spec.std,
                                                key=(spec.architecture, weights_id["weights_sha256"], size))
            output_scale = 2.0 ** scale_log2
            calibration = {"calibration": {
                "method": "output times 2**scale_log2: feature RMS 1 (within sqrt 2) on pink noise",
                "input": f"{CALIBRATION_IMAGES} pink_noise images, torch.Generator seed {CALIBRATION_SEED}",
                "scale_log2": scale_log2}}
        extractor = FeatureExtractor(
            model, name=name, input_size=size, mean=spec.mean, std=spec.std,
            identity={"architecture": f"timm:{spec.architecture}", **weights_id, **calibration},
            dim=getattr(model, "num_classes", 0) if spec.keep_head else model.num_features,
            autocast=spec.autocast if autocast is None else autocast, channels_last=not spec.vit,
            output_scale=output_scale,
        )
        return extractor.to(_resolve_device(device))

    factory.__doc__ = f"Build extractor {name!r} (timm {spec.timm_name})."
    return factory


for _name, _spec in BUILTIN_SPECS.items():
    register_extractor(_name, _timm_factory(_name, _spec))


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def get_extractor(name: Any = DEFAULT_EXTRACTOR, *, weights=None, device=None, **options) -> FeatureExtractor:
    """Build a feature extractor by registered name, or wrap a custom one.

    name: a registered name (``list_extractors()``; short aliases such as ``"swav"`` work too), a
        :class:`FeatureExtractor` (returned as is, moved to ``device`` if given), or any
        ``torch.nn.Module``/callable mapping float images in [0, 1] (NCHW, RGB) to ``[B, d]``.
    weights: None = the extractor's official pretrained weights (downloaded by timm / torch.hub),
        or a local .safetensors/.pth/.pt file (state dict; read without unpickling objects).
    device: None = CUDA when available, else CPU.
    options: ``input_size`` (int or (H, W); recorded in ``.identity``), ``pretrained=False``
        (random init from ``seed`` instead of downloading; for tests), ``seed`` (random init,
        default 0), ``autocast`` (float16 on CUDA; default True except for ``random-inception``,
        whose activations exceed the float16 range). Custom extractors also take
        ``name`` (``custom_name``), ``dim``, ``mean``/``std`` (default none) and ``identity``.
    Raises :class:`WeightsUnavailableError` when pretrained weights cannot be had: at once with
    ``HF_HUB_OFFLINE=1``, otherwise after one quick reachability check (module docstring); weights
    in the local Hugging Face / torch hub cache are used without network access.
    """
    if isinstance(name, FeatureExtractor):
        if weights is not None or options:
            raise ValueError("weights/options cannot be applied to an already built FeatureExtractor")
        return name if device is None else name.to(device)
    if isinstance(name, str):
        key = ALIASES.get(name, name)
        if key not in _REGISTRY:
            raise ValueError(f"unknown extractor {name!r}; known extractors: {', '.join(list_extractors())} "
                             f"(aliases: {', '.join(sorted(ALIASES))}), or pass a torch.nn.Module / callable")
        return _REGISTRY[key](weights=weights, device=device, **options)
    if callable(name):
        return _custom_extractor(name, weights=weights, device=device, **options)
    raise TypeError(f"extractor must be a registered name, a torch.nn.Module or a callable, got {type(name).__name__}")


def _custom_extractor(model, *, weights=None, device=None, input_size=None, custom_name=None, dim=None,
                      mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), identity=None, autocast=True) -> FeatureExtractor:
    if weights is not None:
        if not isinstance(model, nn.Module):
            raise ValueError("weights=PATH needs a torch.nn.Module extractor, got a plain callable")
        path = os.fspath(weights)
        _load_into(model, _strip_module_prefix(load_state_dict_file(path)), source=f"file {path!r}",
                   extractor=type(model).__name__)
    label = custom_name or getattr(model, "__qualname__", None) or type(model).__qualname__
    ident = {"architecture": f"custom:{type(model).__module__}.{type(model).__qualname__}"}
    if isinstance(model, nn.Module):
        ident["weights_sha256"] = module_sha256(model)
    ident.update(identity or {})
    extractor = FeatureExtractor(model, name=f"custom:{label}", input_size=input_size, mean=mean, std=std,
                                 identity=ident, dim=dim, autocast=autocast)
    return extractor.to(_resolve_device(device))


# --------------------------------------------------------------------------- data sets


def extract_features(extractor, data, *, batch_size=64, device=None, value_range=(0, 1), progress=True,
                     num_workers=0, hasher=None) -> torch.Tensor:
    """Features ``[N, d]`` float32 on CPU of all images in ``data``.

    data: a tensor or ndarray of images (NCHW, or NHWC/NHW arrays, see
        :func:`irs_callbacks.image_io.as_image_tensor`), an image folder or .npy/.npz path, a
        ``Dataset`` or a ``DataLoader`` (items may be images, (image, ...) tuples or dicts with an
        ``image``/``images``/``img``/``pixel_values`` key). Images of unequal size are resized one
        by one. ``hasher``: optional ``hashlib`` object updated with the raw image bytes (used for
        cache fingerprints).
    """
    from irs_callbacks import image_io

    extractor = get_extractor(extractor, device=device)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    check_value_range(value_range)
    batches, total = image_io.iter_image_batches(data, batch_size=batch_size, num_workers=num_workers)
    from tqdm.auto import tqdm

    out = []
    with tqdm(total=total, desc=f"features ({extractor.name})", unit="img", disable=not progress,
              file=sys.stderr) as bar:
        for batch in batches:
            if hasher is not None:
                image_io.update_hash(hasher, batch)
            out.append(_features_of_batch(extractor, batch, value_range).cpu())
            bar.update(len(batch))
    if not out:
        raise ValueError("data contains no images")
    return torch.cat(out)


def _features_of_batch(extractor: FeatureExtractor, batch, value_range) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return extractor(batch, value_range=value_range)
    # list of single images with different sizes: bring each to the input size first
    images = [extractor.preprocess(image.unsqueeze(0).to(extractor.device), value_range) for image in batch]
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:  # custom extractor without input_size: cannot stack
        raise ValueError(f"images have different sizes {sorted(s[-2:] for s in shapes)[:3]}...; "
                         f"give the extractor an input_size to resize them")
    return extractor(torch.cat(images), value_range=(0, 1))
