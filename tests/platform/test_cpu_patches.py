"""The CPU patches cover the CUDA calls of every tested megatron-core release (0.16.1 in CI; 0.19.2 checked by
running the GPU check's dry run on its sources): 0.19's ``param_and_grad_buffer.start_grad_sync`` asks for
``torch.cuda.current_stream()`` on every gradient sync, which without the patch raises on a CPU-only torch."""
import pytest
import torch

from megatron_onereason.platform import setup


@pytest.mark.skipif(torch.cuda.is_available(), reason="the patches apply only without CUDA")
def test_megatron_core_0_19_gradient_sync_streams_work_on_cpu():
    setup()
    # The calls of megatron-core 0.19.2 param_and_grad_buffer.py (start_grad_sync / finish_grad_sync), verbatim.
    current_stream = torch.cuda.current_stream()
    current_stream.wait_event(object())  # a CUDA-graph replay's "wgrad ready" event
    communication_stream = torch.cuda.current_stream()
    communication_stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.current_stream().wait_stream(communication_stream)
    assert torch.cuda.current_stream().query()
