"""The one format registry: every artifact format by name, and everything that depends on it.

Each entry says what the format is (name, runtime, precision), which files make up one
artifact (the main file and its declared companions, e.g. model.xml + model.bin), who builds
it (a builder function of the export), how an existing file is recognised as it (a detector,
export/detect.py), and how a deploy bundle ships it. The other vocabularies are derived here:
the export's `--formats` names (`list_formats`), the artifact kinds measurements and
report.json use (`kind`, e.g. "onnx-qdq", `kinds()`), and the targets of
deploy_targets/registry.py, which list the formats they ship by name.

Adding a format = one builder module + one `register_format(FormatSpec(...))` call
(tests/test_format_registry.py registers one from a test module and builds, detects and
bundles it). This module stays light (no torch): the CLI checks recipes and deploy_targets
recognises files with it.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dskd.errors import UserError
from export import detect
from export.detect import Detector

# A builder is called as builder(job, spec): job is export.job.BuildJob, the export in progress.
# A preflight is called as preflight(options) -> why the format cannot be built here, or "".
Builder = Callable[[Any, "FormatSpec"], None]


@dataclass(frozen=True)
class Companion:
    """A file that belongs to an artifact beside its main file.

    Named from the main file: its name without the last suffix, plus `suffix` (model.xml ->
    model.bin; model.fp16.engine -> model.fp16.engine.json). `needed_to_run`: the runtime
    reads it (it travels to a device with the model); False for a record such as the engine's
    build information, which is exported and bundled but never needed to run.
    """

    suffix: str
    what: str
    needed_to_run: bool = True

    def name_for(self, main_name: str) -> str:
        stem = main_name[: -len(Path(main_name).suffix)] if Path(main_name).suffix else main_name
        return stem + self.suffix


@dataclass(frozen=True)
class BundleSpec:
    """How pipeline/bundle.py ships the format (bundle_infer.py runs it by `runtime`).

    `name`: the main file's flat name in a bundle, "{precision}" filled in (every OpenVINO IR
    is model.xml in its own export folder); None keeps the exported file's own name.
    `built_on_device`: the bundle may hold only the build kit; infer.py builds the file on
    first use under `name`.
    """

    name: str | None = None
    built_on_device: bool = False

    def file_name(self, precision: str, main_name: str | None) -> str:
        if self.name is not None:
            return self.name.format(precision=precision)
        if main_name is None:
            raise ValueError("a bundle name is needed for a format built on the device")
        return main_name


@dataclass(frozen=True)
class FormatSpec:
    """One format. `path` is the main file relative to the export folder; `files` adds the
    companions. `builder`/`preflight` are callables or "module:function" strings imported
    when first used (so listing formats never imports torch or a runtime)."""

    name: str
    precision: str  # fp32 | fp16 | int8
    runtime: str  # onnxruntime | openvino | tensorrt | torch-tensorrt
    path: str
    kind: str  # the artifact kind measurements and report.json name (several formats may share one)
    builder: Builder | str | None
    detector: Detector
    companions: tuple[Companion, ...] = ()
    needs_calibration: bool = False
    modules: tuple[str, ...] = ()  # Python modules the build needs here
    description: str = ""
    bundle: BundleSpec | None = BundleSpec()  # None: never shipped in a bundle as a file
    exportable: bool = True  # False: made elsewhere (on the device), only recognised here
    preflight: Callable[[Any], str] | str | None = None
    # formats this one is built from that must ship beside it (TensorRT INT8: the QDQ ONNX the
    # device builds the engine from, also checked on this CPU)
    built_from: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        """Every file of one artifact, relative to the export folder, the main file first."""
        folder, main = self.path.rpartition("/")[::2]
        return (self.path, *(f"{folder}/{c.name_for(main)}".lstrip("/") for c in self.companions))

    def companion_paths(self, main: Path, needed_to_run_only: bool = False) -> list[Path]:
        """The declared companions of the file `main` (whatever it is named), beside it."""
        return [main.with_name(c.name_for(main.name)) for c in self.companions
                if c.needed_to_run or not needed_to_run_only]

    def build(self, job: Any) -> None:
        """Build this format into job.stage (export.job.BuildJob) and record it on the job."""
        if self.builder is None:
            raise ValueError(f"{self.name} is not built by the export (it is made on the device)")
        _resolve(self.builder)(job, self)

    def why_not_here(self, options: Any) -> str:
        """Why this format cannot be built with these options on this machine ("" when it can)."""
        return "" if self.preflight is None else _resolve(self.preflight)(options)

    def detects(self, path: str | Path) -> bool:
        return self.detector(Path(path))


def _resolve(ref: Callable[..., Any] | str) -> Callable[..., Any]:
    if callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


_IR_BIN = (Companion(".bin", "weights file"),)
_ENGINE_JSON = (Companion(".engine.json", "build record (TensorRT version, GPU)", needed_to_run=False),)
_OV_BUNDLE = BundleSpec("model.{precision}.xml")
_TRT_BUNDLE = BundleSpec("model.{precision}.engine", built_on_device=True)

FORMATS: dict[str, FormatSpec] = {}  # every registered format, in build order


def register_format(spec: FormatSpec, replace: bool = False) -> FormatSpec:
    """Add a format to the registry (after the built-ins: build order = registration order)."""
    if spec.name in FORMATS and not replace:
        raise ValueError(f"format {spec.name!r} is already registered")
    if spec.name != spec.name.strip().lower() or "," in spec.name or not spec.name:
        raise ValueError(f"format name {spec.name!r}: use lower case, no commas or spaces")
    if spec.exportable and spec.builder is None:
        raise ValueError(f"format {spec.name!r}: an exportable format needs a builder")
    FORMATS[spec.name] = spec
    return spec


def unregister_format(name: str) -> None:
    """Remove a registered format (a test's toy format, when the test ends)."""
    FORMATS.pop(name, None)


for _spec in (
    FormatSpec("onnx", "fp32", "onnxruntime", "model.onnx", "onnx", "export.build_onnx:build_onnx_fp32",
               detect.ONNX_FP32, modules=("onnx", "onnxruntime"),
               description="self-contained ONNX, dynamic batch, opset 18 by default"),
    FormatSpec("onnx-int8", "int8", "onnxruntime", "model.int8.onnx", "onnx-qdq",
               "export.build_onnx:build_onnx_int8", detect.ONNX_QDQ, needs_calibration=True,
               modules=("onnx", "onnxruntime"),
               description="static QDQ INT8 for ONNX Runtime, per-channel weights"),
    FormatSpec("openvino", "fp32", "openvino", "openvino/model.xml", "openvino-ir",
               "export.build_openvino:build_openvino_fp32", detect.IR_FP32, _IR_BIN, modules=("openvino",),
               description="OpenVINO IR, FP32 weights (compile with INFERENCE_PRECISION_HINT=f32)",
               bundle=_OV_BUNDLE),
    FormatSpec("openvino-fp16", "fp16", "openvino", "openvino-fp16/model.xml", "openvino-ir",
               "export.build_openvino:build_openvino_fp16", detect.IR_FP16, _IR_BIN, modules=("openvino",),
               description="OpenVINO IR with FP16-compressed weights", bundle=_OV_BUNDLE),
    FormatSpec("openvino-int8", "int8", "openvino", "openvino-int8/model.xml", "openvino-ir",
               "export.build_openvino:build_openvino_int8", detect.IR_INT8, _IR_BIN, needs_calibration=True,
               modules=("openvino", "nncf"), description="OpenVINO IR quantized with nncf.quantize",
               bundle=_OV_BUNDLE),
    # TensorRT needs no module here: the device build kit is always prepared (export/build_tensorrt.py)
    FormatSpec("tensorrt-fp16", "fp16", "tensorrt", "tensorrt/model.fp16.engine", "trt-engine",
               "export.build_tensorrt:build_tensorrt", detect.TRT_ENGINE, _ENGINE_JSON,
               description="TensorRT engine, FP16 (device-specific)", bundle=_TRT_BUNDLE,
               preflight="export.build_tensorrt:tensorrt_preflight"),
    FormatSpec("tensorrt-int8", "int8", "tensorrt", "tensorrt/model.int8.engine", "trt-engine",
               "export.build_tensorrt:build_tensorrt", detect.TRT_ENGINE, _ENGINE_JSON, needs_calibration=True,
               description="TensorRT engine, INT8 from the QDQ ONNX (device-specific)", bundle=_TRT_BUNDLE,
               preflight="export.build_tensorrt:tensorrt_preflight", built_from=("onnx-int8",)),
    # Made on the device by the torch-tensorrt builder's kit (export/torch_trt.py), measured there.
    *(FormatSpec(f"torch-trt-{p}", p, "torch-tensorrt", f"model.{p}.ep", "torch-trt-ep", None,
                 detect.torch_trt_program(p), exportable=False, bundle=None,
                 description=f"Torch-TensorRT ExportedProgram, {p.upper()} (built on the device)")
      for p in ("fp16", "int8")),
):
    register_format(_spec)

DEFAULT_FORMATS: tuple[str, ...] = tuple(n for n, s in FORMATS.items() if s.exportable)


def exportable() -> dict[str, FormatSpec]:
    """The formats `export_all` can build, by name, in build order."""
    return {n: s for n, s in FORMATS.items() if s.exportable}


def list_formats() -> list[str]:
    """Every format name `--formats` accepts, in build order."""
    return list(exportable())


def kinds() -> tuple[str, ...]:
    """Every artifact kind, in registry order (derived: the entries' `kind`)."""
    return tuple(dict.fromkeys(s.kind for s in FORMATS.values()))


def kind_spec(kind: str) -> FormatSpec:
    """The first format of an artifact kind (formats of one kind share files and detector family)."""
    for spec in FORMATS.values():
        if spec.kind == kind:
            return spec
    raise KeyError(kind)


def detect_formats(path: str | Path) -> list[FormatSpec]:
    """Every format this existing file may be, by its detectors (several when the file cannot
    tell, e.g. a TensorRT engine's precision); [] when none recognises it."""
    return [s for s in FORMATS.values() if s.detects(path)]


def suffix_help() -> str:
    """'.onnx (ONNX), .xml (OpenVINO IR) ... or .ep (...)': the suffixes the detectors know."""
    groups = dict.fromkeys(("/".join(s.detector.suffixes), s.detector.label) for s in FORMATS.values())
    parts = [f"{suffixes} ({label})" for suffixes, label in groups]
    return ", ".join(parts[:-1]) + f" or {parts[-1]}" if len(parts) > 1 else parts[0]


def resolve_formats(names: Iterable[str] | str | None, flag: str = "--formats") -> list[FormatSpec]:
    """Validate names (comma-separated strings allowed); unknown ones get the closest match.

    `flag` starts each error (`--formats: ...`); "" for a recipe's `export.formats`, whose
    caller names the key as the user gave it (file or --set), not a flag they never typed.
    """
    known = exportable()
    lead = f"{flag}: " if flag else ""
    if names is None:
        return [known[n] for n in DEFAULT_FORMATS if n in known]
    if isinstance(names, str):
        names = [names]
    wanted: list[str] = []
    for item in names:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name == "all":
                wanted.extend(known)
                continue
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.4)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise UserError(
                    f"{lead}unknown format '{name}': {hint}choose from {', '.join(known)}"
                )
            wanted.append(name)
    if not wanted:
        raise UserError(f"{lead}no format given; choose from {', '.join(known)}")
    order = list(known)
    return [known[n] for n in sorted(set(wanted), key=order.index)]
