"""diffusers models in elucidate: a UNet + scheduler becomes a :class:`~elucidate.Denoiser` whose
formulation is the :class:`~elucidate.DDPM` of the scheduler's config (or :class:`~elucidate.Flow` for the
``FlowMatch*`` schedulers), so every elucidate sampler,
guidance and evaluation runs on it. Local folders only (safetensors); nothing is ever downloaded.

The scheduler contributes its noise schedule (betas, prediction type, timestep conventions) and its x̂0
clipping (``clip_sample`` / ``clip_sample_range``, ``thresholding``: the denoiser is wrapped in
:class:`~elucidate.Clipped` / :class:`~elucidate.Thresholded`, see :func:`scheduler_clipping`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..denoiser import Clipped, Denoiser, Thresholded
from ..errors import UserError
from ..formulations import DDPM, Flow
from ..nets.diffusers_unet import DiffusersUNet, import_diffusers

__all__ = ["PREDICTION_TYPES", "BETA_SCHEDULES", "ddpm_from_scheduler", "flow_from_scheduler", "is_flow_scheduler",
           "scheduler_config", "from_diffusers",
           "scheduler_clipping",
           "load_diffusers_unet", "load_diffusers", "UNET_CLASSES", "ELUCIDATE_KEY"]

#: diffusers ``prediction_type`` -> DDPM ``prediction``.
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
#: diffusers ``beta_schedule`` -> DDPM ``beta_schedule``.
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine",
                  "sigmoid": "sigmoid"}
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
#: Private key of an exported UNet's config.json with what diffusers' config cannot say (its null class).
ELUCIDATE_KEY = "_elucidate"  # diffusers keeps private keys in unet.config and ignores them otherwise
_SPACINGS = ("leading", "trailing", "linspace")


def _config_dict(scheduler) -> dict:
    """A scheduler's config as a plain dict (from a scheduler, a config mapping or a JSON file)."""
    if isinstance(scheduler, (str, os.PathLike)):
        path = Path(scheduler)
        if path.is_dir():
            path = path / "scheduler_config.json"
        return _read_json(path, "scheduler config")
    config = getattr(scheduler, "config", scheduler)
    if not hasattr(config, "items"):
        raise UserError(f"expected a diffusers scheduler, its config or a scheduler_config.json, got "
                        f"{type(scheduler).__name__}")
    out = dict(config.items())
    out.setdefault("_class_name", type(scheduler).__name__ if hasattr(scheduler, "config") else "scheduler")
    return out


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a JSON object")
    return data


def ddpm_from_scheduler(scheduler) -> DDPM:
    """The DDPM formulation of a diffusers scheduler (object, config mapping or scheduler_config.json):
    ``num_train_timesteps``, ``beta_start``/``beta_end``/``beta_schedule`` or ``trained_betas``,
    ``prediction_type``, ``rescale_betas_zero_snr``, ``timestep_spacing`` and ``steps_offset``.
    Schedulers that are not a discrete beta chain, or that need what DDPM does not model (learned
    variance, continuous timesteps), are refused with a UserError naming the key."""
    c = _config_dict(scheduler)
    name = c.get("_class_name", "scheduler")
    if "num_train_timesteps" not in c or not ("beta_schedule" in c or c.get("trained_betas") is not None):
        raise UserError(f"{name} is not a discrete beta-schedule scheduler (no num_train_timesteps / beta_schedule); "
                        f"supported: the DDPM family (DDPM, DDIM, PNDM, Euler, DPM-Solver, UniPC, LCM ... schedulers)")
    if c.get("variance_type") in ("learned", "learned_range"):
        raise UserError(f"{name}: variance_type {c['variance_type']!r} (the UNet predicts its variance in extra "
                        f"output channels) is not supported; supported: fixed_small, fixed_large")
    if c.get("timestep_type", "discrete") != "discrete":
        raise UserError(f"{name}: timestep_type {c['timestep_type']!r} is not supported (only discrete timesteps)")
    prediction = c.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise UserError(f"{name}: prediction_type {prediction!r} is not supported; expected one of "
                        f"{list(PREDICTION_TYPES)}")
    spacing = c.get("timestep_spacing") or "leading"
    if spacing not in _SPACINGS:
        raise UserError(f"{name}: timestep_spacing {spacing!r} is not supported; expected one of {list(_SPACINGS)}")
    kwargs: dict[str, Any] = dict(num_timesteps=int(c["num_train_timesteps"]), prediction=PREDICTION_TYPES[prediction],
                                  timestep_spacing=spacing, steps_offset=int(c.get("steps_offset") or 0),
                                  rescale_zero_terminal_snr=bool(c.get("rescale_betas_zero_snr", False)))
    if c.get("trained_betas") is not None:
        kwargs["betas"] = [float(b) for b in c["trained_betas"]]
    else:
        schedule = c.get("beta_schedule", "linear")
        if schedule not in BETA_SCHEDULES:
            raise UserError(f"{name}: beta_schedule {schedule!r} is not supported; expected one of "
                            f"{list(BETA_SCHEDULES)} or trained_betas")
        kwargs.update(beta_schedule=BETA_SCHEDULES[schedule], beta_start=float(c.get("beta_start", 1e-4)),
                      beta_end=float(c.get("beta_end", 0.02)))
    try:
        return DDPM(**kwargs)
    except ValueError as e:
        raise UserError(f"{name}: {e}") from None


#: FlowMatch scheduler options that change the levels in ways Flow does not model (a truthy value is refused).
_FLOW_REFUSED = {"use_dynamic_shifting": "resolution-dependent shifting needs mu (a resolution) at sampling time; "
                                         "pass a scheduler with a fixed shift instead",
                 "shift_terminal": "a stretched terminal level is not modelled", "invert_sigmas": "inverted sigmas "
                 "are not modelled", "stochastic_sampling": "stochastic sampling is not modelled (use an elucidate "
                 "stochastic sampler)", "use_karras_sigmas": "use elucidate's karras schedule instead",
                 "use_exponential_sigmas": "use elucidate's exponential schedule instead",
                 "use_beta_sigmas": "beta sigmas are not modelled"}


def is_flow_scheduler(scheduler) -> bool:
    """Whether a scheduler (object, config mapping or JSON path) is one of diffusers' ``FlowMatch*`` schedulers."""
    return str(_config_dict(scheduler).get("_class_name", "")).startswith("FlowMatch")


def flow_from_scheduler(scheduler) -> Flow:
    """The :class:`~elucidate.Flow` formulation of a diffusers ``FlowMatch*`` scheduler: its ``shift``
    (SD3's t' = shift t / (1 + (shift - 1) t)); the network is fed 1000 t, so ``num_train_timesteps`` must be
    1000. Options that change the levels beyond that (``use_dynamic_shifting``, ...) are refused, one line each."""
    c = _config_dict(scheduler)
    name = c.get("_class_name", "scheduler")
    for key, why in _FLOW_REFUSED.items():
        if c.get(key):
            raise UserError(f"{name}: {key} = {c[key]!r} is not supported ({why})")
    if int(c.get("num_train_timesteps", 1000)) != 1000:
        raise UserError(f"{name}: num_train_timesteps = {c['num_train_timesteps']} is not supported (Flow feeds the "
                        f"network 1000 t)")
    try:
        return Flow(shift=float(c.get("shift", 1.0)))
    except ValueError as e:
        raise UserError(f"{name}: {e}") from None


def scheduler_config(formulation) -> dict:
    """The ``DDPMScheduler`` keyword arguments of a DDPM formulation (the inverse of
    :func:`ddpm_from_scheduler`); schedules diffusers does not name are written as ``trained_betas``.
    ``clip_sample`` is off: diffusers' sampling then matches elucidate's."""
    if type(formulation) is not DDPM:
        raise UserError(f"only a DDPM formulation maps to a diffusers scheduler, got {type(formulation).__name__}")
    f = formulation
    by_ours = {"linear": "linear", "sqrt_linear": "linear", "scaled_linear": "scaled_linear", "sigmoid": "sigmoid",
               "cosine": "squaredcos_cap_v2", "squaredcos_cap_v2": "squaredcos_cap_v2"}
    prediction = {v: k for k, v in PREDICTION_TYPES.items()}[f.prediction]
    out = dict(num_train_timesteps=f.num_timesteps, beta_start=f.beta_start, beta_end=f.beta_end,
               beta_schedule=by_ours.get(f.beta_schedule, "linear"), trained_betas=None,
               prediction_type=prediction, variance_type="fixed_small", clip_sample=False,
               timestep_spacing=f.timestep_spacing, steps_offset=f.steps_offset,
               rescale_betas_zero_snr=f.rescale_zero_terminal_snr)
    named = f.betas is None and f.beta_schedule in by_ours and (
        f.beta_schedule not in ("cosine", "squaredcos_cap_v2") or f.cosine_s == 0.008)
    if not named:  # the betas before any zero-SNR rescaling (diffusers rescales them again)
        from ..formulations.ddpm import make_betas

        betas = (torch.as_tensor(f.betas, dtype=torch.float64) if f.betas is not None else
                 make_betas(f.beta_schedule, f.num_timesteps, f.beta_start, f.beta_end, f.cosine_s))
        out["trained_betas"] = betas.tolist()
    return out


def _find_unet(path: Path) -> tuple[Path, str, dict, Path | None]:
    """(UNet folder, its class name, its config.json, the pipeline's model_index.json or None)."""
    index = path / "model_index.json"
    if index.is_file():
        model_index = _read_json(index, "pipeline index")
        entry = model_index.get("unet")
        if not (isinstance(entry, list) and len(entry) == 2):
            raise UserError(f"{index} has no unet entry (elucidate samples UNet pipelines)")
        unet_dir = path / "unet"
    else:
        index, unet_dir = None, path
    config = _read_json(unet_dir / "config.json", "UNet config")
    cls = config.get("_class_name")
    if cls not in UNET_CLASSES:
        raise UserError(f"{unet_dir}: UNet class {cls!r} is not supported; expected one of {list(UNET_CLASSES)}")
    return unet_dir, cls, config, index


def load_diffusers_unet(path: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """(the UNet, its scheduler config) from a local diffusers folder: a pipeline
    (``model_index.json``, ``unet/``, ``scheduler/``) or a bare UNet folder with a ``scheduler_config.json``
    next to its ``config.json``. Safetensors weights only; never downloads."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a local folder (from_diffusers loads saved diffusers folders only; "
                        f"nothing is downloaded)")
    unet_dir, cls, _, index = _find_unet(path)
    weights = [unet_dir / f"diffusion_pytorch_model.safetensors{s}" for s in ("", ".index.json")]
    if not any(w.is_file() for w in weights):
        raise UserError(f"{unet_dir} has no diffusion_pytorch_model.safetensors (elucidate loads safetensors "
                        f"weights only; re-save the model with save_pretrained(safe_serialization=True))")
    scheduler_path = (path / "scheduler" / "scheduler_config.json") if index else (path / "scheduler_config.json")
    scheduler = _config_dict(scheduler_path)
    diffusers = import_diffusers()
    try:
        unet = getattr(diffusers, cls).from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True,
                                                       low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the UNet from {unet_dir}: {first}") from None
    return unet, scheduler


def scheduler_clipping(scheduler, denoiser):
    """``denoiser`` with the x̂0 clipping a diffusers scheduler (object, config mapping or JSON path) applies at every
    step: ``thresholding`` -> :class:`~elucidate.Thresholded` (``dynamic_thresholding_ratio``, ``sample_max_value``),
    else ``clip_sample`` -> :class:`~elucidate.Clipped` to +-``clip_sample_range``; unchanged when neither is set.
    elucidate's samplers then derive the noise estimate from the clipped x̂0: DDIM equals diffusers' DDIMScheduler
    with ``use_clipped_model_output=True`` (its default False mixes the clipped x̂0 with the unclipped noise)."""
    c = _config_dict(scheduler)
    if c.get("thresholding"):
        return Thresholded(denoiser, percentile=float(c.get("dynamic_thresholding_ratio", 0.995)),
                           max_value=float(c.get("sample_max_value", 1.0)))
    if c.get("clip_sample"):
        bound = float(c.get("clip_sample_range", 1.0))
        return Clipped(denoiser, (-bound, bound))
    return denoiser


def from_diffusers(model, scheduler=None, *, null_class: int | None = None,
                   null_context: torch.Tensor | None = None, clip: bool = True) -> Denoiser:
    """An elucidate :class:`~elucidate.Denoiser` for a diffusers UNet and its scheduler.

    ``model`` is a ``UNet2DModel`` / ``UNet2DConditionModel`` (then ``scheduler`` — a scheduler, its
    config or a JSON path — is required) or a local folder (pipeline or UNet; ``scheduler`` optionally
    overrides the one saved there); a ``FlowMatch*`` scheduler gives a :class:`~elucidate.Flow` model
    (:func:`flow_from_scheduler`). The network calls ``unet(x_t, t).sample``; ``class_labels`` and
    ``context`` (``encoder_hidden_states``) pass through as conditioning. ``null_class`` is the class
    embedding meaning "no label" and ``null_context`` the states meaning "no condition" (guidance).
    ``clip``: honour the scheduler's ``clip_sample`` / ``thresholding`` (:func:`scheduler_clipping`; the result is then
    a :class:`~elucidate.Clipped` / :class:`~elucidate.Thresholded` around the Denoiser); False: never clip.
    """
    if isinstance(model, (str, os.PathLike)):
        model, saved = load_diffusers_unet(model)
        scheduler = saved if scheduler is None else scheduler
        model.eval().requires_grad_(False)
    elif scheduler is None:
        raise UserError("from_diffusers(unet, scheduler): the scheduler (or its config) gives the noise schedule")
    if not hasattr(model, "config") or type(model).__name__ not in UNET_CLASSES:
        raise UserError(f"expected a diffusers UNet ({', '.join(UNET_CLASSES)}) or a folder, "
                        f"got {type(model).__name__}")
    meta = model.config.get(ELUCIDATE_KEY) or {}  # written by elucidate's export
    if null_class is None:
        null_class = meta.get("null_class")
    net = DiffusersUNet(model, label_dim=meta.get("label_dim"), null_class=null_class, null_context=null_context)
    formulation = flow_from_scheduler(scheduler) if is_flow_scheduler(scheduler) else ddpm_from_scheduler(scheduler)
    denoiser = Denoiser(net, formulation)
    if clip:
        denoiser = scheduler_clipping(scheduler, denoiser)
    return denoiser.train(model.training)  # the UNet's mode (no change)


def load_diffusers(path: str | os.PathLike, *, device=None, steps: int = 50):
    """A local diffusers pixel-space pipeline/UNet folder as a :class:`~elucidate.run.LoadedRun` (for
    ``elucidate sample/eval --diffusers``): sampling defaults DDIM with ``steps`` steps on the scheduler's
    timesteps, or for a ``FlowMatch*`` scheduler (a :class:`~elucidate.Flow` model) Euler with ``steps`` steps on
    the Flow's own levels (what diffusers' FlowMatchEulerDiscreteScheduler does); images in [-1, 1], no checkpoint
    step."""
    from ..config import Config
    from ..config.network import DataInfo
    from ..config.sampling import SamplingConfig
    from ..run.model import LoadedRun

    path = Path(path)
    index = path / "model_index.json"
    if index.is_file() and any(k in _read_json(index, "pipeline index") for k in ("vae", "vqvae")):
        raise UserError(f"{path} is a latent pipeline (it has a VAE): the command line samples pixel-space UNets "
                        f"only; use elucidate.from_diffusers in Python and decode the latents yourself")
    denoiser = from_diffusers(path)
    net = denoiser.net
    if net.cross_attention:
        raise UserError(f"{path}: {type(net.unet).__name__} needs encoder_hidden_states (context), which the command "
                        f"line cannot provide; use elucidate.from_diffusers in Python")
    if net.img_resolution is None:
        raise UserError(f"{path}: the UNet config has no sample_size, so the image size is unknown")
    formulation = denoiser.formulation
    sampling = SamplingConfig(sampler="euler" if isinstance(formulation, Flow) else "ddim", steps=steps)
    sampling.validate()
    config = Config(data={"dataset": "diffusers", "path": None}, network={"arch": "diffusers", "path": str(path)},
                    diffusion=formulation.to_config(), sampling=sampling)
    info = DataInfo(net.in_channels, net.img_resolution, net.label_dim)
    device = torch.device(device) if device is not None else torch.device("cpu")
    anchor = index if index.is_file() else path / "config.json"
    return LoadedRun(denoiser.to(device).eval().requires_grad_(False), config, info, None, 0, anchor)
