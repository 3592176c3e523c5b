"""Shim for tools that still call setup.py: everything (dependencies, extras, console scripts) is in pyproject.toml."""
from setuptools import setup

setup()
