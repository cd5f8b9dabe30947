"""The device runner: measure one artifact's latency and accuracy with one runtime.

This package is copied to edge devices as a whole (zipped into one file at send time, see
deploy_targets.remote.stage_runner) and run there with the device's own Python >= 3.8, so
every module uses only the standard library, numpy and the runtime being measured.
Locally the pipeline runs the very same zip, so a laptop and a Jetson time identical code.

Modules: protocol (the wire format: constants, exit codes, the timing Protocol sent as one
JSON document), timing (the timed loop, contention detection, statistics), backends and
backend_* (one per runtime), inputs (eval set, batches, accuracy), preprocess (decode,
resize, normalize of one image), environment (machine probing, threads, pinning),
trtexec_tools (NVIDIA trtexec command and parsing) and cli (argument parsing, the run).
"""
