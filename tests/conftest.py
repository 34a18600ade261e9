import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any cuBLAS handle: deterministic GEMMs

import pytest  # noqa: E402
import torch  # noqa: E402

from dist_peft.train.config import from_dict  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA device (skipped without one); the GPU leg is "
                                       "`pytest -m cuda` (tools/test_cuda.sh)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device (the GPU leg: tools/test_cuda.sh)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _deterministic_cuda(request):
    """A ``cuda`` test runs with deterministic algorithms where an op has them (LoCA's index_add_, scatter_add_);
    ops without one warn, and the test's documented tolerance covers them. TF32 stays off (torch's default)."""
    if request.node.get_closest_marker("cuda") is None:
        yield
        return
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def tiny_config(run_dir, **sections):
    """A RunConfig for the tiny random Llama on synthetic data; ``sections`` update the defaults."""
    raw = {
        "model": {"source": "tiny-llama"},
        "method": {"name": "lora", "target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 8},
        "data": {"source": "synthetic", "seq_len": 16, "eval_examples": 8, "synthetic_examples": 64},
        "train": {"steps": 6, "micro_batch_size": 4, "lr": 0.01, "warmup_steps": 2, "progress": False},
        "output": {"dir": str(run_dir)},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return from_dict(raw)


def check_merge_round_trip(model, ids, merged_tol: float, restore_tol: float):
    """Merging gives the unmerged logits (within merged_tol) and changes a base weight; unmerging restores every
    base weight (within restore_tol). Returns the unmerged logits."""
    from dist_peft.integrations.transformers import set_merged

    weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = model(ids).logits
    set_merged(model, True)
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=merged_tol, atol=merged_tol)
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    set_merged(model, False)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=restore_tol)
    return unmerged
