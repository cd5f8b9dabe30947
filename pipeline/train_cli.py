"""`python -m pipeline train`: a command whose flags are built from dskd.train_settings.TrainConfig.

pipeline/argv.py reads a command's signature, annotations and docstring `Args:`; here they are
generated from the settings' metadata (`cli=True`, `doc`), so a new training setting is a new flag
without an edit here. Values are checked with the settings' own rules (the recipe's).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from typing import Any

from dskd.errors import UserError


def _data_limits(value: str | dict | None) -> dict[str, float]:
    """--data-limits as JSON text or the dict fire already parsed; checked by DataLimits."""
    import json

    from dskd.data.limits import DataLimits

    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise UserError(f"--data-limits {value!r}: not JSON; e.g. '{{\"max_file_mb\": 128}}'") from None
    DataLimits.from_any(value)  # one-line error naming the key
    return dict(value)  # type: ignore[arg-type]


_TRAIN_DOC = """Train a model (CE) or distill a student from a teacher (--method NAME,
any method registered in dskd.methods).

Writes OUT/model.pt, OUT/last.pt (for --resume), OUT/metrics.jsonl and OUT/summary.json.
With --nproc N (or under `torchrun --nproc_per_node N -m pipeline train ...`) it runs DDP
(gloo on CPU, NCCL on CUDA). The settings flags are dskd.train_settings.TrainConfig's fields.
"""
_TRAIN_EXTRA_DOCS = {
    "out": "output folder.",
    "resume": "continue from OUT/last.pt.",
    "config": "a JSON file of the settings (TrainConfig fields, as torchrun's ranks get them); "
              "no other setting flag may be given with it.",
    "set": "method options, repeatable: --set dskd.guidance_scale=0.5 --set w_lsh=3.",
}
_TRAIN_FIRST = ("model", "data", "epochs")  # the positional order of old: pipeline train MODEL DATA EPOCHS OUT


def _train_params() -> list[inspect.Parameter]:
    """`pipeline train`'s flags: every cli setting of TrainConfig, plus out/config/resume/set."""
    from dskd.train_settings import SETTING_TYPES, cli_settings

    def param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    settings = []
    for f in cli_settings():
        default = f.default if f.default is not dataclasses.MISSING else f.metadata["recipe_default"]
        annotation = SETTING_TYPES[f.name]
        if f.default_factory is not dataclasses.MISSING:  # dict settings are JSON text on the command line
            annotation, default = str | None, None
        settings.append(param(f.name, annotation, default))
    first = [p for n in _TRAIN_FIRST for p in settings if p.name == n]
    rest = [p for p in settings if p.name not in _TRAIN_FIRST]
    return [*first, param("out", str, "runs/train"), *rest, param("config", str | None, None),
            param("resume", bool, False), param("set", list[str] | None, None)]


def _train_docstring(params: list[inspect.Parameter]) -> str:
    from dskd.train_settings import SETTINGS

    lines = [_TRAIN_DOC, "Args:"]
    for p in params:
        doc = _TRAIN_EXTRA_DOCS.get(p.name) or SETTINGS[p.name].metadata["doc"]
        lines.append(f"    {p.name}: {doc}")
    return "\n".join(lines) + "\n"


def _train(**given: Any) -> None:
    """The body of `pipeline train` (its signature is built from TrainConfig below)."""
    import json

    from dskd.train_settings import SETTINGS, TrainConfig, needs_teacher, rule_problem
    from pipeline.overrides import parse_overrides
    from pipeline.train_stages import run_training

    bound = train.__signature__.bind(**given)
    bound.apply_defaults()
    args = dict(bound.arguments)
    out, resume, config, sets = args.pop("out"), bool(args.pop("resume")), args.pop("config"), args.pop("set")
    if config:
        extra = [k for k in given if k in SETTINGS] + (["set"] if sets else [])
        if extra:
            raise UserError(f"--config {config!r} holds every setting; drop --{extra[0].replace('_', '-')} "
                            "(or drop --config)")
        try:
            values = json.loads(open(config, encoding="utf-8").read())
        except (OSError, ValueError) as exc:
            raise UserError(f"--config {config!r}: not a readable JSON file ({exc})") from None
        if not isinstance(values, dict):
            raise UserError(f"--config {config!r}: expected a JSON object of settings")
        cfg = TrainConfig.from_dict(values, where=f"--config {config!r}")
    else:
        for name, value in args.items():
            problem = rule_problem(SETTINGS[name], value)
            if problem:
                raise UserError(f"--{name.replace('_', '-')} {value!r}: {problem[0]}")
        method = args["method"]
        if needs_teacher(method) and not args["teacher"]:
            raise UserError(f"--method {method} distills from a teacher: pass --teacher DIR_OR_model.pt "
                            "(or --method ce)")
        options = {}
        for key, value in parse_overrides(sets).items():
            head, _, tail = key.partition(".")
            if tail and head != method:
                raise UserError(f"--set {key}: option is for method '{head}' but --method is '{method}'")
            options[tail or head] = value
        args["data_limits"] = _data_limits(args["data_limits"])
        cfg = TrainConfig(**args, options=options)
    summary = run_training(cfg, out, resume)
    launched_ranks = cfg.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1
    if summary and not launched_ranks:  # with --nproc N, rank 0 under torchrun printed it already
        from pipeline.console import print_kv

        print_kv(f"trained {summary['model']} ({summary['method']})", {
            "top1 (%)": f"{summary['top1']:.2f}",
            "params": f"{summary['params']:,}",
            "MACs": f"{summary['macs']:,}",
            "train seconds": summary["train_seconds"],
            "images/s": summary.get("images_seen_per_s"),
            "model": os.path.join(out, "model.pt"),
        })


def _train_command() -> Callable[..., None]:
    params = _train_params()

    def train(**given: Any) -> None:
        _train(**given)

    train.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    train.__annotations__ = {p.name: p.annotation for p in params}
    train.__doc__ = _train_docstring(params)
    return train


train = _train_command()
