"""Package discovery, the one thing pyproject.toml cannot say: every package under lang/, runtime/
and kernels/, renamed into the arborlm namespace (package-dir in pyproject.toml maps the folders)."""

from setuptools import find_packages, setup

setup(packages=["arborlm." + p for p in find_packages(include=["lang", "lang.*", "runtime", "runtime.*",
                                                                 "kernels", "kernels.*"])])
