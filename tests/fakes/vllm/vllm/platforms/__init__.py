from vllm._fake import PLATFORM as current_platform

__all__ = ["current_platform"]
