"""GPU telemetry through NVML (nvidia-ml-py): per-GPU memory, utilisation, power and temperature in every
step's metrics record, and Xid / ECC events to events.jsonl.

A rank sees the GPUs Ray gave it (``CUDA_VISIBLE_DEVICES``: indices or UUIDs; NVML numbers physical
devices). Without NVML (no driver, no GPU) the job says so once (``nvml_unavailable`` with NVML's
reason, from rank 0) and records nothing else.
"""

from __future__ import annotations

import os
from typing import Any, Callable

Event = Callable[..., None]


def _nvml():
    import pynvml

    return pynvml


class GpuTelemetry:
    def __init__(self, event: Event, *, announce: bool):
        """``event(name, **fields)`` receives Xid/ECC events; ``announce``: this rank reports nvml_unavailable."""
        self.event = event
        self.handles: list[tuple[int, Any]] = []
        self.events_set = None
        self.reason = ""
        try:
            nvml = _nvml()
            nvml.nvmlInit()
            self.handles = self._visible(nvml)
            if not self.handles:
                raise RuntimeError("NVML sees no GPU visible to this rank")
        except Exception as e:  # no library, no driver, no device: named once, nothing else recorded
            self.reason = f"{type(e).__name__}: {e}"
            self.handles = []
            if announce:
                event("nvml_unavailable", reason=self.reason)
            return
        self._register_events(nvml)

    @property
    def available(self) -> bool:
        return bool(self.handles)

    @staticmethod
    def _visible(nvml) -> list[tuple[int, Any]]:
        """(index as this rank's CUDA numbers it, NVML handle) for each GPU the rank may use."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(nvml.nvmlDeviceGetCount())]
        out = []
        for i, item in enumerate(x.strip() for x in visible.split(",") if x.strip()):
            if item.startswith(("GPU-", "MIG-")):
                out.append((i, nvml.nvmlDeviceGetHandleByUUID(item)))
            elif item.isdigit():
                out.append((i, nvml.nvmlDeviceGetHandleByIndex(int(item))))
        return out

    def _register_events(self, nvml) -> None:
        kinds = nvml.nvmlEventTypeXidCriticalError | nvml.nvmlEventTypeDoubleBitEccError | \
            nvml.nvmlEventTypeSingleBitEccError
        try:
            self.events_set = nvml.nvmlEventSetCreate()
            for _, handle in self.handles:
                nvml.nvmlDeviceRegisterEvents(handle, kinds & nvml.nvmlDeviceGetSupportedEventTypes(handle),
                                              self.events_set)
        except Exception as e:  # e.g. not supported on this device or driver: readings still work
            self.events_set = None
            self.event("nvml_events_unavailable", reason=f"{type(e).__name__}: {e}")

    def sample(self) -> dict[str, Any]:
        """``{"gpus": [{index, mem_used_bytes, mem_total_bytes, util_pct, power_w, temp_c}]}`` (empty without NVML);
        pending Xid/ECC events go to ``event`` first."""
        if not self.handles:
            return {}
        nvml = _nvml()
        self._drain_events(nvml)
        gpus = []
        for index, handle in self.handles:
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append({
                "index": index,
                "mem_used_bytes": int(mem.used),
                "mem_total_bytes": int(mem.total),
                "util_pct": int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                "power_w": nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
                "temp_c": int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            })
        return {"gpus": gpus}

    def _drain_events(self, nvml) -> None:
        if self.events_set is None:
            return
        names = {nvml.nvmlEventTypeXidCriticalError: "gpu_xid", nvml.nvmlEventTypeDoubleBitEccError: "gpu_ecc_double_bit",
                 nvml.nvmlEventTypeSingleBitEccError: "gpu_ecc_single_bit"}
        while True:
            try:
                data = nvml.nvmlEventSetWait(self.events_set, 0)
            except nvml.NVMLError_Timeout:
                return
            except Exception as e:  # a broken event set: say so once and stop polling it
                self.event("nvml_events_unavailable", reason=f"{type(e).__name__}: {e}")
                self.events_set = None
                return
            uuid = nvml.nvmlDeviceGetUUID(data.device)
            self.event(names.get(data.eventType, "gpu_event"), event_type=int(data.eventType),
                       data=int(data.eventData), gpu_uuid=uuid.decode() if isinstance(uuid, bytes) else uuid)

    def close(self) -> None:
        if self.handles:
            try:
                if self.events_set is not None:
                    _nvml().nvmlEventSetFree(self.events_set)
                _nvml().nvmlShutdown()
            except Exception:  # shutting NVML down is best effort; the process is ending its job
                pass
            self.handles = []
