"""vLLM's ``BlockTable`` / ``MultiGroupBlockTable`` slot-mapping entry points."""

import torch

from vllm._fake import STATE, record


class BlockTable:
    def __init__(self, runner):
        self._runner = runner

    def commit_block_table(self, num_reqs):
        record("block_table", "commit_block_table", {"num_reqs": num_reqs})

    def compute_slot_mapping(self, num_reqs, query_start_loc, positions):
        runner = self._runner
        qsl_buf = getattr(runner, "query_start_loc", None)
        pos_buf = getattr(runner, "positions", None)
        record(
            "block_table",
            "compute_slot_mapping",
            {
                "num_reqs": num_reqs,
                "query_start_loc": query_start_loc.tolist(),
                "query_start_loc.dtype": str(query_start_loc.dtype),
                "query_start_loc.is_runner_buffer": qsl_buf is not None
                and query_start_loc.data_ptr() == qsl_buf.gpu.data_ptr(),
                "positions": positions.tolist(),
                "positions.dtype": str(positions.dtype),
                "positions.is_runner_buffer": pos_buf is not None
                and positions.data_ptr() == pos_buf.data_ptr(),
                "inference_mode": torch.is_inference_mode_enabled(),
                "tuning": STATE.tuning[-1] if STATE.tuning else None,
            },
        )


MultiGroupBlockTable = BlockTable
