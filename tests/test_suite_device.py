"""The suite's device pin (conftest.py) holds for fixtures shared by a module, not only for the test's
own: a module fixture that trains a model must not take the GPU for a CPU test (on a GPU machine it
would take the fast path and write checkpoints the CPU test cannot read)."""

import os

import pytest
import torch


@pytest.fixture(scope="module")
def seen_by_a_module_fixture():
    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available()


@pytest.fixture(scope="module")
def seen_by_a_cuda_module_fixture():
    return torch.cuda.is_available()


def test_a_module_fixture_of_a_cpu_test_sees_no_gpu(seen_by_a_module_fixture):
    assert seen_by_a_module_fixture == ("", False)
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == "" and not torch.cuda.is_available()


@pytest.mark.cuda
def test_a_module_fixture_of_a_cuda_test_sees_the_gpu(seen_by_a_cuda_module_fixture):
    assert seen_by_a_cuda_module_fixture
