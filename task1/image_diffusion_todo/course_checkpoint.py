"""Read a checkpoint written by the course's (Lab-1) `DiffusionModule.save`, without running any
code from it.

The course's save() pickles the network and the scheduler objects themselves:

    torch.save({"hparams": {"network": <UNet>, "var_scheduler": <DDPMScheduler>[, "predictor": str]},
                "state_dict": DiffusionModule.state_dict()})   # network.*, var_scheduler.{betas, ...}

torch.load(weights_only=False) would import the `network`, `module` and `scheduler` modules and
call whatever the pickle names: a file from elsewhere could run any code. Here the archive's
data.pkl is read by a restricted unpickler instead:
  - tensors and parameters are rebuilt from the archive's data/ entries (never on a GPU);
  - dicts, lists, tuples, OrderedDict, set and plain values are rebuilt;
  - every other class becomes an inert `Record`: its pickled name and attributes, nothing imported;
  - a pickle that *calls* anything else (os.system, builtins.eval, subprocess.call, ...) is
    refused: nothing from the file runs.
From the records and tensors, read_course_checkpoint() takes what this project's checkpoints hold
({"config", "state_dict"}, see model.py): the UNet's configuration from the weights' shapes and the
records' attributes, the noise schedule from var_scheduler.betas (linear, quad or cosine, with
beta_1 and beta_T), the predictor from hparams (None when the file does not say: the 2025 template).
"""
import _compat_pickle
import pickle
import zipfile
from collections import OrderedDict

import numpy as np
import torch
from scheduler import PREDICTORS, SIGMA_TYPES, make_betas

# storage classes torch.save names in its persistent ids, and the dtype of their elements
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
COURSE_DEFAULTS = {"beta_1": 1e-4, "beta_T": 0.02, "dropout": 0.1, "cfg_dropout": 0.1}


class CourseCheckpointError(ValueError):
    """A file that is not a course checkpoint this code can rebuild, or whose pickle asks to run code."""


class Record:
    """An inert stand-in for an object of a class the pickle names: the name and the pickled state.

    For an nn.Module the state is its attribute dict: `_parameters`, `_buffers`, `_modules`, and its
    own attributes (the course's UNet has image_resolution, use_cfg, cfg_dropout).
    """

    __slots__ = ("class_name", "state")

    def __init__(self, class_name: str):
        self.class_name, self.state = class_name, None

    def attr(self, name, default=None):
        return self.state.get(name, default) if isinstance(self.state, dict) else default

    def modules(self):
        """This record and every record below it in `_modules`, depth first (each once: a pickle can
        hold cycles)."""
        seen, stack = set(), [self]
        while stack:
            record = stack.pop()
            if id(record) in seen:
                continue
            seen.add(id(record))
            yield record
            children = record.attr("_modules")
            if isinstance(children, dict):
                stack.extend(child for child in reversed(list(children.values())) if isinstance(child, Record))

    def __repr__(self):
        return f"Record({self.class_name})"


class _Name:
    """A global the pickle names that is not on the allow-list: usable only as a class to instantiate."""

    def __init__(self, module: str, name: str):
        self.full_name = f"{module}.{name}"


class _SafeCall:
    """A global the pickle may call: one of the functions below, never the one it names."""

    def __init__(self, function):
        self.function = function


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage:
    """One data/<key> entry of the archive as a flat tensor."""

    def __init__(self, flat: torch.Tensor):
        self.flat = flat


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2, checked: a strided view into a storage read from the archive."""
    size, stride = tuple(size), tuple(stride)
    if not (isinstance(storage, _Storage) and isinstance(storage_offset, int) and storage_offset >= 0
            and len(size) == len(stride) and all(isinstance(n, int) and n >= 0 for n in size + stride)):
        raise CourseCheckpointError("malformed tensor in the pickle")
    if all(size) and storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.flat.numel():
        raise CourseCheckpointError("a tensor in the pickle points outside its storage")
    return storage.flat.as_strided(size, stride, storage_offset)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """torch._utils._rebuild_parameter(_with_state): the tensor is all we need."""
    if not isinstance(data, torch.Tensor):
        raise CourseCheckpointError("malformed parameter in the pickle")
    return data


def _reconstruct(cls, base, state):
    """copyreg._reconstructor (pickle protocols 0 and 1): an object of class cls, built as a Record."""
    if not isinstance(cls, _Name) or state is not None:
        raise CourseCheckpointError("malformed object in the pickle")
    return Record(cls.full_name)


SAFE_CALLS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "copyreg._reconstructor": _reconstruct,
}


class RestrictedUnpickler(pickle._Unpickler):
    """pickle's pure-Python unpickler (pickle._Unpickler: its opcodes can be replaced one by one,
    the C unpickler's cannot) with the opcodes that create or call objects replaced.

    GLOBAL gives a safe stand-in (above) or an inert _Name; REDUCE (a call) runs only the safe
    stand-ins; NEWOBJ (an instance of a class) gives a Record; BUILD (setting an object's state)
    fills a Record only; INST and OBJ (protocol-0/1 calls) are refused.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module, name):
        if self.proto < 3:  # Python 2 names, as pickle's own find_class maps them (torch.save uses protocol 2)
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full_name = f"{module}.{name}"
        if full_name in SAFE_CALLS:
            return _SafeCall(SAFE_CALLS[full_name])
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        return _Name(module, name)

    def persistent_load(self, pid):
        """("storage", storage type, key, location, numel) -> the archive's data/<key> as a flat tensor."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise CourseCheckpointError(f"unsupported persistent id in the pickle: {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise CourseCheckpointError(f"the archive has no data/{key} entry") from None
            dtype = storage_type.dtype
            if len(raw) != numel * dtype.itemsize:
                raise CourseCheckpointError(f"data/{key} holds {len(raw)} bytes, not {numel} x {dtype}")
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            self.storages[key] = _Storage(flat)
        return self.storages[key]

    def _refuse_call(self, target):
        name = target.full_name if isinstance(target, _Name) else type(target).__name__
        raise CourseCheckpointError(f"its pickle calls {name}(...), but only tensors and plain data are "
                                    "rebuilt: refused, nothing from the file was run")

    def load_reduce(self):
        args = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, _SafeCall):
            self._refuse_call(target)
        self.stack[-1] = target.function(*args)

    def load_newobj(self):
        self.stack.pop()  # the arguments of cls.__new__: a Record needs none
        self._push_record(self.stack.pop())

    def load_newobj_ex(self):
        self.stack.pop(), self.stack.pop()  # kwargs, args
        self._push_record(self.stack.pop())

    def _push_record(self, cls):
        if not isinstance(cls, _Name):
            self._refuse_call(cls)
        self.append(Record(cls.full_name))

    def load_build(self):
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, Record):
            target.state = state
        elif not isinstance(target, OrderedDict):
            # (an OrderedDict's state is its attribute dict, e.g. a state_dict's _metadata: not needed)
            raise CourseCheckpointError(f"its pickle sets the state of a {type(target).__name__}: refused")

    def load_inst(self):
        module, name = self.readline()[:-1].decode("ascii"), self.readline()[:-1].decode("ascii")
        self._refuse_call(_Name(module, name))

    def load_obj(self):
        args = self.pop_mark()
        self._refuse_call(args[0] if args else None)

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.INST[0]] = load_inst
    dispatch[pickle.OBJ[0]] = load_obj


def read_pickle_safely(path):
    """The object a torch.save'd file holds, rebuilt by RestrictedUnpickler (see the module docstring)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise CourseCheckpointError(f"not a torch.save zip archive ({error})") from None
    with archive:
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise CourseCheckpointError("not a torch.save zip archive (no single <name>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder") != b"little":
            raise CourseCheckpointError("written on a big-endian machine: not supported")
        with archive.open(pickles[0]) as data:
            try:
                return RestrictedUnpickler(data, archive, prefix).load()
            except CourseCheckpointError:
                raise
            except Exception as error:  # a malformed pickle: whatever the unpickler tripped on
                raise CourseCheckpointError(f"malformed pickle ({type(error).__name__}: {error})") from None


def _number(value, default: float) -> float:
    """A float attribute of a record, or the course's default when it is missing or not a number."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _decimals(value: float) -> list:
    """value rounded to 1, 2, ..., 9 significant digits (the number a student typed is among them)."""
    return list(dict.fromkeys(float(f"{value:.{digits}g}") for digits in range(1, 10)))


def identify_schedule(betas: torch.Tensor) -> dict:
    """{"mode", "beta_1", "beta_T"} for which make_betas gives back betas [T].

    linear and quad start at beta_1 and end at beta_T: the endpoints, rounded to the fewest digits
    that reproduce betas, bit for bit if possible, else to float32 rounding (rtol 1e-4, a student's
    GPU arithmetic). cosine uses neither (reported as the course's defaults). CourseCheckpointError
    naming the closest schedule when none matches.
    """
    T = len(betas)
    betas = betas.float()
    candidates = [(mode, beta_1, beta_T) for mode in ("linear", "quad")
                  for beta_1 in _decimals(betas[0].item()) for beta_T in _decimals(betas[-1].item())]
    candidates.append(("cosine", COURSE_DEFAULTS["beta_1"], COURSE_DEFAULTS["beta_T"]))
    references = [make_betas(T, beta_1, beta_T, mode) for mode, beta_1, beta_T in candidates]
    for matches in (torch.equal, lambda a, b: torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-7)):
        for (mode, beta_1, beta_T), reference in zip(candidates, references):
            if matches(betas, reference):
                return {"mode": mode, "beta_1": beta_1, "beta_T": beta_T}
    differences = [(betas.double() - reference.double()).abs().max().item() for reference in references]
    closest = int(np.argmin(differences))
    raise CourseCheckpointError(
        f"var_scheduler.betas (T = {T}, {betas[0]:.3g} ... {betas[-1]:.3g}) is not a linear, quad or cosine "
        f"schedule this code can rebuild (closest: {candidates[closest][0]}, off by up to {differences[closest]:.2g})")


def unet_config(network: Record, weights: dict) -> dict:
    """The course UNet's constructor arguments (network.py), from the weights' shapes and the record.

    weights: the network's state_dict (keys without "network."). ch from head.weight [ch, 3, 3, 3];
    the levels from the down path (ResBlocks until a DownSample): num_res_blocks, ch_mult from each
    level's output channels, attn from the levels whose ResBlocks have attention; use_cfg and
    num_classes from class_embedding.weight [num_classes + 1, tdim]. The record gives what shapes
    cannot: image_resolution, the Dropout's p, cfg_dropout.
    """
    if "head.weight" not in weights:
        raise CourseCheckpointError("its state_dict has no network.head.weight: not the course's UNet")
    ch = weights["head.weight"].shape[0]
    levels, level, index = [], [], 0
    while True:
        block = f"downblocks.{index}."
        if block + "block1.2.weight" in weights:
            level.append((weights[block + "block1.2.weight"].shape[0], block + "attn.proj_q.weight" in weights))
        elif block + "main.weight" in weights:  # a DownSample ends the level
            levels.append(level)
            level = []
        else:
            break
        index += 1
    levels.append(level)
    num_res_blocks = len(levels[0])
    out_channels = [{channels for channels, _ in level} for level in levels]
    attention = [{has_attn for _, has_attn in level} for level in levels]
    if (num_res_blocks == 0 or any(len(level) != num_res_blocks for level in levels)
            or any(len(s) != 1 or next(iter(s)) % ch for s in out_channels) or any(len(s) != 1 for s in attention)):
        raise CourseCheckpointError("its network's down path is not the course UNet's (levels of equal ResBlocks)")

    image_resolution = network.attr("image_resolution")
    if not isinstance(image_resolution, int):
        raise CourseCheckpointError("its network has no image_resolution attribute: not the course's UNet")
    dropouts = [record.attr("p") for record in network.modules() if record.class_name.endswith(".Dropout")]
    use_cfg = "class_embedding.weight" in weights
    return {
        "image_resolution": image_resolution,
        "ch": ch,
        "ch_mult": [next(iter(s)) // ch for s in out_channels],
        "attn": [i for i, s in enumerate(attention) if next(iter(s))],
        "num_res_blocks": num_res_blocks,
        "dropout": _number(dropouts[0] if dropouts else None, COURSE_DEFAULTS["dropout"]),
        "use_cfg": use_cfg,
        "cfg_dropout": _number(network.attr("cfg_dropout"), COURSE_DEFAULTS["cfg_dropout"]),
        "num_classes": weights["class_embedding.weight"].shape[0] - 1 if use_cfg else None,
    }


def scheduler_config(var_scheduler: Record, state_dict: dict) -> dict:
    """The DDPMScheduler's constructor arguments (scheduler.py) from var_scheduler.betas and the record."""
    betas = state_dict.get("var_scheduler.betas")
    if not isinstance(betas, torch.Tensor) or betas.ndim != 1 or len(betas) == 0:
        raise CourseCheckpointError("its state_dict has no var_scheduler.betas")
    config = {"num_train_timesteps": len(betas), **identify_schedule(betas)}
    sigma_type = var_scheduler.attr("sigma_type") if isinstance(var_scheduler, Record) else None
    config["sigma_type"] = sigma_type if sigma_type in SIGMA_TYPES else "small"
    return config


def read_course_checkpoint(path) -> dict:
    """A course (Lab-1) checkpoint as this project's {"config", "state_dict"} (see model.py).

    config["predictor"] is hparams["predictor"], or None when the file does not record it (the
    2025 template; the caller decides, the course's default being "noise"). The weights are only
    checked against the config when the network is built from them (model.DiffusionModule.load).
    """
    checkpoint = read_pickle_safely(path)
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("hparams"), dict)
            and isinstance(checkpoint.get("state_dict"), dict)):
        raise CourseCheckpointError("not a course checkpoint (no hparams / state_dict)")
    hparams, state_dict = checkpoint["hparams"], checkpoint["state_dict"]
    network = hparams.get("network")
    if not isinstance(network, Record):
        raise CourseCheckpointError("its hparams hold no network")
    predictor = hparams.get("predictor")
    if predictor is not None and predictor not in PREDICTORS:
        raise CourseCheckpointError(f"unknown predictor {predictor!r:.40} in its hparams")
    try:
        weights = {key[len("network."):]: value for key, value in state_dict.items()
                   if isinstance(key, str) and key.startswith("network.") and isinstance(value, torch.Tensor)}
        scheduler = scheduler_config(hparams.get("var_scheduler"), state_dict)
        network_config = unet_config(network, weights)
    except CourseCheckpointError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as error:  # odd values in the records
        raise CourseCheckpointError(f"malformed course checkpoint ({type(error).__name__}: {error})") from None
    config = {"network": {"T": scheduler["num_train_timesteps"], **network_config}, "scheduler": scheduler,
              "predictor": predictor}
    return {"config": config, "state_dict": weights, "format": "course"}
