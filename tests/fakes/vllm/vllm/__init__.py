"""A recording fake of vLLM for warmplan's tests (see tests/fakes/vllm/README.md)."""

__version__ = "0.0.0+warmplan.fake"
WARMPLAN_FAKE = True
