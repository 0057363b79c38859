"""Everything asg-kit does to import an upstream model repository, in one place.

BAGEL, BLIP3o and VARGPT ship as source trees, not packages: an adapter imports the user's
checkout (``upstream=DIR``, the ``ASGKIT_UPSTREAM`` environment variable, or a package that
is already importable). A missing or wrong checkout is one clear error naming the repository
and the commit the adapter was verified with.

Two upstream trees (BAGEL, VARGPT) import flash-attn at module level, which builds only for
CUDA. :func:`install_flash_attn_fallback` registers a pure-torch stand-in for the varlen entry
points they call, and only when no real ``flash_attn`` is installed, so the same trees run on
CPU, on other GPUs and under a debugger.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import os
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

UPSTREAM_ENV = "ASGKIT_UPSTREAM"


@dataclass(frozen=True)
class UpstreamRepo:
    """An upstream repository an adapter drives: where it lives, the commit the adapter was
    verified with, the folder name of a checkout, and files that identify a checkout of it."""

    repository: str
    commit: str
    folder: str
    marker_files: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"https://github.com/{self.repository}"

    def clone_hint(self) -> str:
        return f"git clone {self.url} {self.folder} && git -C {self.folder} checkout {self.commit}"


UPSTREAMS: dict[str, UpstreamRepo] = {
    "vargpt": UpstreamRepo(
        "VARGPT-family/VARGPT-v1.1",
        "8c67c263497a4f303b3e9668b49217d70bd47a44",
        "VARGPT-v1.1",
        ("vargpt_qwen_v1_1/modeling_vargpt_qwen2_vl.py", "vargpt_qwen_v1_1/var_model/infinity/models/infinity.py"),
    ),
    "bagel": UpstreamRepo(
        "ByteDance-Seed/Bagel",
        "056b5fd51a88c1eb4547318609e25d40080fcf87",
        "Bagel",
        ("modeling/bagel/bagel.py", "modeling/bagel/qwen2_navit.py"),
    ),
    "blip3o": UpstreamRepo(
        "JiuhaiChen/BLIP3o",
        "4689ec389e2b9108efc8b9761432538fc890156d",
        "BLIP3o",
        ("blip3o/model/lumina_nextdit2d.py",),
    ),
}


class UpstreamNotFound(ImportError):
    """No usable checkout of a backbone's upstream repository."""


def _is_checkout(folder: Path, repo: UpstreamRepo) -> bool:
    return all((folder / marker).is_file() for marker in repo.marker_files)


def _checkout_commit(folder: Path) -> str | None:
    """The commit a git checkout has out, read from its files (no git binary needed)."""
    git = folder / ".git"
    if git.is_file():  # a worktree or submodule: "gitdir: PATH"
        text = git.read_text(errors="replace").strip()
        if not text.startswith("gitdir:"):
            return None
        git = (folder / text.split(":", 1)[1].strip()).resolve()
    head = git / "HEAD"
    if not head.is_file():
        return None
    ref = head.read_text(errors="replace").strip()
    if not ref.startswith("ref:"):
        return ref or None
    ref_path = ref.split(":", 1)[1].strip()
    loose = git / ref_path
    if loose.is_file():
        return loose.read_text(errors="replace").strip() or None
    packed = git / "packed-refs"
    if packed.is_file():
        for line in packed.read_text(errors="replace").splitlines():
            if line.endswith(" " + ref_path):
                return line.split(" ", 1)[0]
    return None


def _installed_checkout(repo: UpstreamRepo) -> Path | None:
    """The root of an importable copy (on ``sys.path`` already), found by its first marker's package."""
    package = repo.marker_files[0].split("/", 1)[0]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        root = Path(location).parent
        if _is_checkout(root, repo):
            return root
    return None


def locate_upstream(backbone: str, upstream: str | os.PathLike | None = None) -> Path:
    """The checkout of ``backbone``'s upstream repository to import.

    Looked for: ``upstream`` when given (the checkout itself, or a folder holding it under
    the repository's name; a given folder that holds neither is an error, never passed over
    for another copy), else the ``ASGKIT_UPSTREAM`` environment variable (same forms), else an
    importable installed copy. A checkout at another commit than the verified one is used
    with a warning; no checkout is an :class:`UpstreamNotFound` saying how to get one.
    """
    if backbone not in UPSTREAMS:
        raise ValueError(f"no upstream repository is registered for backbone {backbone!r}; known: {', '.join(sorted(UPSTREAMS))}")
    repo = UPSTREAMS[backbone]
    origin, value = ("--upstream", upstream) if upstream else (UPSTREAM_ENV, os.environ.get(UPSTREAM_ENV))
    if value:
        base = Path(value).expanduser()
        for folder in (base, base / repo.folder):
            if _is_checkout(folder, repo):
                _warn_if_other_commit(folder, repo)
                return folder.resolve()
    elif (installed := _installed_checkout(repo)) is not None:
        return installed.resolve()
    where = f" ({origin} {value} holds no {repo.marker_files[0]}, nor {repo.folder}/ with it)" if value else ""
    raise UpstreamNotFound(
        f"backbone {backbone!r} runs the upstream code of {repo.url}, verified at commit {repo.commit}, "
        f"and no checkout of it was found{where}; get one with `{repo.clone_hint()}` and pass "
        f"--upstream {repo.folder} (or set {UPSTREAM_ENV})"
    )


def _warn_if_other_commit(folder: Path, repo: UpstreamRepo) -> None:
    commit = _checkout_commit(folder)
    if commit is not None and commit != repo.commit:
        warnings.warn(
            f"{folder} is {repo.repository} at commit {commit[:12]}, but asg-kit was verified with {repo.commit[:12]}; "
            "run `asgkit check` on it before a long run",
            stacklevel=3,
        )


def put_on_path(checkout: Path) -> None:
    """Make the checkout's top-level packages importable (once, in front)."""
    entry = str(checkout)
    if entry not in sys.path:
        sys.path.insert(0, entry)


# --------------------------------------------------------------------------------------
# flash-attn fallback
# --------------------------------------------------------------------------------------


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention over packed sequences, flash-attn 2 semantics.

    q: (total_q, H, d); k, v: (total_k, H_kv, d), sequence ``i`` being rows
    ``cu_seqlens[i]:cu_seqlens[i+1]``; query head h reads kv head ``h // (H / H_kv)``.
    ``causal`` is aligned bottom-right, as for decoding against a cache: query i sees key j
    iff ``j <= i + L_k - L_q``; a query that sees no key gets zeros. Scores in float32,
    output in q's dtype, differentiable.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads is not a multiple of {kv_heads} key/value heads")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q_edges, k_edges = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(q_edges) != len(k_edges):
        raise ValueError("cu_seqlens_q and cu_seqlens_k describe different numbers of sequences")
    out = q.new_zeros(q.shape[0], heads, v.shape[-1])
    for q0, q1, k0, k1 in zip(q_edges[:-1], q_edges[1:], k_edges[:-1], k_edges[1:]):
        if q1 == q0 or k1 == k0:
            continue
        query = q[q0:q1].transpose(0, 1).float()
        key = k[k0:k1].transpose(0, 1).float().repeat_interleave(heads // kv_heads, dim=0)
        value = v[k0:k1].transpose(0, 1).float().repeat_interleave(heads // kv_heads, dim=0)
        mask = None
        if causal:
            mask = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=q.device).tril(diagonal=(k1 - k0) - (q1 - q0))
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        if mask is not None:
            attended = attended.masked_fill(~mask.any(-1)[None, :, None], 0.0)
        out[q0:q1] = attended.transpose(0, 1).to(q.dtype)
    return out


def _refuse_unsupported(dropout_p=0.0, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, return_attn_probs=False, block_table=None, **_):
    if dropout_p or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None or return_attn_probs or block_table is not None:
        raise NotImplementedError(
            "asg-kit's flash-attn fallback supports plain varlen attention only (no dropout, windows, softcap, "
            "alibi, attention probabilities or paged KV); install flash-attn for those"
        )


def _flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0, softmax_scale=None, causal=False, **options):
    _refuse_unsupported(dropout_p, **options)
    return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, softmax_scale=softmax_scale)


def _flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0, softmax_scale=None, causal=False, **options):
    _refuse_unsupported(dropout_p, **options)
    return varlen_attention(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, causal=causal, softmax_scale=softmax_scale)


def _flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **options):
    """Dense (batch, length, heads, d) layout, as flash-attn's ``flash_attn_func``."""
    _refuse_unsupported(dropout_p, **options)
    batch, length_q, length_k = q.shape[0], q.shape[1], k.shape[1]
    cu_q = torch.arange(0, (batch + 1) * length_q, length_q, device=q.device)
    cu_k = torch.arange(0, (batch + 1) * length_k, length_k, device=q.device)
    out = varlen_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, causal=causal, softmax_scale=softmax_scale)
    return out.view(batch, length_q, q.shape[2], v.shape[-1])


FLASH_ATTN_FALLBACK_VERSION = "0.0.0+asgkit.fallback"


def install_flash_attn_fallback() -> bool:
    """Register the fallback as ``flash_attn`` when no real flash-attn is importable.

    Returns True when the fallback is (now) the module in use. ``flash_attn.ops`` is left
    absent on purpose, so upstream code that tries its fused kernels takes its own unfused
    path. transformers still sees flash-attn as unavailable and keeps eager/SDPA attention.
    """
    current = sys.modules.get("flash_attn")
    if current is not None:
        return getattr(current, "__version__", None) == FLASH_ATTN_FALLBACK_VERSION
    try:
        import flash_attn  # noqa: F401

        return False
    except Exception:  # absent, or a CUDA build that cannot load here: both mean "use the fallback"
        for name in [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]:
            del sys.modules[name]
    module = types.ModuleType("flash_attn", "asg-kit's pure-torch fallback for flash-attn's varlen attention")
    # A spec, or importlib.util.find_spec("flash_attn") raises ValueError inside transformers'
    # availability checks; with one but no installed distribution they report it absent.
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.__version__ = FLASH_ATTN_FALLBACK_VERSION
    module.flash_attn_varlen_func = _flash_attn_varlen_func
    module.flash_attn_varlen_kvpacked_func = _flash_attn_varlen_kvpacked_func
    module.flash_attn_func = _flash_attn_func
    sys.modules["flash_attn"] = module
    return True


# --------------------------------------------------------------------------------------
# BAGEL (ByteDance-Seed/Bagel)
# --------------------------------------------------------------------------------------


def _register_transformers5_default_rope() -> None:
    """BAGEL's copied Qwen2 modeling looks up ``ROPE_INIT_FUNCTIONS["default"]``, which
    transformers 5 no longer registers: register the 4.x default (inverse frequencies
    ``theta^(-2i/d)``, attention factor 1). Nothing changes under 4.x (BAGEL's pin)."""
    from transformers import modeling_rope_utils

    def default_rope(config, device=None, seq_len=None, **kwargs):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim
        return 1.0 / (config.rope_theta**exponent), 1.0

    modeling_rope_utils.ROPE_INIT_FUNCTIONS.setdefault("default", default_rope)


def _sdpa_with_math_fallback(sdpa_kernel, math_backend):
    """BAGEL's packed training attention pins SDPA to the CUDA-only EFFICIENT_ATTENTION
    backend ("No viable backend" on CPU). Allowing the MATH backend as well keeps the
    efficient kernel wherever it runs and gives every other device a kernel."""

    def allowing_math(backends, *args, **kwargs):
        backends = list(backends) if isinstance(backends, (list, tuple)) else [backends]
        return sdpa_kernel(backends + [math_backend], *args, **kwargs)

    return allowing_math


def import_bagel(upstream: str | os.PathLike | None = None) -> types.SimpleNamespace:
    """Import BAGEL's modules from its checkout (see :func:`locate_upstream`), with the
    flash-attn fallback when flash-attn is absent, transformers 5's missing default RoPE
    registered, and the SDPA backend pin relaxed. Returns the pieces an adapter uses."""
    import transformers

    checkout = locate_upstream("bagel", upstream)
    install_flash_attn_fallback()
    # BAGEL's top-level packages are named `data`, `modeling` and `inferencer`: a different
    # package of that name imported earlier would shadow the checkout, so say so.
    for name in ("data", "modeling"):
        loaded = sys.modules.get(name)
        where = getattr(loaded, "__file__", None) or next(iter(getattr(loaded, "__path__", []) or []), None)
        if loaded is not None and where and not Path(where).resolve().is_relative_to(checkout):
            raise UpstreamNotFound(f"a module named {name!r} from {where} is already imported; BAGEL's checkout {checkout} needs that name")
    put_on_path(checkout)
    if int(transformers.__version__.split(".")[0]) >= 5:
        _register_transformers5_default_rope()
    try:
        import data.data_utils as data_utils
        import modeling.bagel.qwen2_navit as qwen2_navit
        from modeling.autoencoder import AutoEncoder, AutoEncoderParams
        from modeling.bagel import Bagel, BagelConfig, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel
        from modeling.qwen2 import Qwen2Tokenizer, tokenization_qwen2
    except ImportError as error:
        raise ImportError(
            f"BAGEL's code in {checkout} does not import here ({error}; transformers {transformers.__version__}); "
            "its environment: pip install -e '.[bagel]' (transformers 4.49.0, accelerate, einops)"
        ) from error

    if not getattr(qwen2_navit, "_asgkit_sdpa", False):
        qwen2_navit.sdpa_kernel = _sdpa_with_math_fallback(qwen2_navit.sdpa_kernel, qwen2_navit.SDPBackend.MATH)
        qwen2_navit._asgkit_sdpa = True
    return types.SimpleNamespace(
        checkout=checkout,
        data_utils=data_utils,
        NaiveCache=qwen2_navit.NaiveCache,
        AutoEncoder=AutoEncoder,
        AutoEncoderParams=AutoEncoderParams,
        Bagel=Bagel,
        BagelConfig=BagelConfig,
        Qwen2Config=Qwen2Config,
        Qwen2ForCausalLM=Qwen2ForCausalLM,
        SiglipVisionConfig=SiglipVisionConfig,
        SiglipVisionModel=SiglipVisionModel,
        Qwen2Tokenizer=Qwen2Tokenizer,
        tokenization_qwen2=tokenization_qwen2,
    )


def bagel_autocast(device: torch.device):
    """BAGEL runs its bf16 model next to an fp32 VAE, and its MoT layers cast some
    activations to bf16 themselves, under ``torch.autocast("cuda", bfloat16)``, a no-op on
    other devices: autocast on the model's own device type instead."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------
# torchvision without its C++ ops, torch.compile'd helpers on CPU
# --------------------------------------------------------------------------------------

_KEPT_LIBRARIES: list = []  # torch.library.Library objects must outlive the schemas they define


def allow_torchvision_without_ops() -> str:
    """Let ``import torchvision`` succeed when its C++ ops do not load.

    PyPI's torchvision wheels are CUDA builds; next to a CPU torch their extension fails to
    load, and ``torchvision/_meta_registrations.py`` then dies on ``register_fake`` for
    ``torchvision::nms`` and ``qnms`` (the only two it does not guard). transformers imports
    torchvision whenever it is installed, so every model import fails. Defining those two
    schemas first lets the pure-Python parts import; the detection ops stay unavailable, and
    nothing asg-kit runs calls them. Returns "absent", "native" or "schemas defined (nms, qnms)".
    """
    if importlib.util.find_spec("torchvision") is None:
        return "absent"
    try:
        import torchvision  # noqa: F401

        return "native"
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEPT_LIBRARIES.append(library)
    import torchvision  # noqa: F401,F811

    return "schemas defined (nms, qnms)"


def uncompile_module(module: types.ModuleType) -> list[str]:
    """Replace the ``torch.compile``-decorated functions of an upstream module by the plain
    functions they wrap. Names another module imported are bindings of their own: call it
    on every module of the upstream package, before its models are built.

    On CPU, a compiled function means an inductor C++ build at its first call (seconds to
    minutes, and a compiler on the machine); eager mode computes the same values. Only this
    module's functions change: torch.compile keeps working for everything else. Returns the
    names replaced."""
    replaced = []
    for name, value in list(vars(module).items()):
        original = getattr(value, "_torchdynamo_orig_callable", None)
        if callable(value) and original is not None:
            setattr(module, name, original)
            replaced.append(name)
    return replaced


# --------------------------------------------------------------------------------------
# BLIP3o: the DiT and the EVA-CLIP tower, imported without the rest of the repository
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blip3oModules:
    """The upstream BLIP3o classes asg-kit drives (everything else it does natively)."""

    NextDiTCrossAttn: type
    NextDiTCrossAttnConfig: type
    EVAVisionTransformer: type | None  # None when einops is missing: the tower is only needed to train


def _stand_in_module(name: str, **attrs) -> types.ModuleType:
    """A module object for ``sys.modules`` with a spec, so that availability probes
    (``importlib.util.find_spec``) treat it as a module rather than raising."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package="__path__" in attrs)
    module.__dict__.update(attrs)
    return module


def _timm_layers_stand_in() -> dict[str, types.ModuleType]:
    """The three helpers BLIP3o's eva_vit.py takes from timm (timm pulls torchvision, whose
    PyPI wheels are CUDA builds that fail to import beside a CPU torch)."""

    def drop_path(x, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
        if drop_prob == 0.0 or not training:
            return x
        keep = 1.0 - drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (mask / keep if scale_by_keep else mask)

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    helpers = {"drop_path": drop_path, "to_2tuple": to_2tuple, "trunc_normal_": torch.nn.init.trunc_normal_}
    layers = _stand_in_module("timm.layers", **helpers)
    models = _stand_in_module("timm.models", __path__=[])
    models.layers = _stand_in_module("timm.models.layers", **helpers)
    timm = _stand_in_module("timm", __path__=[], layers=layers, models=models)
    return {"timm": timm, "timm.layers": layers, "timm.models": models, "timm.models.layers": models.layers}


_BLIP3O_MODULES: dict[Path, Blip3oModules] = {}


def import_blip3o(checkout: Path) -> Blip3oModules:
    """Import ``NextDiTCrossAttn`` (and EVA-CLIP's ``EVAVisionTransformer``) from a BLIP3o
    checkout, and nothing else of it.

    - The package ``__init__``s import every model variant (LLaMA, transformers 4.51 classes);
      empty package modules with the checkout's ``__path__`` stand in for them.
    - ``eva_vit.py`` calls ``snapshot_download("jiuhai/eva_clip_vision_tower")`` at import
      time; the call is answered with a local folder for the duration of the import (asg-kit
      loads the tower's weights itself, from safetensors).
    - timm is replaced, during the import only and only when it cannot be imported, by
      its three helpers that eva_vit.py uses.
    - diffusers >= 0.33 calls ``_set_gradient_checkpointing(enable=..., gradient_checkpointing_func=...)``
      while upstream's ``LuminaNextDiT2DModel`` overrides it with the old ``(module, value)``
      signature; the override is dropped so that the diffusers base method applies.
    """
    checkout = Path(checkout).resolve()
    if checkout in _BLIP3O_MODULES:
        return _BLIP3O_MODULES[checkout]
    import diffusers
    from packaging.version import Version

    if Version(diffusers.__version__).release < (0, 33):
        raise ImportError(
            f"BLIP3o needs diffusers >= 0.33 (installed: {diffusers.__version__}; older versions build the DiT's "
            "feed-forward at the wrong width for the 8B checkpoint); run: pip install 'diffusers>=0.33'"
        )
    # no bytecode caches written into the user's checkout (it may be read-only or shared)
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        modules = _import_blip3o_modules(checkout)
    finally:
        sys.dont_write_bytecode = writes_bytecode
    _BLIP3O_MODULES[checkout] = modules
    return modules


def _import_blip3o_modules(checkout: Path) -> Blip3oModules:
    import importlib

    packages = {
        "blip3o": checkout / "blip3o",
        "blip3o.model": checkout / "blip3o" / "model",
        "blip3o.model.multimodal_encoder": checkout / "blip3o" / "model" / "multimodal_encoder",
        "blip3o.model.multimodal_encoder.eva_clip": checkout / "blip3o" / "model" / "multimodal_encoder" / "eva_clip",
    }
    for name, folder in packages.items():
        current = sys.modules.get(name)
        if current is None or list(getattr(current, "__path__", [])) != [str(folder)]:
            sys.modules[name] = _stand_in_module(name, __path__=[str(folder)])
    nextdit = importlib.import_module("blip3o.model.nextdit_crossattn")
    lumina = importlib.import_module("blip3o.model.lumina_nextdit2d")
    if "_set_gradient_checkpointing" in lumina.LuminaNextDiT2DModel.__dict__:
        del lumina.LuminaNextDiT2DModel._set_gradient_checkpointing

    eva_class = None
    if importlib.util.find_spec("einops") is not None:
        import huggingface_hub

        added: list[str] = []
        try:
            import timm.layers  # noqa: F401
        except Exception:
            for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
                del sys.modules[name]
            for name, module in _timm_layers_stand_in().items():
                sys.modules[name] = module
                added.append(name)
        original = huggingface_hub.snapshot_download
        huggingface_hub.snapshot_download = lambda *args, **kwargs: str(checkout)
        try:
            eva_class = importlib.import_module("blip3o.model.multimodal_encoder.eva_clip.eva_vit").EVAVisionTransformer
        finally:
            huggingface_hub.snapshot_download = original
            for name in added:
                sys.modules.pop(name, None)
    return Blip3oModules(nextdit.NextDiTCrossAttn, nextdit.NextDiTCrossAttnConfig, eva_class)
