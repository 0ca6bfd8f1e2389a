"""Reading pretraining sources (local files, directories, hub datasets) into documents.

A source is a local ``.txt`` / ``.jsonl`` / ``.parquet`` file, a directory searched recursively
for those, or a Hugging Face hub dataset name. Documents come out as plain strings, in a
deterministic order, so the packed blocks and their example ids are reproducible.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from lightning.pytorch.utilities import rank_zero_info

from app.errors import ConfigurationError
from app.shipped import shipped_path

LOCAL_FORMATS = (".txt", ".jsonl", ".parquet")
# ``datasets`` builders used when a local file is streamed instead of read up front.
STREAMING_BUILDERS = {".jsonl": "json", ".parquet": "parquet"}
_BATCH = 1000


@dataclass(frozen=True)
class Source:
    """One resolved corpus source: a local file (``path``) or a hub dataset (``hub_name``)."""

    path: Path | None = None
    hub_name: str | None = None


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a hub repository id."""
    return name.startswith(("/", ".", "~")) or Path(name).suffix in LOCAL_FORMATS


def resolve_sources(sources: list[str]) -> list[Source]:
    """Expand the configured sources into files (directories walked, sorted) and hub names.

    Args:
        sources: Local files, directories or hub dataset names, in reading order.

    Returns:
        The sources, directories replaced by their supported files sorted by relative path.

    Raises:
        ConfigurationError: No sources, a path that does not exist, a file with an unsupported
            extension, or a directory without supported files.
    """
    if not sources:
        raise ConfigurationError("no corpus sources given (data.sources is empty)")
    resolved = []
    for name in sources:
        path = shipped_path(name)  # the working directory's, else the shipped samples
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_FORMATS]
            if not files:
                raise ConfigurationError(f"corpus directory {name} has no {'/'.join(LOCAL_FORMATS)} files; put the "
                                         "corpus in such files (.txt: documents separated by blank lines) or "
                                         "point data.init_args.sources at them")
            resolved += [Source(path=p) for p in sorted(files, key=lambda p: p.relative_to(path).parts)]
        elif path.exists():
            if path.suffix not in LOCAL_FORMATS:
                raise ConfigurationError(
                    f"unsupported corpus file type {path.suffix or '(none)'!r} for {name}: "
                    f"expected one of {', '.join(LOCAL_FORMATS)}; convert or rename it"
                )
            resolved.append(Source(path=path))
        elif looks_like_path(name):
            raise ConfigurationError(f"corpus source not found: {name}; data.init_args.sources takes existing "
                                     "files, directories or hub dataset names (relative paths are read from "
                                     "the working directory, then from the ntng checkout)")
        else:
            resolved.append(Source(hub_name=name))
    return resolved


def source_fingerprints(sources: list[Source], hub_config: str | None, hub_split: str) -> list[str]:
    """Identify each source by content (files) or by name/config/split (hub), in order.

    File hashes ignore the path, so a moved or copied corpus reuses its cached blocks.

    Args:
        sources: Resolved sources.
        hub_config: Hub dataset configuration name.
        hub_split: Hub dataset split.

    Returns:
        One string per source: ``"<suffix>:<sha256 of the bytes>"`` or ``"hub:<name>:<config>:<split>"``.
    """
    parts = []
    for source in sources:
        if source.path is None:
            parts.append(f"hub:{source.hub_name}:{hub_config}:{hub_split}")
            continue
        digest = hashlib.sha256()
        with open(source.path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        parts.append(f"{source.path.suffix}:{digest.hexdigest()}")
    return parts


def not_utf8_text(path: Path) -> ConfigurationError:
    """The error for a text file that does not decode as UTF-8: its first such line, its byte, the fix."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                where, byte = f"line {number}", f"byte 0x{raw[error.start]:02x}"
                break
        else:  # every line decodes alone (a byte-order mark inside the file)
            where, byte = "a line", "an undecodable byte"
    return ConfigurationError(f"{path}, {where}: not UTF-8 text ({byte}); convert the file to UTF-8, e.g. "
                              f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`")


def _read_txt(path: Path) -> Iterator[str]:
    # utf-8-sig drops a BOM; text mode's universal newlines turn CRLF into "\n".
    lines: list[str] = []
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for line in handle:
                if line.strip():
                    lines.append(line.rstrip("\n"))
                elif lines:
                    yield "\n".join(lines)
                    lines = []
    except UnicodeDecodeError:
        raise not_utf8_text(path) from None
    if lines:
        yield "\n".join(lines)


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line of a JSON-lines file (BOM tolerated).

    Raises:
        ConfigurationError: naming the file and line of invalid JSON or a non-object line.
    """
    try:
        with path.open(encoding="utf-8-sig") as handle:
            for line, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as error:
                    raise ConfigurationError(f"{path}, line {line}: invalid JSON ({error.msg} at column "
                                             f"{error.colno}); fix the line: one JSON object per line") from None
                if not isinstance(record, dict):
                    raise ConfigurationError(f"{path}, line {line}: expected a JSON object, got "
                                             f"{type(record).__name__}; fix the line: one JSON object per line")
                yield line, record
    except UnicodeDecodeError:
        raise not_utf8_text(path) from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for number, record in read_jsonl(path):
        text = record.get(text_field)
        if not isinstance(text, str):
            fields = ", ".join(sorted(record)) or "none"
            raise ConfigurationError(f"{path}, line {number}: no string field {text_field!r} (its fields: {fields}); "
                                     "set data.init_args.text_field to the field that holds the text")
        yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise ConfigurationError(f"{path} has no column {text_field!r} (columns: {schema.names})")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigurationError(f"column {text_field!r} of {path} holds {kind}, not text")
    for batch in parquet.iter_batches(batch_size=_BATCH, columns=[text_field]):
        yield from (text for text in batch.column(0).to_pylist() if text is not None)


def load_hub_dataset(name: str, hub_config: str | None, hub_split: str, streaming: bool):
    """``datasets.load_dataset`` with failures turned into one clear configuration error."""
    import datasets

    try:
        return datasets.load_dataset(name, hub_config, split=hub_split, streaming=streaming)
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        raise ConfigurationError(
            f"corpus source {name!r} is not a local path, and loading it as a hub dataset failed "
            f"(the hub cannot be reached offline): {type(err).__name__}: {' '.join(str(err).split())}"
        ) from err


def iter_text_batches(dataset, text_field: str, name: str) -> Iterator[list[str]]:
    """Batches of texts from a ``datasets`` (iterable) dataset's ``text_field`` column.

    ``.iter()`` (unlike ``__iter__``) does not split shards among DataLoader workers, so every
    worker sees the whole stream; block-level sharding is done by the caller.
    """
    for batch in dataset.iter(batch_size=_BATCH):
        if text_field not in batch:
            raise ConfigurationError(f"dataset {name} has no column {text_field!r} (columns: {list(batch)})")
        yield [text for text in batch[text_field] if text and not text.isspace()]


def iter_documents(
    sources: list[Source], text_field: str, hub_config: str | None, hub_split: str, max_documents: int | None
) -> Iterator[str]:
    """All non-empty documents of ``sources`` in order, at most ``max_documents`` of them.

    Args:
        sources: Resolved sources (see ``resolve_sources``).
        text_field: Field/column holding the text in ``.jsonl``, ``.parquet`` and hub data.
        hub_config: Hub dataset configuration name.
        hub_split: Hub dataset split.
        max_documents: Stop after this many documents (``None``: read everything).

    Returns:
        An iterator over document strings.
    """

    def generate() -> Iterator[str]:
        for source in sources:
            rank_zero_info(f"[data] reading {source.path or source.hub_name}")
            if source.path is None:
                dataset = load_hub_dataset(source.hub_name, hub_config, hub_split, streaming=False)
                for batch in iter_text_batches(dataset, text_field, source.hub_name):
                    yield from batch
            elif source.path.suffix == ".txt":
                yield from _read_txt(source.path)
            else:
                reader = _read_jsonl if source.path.suffix == ".jsonl" else _read_parquet
                yield from (text for text in reader(source.path, text_field) if text.strip())

    return islice(generate(), max_documents)


def check_streamable(sources: list[Source], tokenizer: str | None, val_size: int | None) -> None:
    """Raise unless streaming can work: hub or local ``.jsonl``/``.parquet`` sources, a tokenizer, ``val_size``."""
    unsupported = [str(s.path) for s in sources if s.path is not None and s.path.suffix not in STREAMING_BUILDERS]
    if unsupported:
        raise ConfigurationError(f"streaming supports hub datasets and local .jsonl/.parquet, not {unsupported[0]}")
    if tokenizer is None or val_size is None:
        raise ConfigurationError("streaming needs a pretrained tokenizer and val_size (the stream is never read whole)")


def open_streams(sources: list[Source], text_field: str, hub_config: str | None, hub_split: str) -> list:
    """Open each source as a streaming ``datasets.IterableDataset`` (hub names, local ``.jsonl``/``.parquet``).

    Returns:
        ``(dataset, name)`` pairs, in source order; nothing is read yet.
    """
    import datasets

    streams = []
    for source in sources:
        if source.path is None:
            dataset = load_hub_dataset(source.hub_name, hub_config, hub_split, streaming=True)
        else:
            builder = STREAMING_BUILDERS[source.path.suffix]
            dataset = datasets.load_dataset(builder, data_files=os.fspath(source.path), split="train", streaming=True)
        streams.append((dataset, source.hub_name or str(source.path)))
    return streams


def iter_streamed_documents(streams: list, text_field: str, max_documents: int | None) -> Iterator[str]:
    """The non-empty documents of opened streams (see ``open_streams``), at most ``max_documents``."""
    texts = (
        text for dataset, name in streams for batch in iter_text_batches(dataset, text_field, name) for text in batch
    )
    return islice(texts, max_documents)
