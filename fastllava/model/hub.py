"""A model reference, a local directory or a Hugging Face Hub id, as a local directory.

`resolve("openai/clip-vit-large-patch14-336")` (optionally `@revision`: a branch, tag or commit) downloads
through huggingface_hub's `snapshot_download`, so its cache, HF_HUB_OFFLINE, HF_TOKEN or a saved login and
HF_ENDPOINT all apply, and returns the snapshot directory. Only what fastllava reads is fetched: configs,
safetensors, tokenizer and preprocessor files; a repository's `.bin` pickles only when it has no safetensors
(Vicuna-v1.5's case; safetensors_io.py then converts them safely). A path that exists always wins over an id.

Under torchrun the ranks of a node take turns on a file lock in the Hub cache: the first downloads and
records the snapshot it resolved for this job; the others wait on the lock and then read that record, so
a node downloads once and every rank loads the same commit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from pathlib import Path

# config.json, tokenizer.json / tokenizer_config.json / special_tokens_map.json, preprocessor_config.json,
# generation_config.json, the shards' index, fastllava.json; `*` also matches "/", so an original-LLaVA
# export's vision_tower/ comes too. tokenizer.model: SentencePiece (Vicuna); vocab.json + merges.txt: BPE (CLIP).
WANTED = ["*.json", "*.safetensors", "tokenizer.model", "merges.txt", "*.tiktoken"]
# Only for a repository without safetensors: the pickled weights (never training_args.bin and the like).
PICKLED = ["pytorch_model*.bin"]

_resolved: dict[str, Path] = {}  # one resolution per reference and process: one commit for the whole run


def split_ref(ref: str) -> tuple[str, str | None]:
    """(repo id, revision or None) of `org/name[@revision]`."""
    repo_id, _, revision = ref.partition("@")
    return repo_id, revision or None


def is_hub_id(ref: str) -> bool:
    """Whether `ref` is written as a Hub id (`name` or `org/name`, optionally `@revision`)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, revision = split_ref(ref)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return "@" not in ref or revision is not None


def resolve(ref: str | os.PathLike, what: str = "model") -> Path:
    """The local directory of `ref`: itself if the path exists, else the Hub snapshot of the id `ref`.

    what: how the caller names the reference in errors (e.g. "model.vision_path", "--model").
    ValueError naming `ref` when it is neither an existing path nor a valid id, or when the Hub (or, with
    HF_HUB_OFFLINE=1, the cache) does not have it."""
    path = Path(ref)
    if path.exists():
        return path
    ref = os.fspath(ref)
    if not is_hub_id(ref):
        raise ValueError(f"{what} {ref}: does not exist as a local path, and is not a Hugging Face Hub id "
                         "(org/name or org/name@revision)")
    if ref not in _resolved:
        _resolved[ref] = _download_once_per_node(ref, what)
    return _resolved[ref]


def _download_once_per_node(ref: str, what: str) -> Path:
    from huggingface_hub import constants

    job = _torchrun_job()
    if job is None:  # one process: nothing to share
        return _download(ref, what)
    name = ref.replace("/", "--").replace("@", "--at--")
    lock = Path(constants.HF_HUB_CACHE, ".fastllava", f"{name}.lock")
    record = lock.with_suffix(".json")
    with _flock(lock) as locked:
        if not locked:
            return _download(ref, what)
        seen = json.loads(record.read_text()) if record.is_file() else {}
        if seen.get("job") == job and Path(seen["path"]).is_dir():
            return Path(seen["path"])
        path = _download(ref, what)
        record.write_text(json.dumps({"job": job, "path": str(path)}))
        return path


def _torchrun_job() -> str | None:
    """A name of this torchrun job on this node, the same in all its local ranks; None outside torchrun.
    The local ranks are the children of one torchrun agent: the run id, the agent's pid and its start time
    (so a later job whose agent reuses the pid is another job)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None or "LOCAL_RANK" not in os.environ:
        return None
    agent = os.getppid()
    try:  # field 22 of /proc/<pid>/stat, counted after the ")" that ends the command name
        started = Path(f"/proc/{agent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        started = ""
    return f"{run_id}-{agent}-{started}"


@contextlib.contextmanager
def _flock(path: Path):
    """Yields whether it holds an exclusive flock on `path` (created), released when the file closes or its
    holder dies. A file system without locks (some network mounts) gives none: each rank then resolves for
    itself, which huggingface_hub's own per-file locks keep safe, only slower."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            print(f"model: no lock on {path} ({e}); this rank resolves the model itself", file=sys.stderr)
            yield False
            return
        yield True


def _download(ref: str, what: str) -> Path:
    """snapshot_download of WANTED, then of PICKLED when no safetensors came, errors named for the user."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    repo_id, revision = split_ref(ref)
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=WANTED))
        if not any(path.rglob("*.safetensors")):
            path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=WANTED + PICKLED))
    except RevisionNotFoundError:
        raise ValueError(f"{what} {ref}: the Hub repository {repo_id} has no revision {revision!r}") from None
    except GatedRepoError:
        raise ValueError(f"{what} {ref}: {repo_id} is gated on the Hub: accept its terms on huggingface.co and "
                         "log in (hf auth login) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{what} {ref}: no local path of that name, and the Hub has no repository {repo_id} "
                         "(or it is private: log in or set HF_TOKEN)") from None
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else str(e).splitlines()[-1]
        raise ValueError(f"{what} {ref}: no local path of that name, and {repo_id}"
                         f"{'@' + revision if revision else ''} is not in the Hub cache {constants.HF_HUB_CACHE} "
                         f"({why}); download it once online, or set HF_HUB_CACHE to a cache that holds it") from None
    return path
