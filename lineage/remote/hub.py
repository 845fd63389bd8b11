"""`hf://ORG/NAME[@REVISION]`, planned from the hub without downloading a model.

The driver resolves the revision once to a commit hash (huggingface_hub's
`repo_info`), lists the files at that commit (`list_repo_tree`: sizes and
LFS sha256), fetches the index if there is one (whole, under its cap) and
every shard's safetensors header by two range requests: the 8-byte length
first, checked against the 100 MB cap and the file size before the header
itself is fetched, then the header, checked like a local one
(header.parse_header_bytes). No tensor byte passes through the driver.

Every tensor's path is then the shard's `resolve` URL at the commit, and
its stamp the file's size and sha256: the workers fetch their own byte
ranges from it (reader.py; a file their own Hugging Face cache holds at
that commit is read locally instead). Because the URL names the commit,
the bytes behind it cannot move while the audit runs; a branch that moves
meanwhile changes nothing, and a rerun that finds it moved is refused
(audit.py), never mixed.

Offline (HF_HUB_OFFLINE=1), or with the hub unreachable, a model already in
the local cache is resolved from the cache alone, as before.
"""

from __future__ import annotations

import os
from pathlib import Path

from lineage.errors import LineageError
from lineage.files import MAX_CONFIG_BYTES, MAX_INDEX_BYTES, Stamp, read_small
from lineage.header import Header, parse_header_bytes, read_header_bytes
from lineage.remote import RemoteOptions, ranged_header
from lineage.remote.http import HttpRangeFile, read_document
from lineage.source import Model, assemble, cached_snapshot, natural_key, parse_hf, parse_index, pick_shards


def endpoint() -> str:
    """The hub's address: huggingface_hub's (HF_ENDPOINT), read when asked, not at import."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def file_url(repo_id: str, filename: str, commit: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, filename, revision=commit, endpoint=endpoint())


def resolve_hub(name: str, source: str, opts: RemoteOptions | None = None) -> Model:
    """The model at `source`, from the hub's metadata and headers only (see module docstring)."""
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    repo_id, revision = parse_hf(source)
    if constants.HF_HUB_OFFLINE:
        return cached_snapshot(name, source)
    api = HfApi(endpoint=endpoint())
    try:
        commit = api.repo_info(repo_id, revision=revision).sha
        tree = {f.path: f for f in api.list_repo_tree(repo_id, revision=commit, recursive=True) if isinstance(f, RepoFile)}
    except RepositoryNotFoundError:
        raise LineageError(f"{source}: no such repository on {endpoint()} (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise LineageError(f"{source}: no revision {revision!r} in {repo_id}") from None
    except (httpx2.TransportError, HfHubHTTPError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        try:
            m = cached_snapshot(name, source)
        except LineageError:
            raise LineageError(f"{source}: the hub cannot be reached ({first}) and the model is not in the local cache") from None
        m.warnings.append(f"{source}: the hub cannot be reached ({first}); read from the local cache at {m.commit}")
        return m
    if not commit:
        raise LineageError(f"{source}: the hub gave no commit for revision {revision or 'main'}")
    opts = opts or RemoteOptions()
    top = sorted((p for p in tree if "/" not in p), key=natural_key)
    warnings: list[str] = []

    def read_index(name: str) -> tuple[str, dict[str, str]]:
        url = file_url(repo_id, name, commit)
        return url, parse_index(read_document(url, MAX_INDEX_BYTES, tree[name].size, "index", opts), url, warnings)

    hint = ". Use the safetensors revision the hub's conversion bot publishes (refs/pr/N), or convert them in a sandbox"
    shards, weight_map = pick_shards(source, top, read_index, f"in {repo_id} at {commit}", hint)
    headers: dict[str, tuple[str, Header]] = {}
    files = {}
    for shard in shards:
        f = tree[shard]
        etag = f.lfs.sha256 if f.lfs is not None else f.blob_id
        url = file_url(repo_id, shard, commit)
        headers[url] = (shard, remote_header(url, repo_id, shard, commit, f.size, etag, opts))
        files[shard] = {"size": f.size, "sha256" if f.lfs is not None else "blob_id": etag}
    root = file_url(repo_id, "config.json", commit).rsplit("/", 1)[0]  # the folder of the repo at the commit
    m = assemble(name, source, root, headers, weight_map)
    m.warnings[:0] = warnings
    m.commit, m.files = commit, files
    if "config.json" in tree:
        m.files["config.json"] = {"size": tree["config.json"].size, "blob_id": tree["config.json"].blob_id}
    return m


def remote_header(url: str, repo_id: str, shard: str, commit: str, size: int, etag: str, opts: RemoteOptions) -> Header:
    """A shard's header: from this machine's Hugging Face cache at `commit` when it is
    there, else by two range requests (the length, checked, then the header)."""
    stamp = Stamp(size, 0, etag)
    local = cached_file(repo_id, shard, commit, size)
    if local is not None:
        raw, _ = read_header_bytes(local)
        return parse_header_bytes(raw, url, size, stamp)
    return ranged_header(HttpRangeFile(url, size, etag, opts), size, stamp)


def cached_file(repo_id: str, filename: str, commit: str, size: int | None = None) -> str | None:
    """This machine's Hugging Face cache copy of `filename` at `commit` (of `size` bytes), if any."""
    from huggingface_hub import try_to_load_from_cache

    try:
        p = try_to_load_from_cache(repo_id, filename, revision=commit)
    except (OSError, ValueError):
        return None
    if not isinstance(p, str) or not os.path.isfile(p):
        return None
    if size is not None and os.path.getsize(p) != size:
        return None
    return p


def parse_url(url: str) -> tuple[str, str, str] | None:
    """(repo_id, commit, filename) of a hub `resolve` URL at a commit, else None."""
    import re

    m = re.search(r"/([^/]+/[^/]+)/resolve/([0-9a-f]{40})/(.+)$", url)
    if m is None:
        return None
    from urllib.parse import unquote

    return m.group(1), m.group(2), unquote(m.group(3))


def read_config(root: str, size: int | None) -> bytes | None:
    """config.json beside a hub model's shards (`size` from the tree; capped), or None."""
    return read_beside(root, "config.json", size, MAX_CONFIG_BYTES)


def read_beside(root: str, name: str, size: int | None, cap: int) -> bytes | None:
    """A small file beside a hub model's shards (`size` from the tree), refused above `cap`: from
    the local cache at the commit, else fetched; None when the tree does not list it."""
    parts = parse_url(f"{root}/{name}")
    if parts is None or size is None:
        return None
    repo_id, commit, filename = parts
    local = cached_file(repo_id, filename, commit, size)
    if local is not None:
        return read_small(local, cap, name)
    return read_document(f"{root}/{name}", cap, size, name)


def snapshot(source: str, commit: str | None = None) -> Path:
    """A local copy of an `hf://` model's safetensors and JSON files at `commit` (huggingface_hub's
    cache: nothing fetched twice), for what needs whole files (lineage certify's comparison)."""
    from huggingface_hub import snapshot_download

    repo_id, revision = parse_hf(source)
    try:
        return Path(snapshot_download(repo_id, revision=commit or revision, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as e:  # huggingface_hub raises its own errors and requests' alike
        raise LineageError(f"{source}: cannot download it to compare with ({type(e).__name__}: {e})") from None
