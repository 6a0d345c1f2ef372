"""Reading CLIP image-tower checkpoints of every format the paper's experts come in.

Each loader returns a state dict of open_clip's ``model.visual`` (keys ``conv1.weight``,
``class_embedding``, ``positional_embedding``, ``ln_pre.*``, ``transformer.resblocks.<i>.*``,
``ln_post.*``, ``proj``), the layout every stage of the pipeline reads.

Formats
- ``task_vectors``: the task-vectors release (mlfoundations/task_vectors): per model a folder
  with ``zeroshot.pt`` and ``<Task>/finetuned.pt``, each ``torch.save`` of a whole
  ``src.modeling.ImageEncoder`` module (wrapping an open_clip ``CLIP`` as ``.model``). Current
  open_clip cannot unpickle them, and unpickling runs arbitrary code, so they are read with
  :class:`RestrictedUnpickler`: tensors are rebuilt from the zip's storages, module classes are
  replaced by inert stand-ins (:class:`PickledObject`) that only keep their ``__dict__``, and
  every other global is refused. Nothing from the file is imported or executed.
- ``hf``: transformers ``CLIPVisionModel(WithProjection)`` checkpoints (the FusionBench experts
  ``tanganke/clip-vit-base-patch32_<task>`` and friends), mapped key by key by
  :func:`hf_vision_to_open_clip`.
- ``state_dict``: local safetensors (or ``torch.load(weights_only=True)``) state dicts, of the
  image tower or of a whole CLIP (``visual.`` prefix stripped).
- ``open_clip``: the backbone's own pretrained weights (``open_clip.create_model``); loaded by
  ``pipeline.suites.paper8``.

Sizes are checked before anything is allocated: every storage record of a torch zip must
hold exactly the bytes its tensors declare, every tensor view must lie inside its storage,
and all tensors together may take at most :data:`MAX_EXPANSION` times the file's size
(:data:`MAX_CHECKPOINT_BYTES` in all), so a small file cannot expand to gigabytes (a
compressed record, views repeating one storage). A refused file raises
:class:`CheckpointSizeError` (a ``ValueError``) naming the file and the record.

Missing files and unreachable hub ids are reported together, before any heavy work, by one
:class:`MissingResourceError` that says what was looked for, where, and how to get it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import compat  # noqa: F401  (torchvision guard before transformers / open_clip)

KINDS = ("hf", "task_vectors", "state_dict", "open_clip")
MAX_EXPANSION = 4  # tensors of a checkpoint may take at most this many times its file size
SIZE_SLACK = 1 << 20  # ... plus this (small files, small metadata tensors)
MAX_CHECKPOINT_BYTES = int(os.environ.get("REACT_MAX_CHECKPOINT_BYTES", 64 << 30))
HUB_UNREACHABLE = "the Hugging Face hub is unreachable"
TASK_VECTORS_URL = "https://drive.google.com/drive/folders/1u_Tva6x0p6oxu5Eo0ZZsf-520Cc_3MKw"


# ====================================================================== missing resources
class MissingResourceError(FileNotFoundError):
    """Files or hub entries needed to build a suite are missing. ``.missing`` lists them."""

    def __init__(self, missing: list[tuple[Resource, str]], context: str = "this run"):
        self.missing = missing
        lines = [f"{len(missing)} resource(s) needed by {context} are missing:"]
        for res, why in missing:
            lines.append(f"  - {res.what}: {res.location} ({why})")
            lines.append(f"      get it: {res.fix}")
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class Resource:
    """Something a build reads: a local file or folder, or a Hugging Face hub repository.

    kind: ``file`` | ``dir`` | ``hub_model`` | ``hub_dataset``; ``fix`` is the command or URL
    that gets it.
    """

    what: str
    kind: str
    location: str
    fix: str
    revision: str | None = None
    needs: str | None = None  # for ``dir``: a file that must exist inside it


def missing_resources(resources: list[Resource]) -> list[tuple[Resource, str]]:
    """The resources that are not available, each with the reason.

    Once the hub proves unreachable, later hub entries are only looked up in the local cache
    (no more network timeouts).
    """
    out, unreachable = [], None
    for res in resources:
        if unreachable and res.kind.startswith("hub_"):
            cached = hub_cached(res.location, res.kind.removeprefix("hub_"), res.revision)
            why = None if cached else unreachable
        else:
            why = resource_status(res)
        if why is not None:
            out.append((res, why))
            if why.startswith(HUB_UNREACHABLE):
                unreachable = why
    return out


def check_resources(resources: list[Resource], context: str = "this run") -> None:
    """Raise one :class:`MissingResourceError` naming every unavailable resource."""
    missing = missing_resources(resources)
    if missing:
        raise MissingResourceError(missing, context)


def resource_status(res: Resource) -> str | None:
    """None when ``res`` is available, else why not."""
    if res.kind == "file":
        return None if Path(res.location).is_file() else "no such file"
    if res.kind == "dir":
        p = Path(res.location)
        if not p.is_dir():
            return "no such folder"
        if res.needs and not (p / res.needs).exists():
            return f"the folder has no {res.needs}"
        return None
    if res.kind in ("hub_model", "hub_dataset"):
        return hub_status(res.location, res.kind.removeprefix("hub_"), res.revision)
    raise ValueError(f"unknown resource kind {res.kind!r}")


def hub_offline() -> bool:
    """Whether Hugging Face hub access is switched off (HF_HUB_OFFLINE, read now)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "ON", "YES", "TRUE"}


def hub_cached(repo_id: str, repo_type: str = "model", revision: str | None = None) -> bool:
    """Whether a snapshot of the repository is in the local hub cache (or, for a dataset,
    a prepared copy in the ``datasets`` cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True)
        return True
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        pass
    if repo_type == "dataset":
        import datasets

        prepared = Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")
        return prepared.is_dir()
    return False


def hub_status(repo_id: str, repo_type: str = "model", revision: str | None = None) -> str | None:
    """None when ``repo_id`` can be loaded (cached, or reachable online); else why not."""
    if hub_cached(repo_id, repo_type, revision):
        return None
    if hub_offline():
        return "not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=15)
        return None
    except GatedRepoError:
        return "gated on the hub: accept its terms on the website, then `hf auth login`"
    except RevisionNotFoundError:
        return f"revision {revision!r} not found on the hub"
    except RepositoryNotFoundError:
        return f"no {repo_type} repository of that name on the hub (or it is private)"
    except Exception as e:  # network errors come in many types
        return f"{HUB_UNREACHABLE} ({type(e).__name__}: {e})"


# ====================================================================== safe torch unpickling
class PickledObject:
    """Inert stand-in for a class named in a pickle (an ``nn.Module``, a transform, ...).

    Created instead of importing the real class; keeps the pickled state (``__dict__``) and
    constructor arguments, and has no behaviour. ``_pickled_global`` is the original name.
    """

    _pickled_global = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE of a stubbed callable
        self.__dict__["_pickled_args"] = args
        if kwargs:
            self.__dict__["_pickled_kwargs"] = kwargs

    def __setstate__(self, state: Any) -> None:  # BUILD
        if (
            isinstance(state, tuple)
            and len(state) == 2
            and all(s is None or isinstance(s, dict) for s in state)
        ):
            for part in state:
                self.__dict__.update(part or {})
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_pickled_state"] = state

    def __repr__(self) -> str:
        return f"<inert {self._pickled_global}>"


# Module prefixes whose classes become PickledObject stand-ins (never imported).
STUB_MODULES = (
    "src",  # task_vectors: src.modeling.ImageEncoder
    "modeling",
    "open_clip",
    "torch.nn",
    "torchvision",
    "timm",
)
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: torch.dtype


def _rebuild_from_type_v2(func, new_type, args, state):
    """torch's tensor-subclass rebuild, limited to plain tensors and parameters."""
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise pickle.UnpicklingError(
            f"refusing to rebuild a tensor of type {new_type!r}: only torch.Tensor and "
            "torch.nn.Parameter are allowed"
        )
    from torch._tensor import _rebuild_from_type_v2 as real

    return real(func, new_type, args, state)


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` for stand-ins only (protocol 0/1 pickles of objects)."""
    if not (isinstance(cls, type) and issubclass(cls, PickledObject)):
        raise pickle.UnpicklingError(f"refusing copyreg._reconstructor for {cls!r}")
    return cls.__new__(cls)


def _allowed_functions() -> dict[tuple[str, str], Any]:
    from torch import _utils

    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _utils._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _utils._rebuild_parameter_with_state,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch", "Tensor"): torch.Tensor,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("copy_reg", "_reconstructor"): _reconstructor,
    }
    for builtins_name in ("builtins", "__builtin__"):
        allowed[(builtins_name, "set")] = set
        allowed[(builtins_name, "frozenset")] = frozenset
    return allowed


class CheckpointSizeError(pickle.UnpicklingError, ValueError):
    """A checkpoint declares more bytes than it holds, or more than the limit allows."""


def _prod(values) -> int:
    n = 1
    for v in values:
        n *= int(v)
    return n


class _SizeBudget:
    """Declared sizes of one torch zip, checked before anything is allocated."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, prefix: str):
        self.path, self.archive, self.prefix = path, archive, prefix
        self.file_bytes = path.stat().st_size
        self.limit = min(MAX_EXPANSION * self.file_bytes + SIZE_SLACK, MAX_CHECKPOINT_BYTES)
        self.total = 0  # bytes of the tensors built so far (views counted in full)
        self.records: dict[str, int] = {}  # bytes of each storage record declared so far

    def _refuse(self, what: str) -> None:
        raise CheckpointSizeError(
            f"{self.path}: {what}; refused before allocating anything (the file is corrupted or "
            f"crafted; limit: {MAX_EXPANSION} x its {self.file_bytes} bytes, at most "
            f"{MAX_CHECKPOINT_BYTES} bytes, env REACT_MAX_CHECKPOINT_BYTES)"
        )

    def storage(self, key: str, numel: int, itemsize: int, untyped: bool) -> int:
        """Bytes of storage ``key``, checked against its zip record; returns them."""
        name = f"{self.prefix}/data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            self._refuse(f"storage {key} has no record {name}")
        declared = int(numel) * (1 if untyped else itemsize)
        if not untyped and info.file_size != declared:
            self._refuse(
                f"storage {key} declares {numel} x {itemsize} bytes but its record holds "
                f"{info.file_size}: the file is truncated or corrupted"
            )
        self.records[key] = info.file_size
        if sum(self.records.values()) > self.limit:
            self._refuse(f"its storages would take {sum(self.records.values())} bytes or more")
        return info.file_size

    def view(self, storage_bytes: int, itemsize: int, offset, size, stride) -> None:
        """A tensor of ``size``/``stride`` at ``offset`` into a storage of ``storage_bytes``."""
        size, stride = tuple(int(x) for x in size), tuple(int(x) for x in stride)
        numel = _prod(size)
        if numel == 0:
            return
        if len(size) != len(stride) or min(stride, default=0) < 0:
            self._refuse(f"a tensor has sizes {size} and strides {stride}")
        extent = int(offset) + sum((n - 1) * st for n, st in zip(size, stride, strict=True)) + 1
        if int(offset) < 0 or extent * itemsize > storage_bytes:
            self._refuse(
                f"a tensor of shape {size} (strides {stride}, offset {offset}) reaches past its "
                f"storage of {storage_bytes} bytes"
            )
        self.total += numel * itemsize
        if self.total > self.limit:
            self._refuse(
                f"its tensors would take {self.total} bytes or more (a tensor of shape {size} "
                f"views a storage of {storage_bytes} bytes)"
            )


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch checkpoint's ``data.pkl`` without running code from the file.

    ``find_class`` returns: torch's tensor/parameter rebuild functions, ``OrderedDict``,
    ``set``, torch dtypes and storage types, and for classes under :data:`STUB_MODULES` an
    inert :class:`PickledObject` subclass. Any other global (``os.system``,
    ``builtins.eval``, ``subprocess.Popen``, ...) raises ``pickle.UnpicklingError`` naming it.
    Storages are read from the zip archive by ``persistent_load``.
    """

    def __init__(
        self,
        file,
        archive: zipfile.ZipFile,
        prefix: str,
        source: str = "?",
        stub_modules: tuple[str, ...] = STUB_MODULES,
    ):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._source = source
        self._stub_modules = stub_modules
        self._storages: dict[str, Any] = {}
        self._stubs: dict[str, type] = {}
        self._allowed = _allowed_functions()
        self._budget = _SizeBudget(Path(source), archive, prefix)
        for name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            self._allowed[("torch._utils", name)] = functools.partial(self._rebuild, name)
        self.stubbed: set[str] = set()

    def _rebuild(self, name: str, storage, offset, size, stride, *rest):
        """torch's tensor rebuild, after checking the view against its storage."""
        self._budget.view(
            self._storage_bytes(storage), self._dtype_size(storage), offset, size, stride
        )
        from torch import _utils

        return getattr(_utils, name)(storage, offset, size, stride, *rest)

    def _storage_bytes(self, storage) -> int:
        return int(storage._untyped_storage.nbytes())  # (TypedStorage.nbytes() warns)

    def _dtype_size(self, storage) -> int:
        return _itemsize(storage.dtype)

    def find_class(self, module: str, name: str) -> Any:
        fn = self._allowed.get((module, name))
        if fn is not None:
            return fn
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return self._other_global(module, name)

    def _other_global(self, module: str, name: str) -> Any:
        """A global that is not a tensor rebuild, dtype or storage: a stand-in or refused."""
        if any(module == m or module.startswith(m + ".") for m in self._stub_modules):
            return self._stub(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load the global {module}.{name} from {self._source}: only torch "
            "tensor rebuild functions, collections.OrderedDict and classes of "
            f"{', '.join(self._stub_modules)} (as inert stand-ins) are allowed. The file may be "
            "malicious, or of a kind this reader does not know."
        )

    def _stub(self, module: str, name: str) -> type:
        full = f"{module}.{name}"
        if full not in self._stubs:
            self._stubs[full] = type(
                name.split(".")[-1],
                (PickledObject,),
                {"__module__": "pipeline.checkpoints.stubs", "_pickled_global": full},
            )
            self.stubbed.add(full)
        return self._stubs[full]

    def _declared_storage(self, pid: Any) -> tuple[str, torch.dtype, int]:
        """(key, dtype, bytes) of a storage persistent id, its size checked (nothing read)."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r} in {self._source}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        dtype, untyped = storage_type.dtype, storage_type.name == "UntypedStorage"
        return str(key), dtype, self._budget.storage(str(key), numel, _itemsize(dtype), untyped)

    def persistent_load(self, pid: Any) -> Any:
        key, dtype, _ = self._declared_storage(pid)
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            flat = (
                torch.frombuffer(bytearray(raw), dtype=dtype)
                if raw
                else torch.empty(0, dtype=dtype)
            )
            self._storages[key] = torch.storage.TypedStorage(
                wrap_storage=flat.untyped_storage(), dtype=dtype, _internal=True
            )
        return self._storages[key]


@dataclasses.dataclass(frozen=True)
class _DeclaredStorage:
    nbytes: int
    dtype: torch.dtype


class _DeclaredTensor:
    """What a tensor rebuild gives while only sizes are checked (nothing allocated)."""


class _SizeScan(RestrictedUnpickler):
    """Walks a checkpoint's pickle checking declared sizes only: storages are not read,
    tensors are not built, and every global is an inert stand-in (nothing is refused here:
    whether the file is allowed is ``torch.load(weights_only=True)``'s decision)."""

    def __init__(self, file, archive, prefix, source):
        super().__init__(file, archive, prefix, source, stub_modules=("",))
        for name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            self._allowed[("torch._utils", name)] = lambda data, *rest: data
        self._allowed[("torch._tensor", "_rebuild_from_type_v2")] = (
            lambda func, new_type, args, state: func(*args)
        )

    def _other_global(self, module: str, name: str) -> Any:
        return self._stub(module, name)

    def _rebuild(self, name, storage, offset, size, stride, *rest):
        if not isinstance(storage, _DeclaredStorage):
            raise pickle.UnpicklingError(f"{self._source}: a tensor without a storage record")
        self._budget.view(storage.nbytes, _itemsize(storage.dtype), offset, size, stride)
        return _DeclaredTensor()

    def persistent_load(self, pid: Any) -> Any:
        _, dtype, nbytes = self._declared_storage(pid)
        return _DeclaredStorage(nbytes, dtype)


def _open_torch_zip(path: Path):
    """(archive, data.pkl name, prefix) of a torch zip checkpoint; refuses anything else."""
    if not zipfile.is_zipfile(path):
        raise pickle.UnpicklingError(
            f"{path} is not a torch zip checkpoint (torch.save's format since torch 1.6); the "
            "legacy format and raw pickles are not read (their sizes cannot be checked before "
            "loading, and they can run code). Re-save it as a state dict "
            "(torch.save(model.state_dict())) in a trusted environment, or as safetensors."
        )
    archive = zipfile.ZipFile(path)
    names = archive.namelist()
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pkls:
        archive.close()
        hint = (
            " (it looks like a TorchScript archive)"
            if any(n.endswith("constants.pkl") for n in names)
            else ""
        )
        raise pickle.UnpicklingError(f"{path} has no <archive>/data.pkl record{hint}")
    prefix = pkls[0].rsplit("/", 1)[0]
    order = f"{prefix}/byteorder"
    if order in names and archive.read(order).decode().strip() != "little":
        archive.close()
        raise pickle.UnpicklingError(f"{path} was saved on a big-endian machine; unsupported")
    return archive, pkls[0], prefix


def check_torch_zip_sizes(path: str | Path) -> None:
    """Raise :class:`CheckpointSizeError` if the torch zip at ``path`` declares tensors
    larger than its records or the limit (see the module docstring); reads only the pickle."""
    path = Path(path)
    archive, pkl, prefix = _open_torch_zip(path)
    with archive, archive.open(pkl) as f:
        _SizeScan(f, archive, prefix, str(path)).load()


def safe_torch_load(path: str | Path, stub_modules: tuple[str, ...] = STUB_MODULES) -> Any:
    """Load a ``torch.save`` zip file with :class:`RestrictedUnpickler` (no code execution).

    Returns the unpickled object: tensors as tensors, containers as containers, and module
    objects as :class:`PickledObject` stand-ins (use :func:`module_state_dict`).
    """
    path = Path(path)
    archive, pkl, prefix = _open_torch_zip(path)
    with archive, archive.open(pkl) as f:
        return RestrictedUnpickler(f, archive, prefix, str(path), stub_modules).load()


def module_state_dict(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The ``state_dict()`` an ``nn.Module`` would give, computed from a pickled stand-in.

    Mirrors ``nn.Module.state_dict``: own ``_parameters`` (not None), persistent ``_buffers``
    (not None, not in ``_non_persistent_buffers_set``), then ``_modules`` recursively.
    """
    d = obj.__dict__ if isinstance(obj, PickledObject) else {}
    if "_parameters" not in d or "_modules" not in d:
        raise ValueError(
            f"{getattr(obj, '_pickled_global', type(obj).__name__)} at {prefix or '<root>'!r} is "
            "not a pickled torch.nn.Module (no _parameters/_modules)"
        )
    out: dict[str, torch.Tensor] = {}
    for name, p in d["_parameters"].items():
        if p is not None:
            out[prefix + name] = p.detach() if isinstance(p, torch.Tensor) else p
    skip = d.get("_non_persistent_buffers_set") or set()
    for name, b in (d.get("_buffers") or {}).items():
        if b is not None and name not in skip:
            out[prefix + name] = b.detach()
    for name, m in d["_modules"].items():
        if m is not None:
            out.update(module_state_dict(m, prefix + name + "."))
    return out


VISUAL_PREFIXES = (
    "image_encoder.model.visual.",  # a task-vectors ImageClassifier
    "module.model.visual.",
    "model.visual.",  # a task-vectors ImageEncoder
    "module.visual.",
    "visual.",  # a whole open_clip CLIP
)


def visual_subset(state: Mapping[str, torch.Tensor], source: str = "?") -> dict[str, torch.Tensor]:
    """The image tower's entries of ``state``, keyed as open_clip ``model.visual``.

    Accepts a task-vectors ImageEncoder (``model.visual.*``), a whole CLIP (``visual.*``,
    optionally under ``module.``) or an image tower already (``conv1.weight``, ...).
    """
    for prefix in VISUAL_PREFIXES:
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return sub
    if "conv1.weight" in state or "class_embedding" in state:
        return dict(state)
    raise ValueError(
        f"{source} holds no CLIP image tower: expected keys under one of {VISUAL_PREFIXES} or "
        f"an image tower's own keys (conv1.weight, ...); found e.g. {sorted(state)[:5]}"
    )


def load_task_vectors_visual(path: str | Path) -> dict[str, torch.Tensor]:
    """Image-tower state dict from a task-vectors ``finetuned.pt`` / ``zeroshot.pt``.

    The file is a pickled ``ImageEncoder`` whose ``.model`` is an open_clip CLIP; its
    ``model.visual.*`` entries are returned without the prefix. Plain pickled state dicts are
    accepted too. Read with :func:`safe_torch_load` (no code from the file runs).
    """
    obj = safe_torch_load(path)
    if isinstance(obj, PickledObject):
        state = module_state_dict(obj)
    elif isinstance(obj, Mapping):
        state = obj.get("state_dict", obj)
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    else:
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a module or a state dict")
    return {k: v.contiguous() for k, v in visual_subset(state, str(path)).items()}


# ====================================================================== local state dicts
def check_torch_weights(path: str | Path) -> None:
    """Refuse, before any load, a torch file that is not a zip, names a global a
    ``weights_only`` load refuses, or declares sizes it does not hold; the error names it."""
    path = Path(path)
    _open_torch_zip(path)[0].close()
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    if unsafe:
        raise pickle.UnpicklingError(
            f"{path} is not a plain state dict: its pickle names {', '.join(unsafe)}, which a "
            "safe load refuses (nothing from the file was run). A task-vectors whole-module "
            "checkpoint: use experts.source=task_vectors or convert it with "
            "scripts/convert_task_vectors.py; otherwise re-save its state_dict() as safetensors."
        )
    check_torch_zip_sizes(path)


def check_weight_files(folder: str | Path) -> None:
    """Check every weight file of a local ``save_pretrained`` folder before transformers
    reads it: torch files by :func:`check_torch_weights`, safetensors by their header."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).iterdir()):
        if path.suffix in (".bin", ".pt", ".pth"):
            check_torch_weights(path)
        elif path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except SafetensorError as e:
                raise ValueError(
                    f"{path} is not a valid safetensors file ({e}): it is truncated, damaged or "
                    "tampered with; re-create it from its source"
                ) from e


def load_torch_weights(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: the one ``torch.load`` of the project.

    Before torch reads it: the file must be a torch zip, every global its pickle names must be
    one ``weights_only`` allows (``torch.serialization.get_unsafe_globals_in_checkpoint``), and
    its declared sizes must pass :func:`check_torch_zip_sizes`. A file that needs more than
    tensors and containers (a pickled module, or code such as ``os.system``) is refused before
    anything in it runs; the error names the file and the refused globals.
    """
    path = Path(path)
    check_torch_weights(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next(
            (ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else ""
        )
        raise pickle.UnpicklingError(
            f"{path} is not a plain state dict: a safe load refused it ({reason}); nothing from "
            "the file was run. Re-save its state_dict() as safetensors in a trusted environment."
        ) from e


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, with a damaged or tampered file named in the error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(
            f"{path} is not a valid safetensors file ({e}): it is truncated, damaged or "
            "tampered with; re-create it from its source"
        ) from e


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Image-tower state dict from a safetensors file or a ``torch.save``d state dict.

    ``.safetensors`` is read with safetensors; anything else with
    ``torch.load(weights_only=True)`` (a ``{"state_dict": ...}`` wrapper is unwrapped).
    Whole-CLIP keys (``visual.*``) are reduced to the image tower.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_safetensors(path)
    else:
        state = load_torch_weights(path)
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return visual_subset(state, str(path))


# ====================================================================== transformers CLIP
def hf_vision_to_open_clip(
    hf_state: Mapping[str, torch.Tensor], proj: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Map a transformers CLIP vision state dict onto open_clip's ``model.visual`` keys.

    - ``embeddings.class_embedding`` -> ``class_embedding``;
      ``embeddings.patch_embedding.weight`` -> ``conv1.weight``;
      ``embeddings.position_embedding.weight`` -> ``positional_embedding``
    - ``pre_layrnorm`` -> ``ln_pre``; ``post_layernorm`` -> ``ln_post``
    - layer i: ``self_attn.{q,k,v}_proj`` -> ``attn.in_proj_{weight,bias}`` (rows stacked
      q, k, v, as ``nn.MultiheadAttention``); ``self_attn.out_proj`` -> ``attn.out_proj``;
      ``layer_norm1/2`` -> ``ln_1/2``; ``mlp.fc1/fc2`` -> ``mlp.c_fc/c_proj``
    - ``visual_projection.weight`` (E x D, ``y = x W^T``) -> ``proj`` = W^T (D x E, ``y = x P``)

    Keys may carry a ``vision_model.`` prefix; text-tower keys of a whole ``CLIPModel`` are
    ignored. A ``CLIPVisionModel`` has no projection: pass ``proj`` (e.g. the pretrained
    model's, which CLIPVisionModel fine-tuning leaves unchanged). Unknown keys raise.
    """
    sd: dict[str, torch.Tensor] = {}
    for k, v in hf_state.items():
        if k.startswith("text_model.") or k in ("text_projection.weight", "logit_scale"):
            continue
        sd[k.removeprefix("vision_model.")] = v
    sd.pop("embeddings.position_ids", None)

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"transformers CLIP vision state dict lacks {key!r}")
        return sd.pop(key)

    out = {
        "class_embedding": take("embeddings.class_embedding"),
        "positional_embedding": take("embeddings.position_embedding.weight"),
        "conv1.weight": take("embeddings.patch_embedding.weight"),
        "ln_pre.weight": take("pre_layrnorm.weight"),
        "ln_pre.bias": take("pre_layrnorm.bias"),
    }
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    if layers != list(range(len(layers))):
        raise ValueError(f"transformers encoder layers are not numbered 0..n-1: {layers}")
    for i in layers:
        h, o = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[o + f"attn.in_proj_{part}"] = torch.cat(
                [take(h + f"self_attn.{x}_proj.{part}") for x in ("q", "k", "v")], dim=0
            )
            out[o + f"attn.out_proj.{part}"] = take(h + f"self_attn.out_proj.{part}")
            out[o + f"ln_1.{part}"] = take(h + f"layer_norm1.{part}")
            out[o + f"ln_2.{part}"] = take(h + f"layer_norm2.{part}")
            out[o + f"mlp.c_fc.{part}"] = take(h + f"mlp.fc1.{part}")
            out[o + f"mlp.c_proj.{part}"] = take(h + f"mlp.fc2.{part}")
    out["ln_post.weight"] = take("post_layernorm.weight")
    out["ln_post.bias"] = take("post_layernorm.bias")
    if "visual_projection.weight" in sd:
        out["proj"] = take("visual_projection.weight").t().contiguous()
    elif proj is not None:
        out["proj"] = proj
    else:
        raise ValueError(
            "the checkpoint has no visual_projection (a CLIPVisionModel): pass proj= (the "
            "pretrained CLIP's projection)"
        )
    if sd:
        raise ValueError(f"unmapped transformers CLIP vision keys: {sorted(sd)[:8]}")
    return {k: v.contiguous() for k, v in out.items()}


def load_hf_visual(
    location: str,
    revision: str | None = None,
    fallback_proj: torch.Tensor | None = None,
    quick_gelu: bool | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Image tower from a transformers CLIP checkpoint (hub id or ``save_pretrained`` folder).

    Loaded with ``CLIPVisionModelWithProjection.from_pretrained``. When the checkpoint has no
    ``visual_projection`` (a ``CLIPVisionModel``, as the FusionBench experts are),
    ``fallback_proj`` is used and ``info["projection"]`` says so. ``quick_gelu`` (the open_clip
    model's activation) must agree with the checkpoint's ``hidden_act``.
    """
    from transformers import AutoConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    if Path(location).is_dir():
        check_weight_files(location)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized visual_projection" notice
    try:
        config = AutoConfig.from_pretrained(location, revision=revision)
        if config.model_type == "clip":  # a whole CLIPModel: its projection size is the CLIP's
            config.vision_config.projection_dim = config.projection_dim
            config = config.vision_config
        model, loading = CLIPVisionModelWithProjection.from_pretrained(
            location, revision=revision, config=config, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    act = model.config.hidden_act
    if quick_gelu is not None and act != ("quick_gelu" if quick_gelu else "gelu"):
        raise ValueError(
            f"{location} uses hidden_act={act!r} but the open_clip backbone uses "
            f"{'QuickGELU' if quick_gelu else 'GELU'}; pick the matching open_clip model "
            "(OpenAI CLIP weights need the '-quickgelu' variant)"
        )
    state = model.state_dict()
    info: dict[str, Any] = {"format": "transformers", "location": location, "hidden_act": act}
    if "visual_projection.weight" in set(loading.get("missing_keys", ())):
        if fallback_proj is None:
            raise ValueError(
                f"{location} has no visual_projection (a CLIPVisionModel checkpoint) and no "
                "pretrained projection was given to complete it"
            )
        state = {k: v for k, v in state.items() if k != "visual_projection.weight"}
        info["projection"] = (
            "taken from the pretrained model: the checkpoint is a CLIPVisionModel without "
            "visual_projection"
        )
    else:
        info["projection"] = "from the checkpoint (visual_projection.weight, transposed)"
    return hf_vision_to_open_clip(state, proj=fallback_proj), info


# ====================================================================== checking and refs
def check_visual_state(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """``state`` with the keys, shapes and dtypes of ``reference`` (float tensors cast).

    Raises ValueError naming missing, unexpected or mis-shaped keys.
    """
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        raise ValueError(
            f"{what} does not match the backbone's image tower: missing {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected {extra[:6]}"
            f"{' ...' if len(extra) > 6 else ''}. Is it a checkpoint of this backbone?"
        )
    out = {}
    for k, ref in reference.items():
        v = state[k]
        if tuple(v.shape) != tuple(ref.shape):
            raise ValueError(
                f"{what}: {k} has shape {tuple(v.shape)}, the backbone expects {tuple(ref.shape)}"
            )
        out[k] = v.to(ref.dtype) if v.is_floating_point() else v
    return out


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """Where one image tower comes from: ``kind`` in :data:`KINDS`, a location, a revision."""

    role: str  # "pretrained" or "expert <Task>"
    kind: str
    location: str
    revision: str | None = None

    def material(self) -> dict[str, Any]:
        """Cache-key material: the reference, plus size and mtime of a local file or folder."""
        m: dict[str, Any] = {
            "kind": self.kind,
            "location": self.location,
            "revision": self.revision,
        }
        p = Path(self.location)
        target = p / "model.safetensors" if p.is_dir() else p
        if self.kind != "open_clip" and target.exists():
            st = target.stat()
            m["file"] = {
                "path": str(target.resolve()),
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
            }
        return m

    def resource(self) -> Resource:
        what = f"{self.role} ({self.kind} checkpoint)"
        if self.kind == "hf":
            if Path(self.location).exists() or self.location.startswith((".", "/", "~")):
                return Resource(
                    what,
                    "dir",
                    self.location,
                    "a folder written by transformers save_pretrained (config.json + weights)",
                    needs="config.json",
                )
            return Resource(
                what,
                "hub_model",
                self.location,
                f"hf download {self.location}",
                revision=self.revision,
            )
        if self.kind == "task_vectors":
            return Resource(
                what,
                "file",
                self.location,
                f"download the task-vectors checkpoints ({TASK_VECTORS_URL}) and set "
                "backbone.experts.task_vectors.root to the folder holding "
                "zeroshot.pt and <Task>/finetuned.pt",
            )
        if self.kind == "state_dict":
            return Resource(
                what,
                "file",
                self.location,
                "write it with `python scripts/convert_task_vectors.py SRC DST` or point "
                "backbone.experts.state_dict.template at your safetensors files",
            )
        raise ValueError(f"{self.role}: an open_clip reference is checked by the suite builder")


def load_checkpoint(
    ref: CheckpointRef,
    reference: Mapping[str, torch.Tensor],
    quick_gelu: bool | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``ref`` as an image-tower state dict checked against ``reference``.

    ``reference`` is the pretrained tower's state dict: it fixes keys, shapes and dtypes, and
    supplies the projection of ``CLIPVisionModel`` checkpoints.
    """
    if ref.kind not in KINDS[:3]:
        raise ValueError(f"{ref.role}: cannot load kind {ref.kind!r} here (one of {KINDS[:3]})")
    try:
        if ref.kind == "hf":
            state, info = load_hf_visual(
                ref.location, ref.revision, reference.get("proj"), quick_gelu
            )
        elif ref.kind == "task_vectors":
            state, info = load_task_vectors_visual(ref.location), {"format": "task_vectors pickle"}
        else:
            state, info = load_state_file(ref.location), {"format": "state dict"}
    except pickle.UnpicklingError as e:  # refused or oversized: name the expert too
        raise type(e)(f"{ref.role} ({ref.kind} checkpoint): {e}") from e
    info["location"] = ref.location
    return check_visual_state(state, reference, f"{ref.role} from {ref.location}"), info
