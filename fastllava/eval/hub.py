"""Benchmarks read from the Hugging Face Hub datasets lmms-eval uses, instead of LLaVA's eval layout.

`--data hub` takes the task's default dataset (`HubSource.repo`), `--data org/name[@revision]` another
repository in the same schema, and `--data DIR` a local copy of such a repository (any folder holding its
parquet files). A repository is fetched with huggingface_hub's snapshot_download: only the split's parquet
files, into the Hub cache, honouring HF_HUB_OFFLINE, HF_TOKEN or a login. Rows are read with pyarrow (the
`hub-eval` extra) and images decoded from the rows' {"bytes", "path"} structs, the `datasets` Image
feature's storage. Each task turns the rows into the questions LLaVA's layout gives (Task.load_hub).
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

    try:
        return Path(huggingface_hub.snapshot_download(repo, repo_type="dataset", revision=revision or None,
                                                      allow_patterns=[source.pattern]))
    except Exception as e:  # huggingface_hub's errors (offline, not found, gated) say why; name the dataset too
        raise EvalDataError(data, None, f"not a local folder, and could not fetch the Hub dataset {repo!r} "
                                        f"(files {source.pattern}): {type(e).__name__}: {e}") from None


def read_rows(folder: Path, source: HubSource) -> list[tuple[Path, int, dict]]:
    """(parquet file, 0-based row, {column: value}) of every row of the files matching source.pattern
    under `folder`, files in name order (the shards' order). EvalDataError for no file or a missing column."""
    pq = require("pyarrow.parquet", "reading benchmarks from Hub parquet files (--data hub)")
    files = sorted(Path(folder).glob(source.pattern)) or sorted(Path(folder).rglob("*.parquet"))
    if not files:
        raise EvalDataError(folder, None, f"no parquet file (expected {source.pattern}, the split of "
                                          f"{source.repo})")
    rows = []
    for file in files:
        table = pq.read_table(file)
        missing = [c for c in source.columns if c not in table.column_names]
        if missing:
            raise EvalDataError(file, None, f"expected the columns of {source.repo} ({', '.join(source.columns)}); "
                                            f"missing {', '.join(missing)}")
        for i, row in enumerate(table.select(list(source.columns)).to_pylist()):
            rows.append((file, i, row))
    return rows
