"""Plain helpers shared by test modules (functions, constants, tiny models).

Test modules import from here and from `tests._sshd`, never from each other: a test module is
collected and run by pytest, so importing one from another runs its module-level code twice and
ties unrelated files together. Fixtures built on these helpers live in `tests/conftest.py`; fakes
of software that cannot run here (TensorRT, a Jetson) live in `tests/fakes/`, named as fakes.
"""
