"""Measure latency and accuracy of one artifact with one runtime, the same way everywhere.

This small file is the runner's entry point: `python runner.py --artifact ... --out ...`.
The runner itself is the `dskd_runner` package beside it (protocol, timing, backends,
evaluation, pre-processing, environment, CLI modules), which travels to the device as ONE
zip file, dskd_runner.zip (deploy_targets.remote.stage_runner), copied beside this file;
Python imports the package straight from the zip. Both use only the standard library,
numpy and the runtime being measured, on Python >= 3.8. Locally the pipeline runs the very
same two files, so a number measured on a laptop and one on a Jetson come from identical code.

Imported on the host (deploy_targets.remote.runner), this module re-exports the runner
names the rest of the project uses, so callers need not know the package's layout.
"""

import os
import sys

if __package__:  # imported on the host
    from .dskd_runner.backends import Backend, load_backend, require_modules
    from .dskd_runner.cli import RunConfig, build_parser, main, run
    from .dskd_runner.environment import (
        cpu_model,
        jetson_info,
        parse_nv_tegra_release,
        parse_nvpmodel,
        physical_cores,
        resolve_threads,
    )
    from .dskd_runner.protocol import (
        ERROR_PREFIX,
        EXIT_BAD_INPUT,
        EXIT_MISSING_MODULE,
        EXIT_OK,
        EXIT_RUNTIME_FAILURE,
        EXIT_USAGE,
        HINTS,
        PRECISIONS,
        RESULT_FORMAT,
        RUNNER_VERSION,
        RUNTIME_MODULES,
        RUNTIMES,
        THREADS_ALL,
        Protocol,
        RunnerError,
    )
    from .dskd_runner.timing import (
        MAX_SAMPLES_KEPT,
        measure_latency,
        summarize,
        thin_samples,
        time_calls,
    )

    __all__ = [
        "Backend", "load_backend", "require_modules", "RunConfig", "build_parser", "main", "run",
        "cpu_model", "jetson_info", "parse_nv_tegra_release", "parse_nvpmodel", "physical_cores",
        "resolve_threads", "ERROR_PREFIX", "EXIT_BAD_INPUT", "EXIT_MISSING_MODULE", "EXIT_OK",
        "EXIT_RUNTIME_FAILURE", "EXIT_USAGE", "HINTS", "PRECISIONS", "RESULT_FORMAT",
        "RUNNER_VERSION", "RUNTIME_MODULES", "RUNTIMES", "THREADS_ALL", "Protocol", "RunnerError",
        "MAX_SAMPLES_KEPT", "measure_latency", "summarize", "thin_samples", "time_calls",
    ]  # fmt: skip
else:  # run as a script: on the device from the zip beside it, in the source tree from the folder
    _HERE = os.path.dirname(os.path.abspath(__file__))
    _ZIP = os.path.join(_HERE, "dskd_runner.zip")
    if os.path.isfile(_ZIP):
        sys.path.insert(0, _ZIP)
    from dskd_runner.cli import main

    if __name__ == "__main__":
        sys.exit(main())
