import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped on machines without one (CI has none)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cpu_kernels_restored():
    """After the test: the CPU kernels' AVX2 dispatch and the suite's pool of 2 threads."""
    yield
    from hybridinfer.kernels import cpu
    cpu.force_reference(False)
    cpu.set_num_threads(2)
