"""Fixtures for the emulator tests; the build and run helpers are in emu_build.py."""
import shutil
from pathlib import Path

import pytest

from emu_build import CUDA_HOME, RELEASE, Program, build, prefetch_for


@pytest.fixture(scope="session")
def program(request):
    if shutil.which("g++") is None or not (CUDA_HOME / "include/cuda_fp16.h").exists():
        pytest.skip("needs g++ and the CUDA headers (cuda_fp16.h) for the emulated build")
    # the builds of every selected module of this folder start now, in parallel (emu_build.py)
    prefetch_for({Path(str(item.fspath)).name for item in request.session.items})
    cache = {}

    def get(name, opt=RELEASE):
        key = (name, tuple(opt))
        if key not in cache:
            cache[key] = Program(build(name, opt))
        return cache[key]

    return get
