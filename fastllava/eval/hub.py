"""Benchmarks read from the Hugging Face Hub datasets lmms-eval uses, instead of LLaVA's eval layout.

`--data hub` takes the task's default dataset (`HubSource.repo`), `--data org/name[@revision]` another
repository in the same schema, and `--data DIR` a local copy of such a repository (any folder holding its
parquet files). A repository is fetched with huggingface_hub's snapshot_download: only the split's parquet
files, into the Hub cache, honouring HF_HUB_OFFLINE, HF_TOKEN or a login. Rows are read with pyarrow (the
`hub-eval` extra) and images decoded from the rows' {"bytes", "path"} structs, the `datasets` Image
feature's storage. Where a split's rows reference another config of the repository (GQA's questions name an
image of testdev_balanced_images), both are fetched and joined here (HubSource.join). Each task turns the
rows into the questions LLaVA's layout gives (Task.load_hub).
"""

from __future__ import annotations

from pathlib import Path

from ..extras import require
from .tasks.base import EvalDataError, HubSource


def is_hub_spec(data: str) -> bool:
    """Whether `--data` names the Hub (`hub`, `org/name[@rev]`, or a local folder of parquet files) rather
    than LLaVA's layout."""
    path = Path(data)
    if path.is_dir():  # two levels only: a LLaVA layout holds ~10^5 images further down
        return any(path.glob("*.parquet")) or any(path.glob("*/*.parquet"))
    return data == "hub" or (data.count("/") == 1 and not data.startswith((".", "/")))


def resolve(data: str, source: HubSource) -> Path:
    """The local folder holding `source`'s parquet files for `--data data`: the folder itself, or the Hub
    cache's snapshot of the repository (downloaded if not cached; HF_HUB_OFFLINE=1 reads the cache only)."""
    path = Path(data)
    if path.is_dir():
        return path
    repo, _, revision = (source.repo if data == "hub" else data).partition("@")
    import huggingface_hub  # a dependency of transformers: always installed

    patterns = [source.pattern] + ([source.join.pattern] if source.join else [])
    try:
        return Path(huggingface_hub.snapshot_download(repo, repo_type="dataset", revision=revision or None,
                                                      allow_patterns=patterns))
    except Exception as e:  # huggingface_hub's errors (offline, not found, gated) say why; name the dataset too
        raise EvalDataError(data, None, f"not a local folder, and could not fetch the Hub dataset {repo!r} "
                                        f"(files {', '.join(patterns)}): {type(e).__name__}: {e}") from None


def read_rows(folder: Path, source: HubSource) -> list[tuple[Path, int, dict]]:
    """(parquet file, 0-based row, {column: value}) of every row of the files matching source.pattern
    under `folder`, files in name order (the shards' order), with the columns of the joined config's
    matching row added (source.join). EvalDataError for no file, a missing column or a key with no row."""
    join = source.join
    # A folder without the repository's layout: any parquet file in it is the split, unless a second config
    # must be told apart from it.
    rows = _read(folder, source.pattern, source.columns, source.repo, fallback=join is None)
    if join is None:
        return rows
    table = {}
    for file, i, row in _read(folder, join.pattern, (join.key, *join.columns), source.repo, fallback=False):
        table.setdefault(row[join.key], row)
    for file, i, row in rows:
        match = table.get(row[join.on])
        if match is None:
            raise EvalDataError(file, None, f"row {i}: {join.on} {row[join.on]!r} has no row with that {join.key} "
                                            f"in {join.pattern} of {source.repo}")
        row.update({c: match[c] for c in join.columns})
    return rows


def _read(folder: Path, pattern: str, columns: tuple[str, ...], repo: str, *, fallback: bool):
    pq = require("pyarrow.parquet", "reading benchmarks from Hub parquet files (--data hub)")
    files = sorted(Path(folder).glob(pattern)) or (sorted(Path(folder).rglob("*.parquet")) if fallback else [])
    if not files:
        raise EvalDataError(folder, None, f"no parquet file (expected {pattern}, from {repo})")
    rows = []
    for file in files:
        missing = [c for c in columns if c not in pq.read_schema(file).names]
        if missing:
            raise EvalDataError(file, None, f"expected the columns of {repo} ({', '.join(columns)}); "
                                            f"missing {', '.join(missing)}")
        # Only the columns read: the others of a split (VQAv2's answers, GQA's programs) stay on disk.
        for i, row in enumerate(pq.read_table(file, columns=list(columns)).to_pylist()):
            rows.append((file, i, row))
    return rows
