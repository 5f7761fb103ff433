"""A CUDA device emulated on the CPU, for the device-readiness tests (tests/test_devices.py).

Run code inside `emulated_cuda()`, or a script with `python tests/emulated_cuda.py exp_x.py --device cuda ...`.
Tensors "on the GPU" are `CudaTensor`s: ordinary CPU tensors that say device cuda:0. A TorchFunctionMode sees every
torch call and enforces what a GPU enforces:
- a factory call or .to()/.cuda() that asks for cuda gives a CudaTensor (a copy); .cpu()/.to("cpu") a plain tensor;
- an operation that mixes CudaTensors with CPU tensors of one or more dimensions fails (0-dim CPU tensors are
  allowed, as on CUDA; so is indexing a CUDA tensor with CPU indices);
- a random operation whose generator is on another device than its output fails ("Expected a 'cuda' device type
  for generator"); torch.Generator("cuda") is a CPU generator that says cuda;
- .numpy() of a CudaTensor fails;
- every operation that makes the host wait for the device (.item(), float(), bool(), .tolist(), .cpu(), nonzero,
  boolean-mask indexing, masked_select, unique, torch.equal) is counted per call site (`Emulation.syncs`), and
  so is every host-to-device copy (`Emulation.copies`).
torch.cuda's queries answer as one GPU would; torch.save stores CudaTensors as plain tensors (as a GPU's tensors
are read back on a CPU with map_location). The numbers are the CPU's: an emulated run equals a --device cpu run,
except where the code itself chooses by device (fast_layout keeps GroupNorm-based models NCHW on CUDA).

What it cannot see: kernels that exist on the CPU but not on CUDA, or differ in numerics there (TF32, cuDNN's
algorithms, bf16 autocast: --amp is not emulated); memory; asynchrony and speed; NCCL; the size and content of a
real CUDA generator's state (16 bytes); where sparse tensors live (they are never tagged); C++ code inside torch
that reads a tensor's real device (tensors made there, e.g. by autograd, are re-tagged where Python reads them:
.grad and torch.autograd.grad).
"""
import collections
import contextlib
import json
import os
import runpy
import sys
import traceback
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

CUDA = torch.device("cuda", 0)
_NOWRAP = torch.overrides.get_default_nowrap_functions()
HERE = os.path.abspath(__file__)


class CudaTensor(torch.Tensor):
    """A CPU tensor that says it lives on cuda:0."""

    @property
    def device(self):
        return CUDA

    @property
    def is_cuda(self):
        return True

    def get_device(self):
        return 0

    def __deepcopy__(self, memo):  # (torch's default asks subclasses for new_empty)
        if id(self) not in memo:
            new = _plain(self).detach().clone().as_subclass(CudaTensor).requires_grad_(self.requires_grad)
            if getattr(self, "_is_param", False):
                new._is_param = True  # a Parameter stays a Parameter
            memo[id(self)] = new
        return memo[id(self)]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # torch's default, but sparse results stay plain
        with torch._C.DisableTorchFunctionSubclass():
            ret = func(*args, **(kwargs or {}))
        return ret if func in _NOWRAP else _tag(ret)


class CudaGenerator(torch.Generator):
    """torch.Generator(device=...): a CPU generator that says cuda when asked for one."""

    def __new__(cls, device="cpu"):
        g = super().__new__(cls)  # (a CPU generator: torch's own would ask for the CUDA library)
        g.emulated = torch.device(device).type == "cuda"
        return g

    def __init__(self, device="cpu"):
        super().__init__()

    @property
    def device(self):
        return CUDA if self.emulated else torch.device("cpu")


def _plain(t):
    with torch._C.DisableTorchFunctionSubclass():
        return t.as_subclass(torch.Tensor)


def _on_cuda(t):
    return t if isinstance(t, CudaTensor) else t.as_subclass(CudaTensor)


def _tag(ret):
    """`ret` with its (strided) tensors as CudaTensors, one level into tuples and lists, as torch's default does."""
    if isinstance(ret, torch.Tensor):
        return ret if isinstance(ret, CudaTensor) or ret.layout != torch.strided else ret.as_subclass(CudaTensor)
    if isinstance(ret, (tuple, list)):
        return type(ret)(_tag(r) for r in ret)
    return ret


def _tensors(args, kwargs):
    """The tensors among the arguments, one level into lists and tuples (torch's ops take no deeper nesting)."""
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


def _wants(d):
    """True (cuda), False (cpu) or None (not a device) for a device-like argument."""
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        try:
            return torch.device(d).type == "cuda"
        except RuntimeError:
            return None
    return None


SYNCS = {"item", "__float__", "__int__", "__bool__", "__index__", "__format__", "tolist", "nonzero", "masked_select",
         "unique", "equal", "cpu"}
MOVES = {"to", "cuda", "cpu"}


class Emulation(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.syncs = collections.Counter()  # "file:line what" -> how often the host waited for the device there
        self.copies = collections.Counter()  # "file:line" -> host-to-device copies made there

    @staticmethod
    def _site():
        site = next((f for f in reversed(traceback.extract_stack())
                     if os.sep + "torch" + os.sep not in f.filename and f.filename != HERE), None)
        return f"{os.path.basename(site.filename)}:{site.lineno}" if site else "?"

    def _sync(self, what):
        self.syncs[f"{self._site()} {what}"] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property (.grad, .data, ...): the name is the property's
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        tensors = _tensors(args, kwargs)
        on_dev = [isinstance(t, CudaTensor) for t in tensors]
        self_dev = bool(args) and isinstance(args[0], CudaTensor)
        if name in MOVES and args and isinstance(args[0], torch.Tensor):
            return self._move(func, name, args, kwargs)
        want = _wants(kwargs.get("device"))
        if want:
            kwargs = dict(kwargs, device="cpu")
            if name in ("tensor", "as_tensor"):  # host data copied to the device
                self.copies[self._site()] += 1
        if any(on_dev) and not all(on_dev):
            self._check_mixed(name, args, tensors, self_dev)
        gen = kwargs.get("generator")
        if gen is not None:
            out_dev = want if want is not None else self_dev
            if getattr(gen, "emulated", False) != out_dev:
                raise RuntimeError(f"Expected a '{'cuda' if out_dev else 'cpu'}' device type for generator but found "
                                   f"'{'cuda' if getattr(gen, 'emulated', False) else 'cpu'}' (emulated CUDA: {name})")
        if name == "numpy" and self_dev:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                            "host memory first. (emulated CUDA)")
        if any(on_dev) and (name in SYNCS or (name == "__getitem__" and self._bool_index(args))):
            self._sync(name)
        res = func(*args, **kwargs)
        # made on the device; or made by autograd's C++ for CudaTensors (.grad, torch.autograd.grad), which does
        # not tag them
        if want or (want is None and name == "grad" and any(on_dev)):
            return tree_map(lambda t: _on_cuda(t) if isinstance(t, torch.Tensor) else t, res)
        if want is False:
            return tree_map(lambda t: _plain(t) if isinstance(t, torch.Tensor) else t, res)
        return res

    def _move(self, func, name, args, kwargs):
        src = args[0]
        if name == "cuda":
            target = True
        elif name == "cpu":
            target = False
        else:
            target = None
            for a in list(args[1:]) + list(kwargs.values()):
                if isinstance(a, torch.Tensor):
                    target = isinstance(a, CudaTensor)
                elif _wants(a) is not None:
                    target = _wants(a)
                if target is not None:
                    break
        if target is None:  # a dtype change only: stays where it is
            return func(*args, **kwargs)
        given = [a.dtype if isinstance(a, torch.Tensor) else a for a in list(args[1:]) + list(kwargs.values())]
        dtype = next((a for a in given if isinstance(a, torch.dtype)), None)
        fmt = {k: v for k, v in kwargs.items() if k == "memory_format"}
        res = torch.Tensor.to(_plain(src), "cpu", dtype, **fmt)  # (.cuda()/.cpu()/.to(...) all as one .to)
        if target and isinstance(src, CudaTensor):
            return src if res.data_ptr() == src.data_ptr() else _on_cuda(res)  # already there: itself, as torch
        if res.data_ptr() == src.data_ptr():
            res = res.clone()  # another device: another copy
        if target:
            self.copies[self._site()] += 1
            return _on_cuda(res)
        if isinstance(src, CudaTensor):
            self._sync("cpu")
            return _plain(res)
        return res

    @staticmethod
    def _bool_index(args):
        idx = args[1] if len(args) > 1 else None
        parts = idx if isinstance(idx, tuple) else (idx,)
        return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)

    @staticmethod
    def _check_mixed(name, args, tensors, self_dev):
        if name in ("__getitem__", "__setitem__", "index_put_") and self_dev:
            value = args[2] if name == "__setitem__" and len(args) > 2 else None
            if not (isinstance(value, torch.Tensor) and not isinstance(value, CudaTensor) and value.dim() > 0):
                return  # CUDA indexes with CPU indices (it copies them)
        if name in ("copy_", "set_", "data", "__set__", "_has_compatible_shallow_copy_type", "swap_tensors"):
            return  # copies between devices, and questions about tensor types
        cpu = [tuple(t.shape) for t in tensors if not isinstance(t, CudaTensor) and t.dim() > 0 and
               t.layout == torch.strided]  # (sparse tensors are not tagged: see the module's docstring)
        if cpu:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"cuda:0 and cpu! (emulated CUDA: {name}, CPU tensors of shapes {cpu})")


def command(script, *args, gpu=False):
    """The command line of `script`: plain, or (gpu=True) on the emulated GPU with --device cuda."""
    return [sys.executable, *([HERE] if gpu else []), script, *map(str, args), *(["--device", "cuda"] if gpu else [])]


@contextlib.contextmanager
def emulated_cuda():
    """Inside: one emulated GPU (see the module's docstring). Yields the Emulation, whose .syncs counts host waits."""
    def save(obj, f, *a, **k):
        return real_save(tree_map(lambda t: _plain(t) if isinstance(t, CudaTensor) else t, obj), f, *a, **k)
    real_save = torch.save
    emu = Emulation()
    patches = [mock.patch("torch.cuda.is_available", lambda: True), mock.patch("torch.cuda.device_count", lambda: 1),
               mock.patch("torch.cuda.get_device_name", lambda *a: "emulated CUDA (a CPU)"),
               mock.patch("torch.cuda.synchronize", lambda *a: None), mock.patch("torch.cuda.set_device", lambda *a: None),
               mock.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True),
               mock.patch("torch.Generator", CudaGenerator), mock.patch("torch.save", save)]
    old = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # model.to("cuda") makes CudaTensor parameters
    try:
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            with emu:
                yield emu
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(old)


if __name__ == "__main__":  # python tests/emulated_cuda.py SCRIPT ARGS...: run SCRIPT as on a GPU
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    code = 0
    with emulated_cuda() as emu:
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if os.environ.get("EMULATED_CUDA_SYNCS"):
        with open(os.environ["EMULATED_CUDA_SYNCS"], "w") as f:
            json.dump(dict(emu.syncs), f, indent=1, sort_keys=True)
    sys.exit(code)
