"""Resolve a model `source` from the config into what vLLM's `--model` takes.

- ``builtin:<name>``: a model Spillway generates (``spillway models prepare``);
  prepared on first use if the cache lacks it.
- an existing local folder: used as is.
- anything else (``org/name``): a Hugging Face hub id, passed to vLLM unchanged,
  so real model ids work on a cluster that can download.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_PREFIX = "builtin:"


def resolve_model_source(source: str, cache_dir: str | Path | None = None) -> str:
    if source.startswith(BUILTIN_PREFIX):
        from deployments.model_prep import prepare_model

        name = source[len(BUILTIN_PREFIX):]
        return str(prepare_model(name, Path(cache_dir) if cache_dir else None))
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if source.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model folder {source!r} does not exist")
    return source
