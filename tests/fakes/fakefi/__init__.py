"""A FlashInfer-shaped fake (``flashinfer.autotuner``'s API, on a CPU): a tuner whose
tactic timings carry per-rank noise that makes ranks disagree unless their timings
are mean-reduced over ``set_autotune_process_group``'s group, as FlashInfer does.
Used through ``FlashInferBackend(module="tests.fakes.fakefi", require_cuda=False)``."""

__version__ = "0.7.2"
