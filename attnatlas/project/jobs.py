"""What a projection run does to each head: the methods as typed jobs (reducer options, the parameters adapted to
the head size, the params stored with the layout) and the token rows laid out."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnatlas.errors import InputError
from attnatlas.project.placement import PLACE_K
from attnatlas.project.quality import QUALITY_SAMPLE
from attnatlas.project.reducers import REDUCERS, Reducer, get_reducer

# Above this many points per head (2 x tokens) a seeded sample of token rows is projected: t-SNE
# and UMAP cost grows faster than linearly and 20k points is past what one scatter plot shows well.
MAX_POINTS = 20_000


@dataclass(frozen=True)
class Job:
    """One method to run on a head: the reducer's options and the parameters the driver adapted to the
    head size, the params stored with the layout, and the module that registers the reducer (imported in
    worker processes, Dask's included, that have not imported it yet)."""

    method: str
    options: dict[str, Any]
    adapted: dict[str, Any]
    params: dict[str, Any]
    module: str
    device: str | None = None  # where a batched backend runs (cpu | cuda; None: CUDA if torch sees it); not stored


def parse_list(value: str | Iterable[int] | None, upper: int, what: str) -> list[int] | None:
    """'0,2,5-7' or a list of ints -> sorted unique ints, each checked against 0..upper-1."""
    if value is None:
        return None
    out: set[int] = set()
    items = value.split(",") if isinstance(value, str) else list(value)
    for item in items:
        try:
            if isinstance(item, str) and "-" in item.strip()[1:]:
                a, b = item.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(item))
        except ValueError:
            raise InputError(f"Cannot read {what} {item!r}; use numbers like 0,2,5-7.") from None
    bad = sorted(x for x in out if not 0 <= x < upper)
    if bad:
        raise InputError(f"{what.capitalize()} {bad[0]} is out of range (the model has {what}s 0..{upper - 1}).")
    return sorted(out)


def parse_methods(methods: str | Iterable[str]) -> list[str]:
    """'tsne,umap' or names -> registered method names, in order, without repeats."""
    names = [m.strip().lower() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    if not names:
        raise InputError("No projection method given; choose from " + ", ".join(sorted(REDUCERS)) + ".")
    for m in names:
        if m not in REDUCERS:
            raise InputError(f"Unknown projection method {m!r}; choose from {', '.join(sorted(REDUCERS))}.")
    return list(dict.fromkeys(names))


def sample_rows(n_tokens: int, max_points: int, seed: int) -> np.ndarray:
    """Token rows projected: all, or a sorted seeded sample so that 2 x rows <= max_points."""
    cap = max(1, max_points // 2)
    if n_tokens <= cap:
        return np.arange(n_tokens, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n_tokens, cap, replace=False)).astype(np.int64)


def project_device(device: str) -> str:
    """`--device` of project: auto (CUDA when torch sees it, else the CPU), cpu or cuda; InputError otherwise."""
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"Unknown device {device!r}: use auto, cpu or cuda.")
    if device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise InputError("--device cuda was asked for, but no CUDA device is available (use --device auto or cpu).")
    return "cpu"


def options_on(method: str, options: dict[str, Any], device: str | None) -> dict[str, Any]:
    """A method's options on `device`: on cuda, the batched backend (every head of a layer in one program on the
    GPU) for a method that has it, unless the options name a backend."""
    options = dict(options)
    if device == "cuda" and "backend" not in options and getattr(REDUCERS.get(method), "has_batched_backend", False):
        options["backend"] = "batched"
    return options


def plan_jobs(names: list[str], n_points: int, metric: str, seed: int, normalise: dict[str, Any], max_points: int,
              place: bool, reducer_params: dict[str, dict[str, Any]] | None = None, device: str | None = None) -> list[Job]:
    """One job per method for heads of `n_points` points; InputError if a method cannot lay out that few.
    On `device` cuda, a method that has the batched backend takes it unless its options name a backend."""
    jobs = []
    for name in names:
        r = get_reducer(name, metric=metric, random_state=seed, **options_on(name, (reducer_params or {}).get(name, {}), device))
        r.adapt(n_points)
        params = {**r.params, "normalise": normalise, "max_points": max_points, "quality_sample": QUALITY_SAMPLE}
        safe = get_reducer(name, metric=metric, random_state=seed, **r.options).make_safe()
        if safe.backend() != r.backend():  # heads flagged fallback = 1 in their quality were made on it
            params["fallback_backend"] = safe.backend()
        if place:
            params["placement"] = {"method": "knn-weighted", "k": PLACE_K}
        jobs.append(Job(name, r.options, dict(r.adapted), params, type(r).__module__, device))
    return jobs


def reducers_of(jobs: list[Job], metric: str, seed: int, safe: bool = False) -> list[tuple[Reducer, dict[str, Any]]]:
    """Rebuild each job's reducer, with the parameters the driver already adapted, beside its params;
    with `safe`, on the backend without known native crashes (`Reducer.make_safe`)."""
    out = []
    for job in jobs:
        if job.method not in REDUCERS:
            importlib.import_module(job.module)
        r = get_reducer(job.method, metric=metric, random_state=seed, **job.options)
        if safe:
            r.make_safe()
        r.adapted = dict(job.adapted)
        r.device = job.device
        out.append((r, job.params))
    return out


def all_batched(jobs: list[Job], metric: str, seed: int) -> bool:
    """Whether every job's reducer embeds several heads in one batch (`Reducer.batched`)."""
    return all(get_reducer(j.method, metric=metric, random_state=seed, **j.options).batched for j in jobs)
