"""Every CUDA-only call of minillm behind one small interface, so that tests can replace it with a fake GPU.

`backend()` returns the active `Cuda` object; tests swap it with `use(FakeCuda(...))` (or monkeypatch `_ACTIVE`).
Code elsewhere asks `backend().is_cuda(device)` instead of `device.type == "cuda"` wherever it then calls into
CUDA, so a fake backend can claim any device type (normally "cpu") as its GPU.
"""

from __future__ import annotations

import torch


class Cuda:
    """The real CUDA runtime through torch.cuda. Sizes in bytes."""

    def is_cuda(self, device: torch.device | str) -> bool:
        return torch.device(device).type == "cuda"

    def available(self) -> bool:
        return torch.cuda.is_available()

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def synchronize(self, device) -> None:
        torch.cuda.synchronize(device)

    def reset_peak(self, device) -> None:
        torch.cuda.reset_peak_memory_stats(device)

    def memory_allocated(self, device) -> int:
        return torch.cuda.memory_allocated(device)

    def max_memory_allocated(self, device) -> int:
        return torch.cuda.max_memory_allocated(device)

    def max_memory_reserved(self, device) -> int:
        return torch.cuda.max_memory_reserved(device)

    def total_memory(self, device) -> int:
        """The device's capacity in bytes."""
        return torch.cuda.get_device_properties(device).total_memory

    def capability(self, device) -> tuple[int, int]:
        return torch.cuda.get_device_capability(device)

    def name(self, device) -> str:
        return torch.cuda.get_device_name(device)

    def bf16_supported(self, device) -> bool:
        """Whether bfloat16 autocast runs natively on this GPU (Ampere and later)."""
        return torch.cuda.is_bf16_supported()

    def autocast(self, device, dtype: torch.dtype, enabled: bool = True):
        """Mixed-precision context of `device` (torch.autocast on its device type)."""
        return torch.autocast(torch.device(device).type, dtype=dtype, enabled=enabled)

    def compile(self, module):
        """`module` compiled by torch.compile (the latency benchmark's compile policy 'all')."""
        return torch.compile(module)

    def empty_cache(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def cusparselt_available(self) -> bool:
        return bool(getattr(torch.backends, "cusparselt", None) and torch.backends.cusparselt.is_available())

    def to_semi_structured(self, weight: torch.Tensor, sparse_backend: str) -> torch.Tensor:
        """A 2:4-sparse weight in torch's semi-structured format on the named kernel library ('cutlass' or
        'cusparselt'). Raises whatever torch raises when the conversion is not supported."""
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

        SparseSemiStructuredTensor._FORCE_CUTLASS = sparse_backend == "cutlass"
        return to_sparse_semi_structured(weight)


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error of the accelerator (or of a fake one in tests)."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class FakeCuda(Cuda):
    """A GPU that is really the CPU, for tests and for the CI run of the gpu profile on CPU: every CUDA branch of
    minillm runs (device checks, peak-memory reset and read, synchronisation, bf16 autocast, 2:4 conversion, OOM
    capacity) on CPU tensors. Memory statistics are the CPU's resident set (peak during the step) so they are real
    numbers, not constants; `compile` returns the module unchanged (no compiler in CI); the 2:4 conversion returns
    the weight unchanged (or raises `convert_error`) and records the requested kernel library."""

    def __init__(self, capability=(9, 0), cusparselt=True, convert_error=None, total=80 * 10**9, bf16=True):
        self.cap, self.sparselt, self.convert_error, self.total, self.bf16 = (
            capability, cusparselt, convert_error, total, bf16,
        )
        self.requested_backends: list[str] = []
        self.calls: dict[str, int] = {}
        self._peak = 0

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    @staticmethod
    def _rss() -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def is_cuda(self, device):
        return torch.device(device).type == "cpu"

    def available(self):
        return True

    def device_count(self):
        return 1

    def synchronize(self, device):
        self._count("synchronize")

    def reset_peak(self, device):
        self._count("reset_peak")
        self._peak = self._rss()

    def memory_allocated(self, device):
        return self._rss()

    def max_memory_allocated(self, device):
        self._count("max_memory_allocated")
        self._peak = max(self._peak, self._rss())
        return self._peak

    def max_memory_reserved(self, device):
        return self.max_memory_allocated(device)

    def total_memory(self, device):
        return self.total

    def capability(self, device):
        return self.cap

    def name(self, device):
        return "Fake H100 (CPU)"

    def bf16_supported(self, device):
        return self.bf16

    def autocast(self, device, dtype, enabled=True):
        self._count("autocast")
        return torch.autocast("cpu", dtype=dtype, enabled=enabled)

    def compile(self, module):
        self._count("compile")
        return module

    def empty_cache(self):
        pass

    def cusparselt_available(self):
        return self.sparselt

    def to_semi_structured(self, weight, sparse_backend):
        self.requested_backends.append(sparse_backend)
        if self.convert_error:
            raise self.convert_error
        return weight


_ACTIVE: Cuda = Cuda()


def backend() -> Cuda:
    return _ACTIVE


def use(new: Cuda) -> Cuda:
    """Make `new` the active backend; returns the previous one (tests restore it)."""
    global _ACTIVE
    old, _ACTIVE = _ACTIVE, new
    return old


def semi_structured_backend(capability: tuple[int, int], cusparselt: bool, requested: str = "auto") -> str | None:
    """Which 2:4 kernel library can run on a GPU of this compute capability: torch's CUTLASS kernels exist for
    sm80-sm89 only, so Hopper (sm90) and later need cuSPARSELt. None when no library can run."""
    major = capability[0]
    if major < 8:
        return None
    if requested == "cutlass":
        return "cutlass" if major == 8 else None
    if requested == "cusparselt":
        return "cusparselt" if cusparselt else None
    if major >= 9:
        return "cusparselt" if cusparselt else None
    return "cusparselt" if cusparselt else "cutlass"
