"""FlashInfer's ``AutoTuner`` singleton, recording ``load_configs``."""

from vllm._fake import STATE, record
from vllm.utils.flashinfer import autotune

__all__ = ["AutoTuner", "autotune"]


class AutoTuner:
    _instance = None

    @classmethod
    def get(cls):
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def load_configs(self, path):
        with open(path, "rb") as f:
            data = f.read()
        STATE.loaded_configs.append(data)
        record("tuning", "load_configs", {"path": str(path), "size": len(data)})
