"""Model references: local paths, Hugging Face Hub IDs and the local Hugging Face cache.

Every model string a config holds (`base_model`, `models[i].model`, slice sources, a tokenizer
source) goes through `locate`, the one place that turns it into a folder:

1. a local file or folder that exists wins, whatever it looks like;
2. `BASE+ADAPTER` (mergekit's LoRA syntax): the base resolved by these rules, the adapter a local
   folder or a Hub ID already in the cache (lora.py applies it);
3. a cache repository folder (`.../models--ORG--NAME`, optionally `@REVISION`) resolves to its
   snapshot for that revision (default `main`) through `refs/`, as transformers does;
4. `ORG/NAME` or `ORG/NAME@REVISION` resolves through the cache folder transformers uses
   (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`): `refs/REVISION` gives the
   commit, `snapshots/COMMIT` the folder;
5. anything else is a local path that does not exist (the checkpoint reader says so).

An ID that is not in the cache (or only partly: a shard missing) stays *pending*: `fetch`
downloads it when the command was given `--download`, and otherwise says where it looked and how
to allow downloads. Reading the cache needs no client: its layout (refs/, snapshots/, blobs/) is
a stable on-disk format, and importing `huggingface_hub` costs ~0.4 s, so it is imported only to
download.

Downloads fetch only what a merge needs: the safetensors weights (the index and its shards, or
model.safetensors) and the side files hf_files copies (config.json, tokenizer and generation
files). Before the weights, every pending model's config and side files are downloaded (small)
and each weight file's safetensors header is read with HTTP range requests, so that the caller
can check the whole set for compatibility (`remote_checkpoint`) and refuse it within seconds, not
after hundreds of gigabytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field

from .errors import InputError, OutputError, UsageError, printable, short

DEFAULT_ENDPOINT = "https://huggingface.co"
# huggingface_hub's rule for repository IDs: an optional namespace, then a name; word characters,
# '-', '.' (no '--' or '..', which the cache folder names and URLs reserve)
_ID = re.compile(r"^(?:[\w\-.]{1,96}/)?[\w\-.]{1,96}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REVISION = re.compile(r"^[\w\-.]+(?:/[\w\-.]+)*$")  # branch, tag or commit; used in a path under refs/
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_TRUE = {"1", "ON", "YES", "TRUE"}


def cache_dir() -> str:
    """The Hugging Face hub cache folder, found the way huggingface_hub finds it (read now, not
    at import, so a changed environment counts): HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub,
    XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                                              "huggingface")
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.abspath(os.path.expandvars(os.path.expanduser(hub)))


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to a true value: no download may be tried."""
    return any((os.environ.get(k) or "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@dataclass(frozen=True)
class HubRef:
    """A Hub model the config names that is not (completely) in the cache yet."""

    repo_id: str
    revision: str | None  # None: the default branch
    text: str  # as written in the config
    where: str  # config file and line, for messages
    cache: str  # the cache folder it was looked for in
    partly: str = ""  # why a cached snapshot does not count (e.g. a missing shard)
    weights: bool = True  # False: only its tokenizer/config files are needed (a tokenizer source)

    @property
    def key(self) -> str:
        """What the config holds in place of the folder until the model is downloaded."""
        return f"hf://{self.repo_id}@{self.revision or 'main'}"

    def missing(self) -> InputError:
        """The error for a pending model when downloads are not allowed."""
        state = (f"is only partly in the Hugging Face cache {self.cache} ({self.partly})" if self.partly
                 else f"is neither a local folder nor in the Hugging Face cache {self.cache}")
        how = ("unset HF_HUB_OFFLINE and pass --download to fetch it" if offline()
               else f"pass --download to fetch it from {endpoint()}")
        return InputError(f"{self.where}: {short(self.text)} {state}; {how} (or download it yourself with "
                          f"`hf download {self.repo_id}`, or give a local folder)")


@dataclass(frozen=True)
class Located:
    path: str  # a local path (folder or file), or HubRef.key while pending
    pending: HubRef | None = None
    hub_id: str | None = None  # the repository, when the model came from the cache or the Hub


def _adapted(text: str, where: str, key: str, weights: bool) -> Located:
    """mergekit's `MODEL+ADAPTER` (a PEFT LoRA adapter on a model, lora.py). A `+` may occur inside
    either part: the split taken is the first whose right side is an adapter (a local folder, or a
    Hub ID in the cache, with adapter_config.json) and whose left side resolves."""
    from .lora import is_adapter_folder
    from .lora import key as adapted_key

    named = []
    for i, c in enumerate(text):
        if c != "+" or not 0 < i < len(text) - 1:
            continue
        model, adapter = text[:i], text[i + 1:]
        folder = _adapter_folder(adapter)
        if folder is None:
            named.append(adapter)
            continue
        base = locate(model, where, key, weights)
        if is_adapter_folder(base.path):
            raise UsageError(f"{where}: {key} {short(text)}: {short(model)} is an adapter, not a model")
        return Located(adapted_key(base.path, folder), base.pending, base.hub_id)
    raise InputError(f"{where}: {key} {short(text)} names a LoRA adapter on a model (mergekit's BASE+ADAPTER), but "
                     f"{short(named[-1] if named else text)} is neither a local adapter folder nor an adapter in the "
                     f"Hugging Face cache {cache_dir()} (adapter_config.json); download adapters yourself "
                     "(`hf download ORG/NAME`)")


def _adapter_folder(text: str) -> str | None:
    """The folder of an adapter named by a path or a cached Hub ID (ORG/NAME[@REVISION]), or None."""
    from .lora import is_adapter_folder

    local = os.path.abspath(os.path.expanduser(text))
    if os.path.lexists(local):
        return local if is_adapter_folder(local) else None
    name, _, revision = text.partition("@")
    if not _ID.match(name) or "--" in name or ".." in name:
        return None
    snap = _snapshot_of(repo_folder(cache_dir(), name), revision or None)
    return snap if snap is not None and is_adapter_folder(snap) else None


def repo_folder(cache: str, repo_id: str) -> str:
    return os.path.join(cache, "models--" + repo_id.replace("/", "--"))


def locate(text: str, where: str, key: str, weights: bool = True) -> Located:
    """Resolve one model string of a config (see the module docstring). UsageError for strings
    that can never name a model (a bad revision, a revision on a plain folder)."""
    local = os.path.abspath(os.path.expanduser(text))
    if os.path.lexists(local):
        return Located(_cache_snapshot(local, None, where, key) if _is_repo_folder(local) else local)
    if "+" in text:
        return _adapted(text, where, key, weights)
    name, at, revision = text.rpartition("@") if "@" in text else (text, "", "")
    if at and (not revision or not _REVISION.match(revision) or ".." in revision):
        raise UsageError(f"{where}: {key} {short(text)}: {short(revision)} is not a usable revision "
                         "(a branch, tag or commit after '@')")
    name_local = os.path.abspath(os.path.expanduser(name))
    if at and os.path.lexists(name_local):
        if not _is_repo_folder(name_local):
            raise UsageError(f"{where}: {key} {short(text)}: a revision (@{printable(revision, 80)}) applies to Hub IDs and "
                             f"Hugging Face cache folders (models--ORG--NAME), not to the local folder {name_local}")
        return Located(_cache_snapshot(name_local, revision, where, key))
    looks_like_id = (_ID.match(name) and "--" not in name and ".." not in name
                     and not name.startswith((".", "~")) and not name.endswith("."))
    if not looks_like_id:
        return Located(local)
    cache = cache_dir()
    folder = repo_folder(cache, name)
    snapshot = _snapshot_of(folder, revision or None)
    partly = "" if snapshot is None else incomplete(snapshot, weights)
    if snapshot is not None and not partly:
        return Located(snapshot, hub_id=name)
    if snapshot is None and os.path.isdir(folder):
        partly = f"no snapshot for revision {revision or 'main'}"
    ref = HubRef(name, revision or None, text, where, cache, partly, weights)
    return Located(ref.key, ref, name)


def _is_repo_folder(path: str) -> bool:
    return (os.path.basename(os.path.normpath(path)).startswith("models--")
            and os.path.isdir(os.path.join(path, "snapshots")))


def _snapshot_of(folder: str, revision: str | None) -> str | None:
    """The snapshot folder of `revision` (a commit, or a branch/tag recorded under refs/) in a
    cache repository folder, or None."""
    rev = revision or "main"
    commit = rev if _COMMIT.match(rev) else None
    if commit is None:
        try:
            with open(os.path.join(folder, "refs", rev), encoding="utf-8") as f:
                commit = f.read(200).strip()
        except (OSError, UnicodeDecodeError):
            return None
    if not _COMMIT.match(commit or ""):
        return None
    snap = os.path.join(folder, "snapshots", commit)
    return snap if os.path.isdir(snap) else None


def _cache_snapshot(folder: str, revision: str | None, where: str, key: str) -> str:
    """A `models--ORG--NAME` folder given as a path: its snapshot for `revision` (default main;
    with no refs/ at all, its only snapshot)."""
    snap = _snapshot_of(folder, revision)
    if snap is None and revision is None and not os.path.isdir(os.path.join(folder, "refs")):
        snaps = sorted(os.listdir(os.path.join(folder, "snapshots")))
        snap = os.path.join(folder, "snapshots", snaps[0]) if len(snaps) == 1 else None
    if snap is None:
        raise InputError(f"{where}: {key} {folder} is a Hugging Face cache folder without a snapshot for revision "
                         f"{revision or 'main'} (refs/{revision or 'main'} -> snapshots/COMMIT)")
    return snap


def incomplete(folder: str, weights: bool = True) -> str:
    """Why a cached snapshot cannot be used as it is ('' when it can): no weights, or a shard its
    index names is missing (an interrupted download). Pickled weights count as present, so that
    the checkpoint reader refuses them with its own message."""
    if not weights:
        return "" if os.path.exists(os.path.join(folder, "config.json")) else "no config.json"
    index = os.path.join(folder, INDEX_NAME)
    if os.path.exists(index):
        try:
            with open(index, "rb") as f:
                wmap = json.loads(f.read(100_000_000)).get("weight_map")
            shards = sorted(set(wmap.values()))
        except (OSError, ValueError, AttributeError, TypeError):
            return ""  # damaged: the checkpoint reader names the problem
        gone = [s for s in shards if isinstance(s, str) and not os.path.exists(os.path.join(folder, s))]
        return f"{len(gone)} of {len(shards)} shards missing, e.g. {gone[0]}" if gone else ""
    if os.path.exists(os.path.join(folder, SINGLE_NAME)):
        return ""
    if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(folder)):
        return ""
    return f"no {SINGLE_NAME} or {INDEX_NAME}"


# --- downloading ---------------------------------------------------------------------------------


@dataclass
class Remote:
    """A pending model being downloaded: its commit, snapshot folder and the files a merge needs."""

    ref: HubRef
    commit: str
    folder: str
    sizes: dict[str, int]  # every file of the repository at that commit -> bytes
    weights: list[str] = field(default_factory=list)  # weight files, in the order the checkpoint lists them

    def missing_weights(self) -> list[str]:
        return [f for f in self.weights if not os.path.exists(os.path.join(self.folder, f))]


@contextlib.contextmanager
def _progress(quiet: bool):
    """huggingface_hub's progress bars, silenced for --quiet."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was = are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        yield
    finally:
        if quiet and not was:
            enable_progress_bars()


def _hub_error(ref: HubRef, e: Exception) -> InputError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(e, GatedRepoError):
        why = "is gated: accept its terms on the Hub and log in (`hf auth login`)"
    elif isinstance(e, RepositoryNotFoundError):
        why = f"is not a model on {endpoint()} (or it is private: log in with `hf auth login`)"
    elif isinstance(e, RevisionNotFoundError):
        why = f"has no revision {ref.revision!r} on {endpoint()}"
    else:
        why = f"could not be fetched from {endpoint()} ({type(e).__name__}: {short(str(e).splitlines()[0] if str(e) else '', 200)})"
    return InputError(f"{ref.where}: {short(ref.text)} {why}")


def prepare(refs: list[HubRef], quiet: bool) -> dict[str, Remote]:
    """Resolve every pending model on the Hub and download its small files (config, index,
    tokenizer and generation files): key -> Remote. The weights come later (`download_weights`),
    after the caller has checked the set from these files and the remote headers."""
    if offline():
        raise refs[0].missing()
    from huggingface_hub import HfApi, hf_hub_download

    from .hf_files import MODEL_FILES

    api = HfApi(endpoint=endpoint())
    out: dict[str, Remote] = {}
    with _progress(quiet):
        for ref in refs:
            if ref.key in out:
                continue
            try:
                info = api.model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
                commit = info.sha
                sizes = {s.rfilename: (s.size or 0) for s in info.siblings or []}
                small = [f for f in MODEL_FILES if f in sizes]
                if ref.weights and INDEX_NAME in sizes:
                    small.append(INDEX_NAME)
                for name in small:
                    hf_hub_download(ref.repo_id, name, revision=commit, cache_dir=ref.cache, endpoint=endpoint())
            except InputError:
                raise
            except Exception as e:  # the client's errors: not found, gated, network, server
                raise _hub_error(ref, e) from None
            if not _COMMIT.match(commit or ""):
                raise InputError(f"{ref.where}: {short(ref.text)}: {endpoint()} answered no commit for it")
            repo = repo_folder(ref.cache, ref.repo_id)
            _write_ref(repo, ref.revision or "main", commit)
            remote = Remote(ref, commit, os.path.join(repo, "snapshots", commit), sizes)
            if ref.weights:
                remote.weights = _weight_files(remote)
            os.makedirs(remote.folder, exist_ok=True)
            out[ref.key] = remote
    return out


def _write_ref(repo: str, revision: str, commit: str) -> None:
    """Record revision -> commit under refs/, as huggingface_hub does, so the next run finds the
    model in the cache without asking the Hub."""
    if revision == commit:
        return
    path = os.path.join(repo, "refs", revision)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(commit)
    except OSError as e:
        raise OutputError(f"{path}: cannot record the downloaded revision ({e.strerror})") from None


def _weight_files(remote: Remote) -> list[str]:
    from .checkpoint.reader import check_relative, read_json_file

    where = f"{remote.ref.where}: {short(remote.ref.text)}"
    if INDEX_NAME in remote.sizes:
        index = os.path.join(remote.folder, INDEX_NAME)
        data = read_json_file(index)
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise InputError(f"{index}: needs a non-empty 'weight_map' object")
        files = list(dict.fromkeys(wmap.values()))
        for f in files:
            check_relative(f, index, "shard filename")
            if f not in remote.sizes:
                raise InputError(f"{index}: shard {short(f)} is not in the repository {remote.ref.repo_id}")
        return files
    if SINGLE_NAME in remote.sizes:
        return [SINGLE_NAME]
    pickled = sorted(f for f in remote.sizes if f.endswith((".bin", ".pt", ".pth")))
    extra = f" (only pickled weights such as {pickled[0]}, which are refused)" if pickled else ""
    raise InputError(f"{where} has no {SINGLE_NAME} or {INDEX_NAME} on {endpoint()}{extra}")


def remote_header_reader(remote: Remote, filename: str):
    """A `pread(n, offset)` over HTTP range requests for one weight file (its first 100 kB are
    fetched once: most headers fit), for the checkpoint reader's header parser."""
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(remote.ref.repo_id, filename, revision=remote.commit, endpoint=endpoint())
    headers = build_hf_headers()
    first: dict[str, bytes] = {}

    def get(start: int, stop: int) -> bytes:
        try:
            r = get_session().get(url, headers={**headers, "Range": f"bytes={start}-{stop - 1}"})  # follows redirects
            r.raise_for_status()
        except Exception as e:
            raise _hub_error(remote.ref, e) from None
        body = r.content
        return body[start:stop] if r.status_code == 200 else body  # a server that ignores Range sends it all

    def pread(n: int, offset: int) -> bytes:
        if "head" not in first:
            first["head"] = get(0, 100_000)
        head = first["head"]
        if offset + n <= len(head):
            return head[offset:offset + n]
        return get(offset, offset + n)

    return pread


def download_weights(remotes: list[Remote], quiet: bool) -> None:
    """Download the weight files still missing, after checking the cache disk has room."""
    from huggingface_hub import hf_hub_download

    todo = [(r, f) for r in remotes for f in r.missing_weights()]
    if not todo:
        return
    need = sum(r.sizes.get(f, 0) for r, f in todo)
    cache = remotes[0].ref.cache
    free = shutil.disk_usage(cache).free
    if need > free:
        raise OutputError(f"{cache}: the download needs {need / 1e9:.2f} GB but the disk has {free / 1e9:.2f} GB free; "
                          "free space or point HF_HUB_CACHE elsewhere")
    with _progress(quiet):
        for r, f in todo:
            try:
                hf_hub_download(r.ref.repo_id, f, revision=r.commit, cache_dir=r.ref.cache, endpoint=endpoint())
            except Exception as e:
                raise _hub_error(r.ref, e) from None


def remote_checkpoint(remote: Remote):
    """The checkpoint catalogue of a model being downloaded, from its weight files' headers
    (read over HTTP for those not on disk yet)."""
    from .checkpoint import Checkpoint

    files = []
    for f in remote.weights:
        path = os.path.join(remote.folder, f)
        if os.path.exists(path):
            files.append((path, _local_reader(path), os.path.getsize(path)))
        else:
            files.append((path, remote_header_reader(remote, f), remote.sizes.get(f, 0)))
    return Checkpoint.from_headers(remote.folder, files)


def _local_reader(path: str):
    def pread(n: int, offset: int) -> bytes:
        with open(path, "rb") as f:
            return os.pread(f.fileno(), n, offset)

    return pread
