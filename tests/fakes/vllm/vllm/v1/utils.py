from vllm._fake import CpuGpuBuffer

__all__ = ["CpuGpuBuffer"]
