"""SKU versions on a running station: which version of a SKU runs, and activating or rolling one back live.

A SKU runs from the version store (inspector/skustore.py) when `[skus.<name>] model_dir` is the store's link
`<store.dir>/<name>/active`. Every load of such a SKU is pinned (`pinned`): the link is read once and the engine,
calibration and manifest all come from that one version folder, so the daemon knows exactly which version runs
(ActiveSku.version and .content_hash: the status's `sku_version` and `sku_hash`, /metrics'
inspector_sku_bundle_info) even when the link moves while it loads. A SKU not run from the store has version ""
and the sha256 of its meta.json as its hash.

The `activate` and `rollback` commands (Activations, called by Daemon.handle_command for /cmd and the station
page) keep the station consistent (the SKU that inspects runs the version its link names) by this order:

  1. refuse at once, in one line: SKU not configured or not run from the store, unknown version, the version
     active and running already, another activation under way, a changeover in progress;
  2. pre-flight the target version (inspector.preflight.version_check), then swap the link (SkuStore.activate or
     .rollback, actor = who sent the command): a failing pre-flight leaves the link as it was;
  3. when the SKU is the one inspecting, reload it pinned to the new version through the daemon's changeover
     (Changeovers.reload_version; the old engine inspects meanwhile, so no frame waits); another SKU loads the new
     version at its next changeover;
  4. when that load fails, or a changeover to another SKU supersedes it, swap the link back (a "rollback" entry, or
     an "activate" of the version that runs, with the reason) and answer with the error.

An `activate` of the version the link already names while the station still runs another (the link was swapped
offline with `inspector sku activate`) skips step 2: it reloads the SKU, which is how a running station picks up
an offline activation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from foundation.errors import DataError, InspectorError
from foundation.log import get_logger
from inspector.config import InspectorConfig, resolve_sku
from inspector.pipeline import ActiveSku
from inspector.preflight import version_check
from inspector.skustore import ACTIVE_LINK, Change, SkuStore, Version
from tdad.manifest import MANIFEST_FILE, file_sha256

log = get_logger(__name__)

MAX_TEXT = 200  # characters of a command's "operator" or "reason"


@dataclass(frozen=True)
class SkuIdentity:
    """Which content a SKU load runs: its store version id ("" when not run from the store) and hash (the
    version's content hash, else the sha256 of the SKU folder's meta.json, "" without one)."""

    version: str
    hash: str


def store_link(config: InspectorConfig, name: str) -> Path:
    """<store.dir>/<name>/active: the model_dir of a SKU run from the version store."""
    return config.store.dir / name / ACTIVE_LINK


def runs_from_store(config: InspectorConfig, name: str) -> bool:
    """Whether SKU `name`'s model_dir is the store's active link of that SKU."""
    return resolve_sku(config, name).model_dir == store_link(config, name)


def pinned(config: InspectorConfig, name: str, version: str | None = None) -> tuple[InspectorConfig, SkuIdentity]:
    """The config to load SKU `name` with and what it will run: for a SKU run from the store, model_dir pinned to
    the folder of `version` (None: the version the link names now); any other SKU unchanged. DataError when a store
    SKU has no active version or the version is unknown."""
    sku = resolve_sku(config, name)
    if not runs_from_store(config, name):
        manifest = sku.model_dir / MANIFEST_FILE
        return config, SkuIdentity("", file_sha256(manifest) if manifest.is_file() else "")
    store = SkuStore(config.store.dir)
    version = version or store.active(name)
    if version is None:
        raise DataError(f"skus.{name}.model_dir = {sku.model_dir}: SKU {name!r} has no active version in the store "
                        f"{store.root}; make one active with `inspector sku activate --sku {name} VERSION`")
    folder = store.path(name, version)
    record = next((v for v in store.versions(name) if v.id == version), None)
    skus = dict(config.skus) | {name: sku.model_copy(update={"model_dir": folder})}
    return config.model_copy(update={"skus": skus}), SkuIdentity(version, record.hash if record else "unknown")


def provenance(version: Version) -> str:
    """A short line of where a version came from: its source (a bundle's file name, not the folder it was installed
    from: the station page shows this line to every viewer; `inspector sku list` has the whole source), signer and
    who added it."""
    signer = version.details.get("signed_by")
    source = version.source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    parts = [source, f"signed by {signer}" if signer else "", f"added by {version.actor}" if version.actor else ""]
    return ", ".join(p for p in parts if p)


class Changeovers(Protocol):
    """What activations need from the daemon's changeovers (inspector.service.Daemon)."""

    def running_sku(self) -> ActiveSku:
        """The SKU inspecting (a changeover waiting for the next batch included)."""
        ...

    def claim_activation(self, name: str) -> str | None:
        """Mark an activation of SKU `name` under way (changeovers to it are refused until released); why not (an
        activation under way, a changeover in progress) as one line, else None."""
        ...

    def release_activation(self) -> None:
        """The activation is answered."""
        ...

    def reload_version(self, name: str, version: str) -> dict[str, Any]:
        """Load version `version` of SKU `name` through the changeover when it inspects; its final reply."""
        ...


@dataclass(frozen=True)
class _Activation:
    """One accepted activate/rollback command: what to do, by whom and why, and the version running before."""

    op: str  # "activate" or "rollback"
    sku: str
    version: str | None  # the target of an activate; None for a rollback (the store picks the version before)
    actor: str
    reason: str
    running: str | None  # the version inspecting when it was accepted (None: another SKU inspects)


class Activations:
    """The station's `versions`, `activate` and `rollback` commands (module docstring); one activation at a time."""

    def __init__(self, config: InspectorConfig, station: Changeovers) -> None:
        self.config = config
        self.station = station
        self.store = SkuStore(config.store.dir)

    def versions(self, command: dict[str, Any]) -> dict[str, Any]:
        """The versions of SKU command["sku"] (default: the one inspecting), oldest first, with the active one (the
        link), the one running, and each one's created time, origin and provenance."""
        running = self.station.running_sku()
        name = command.get("sku", running.name)
        if not isinstance(name, str):
            return {"ok": False, "error": 'versions takes {"sku": NAME} (default: the SKU inspecting)'}
        try:
            self._store_sku(name)
            listed = self.store.versions(name)
        except InspectorError as exc:
            return {"ok": False, "sku": name, "error": str(exc)}
        rows = [{"id": v.id, "active": v.active, "created": v.created, "installed": v.installed,
                 "origin": v.origin, "provenance": provenance(v)} for v in listed]
        return {"ok": True, "sku": name, "active": self.store.active(name),
                "running": running.version if running.name == name else None, "versions": rows}

    def start(self, op: str, command: dict[str, Any], client: str,
              deliver: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        """Check an activate/rollback command and run it: refusals come back at once; with `deliver` (the /cmd
        topic) the work runs on a thread of its own and this returns {"state": "loading"}, the final reply going to
        deliver; without (the station page) this returns the final reply."""
        try:
            activation = self._accept(op, command, client)
        except InspectorError as exc:
            return {"ok": False, "error": str(exc)}
        if deliver is None:
            return self._run(activation)
        threading.Thread(target=lambda: deliver(self._run(activation)), name="activation", daemon=True).start()
        target = {"version": activation.version} if activation.version is not None else {}
        return {"ok": True, "sku": activation.sku, **target, "state": "loading"}

    def _store_sku(self, name: str) -> None:
        """DataError unless SKU `name` is configured and run from the store."""
        sku = resolve_sku(self.config, name)
        link = store_link(self.config, name)
        if sku.model_dir != link:
            raise DataError(f"SKU {name!r} does not run from the version store: skus.{name}.model_dir = "
                            f"{sku.model_dir}; set it to \"{link}\" to run the store's versions of it "
                            "(docs/operations.md, SKU versions and bundles)")

    def _accept(self, op: str, command: dict[str, Any], client: str) -> _Activation:
        """The command checked (step 1 of the module docstring) and this activation marked under way; DataError
        (one line) for a refusal."""
        name, version, operator, reason = check_command(op, command)
        self._store_sku(name)
        running = self.station.running_sku()
        running_version = running.version if running.name == name else None
        if version is not None:
            self.store.path(name, version)  # DataError naming the versions there are
            if self.store.active(name) == version and running_version in (None, version):
                state = "inspecting" if running_version else "ready for the next changeover to it"
                raise DataError(f"SKU {name!r}: version {version} is active already ({state}); nothing to do")
        refused = self.station.claim_activation(name)
        if refused is not None:
            raise DataError(refused)
        actor = f"{client} ({operator})" if operator else client
        return _Activation(op, name, version, actor, reason, running_version)

    def _run(self, job: _Activation) -> dict[str, Any]:
        """Steps 2 to 4 of the module docstring; the final reply."""
        try:
            check = version_check(self.config, job.sku)
            try:
                change = (self.store.activate(job.sku, job.version, check=check, actor=job.actor, reason=job.reason)
                          if job.version is not None else
                          self.store.rollback(job.sku, check=check, actor=job.actor, reason=job.reason))
            except InspectorError as exc:
                log.warning("sku_version_refused", sku=job.sku, op=job.op, error=str(exc))
                return {"ok": False, "sku": job.sku, "error": str(exc)}
            done = {"sku": job.sku, "version": change.after, "from": job.running or change.before}
            outcome = self.station.reload_version(job.sku, change.after)
            if outcome.get("ok"):
                log.info("sku_version_live", sku=job.sku, op=job.op, version=change.after, before=done["from"],
                         actor=job.actor, state=outcome["state"])
                return {"ok": True, **done, "state": outcome["state"]} | (
                    {"load_s": outcome["load_s"]} if "load_s" in outcome else {})
            error = outcome.get("error", "the changeover did not complete")
            undone = self._undo(job, change, error)
            log.error("sku_version_not_live", sku=job.sku, op=job.op, version=change.after, error=error,
                      undone=undone)
            return {"ok": False, **done, "error": f"version {change.after} did not go live: {error}; {undone}"}
        except Exception as exc:  # a bug, not an operator's mistake: still one final reply
            log.exception("sku_version_failed", sku=job.sku, op=job.op)
            return {"ok": False, "sku": job.sku, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            self.station.release_activation()

    def _undo(self, job: _Activation, change: Change, why: str) -> str:
        """Swap the link back to the version that inspects (step 4); what was done, as the end of a reply."""
        back = job.running or change.before
        reason = f"version {change.after} did not go live: {why}"[:MAX_TEXT * 2]
        try:
            if self.store.active(job.sku) != change.after:
                return f"the link was moved meanwhile (now {self.store.active(job.sku)}), so it is left as it is"
            if back is None or back == change.after:
                return "no other version to go back to"
            if job.op == "activate" and change.before == back:
                self.store.rollback(job.sku, actor=job.actor, reason=reason)
            else:
                self.store.activate(job.sku, back, actor=job.actor, reason=reason)
        except InspectorError as exc:
            return (f"swapping the link back to {back} failed too ({exc}); run `inspector sku activate --sku "
                    f"{job.sku} {back}`")
        return f"version {back} is active again"


def check_command(op: str, command: dict[str, Any]) -> tuple[str, str | None, str, str]:
    """The shape of an activate or rollback command: (sku, version (None for a rollback), operator, reason);
    DataError (one line) saying what is wrong. The station page checks it too, before the daemon is involved."""
    name, version = command.get("sku"), command.get("version") if op == "activate" else None
    if not isinstance(name, str) or (op == "activate" and not isinstance(version, str)):
        wanted = '{"sku": NAME, "version": ID}' if op == "activate" else '{"sku": NAME}'
        raise DataError(f"{op} needs {wanted} (the command `versions` lists a SKU's versions)")
    texts = []
    for key in ("operator", "reason"):
        value = command.get(key, "")
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise DataError(f'{op}: "{key}" must be a string of at most {MAX_TEXT} characters')
        texts.append(value)
    return name, version, texts[0], texts[1]
