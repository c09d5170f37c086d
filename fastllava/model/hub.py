"""A model reference, a local directory or a Hugging Face Hub id, as a local directory.

`resolve("openai/clip-vit-large-patch14-336")` (optionally `@revision`: a branch, tag or commit) downloads
through huggingface_hub's `snapshot_download`, so its cache, HF_HUB_OFFLINE, HF_TOKEN or a saved login and
HF_ENDPOINT all apply, and returns the snapshot directory. Only what fastllava reads is fetched: configs,
safetensors, tokenizer and preprocessor files; a repository's `.bin` pickles only when it has no safetensors
(Vicuna-v1.5's case; safetensors_io.py then converts them safely). A path that exists always wins over an id.

Under torchrun the ranks of a node take turns on a file lock in the Hub cache: the first downloads and
records the snapshot it resolved for this job; the others wait on the lock and then read that record, so
a node downloads once and every rank loads the same commit.

A stage-1 projector is one file (`resolve_projector`): a local file or directory, `org/name[@revision]`
(the repository's mm_projector.safetensors / mm_projector.bin, as LLaVA publishes its pretrained
projectors), or `org/name[@revision]/path/in/repo` for one file of a repository that holds several.

`python -m fastllava.model.hub ID ... [--projector REF] [--image-processor ID]` fills the cache with what a
run will read, e.g. before the run goes to an offline cluster (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path
from urllib.parse import unquote

# config.json, tokenizer.json / tokenizer_config.json / special_tokens_map.json, preprocessor_config.json,
# generation_config.json, the shards' index, fastllava.json, chat_template.jinja (chat and eval read the
# template there); `*` also matches "/", so an original-LLaVA export's vision_tower/ comes too.
# tokenizer.model: SentencePiece (Vicuna); vocab.json + merges.txt: BPE (CLIP).
WANTED = ["*.json", "*.jinja", "*.safetensors", "tokenizer.model", "merges.txt", "*.tiktoken"]
# Only for a repository without safetensors: the pickled weights (never training_args.bin and the like).
PICKLED = ["pytorch_model*.bin"]
# A projector repository's or directory's file, the first present: LLaVA's pretrained projectors
# (liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5) hold mm_projector.bin, a converted copy
# mm_projector.safetensors, and fastllava's stage 1 writes projector.safetensors (train/export.py).
PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin", "projector.safetensors")

# One resolution per (reference, files) and process: one commit for the whole run.
_resolved: dict[tuple[str, tuple[str, ...] | None], Path] = {}


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


def split_file_ref(ref: str) -> tuple[str, str | None]:
    """(`org/name[@revision]`, path in the repository or None) of `org/name[@revision][/path/in/repo]`, the
    form of huggingface_hub's hf:// paths: the revision ends at the next "/", so one that holds "/"
    (refs/pr/1) is written with %2F there."""
    parts = ref.split("/", 2)
    if len(parts) < 2:
        return ref, None
    repo, at, revision = parts[1].partition("@")
    return f"{parts[0]}/{repo}{at}{unquote(revision)}", parts[2] if len(parts) == 3 else None


def check_ref(value: str, key: str, file: bool = False) -> None:
    """ValueError naming `key` when `value` is neither an existing local path nor written as a Hub reference
    (`org/name[@revision]`; with `file`, optionally followed by `/path/in/repo`). Whether the Hub has it is
    only known when it is resolved."""
    if Path(value).exists() or is_hub_id(split_file_ref(value)[0] if file else value):
        return
    form = "org/name[@revision][/file in the repository]" if file else "org/name or org/name@revision"
    raise ValueError(f"{key} {value}: does not exist as a local path, and is not a Hugging Face Hub id ({form})")


def resolve(ref: str | os.PathLike, what: str = "model", files: tuple[str, ...] | None = None) -> Path:
    """The local directory of `ref`: itself if the path exists, else the Hub snapshot of the id `ref`.

    what: how the caller names the reference in errors (e.g. "model.vision_path", "--model").
    files: the file patterns to fetch from the Hub, when not a model's (WANTED), e.g. only its
    preprocessor_config.json; the snapshot then holds those of them the repository has.
    ValueError naming `ref` when it is neither an existing path nor a valid id, or when the Hub (or, with
    HF_HUB_OFFLINE=1, the cache) does not have it."""
    path = Path(ref)
    if path.exists():
        return path
    ref = os.fspath(ref)
    check_ref(ref, what)
    if (ref, files) not in _resolved:
        _resolved[ref, files] = _download_once_per_node(ref, what, files)
    return _resolved[ref, files]


def resolve_projector(ref: str | os.PathLike, what: str = "model.projector_weights") -> Path:
    """The stage-1 projector file `ref` names: a local file; a local directory holding one of PROJECTOR_FILES
    (a stage-1 output folder); on the Hub, `org/name[@revision]` (the first of PROJECTOR_FILES the repository
    holds) or `org/name[@revision]/path/in/repo` (that file), fetched alone, once per node as `resolve` does.
    A .bin file is read later through torch.load(weights_only=True) (safetensors_io.load_bin).
    ValueError naming `ref` and the files looked for when there is none."""
    path = Path(ref)
    if path.is_file():
        return path
    ref = os.fspath(ref)
    if path.is_dir():
        repo, names = ref, PROJECTOR_FILES
    else:
        check_ref(ref, what, file=True)
        repo, file = split_file_ref(ref)
        names = (file,) if file else PROJECTOR_FILES
    where = resolve(repo, what, files=names)  # a local directory wins here too
    found = [where / n for n in names if (where / n).is_file()]
    if found:
        return found[0]
    if Path(repo).exists():
        raise ValueError(f"{what} {ref}: the local directory {repo} holds none of {', '.join(names)}")
    from huggingface_hub import constants

    offline = " (HF_HUB_OFFLINE is set: only the Hub cache was looked in)" if constants.HF_HUB_OFFLINE else ""
    raise ValueError(f"{what} {ref}: no local file of that name, and the Hub repository {repo} has none of "
                     f"{', '.join(names)}{offline}; name a file in it as {split_ref(repo)[0]}[@revision]/FILE")


def _download_once_per_node(ref: str, what: str, files: tuple[str, ...] | None) -> Path:
    from huggingface_hub import constants

    job = _torchrun_job()
    if job is None:  # one process: nothing to share
        return _download(ref, what, files)
    name = ref.replace("/", "--").replace("@", "--at--")
    if files is not None:  # another set of files of the same repository: its own lock and record
        name += "--" + hashlib.sha1("\0".join(files).encode()).hexdigest()[:12]
    lock = Path(constants.HF_HUB_CACHE, ".fastllava", f"{name}.lock")
    record = lock.with_suffix(".json")
    with _flock(lock) as locked:
        if not locked:
            return _download(ref, what, files)
        seen = json.loads(record.read_text()) if record.is_file() else {}
        if seen.get("job") == job and Path(seen["path"]).is_dir():
            return Path(seen["path"])
        path = _download(ref, what, files)
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


def _download(ref: str, what: str, files: tuple[str, ...] | None) -> Path:
    """snapshot_download of `files`, or of WANTED and then PICKLED when no safetensors came, errors named for
    the user."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    repo_id, revision = split_ref(ref)
    try:
        if files is not None:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(files)))
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


def main(argv=None) -> int:
    """The command line: each reference fetched as a run fetches it, then `ref<TAB>local path`; exit status 1
    when any could not be (each one's error on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m fastllava.model.hub",
                                     description="Fetch models into the Hugging Face cache as a run will read them "
                                                 "(the same files, the same cache), e.g. for HF_HUB_OFFLINE=1 later.")
    parser.add_argument("models", nargs="*", metavar="ID",
                        help="org/name[@revision] of a tower, an LLM or a llava-hf model (model.*_path, --model)")
    parser.add_argument("--projector", action="append", default=[], metavar="REF",
                        help="a stage-1 projector, org/name[@revision][/file] (model.projector_weights)")
    parser.add_argument("--image-processor", action="append", default=[], metavar="ID",
                        help="a repository's preprocessor_config.json alone (data.image_processor)")
    args = parser.parse_args(argv)
    wanted = ([(ref, lambda r: resolve(r, "model")) for ref in args.models]
              + [(ref, resolve_projector) for ref in args.projector]
              + [(ref, lambda r: resolve(r, "--image-processor", files=("preprocessor_config.json",)))
                 for ref in args.image_processor])
    if not wanted:
        parser.error("name at least one ID, --projector REF or --image-processor ID")
    failed = 0
    for ref, fetch in wanted:
        try:
            print(f"{ref}\t{fetch(ref)}", flush=True)
        except ValueError as e:
            print(e, file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
