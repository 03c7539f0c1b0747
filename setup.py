"""Build the optional compiled fast path; everything else is in pyproject.toml.

``optional=True``: without a C compiler or OpenSSL's headers the install still
succeeds and lamina runs its pure-Python path (same results, slower unpack).
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("lamina._fastpath", ["src/lamina/_fastpath.c"], libraries=["crypto", "pthread"],
              extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
              optional=True),
])
